#!/usr/bin/env bash
# A drafter trained on one lent GPU machine with the target in torch (bench/gpu/README.md, "Training there"), in the
# background, so that each call only starts or watches it. Before `start`, trips bring the target (and the drafter to
# start from, if any) in parts into $PARTS: NAME.part-aa, NAME.part-ab, ... and SHA256SUMS of the whole files.
#
#   bash bench/gpu/train.sh start       joins the parts into build/gpu/models (checked against SHA256SUMS), unpacks
#                                       the answers kept in $DATA when the card holds their features too (OLD), and
#                                       runs `run.sh torchtrain` until TRAIN_SECONDS from now on the answers to
#                                       MAX_ANSWERS prompts of $TODO that no kept set ($KEPT) has answered
#   bash bench/gpu/train.sh watch [S]   waits up to S seconds (default 540) for the end; then into $OUT: the drafter
#                                       in 16 MB parts, all the answers (index.json.gz, tokens.i32.xz) and train.log
set -uo pipefail
PARTS=${PARTS:-/root/parts}
BUILD=build/gpu
LOG=/root/train.log
DATA=${DATA:-bench/train/data/coder-algorithms}  # answers kept from an earlier run (index.json.gz, tokens.i32.xz)
KEPT=${KEPT:-$(echo bench/train/data/coder*/)}  # every kept set: their prompts are not answered again
TODO=${TODO:-bench/train/data/coder/todo-exercises.pkl.xz}  # prompts to answer (gpu_train.py --tokenize-to's, xz)
MAX_ANSWERS=${MAX_ANSWERS:-22000}  # float8 features of some 47 GB: what an H100 holds beside the training
TRAIN_SECONDS=${TRAIN_SECONDS:-900}
ANSWER_SECONDS=${ANSWER_SECONDS:-200}
OLD=${OLD:-}  # 1: train on the kept answers too (default: where the card has room for their features, 46 GB)
# the recipe of the coder's shipped drafter, started from its weights (INIT) at half its learning rate
TRAIN_ARGS=${TRAIN_ARGS:---layers 3 --ffn 1536 --batch 16 --anchors 32 --lr 5e-4 --checkpoint-every 500}

start() {
    mkdir -p "$BUILD/models"
    local name init=
    for name in $(find "$PARTS" -name '*.part-*' -printf '%f\n' | sed 's/\.part-.*//' | sort -u); do
        cat "$PARTS/$name".part-* > "$BUILD/models/$name"
        [[ $name == *dflash* ]] && init=$BUILD/models/$name
    done
    (cd "$BUILD/models" && sha256sum -c "$PARTS/SHA256SUMS") || exit 1
    [ -n "$OLD" ] || OLD=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | awk '{print ($1 > 100000)}')
    if [ "$OLD" = 1 ]; then
        DATA=$DATA bash bench/gpu/run.sh data || exit 1
    fi
    mkdir -p "$BUILD/data"
    # the prompts of TODO that no kept data set has answered, MAX_ANSWERS of them (the card holds their features)
    python3 - "$TODO" "$BUILD/todo-now.pkl" "$MAX_ANSWERS" $KEPT <<'PY' || exit 1
import gzip, json, lzma, pickle, sys
src, dst, n, *kept = sys.argv[1:]
done = {s["key"] for d in kept for s in json.load(gzip.open(f"{d}/index.json.gz"))["sequences"]}
todo, skipped, eog = pickle.load(lzma.open(src))
todo = [t for t in todo if t[0] not in done][:int(n)]
pickle.dump((todo, skipped, eog), open(dst, "wb"))
print(f"{len(todo)} prompts of {src} not answered in {' '.join(kept)}")
PY
    # the drafter joined here is the one to start from, and is replaced by the one trained
    [ -z "$init" ] || mv "$init" /root/init.gguf
    echo "OLD=$OLD, training until $(date -d "+$TRAIN_SECONDS seconds" +%T)"
    (DEADLINE=$(($(date +%s) + TRAIN_SECONDS)) TODO=$BUILD/todo-now.pkl \
        TRAIN_ARGS="${init:+--init /root/init.gguf} $TRAIN_ARGS --answer-seconds $ANSWER_SECONDS" \
        setsid bash bench/gpu/run.sh torchtrain < /dev/null > "$LOG" 2>&1 &)
    sleep 10 && tail -3 "$LOG"
}

watch() {
    local i drafter
    for ((i = 0; i < ${1:-540}; i += 5)); do
        pgrep -f gpu_train.py > /dev/null || break
        sleep 5
    done
    tail -c 2500 "$LOG"
    echo
    pgrep -f gpu_train.py > /dev/null && { echo "still training: watch again"; return; }
    drafter=$(find "$BUILD/models" -name '*-dflash.gguf' | head -1)
    [ -n "$drafter" ] || { echo "no drafter was written"; return 1; }
    sha256sum "$drafter" && split -b 16000000 "$drafter" "$OUT/$(basename "$drafter").part-"
    gzip -c "$BUILD/data/index.json" > "$OUT/index.json.gz"
    xz -T0 -c "$BUILD/data/tokens.i32" > "$OUT/tokens.i32.xz"
    cp "$LOG" "$OUT/train.log"
    ls -l "$OUT"
}

case ${1:-} in
    start | watch) "$@" ;;
    *) echo "usage: bash bench/gpu/train.sh start | watch [SECONDS]" >&2; exit 2 ;;
esac
