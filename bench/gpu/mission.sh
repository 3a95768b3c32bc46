#!/usr/bin/env bash
# Issue 26 on one lent GPU machine: build llama.cpp and dflash-local, write the mission shapes, then every measurement
# of bench/gpu/README.md ("Mission shapes") back to back, in the background, so that no call waits on another and
# the GPU never idles between them.
#
#   bash bench/gpu/mission.sh start        first call: copies this tree to $WORK and runs from there (setsid), since
#                                           each call's tree replaces the one before
#   bash bench/gpu/mission.sh watch [S]    later calls: waits up to S seconds (default 540) for the end, prints the
#                                           logs' tails and packs the results into $OUT/mission.tgz
#
# Results go to $RES, not $OUT: the lent machines empty $OUT at the start of every call.
set -uo pipefail
WORK=${WORK:-/root/w}
RES=${RES:-/root/mission}
SHAPES=${SHAPES:-/root/shapes}
N27=${N27:-4}  # prompts of the 27B's emulated runs (their trial passes take some 25 s each)
DRAFTER_TYPES=${DRAFTER_TYPES-q4_k:qwen35-27b f16:qwen35-27b f16:qwen3-8b}  # drafters written in other types: TYPE:SHAPE
ONLY=${ONLY:-.}  # a regex: only the measurements whose names match it (e.g. 'qwen35-27b-emulated' to repeat those)
WRITE=${WRITE-qwen3-8b qwen35-27b}  # the shapes written (the measurements of a shape not written fail at once)
AFTER=${AFTER:-}  # a pattern (pgrep -f): measurements wait until no process matches it (a training run on this GPU)
# the coder's folder of a train.sh run on this machine (build/gpu/models, absolute): its measurements compare the drafter
# trained there with the one it started from (/root/init.gguf); unset, they fail at once
CODER_MODELS=${CODER_MODELS:-}
CODER_N=${CODER_N:-64}  # HumanEval prompts of each coder measurement
LOG=$RES/mission.log

start() {
    rm -rf "$WORK" "$RES" && mkdir -p "$RES" && cp -r . "$WORK"
    # the source as a package for bench/shapes.py before dflash-local is installed (convert/ is dflash_local.convert)
    mkdir -p "$WORK/src" && cp -r dflash_local "$WORK/src/" && cp -r convert "$WORK/src/dflash_local/convert"
    # only setsid in the background: a subshell of `cd && setsid ... &` would hold this call's output open till the end
    (cd "$WORK" || exit 1; setsid bash bench/gpu/mission.sh run < /dev/null > "$LOG" 2>&1 &)
    sleep 5 && cat "$LOG"
}

