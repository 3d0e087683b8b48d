#!/bin/sh
# nvcc with its stderr (where -Xptxas -v reports registers and spills) also appended to
# $EFFKERNELS_PTXAS_LOG; csrc/build_ext.py points PYTORCH_NVCC here. Exit status is nvcc's.
tmp=$(mktemp)
# EFFKERNELS_REAL_NVCC may be several words (e.g. "ccache nvcc"): left unquoted on purpose.
$EFFKERNELS_REAL_NVCC "$@" 2>"$tmp"
rc=$?
cat "$tmp" >&2
[ -n "$EFFKERNELS_PTXAS_LOG" ] && cat "$tmp" >>"$EFFKERNELS_PTXAS_LOG"
rm -f "$tmp"
exit $rc
