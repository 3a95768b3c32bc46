#!/usr/bin/env bash
# Build upstream llama.cpp's llama-speculative-simple (the DFlash comparison of `dflash bench
# --compare-llama-cpp`) and llama-bench (llama.cpp's own cost of a pass, bench/llama_bench.py) from
# the llama.cpp vendored in the pinned llama-cpp-python sdist, so both sides run the same llama.cpp.
# Works on the trimmed sdist of bench/gpu/make_sdist_trim.sh too: a small wrapper project adds
# llama.cpp and only these two programs.
#
#   bench/build_llama_cpp.sh [SDIST.tar.gz | SOURCE_DIR] [OUT_DIR]
#
# SDIST defaults to llama-cpp-python==0.3.36 fetched with pip; OUT_DIR to build/llama.cpp-upstream
# (the build tree stays in OUT_DIR/build, so an interrupted build resumes).
# Environment: GGML_CUDA=on for CUDA, CMAKE_CUDA_ARCHITECTURES (default 90: H100/H200), JOBS (default:
# all cores), EXTRA_CMAKE_ARGS.
set -euo pipefail

src=${1:-}
out=$(realpath -m "${2:-build/llama.cpp-upstream}")
jobs=${JOBS:-$(nproc)}
mkdir -p "$out"

if [ -z "$src" ]; then
    pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$out"
    src=$(ls "$out"/llama_cpp_python-*.tar.gz)
fi
if [ -f "$src" ]; then
    # unpacked once: fresh timestamps would make a resumed build start over (delete OUT/src to redo)
    if [ ! -f "$out/src/pyproject.toml" ]; then
        mkdir -p "$out/src"
        tar -xzf "$src" -C "$out/src" --strip-components=1
    fi
    src="$out/src"
fi
llama=$(realpath "$src/vendor/llama.cpp")
[ -f "$llama/examples/speculative-simple/speculative-simple.cpp" ] \
    || { echo "no vendor/llama.cpp/examples/speculative-simple in $src" >&2; exit 1; }

mkdir -p "$out/wrapper"
cat > "$out/wrapper/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.14)
project(llama-cpp-upstream C CXX)
add_subdirectory("$llama" llama.cpp)
add_subdirectory("$llama/examples/speculative-simple" speculative-simple)
add_subdirectory("$llama/tools/llama-bench" llama-bench)
CMAKE

args=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_OPENSSL=OFF
      -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$out/build/bin")
if [ "${GGML_CUDA:-off}" = "on" ]; then
    args+=(-DGGML_CUDA=on "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}")
fi
# shellcheck disable=SC2206
args+=(${EXTRA_CMAKE_ARGS:-})

cmake -S "$out/wrapper" -B "$out/build" "${args[@]}"
cmake --build "$out/build" --config Release --target llama-speculative-simple llama-bench -j "$jobs"
cp "$out/build/bin/llama-speculative-simple" "$out/build/bin/llama-bench" "$out/"
echo "built $out/llama-speculative-simple and $out/llama-bench"
