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
# The install is editable, so Python changes need no reinstall; only the build inputs and the build
# switches do. Skip the (minutes-long) rebuild when the inputs are unchanged since the last install
# and that install has at least the parts asked for now: CUDA kernels (unless EFFKERNELS_BUILD_CUDA=0
# or no nvcc) and the CUDA simulator (unless EFFKERNELS_BUILD_SIM=0). So scripts/main.sh, which
# asks for neither on a machine without a GPU, keeps a full install that scripts/test.sh made.
stamp=$($V/python - <<'PY'
import hashlib, os, pathlib
h = hashlib.sha256()
for f in sorted([pathlib.Path("pyproject.toml"), pathlib.Path("setup.py"), *pathlib.Path("csrc").rglob("*")]):
    if f.is_file() and "__pycache__" not in f.parts:
        h.update(str(f).encode() + f.read_bytes())
for k in sorted(os.environ):
    if k in ("EFFKERNELS_BUILD_EXT", "EFFKERNELS_CUDA_ARCHS", "CUDA_HOME"):
        h.update(f"{k}={os.environ[k]}".encode())
home = os.environ.get("CUDA_HOME", "")
cuda = int(os.environ.get("EFFKERNELS_BUILD_CUDA", "1") != "0" and os.path.exists(os.path.join(home, "bin", "nvcc")))
sim = int(os.environ.get("EFFKERNELS_BUILD_SIM", "1") != "0")
print(h.hexdigest(), cuda, sim)
PY
)
read -r want_hash want_cuda want_sim <<< "$stamp"
have_hash="" have_cuda=0 have_sim=0
[ -f .venv/.effkernels-install ] && read -r have_hash have_cuda have_sim < .venv/.effkernels-install
if [ "$have_hash" = "$want_hash" ] && [ "${have_cuda:-0}" -ge "$want_cuda" ] && [ "${have_sim:-0}" -ge "$want_sim" ] \
    && $V/python -c "import effkernels" 2>/dev/null; then
  echo "setup: .venv is up to date (rm .venv/.effkernels-install to force a reinstall)"
else
  $V/python -m pip install -q --no-build-isolation -e ".[dev,train,encoders,lpips,vae,inception]"
  echo "$stamp" > .venv/.effkernels-install
fi
