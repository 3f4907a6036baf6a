#!/usr/bin/env bash
# Builds into .whl/ the Python packages a GPU run needs that the offline device image lacks: gemlite 0.6 (the
# pure-Triton W4A16 library bench/gemv4.py compares against; PyPI ships it as a source archive, built here into a
# py3-none-any wheel; its needs numpy, tqdm and triton are in the image), and pytest-xdist with execnet (pure-Python
# wheels) for GPU_TESTS_WORKERS in gpu_check.sh. Run where the package registry is reachable, then name .whl in the
# device call's carry: bench/gpu_check.sh installs whatever .whl holds.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "gemlite==0.6.0.post2"
python -m pip wheel -q --no-deps -w .whl "$tmp"/gemlite-*.tar.gz
python -m pip download -q --no-deps --only-binary=:all: -d .whl "pytest-xdist==3.8.0" "execnet==2.1.2"
ls -la .whl
