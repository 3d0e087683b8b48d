#!/usr/bin/env bash
# The main job: the method comparison on scikit-learn's digits (embedded, no download). Trains every
# registered method (sit, tread, maskdit with its unmasked fine-tune, repa, erw, sra, ct, act) for the
# same short budget (500 steps of batch 64, one seed, FD/accuracy of 500 EMA samples every 125 steps),
# prints the table (throughput and FLOPs ratios to SiT, FD/accuracy at equal steps, steps and seconds
# to reach SiT's FD) and writes it with the plots under runs/main/ (convergence.{md,csv,json,png}).
# Budget: 4 to 5 minutes on 2 quiet CPU cores (2026-12-07, two 1-thread runs at a time); a fresh clone
# about 6 minutes in all (setup: venv, torch, the C++ build), the first run on a machine half a minute
# more (it fits and caches the metric's classifier and REPA's digits encoder). Progress:
# a line as each run starts and ends, with the job's ETA (--quiet: only the table).
#
#   scripts/main.sh                                   # the comparison above
#   scripts/main.sh --seeds 3 --steps 1000            # options of bench/convergence.py (--help)
#   scripts/main.sh --method NAME [args]              # train one method: effkernels-train --method NAME [args]
#                                                     # (e.g. --method sit --out runs/digits: the old main job)
set -euo pipefail
cd "$(dirname "$0")/.."
# The main job needs neither the CUDA simulator (a test tool) nor, without a GPU, the CUDA kernels:
# a first run builds only what it uses (the C++ CPU paths here), minutes less; an install that has
# more (scripts/test.sh's) is kept as it is.
export EFFKERNELS_BUILD_SIM=${EFFKERNELS_BUILD_SIM:-0}
if ! nvidia-smi -L >/dev/null 2>&1; then
  export EFFKERNELS_BUILD_CUDA=${EFFKERNELS_BUILD_CUDA:-0}
fi
scripts/setup.sh
.venv/bin/python -m effkernels
for arg in "$@"; do
    if [[ "$arg" == "--method" || "$arg" == --method=* ]]; then
        exec .venv/bin/effkernels-train "$@"
    fi
done
# One torch thread per run, as many runs at once as there are usable cores (--jobs N to change it):
# each run is its own process with fixed seeds, so the numbers equal those of the runs one at a time.
exec .venv/bin/python bench/convergence.py --seeds 1 --steps 500 --evals 4 --out runs/main \
    --threads 1 --jobs auto --title "digits 8x8, tiny/2 (16 tokens), main job" "$@"
