#!/usr/bin/env bash
# The main job: train the SiT baseline on scikit-learn's digits with the default short budget, print
# the final Frechet distance and class accuracy of EMA samples, write the sample grid and curves
# (under runs/digits/). Extra arguments go to effkernels-train (e.g. --steps 500 --out runs/quick).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m effkernels
.venv/bin/effkernels-train "$@"