watch() {
    local i
    for ((i = 0; i < ${1:-540}; i += 5)); do
        grep -q "^done" "$LOG" && break
        sleep 5
    done
    cat "$LOG"
    for f in "$RES"/*.log; do
        [ "$f" = "$LOG" ] && continue
        printf -- '--- %s\n' "$f"
        grep -v "^llama\|^load\|^print_info\|^ggml_cuda\|^  Device\|^rounding\|^mismatch" "$f" | tail -8 | cut -c1-240
    done
    tar -czf "$OUT/mission.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"
}

# one measurement: its output in $RES/NAME.log, its rc and times in the main log
measure() {
    local name=$1 limit=$2
    shift 2
    [[ $name =~ $ONLY ]] || return 0
    echo "=== $name $(date +%T)"
    timeout "$limit" "$@" > "$RES/$name.log" 2>&1
    echo "rc $? $(date +%T)"
}

run() {
    export PYTHONUNBUFFERED=1
    echo "start $(date +%T)"
    trap 'echo "done $(date +%T)"' EXIT  # however the run ends, so that watch stops waiting
    bash bench/gpu/run.sh deps > "$RES/build.log" 2>&1 || { echo "deps failed"; exit 1; }
    # the shapes are one Python process each; the build takes the cores meanwhile. Each drafter type but Q8_0 goes in
    # a folder of its own, $SHAPES-<type>, beside a link to the same target (found by the name next to it)
    (export PYTHONPATH=$WORK/src
     set -e
     [[ " $WRITE " != *" qwen3-8b "* ]] ||
         python3 bench/shapes.py --shape qwen3-8b --out "$SHAPES" --context-prompts 1024,8192,32768
     [[ " $WRITE " != *" qwen35-27b "* ]] || python3 bench/shapes.py --shape qwen35-27b --out "$SHAPES" --context-prompts 1024
     for dt in $DRAFTER_TYPES; do
         mkdir -p "$SHAPES-${dt%:*}" && ln -f "$SHAPES/${dt#*:}.Q4_K_M.gguf" "$SHAPES-${dt%:*}/"
         python3 bench/shapes.py --shape "${dt#*:}" --out "$SHAPES-${dt%:*}" --drafter-type "${dt%:*}"
     done) > "$RES/shapes.log" 2>&1 &
    local shapes=$!
    CMAKE_ARGS="-DGGML_CUDA_NCCL=OFF ${CMAKE_ARGS:-}" bash bench/gpu/run.sh lcp dflash >> "$RES/build.log" 2>&1
    echo "build rc $? $(date +%T)"
    wait $shapes
    echo "shapes rc $? $(date +%T)"
    if [ -n "$AFTER" ]; then
        while pgrep -f "$AFTER" > /dev/null; do sleep 2; done
        echo "no process matches $AFTER $(date +%T)"
    fi
    local t8=$SHAPES/qwen3-8b.Q4_K_M.gguf t27=$SHAPES/qwen35-27b.Q4_K_M.gguf
    local gpu=(-ngl 99 --device CUDA0)
    local chain=(--block-sizes 16 --fixed --tree-size 0 "${gpu[@]}")
    # in the order of what is least known. First the 27B's emulated run at tau 7.7 (512 tokens, so that a prompt's last
    # pass, capped by the token budget, weighs little in tau) with its drafter in Q8_0, Q4_K and float16 (3.18x at tau
    # 7.68 on 2026-12-07 in Q8_0, at the bound), the 27B's pass costs with a 16k context;
    # then its run at tau 3.4, the 8B's pass costs and its emulated runs at 1k, 8k and 32k, both shapes against
    # upstream, the float16 drafters' pass costs (a drafter type not written: its runs fail at once)
    # one emulated run of the 27B: NAME DRAFTER TAU
    emulated_27b() {
        measure "$1" 480 python3 -P -m dflash_local bench "$t27" -d "$2" --prompts "$SHAPES/prompts-ctx1024.jsonl" \
            -n "$N27" --max-tokens 512 -c 1552 "${chain[@]}" --emulate-acceptance "bench/profiles/tau-$3.json" \
            --json "$RES/$1.json"
    }
    # the pass costs of NAME: TARGET DRAFTER [FLAGS]
    pass_costs() {
        local name=$1 target=$2 drafter=$3
        shift 3
        measure "$name" 240 python3 -P bench/pass_costs.py "$target" "$drafter" "${gpu[@]}" "$@" --json "$RES/$name.json"
    }
    emulated_27b qwen35-27b-emulated-tau7.7-ctx1024 "${t27%.gguf}-dflash.gguf" 7.7
    emulated_27b qwen35-27b-drafter-q4_k-emulated-tau7.7-ctx1024 "$SHAPES-q4_k/qwen35-27b.Q4_K_M-dflash.gguf" 7.7
    pass_costs pass-costs-qwen35-27b-ctx16k "$t27" "${t27%.gguf}-dflash.gguf" --ctx-size 16384
    pass_costs pass-costs-qwen35-27b-ctx16k-drafter-q4_k "$t27" "$SHAPES-q4_k/qwen35-27b.Q4_K_M-dflash.gguf" \
        --ctx-size 16384
    emulated_27b qwen35-27b-drafter-f16-emulated-tau7.7-ctx1024 "$SHAPES-f16/qwen35-27b.Q4_K_M-dflash.gguf" 7.7
    emulated_27b qwen35-27b-emulated-tau3.4-ctx1024 "${t27%.gguf}-dflash.gguf" 3.4
    # upstream llama.cpp (llama-speculative-simple, llama-bench), built once, only for a measurement that runs
    local upstream_built=
    upstream() {
        [[ $1 =~ $ONLY ]] && [ -z "$upstream_built" ] || return 0
        bash bench/gpu/run.sh upstream >> "$RES/build.log" 2>&1
        echo "upstream rc $? $(date +%T)"
        upstream_built=1
    }
    # llama.cpp's own pass of k tokens against one (llama-bench: no dflash-local code in the passes): NAME MODEL
    llama_bench() {
        upstream "$1"
        measure "$1" 240 python3 -P bench/llama_bench.py build/gpu/upstream/llama-bench "$2" --json "$RES/$1.json"
    }
    pass_costs pass-costs-qwen3-8b "$t8" "${t8%.gguf}-dflash.gguf"
    llama_bench llama-bench-qwen3-8b "$t8"
    local tau c n
    for tau in 7.7 3.4; do
        for c in 1024 8192 32768; do
            n=4 && [ $c = 32768 ] && n=2
            measure qwen3-8b-emulated-tau$tau-ctx$c 240 python3 -P -m dflash_local bench "$t8" \
                --prompts "$SHAPES/prompts-ctx$c.jsonl" -n $n --max-tokens 256 -c $((c + 272)) "${chain[@]}" \
                --emulate-acceptance "bench/profiles/tau-$tau.json" --json "$RES/qwen3-8b-emulated-tau$tau-ctx$c.json"
        done
    done
    # the coder's drafters on HumanEval: as `dflash run` drafts (adaptive), the newly trained and the one it started
    # from one after the other; then the new one's chains and trees of 15 every pass (tau as bench/train/tau.py has it)
    local coder=$CODER_MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf new=$CODER_MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m-dflash.gguf
    coder_bench() {
        local name=$1 drafter=$2
        shift 2
        measure "$name" 300 python3 -P -m dflash_local bench "$coder" -d "$drafter" --prompts humaneval --block-sizes 16 \
            "${gpu[@]}" "$@" --json "$RES/$name.json"
    }
    coder_bench coder-new-humaneval$CODER_N "$new" -n "$CODER_N"
    coder_bench coder-init-humaneval$CODER_N /root/init.gguf -n "$CODER_N"
    coder_bench coder-new-humaneval$CODER_N-fixed-chain "$new" -n "$CODER_N" --max-tokens 128 --fixed --tree-size 0
    coder_bench coder-new-humaneval$CODER_N-fixed-tree15 "$new" -n "$CODER_N" --max-tokens 128 --fixed --tree-size 15
    pass_costs coder-pass-costs "$coder" "$new"
    llama_bench coder-llama-bench "$coder"
    # HumanEval-like exercises the coder writes, as prompts for its drafter's next training run (kept as they come)
    measure coder-write-exercises 480 python3 -P bench/train/write_problems.py "$coder" -n "${EXERCISES:-8000}" \
        --parallel 256 --n-gpu-layers 99 -o "$RES/exercises.jsonl"
    measure coder-path-injection 120 python3 -P bench/path_injection.py "$coder" "$new" "${gpu[@]}" \
        --json "$RES/coder-path-injection.json"
    for t in 15 62; do
        measure coder-tree$t-picks 120 python3 -P bench/tree_picks.py "$coder" "$new" "${gpu[@]}" --tree-size $t \
            --json "$RES/coder-tree$t-picks.json"
    done
    local t name
    for t in "$t27" "$t8"; do
        name=$(basename "$t" .Q4_K_M.gguf)-random-drafter-vs-llama-cpp
        upstream "$name"
        measure "$name" 240 python3 -P -m dflash_local bench "$t" \
            --prompts "$SHAPES/prompts-ctx1024.jsonl" -n 2 --max-tokens 64 -c 1280 --block-sizes 16 --fixed \
            --tree-size 0 "${gpu[@]}" --compare-llama-cpp build/gpu/upstream --json "$RES/$name.json"
    done
    pass_costs pass-costs-qwen35-27b-ctx16k-drafter-f16 "$t27" "$SHAPES-f16/qwen35-27b.Q4_K_M-dflash.gguf" \
        --ctx-size 16384
    pass_costs pass-costs-qwen3-8b-drafter-f16 "$t8" "$SHAPES-f16/qwen3-8b.Q4_K_M-dflash.gguf"
}

case ${1:-} in
    start | watch | run) "$@" ;;
    *) echo "usage: bash bench/gpu/mission.sh start | watch [SECONDS]" >&2; exit 2 ;;
esac
