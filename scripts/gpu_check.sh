#!/usr/bin/env bash
# The first GPU hour, prepared: one command for a freshly lent GPU machine.
#
#   scripts/gpu_check.sh OUT_DIR         build the extension for this card, run the GPU-only tests,
#                                        bf16 training steps of every method, the op micro-benchmarks
#                                        and the whole-step bench; at most 8 minutes, build included
#   scripts/gpu_check.sh --dry OUT_DIR   the same steps' code on CPU tensors at tiny sizes (seconds),
#                                        so that the GPU's minutes are not spent on a typo
#   options: --only STEP,...  --budget STEP=SECONDS (lower only); see scripts/gpu_check.py --help
#
# OUT_DIR (empty or new) receives summary.md, summary.json, log.txt, micro.json, bench.json: at most
# 8 files, each under 16 MiB. Exit status: 0 every step passed or was skipped for a stated reason,
# 1 a step failed or timed out, 2 bad arguments or no GPU without --dry.
#
# Time: scripts/gpu_check.py gives every step a budget (its BUDGET_S table) and runs each step's
# commands under `timeout`, within 465 s in all; the `timeout` below is the backstop, so the whole
# run ends within 480 s. The interpreter: $PYTHON, else .venv/bin/python, else python3 (on the
# lent machines, the one that holds torch). Nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v timeout >/dev/null || { echo "gpu_check: error: coreutils 'timeout' is required" >&2; exit 2; }
command -v "$PY" >/dev/null || { echo "gpu_check: error: interpreter '$PY' not found (set PYTHON)" >&2; exit 2; }
timeout -s INT -k 5 475 "$PY" scripts/gpu_check.py --python "$PY" "$@"
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "gpu_check: error: the run reached its 480 s backstop; OUT_DIR holds what was written" >&2
  exit 1
fi
exit "$rc"
