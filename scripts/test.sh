#!/usr/bin/env bash
# The test command: set up (venv, install, build the extension), compile every Triton kernel ahead
# of time for sm_80 and sm_90, then run the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
V=.venv/bin
$V/python -m effkernels
echo "== ahead-of-time compile of every Triton kernel configuration (sm_80, sm_90) =="
$V/python -m effkernels._triton.aot --archs 80,90 --quiet
echo "== pytest =="
$V/python -m pytest tests -q "$@"
