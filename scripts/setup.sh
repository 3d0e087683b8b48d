#!/usr/bin/env bash
# Create .venv (if missing) and install effkernels into it, editable, with the dev and train extras
# and the C++/CUDA extension. Idempotent; every other script calls it first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
V=.venv/bin
# --no-build-isolation (needed to build against the installed torch) wants setuptools and wheel here.
$V/python -m pip install -q --upgrade pip setuptools wheel ninja
# torch first, pinned to the release the project is tested with (2.14.1, CUDA 13.0 build; Triton 3.8
# comes with it); the package itself accepts torch>=2.5,<2.15.
$V/python -m pip install -q "torch==2.14.1"
# The nvcc on PATH may be a wrapper script, from which torch guesses CUDA_HOME wrongly and the link
# fails with "cannot find -lcudart": name the toolkit's own folder when there is one.
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-2}
$V/python -m pip install -q --no-build-isolation -e ".[dev,train]"
