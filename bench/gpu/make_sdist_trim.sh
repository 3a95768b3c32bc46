#!/usr/bin/env bash
# A trimmed llama-cpp-python sdist (~8 MB instead of 73) that still builds the Python package with
# the CPU and CUDA backends, and upstream's llama-speculative-simple through bench/build_llama_cpp.sh,
# so the build can be carried to a machine with no package registry. Dropped: models, docs, tests,
# media, tools and examples we do not build, the conversion scripts, and the sources of the other
# GPU backends (Vulkan, SYCL, OpenCL, Metal, ...). Kept: CMake files, ggml (CPU, CUDA, BLAS, RPC,
# HIP/MUSA glue), src, include, common, vendor, tools/mtmd (the package builds it by default),
# tools/llama-bench and examples/speculative-simple.
#
#   bench/gpu/make_sdist_trim.sh [SDIST.tar.gz] [OUT_DIR]
#
# SDIST defaults to llama-cpp-python==0.3.36 fetched with pip; OUT_DIR to bench/gpu/bundle. The result
# keeps the sdist's name (llama_cpp_python-0.3.36.tar.gz), so pip takes it as that version.
set -euo pipefail

src=${1:-}
out=$(realpath -m "${2:-bench/gpu/bundle}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -z "$src" ]; then
    pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$work"
    src=$(ls "$work"/llama_cpp_python-*.tar.gz)
fi
name=$(basename "$src" .tar.gz)
mkdir "$work/x"
tar -xzf "$src" -C "$work/x"
root="$work/x/$name"
[ -d "$root/vendor/llama.cpp" ] || { echo "$src is not a llama-cpp-python sdist" >&2; exit 1; }

cd "$root"
rm -rf .git .github docs docker examples tests
cd vendor/llama.cpp
rm -rf models docs media tests benches gguf-py conversion scripts pocs app grammars skills requirements \
       ci licenses .github .devops
find tools -mindepth 1 -maxdepth 1 ! -name mtmd ! -name llama-bench -exec rm -rf {} +
find examples -mindepth 1 -maxdepth 1 ! -name speculative-simple -exec rm -rf {} +
for b in vulkan sycl opencl hexagon metal et webgpu openvino cann virtgpu zdnn zendnn kompute; do
    rm -rf "ggml/src/ggml-$b"
done

mkdir -p "$out"
tar -czf "$out/$name.tar.gz" -C "$work/x" "$name"
echo "wrote $out/$name.tar.gz ($(du -h "$out/$name.tar.gz" | cut -f1))"
