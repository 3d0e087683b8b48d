"""The first GPU hour, prepared: build, GPU-only tests, bf16 training steps, micro- and whole-step
benchmarks (our trainer's, and diffusers' transformers patched vs unpatched), in at most 8 minutes, results in at most 8 files. Run through scripts/gpu_check.sh.

    scripts/gpu_check.sh OUT_DIR            # on a GPU machine
    scripts/gpu_check.sh --dry OUT_DIR      # on any machine, CPU tensors, tiny sizes, seconds

Contract:
- Steps run in order (STEPS). Each runs its commands under coreutils `timeout` (SIGINT at the
  step's limit, so pytest still writes what it has, SIGKILL GRACE_S later). A step's limit is the
  smaller of its budget (BUDGET_S) and what is left of the whole run; a step that fails or times
  out is recorded and the next one runs. sum(BUDGET_S) + one GRACE_S per step + RESERVE_S <= TOTAL_S,
  checked at start, so the run ends within TOTAL_S whatever each step does; the shell wrapper's own
  `timeout` (TOTAL_S + 15 s) is the backstop: 480 s in all.
- OUT_DIR must be empty or absent. It receives exactly the files in OUTPUTS (<= 8, each capped
  below 16 MiB), rewritten after every step so that a killed run still leaves a summary.
- Exit status: 0 when every step passed or was skipped for a stated reason (a package that is not
  installed, or --dry), 1 when any step failed or timed out, 2 for bad arguments or no GPU
  without --dry.
- --dry runs every step's code (argument handling, command building, timeouts, parsing, file
  writing) on CPU tensors at tiny sizes; what only a GPU can do is reported as "dry: skipped <why>",
  never estimated. Nothing downloads: the data are the embedded digits or random arrays written here.

This file uses the standard library only: torch is imported by the commands it runs, each under a
timeout, so no import or CUDA initialisation can outlast the budget.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------
# Budgets and sizes (seconds; every number the run depends on is here)
# ------------------------------------------------------------------------------------------------

TOTAL_S = 465  # this program, build included; the wrapper's timeout adds 15 s of backstop: 480 s
RESERVE_S = 10  # writing the outputs after the last step
GRACE_S = 5  # timeout -k: SIGINT at the limit, SIGKILL this much later
STEPS = ("env", "build", "test_ext_gpu", "test_triton_cuda", "test_flash_attn", "train_bf16", "micro",
         "bench_train", "bench_diffusers")
BUDGET_S = {"env": 15, "build": 135, "test_ext_gpu": 20, "test_triton_cuda": 60, "test_flash_attn": 10,
            "train_bf16": 45, "micro": 45, "bench_train": 55, "bench_diffusers": 20}
FALLBACK_BUILD_S = 25  # kept out of the nvcc build's window for a no-extension install if it fails
OUTPUTS = ("summary.md", "summary.json", "log.txt", "micro.json", "bench.json")
MAX_FILES = 8
FILE_CAP = 15 * 2**20  # each output file; the device machine returns files of at most 16 MiB
LOG_CAP = 8 * 2**20  # log.txt in all
CMD_HEAD, CMD_TAIL = 16 * 2**10, 48 * 2**10  # of each command's output kept in log.txt

# The Triton kernel test files, run on CUDA tensors (tests/conftest.py: EFFKERNELS_TEST_DEVICE=cuda).
TRITON_TEST_FILES = ("tests/test_adaln.py", "tests/test_routing.py", "tests/test_align.py",
                     "tests/test_align_proj.py", "tests/test_attention_triton.py", "tests/test_attention.py",
                     "tests/test_nn.py")
MICRO_FILES = ("bench/test_micro_adaln.py", "bench/test_micro_align.py", "bench/test_micro_routing.py",
               "bench/test_micro_attention.py")  # priority order: a timeout keeps the earlier ones
S2 = ["--model", "SiT-S/2", "--input-size", "32", "--channels", "4", "--classes", "1000"]  # 256 px latents
XL2 = ["--model", "SiT-XL/2", "--input-size", "32", "--channels", "4", "--classes", "1000"]
BENCH_METHODS = "sit,tread,maskdit,tread+repa"
# The trainer and the benches never run (or time) Triton's interpreter, whatever the caller set.
NO_INTERPRETER = {"TRITON_INTERPRET": "0", "EFFKERNELS_TEST_DEVICE": ""}


def sizes(dry: bool, gpu_mem_gib: float) -> dict:
    """What each step runs: GPU sizes, or the dry run's tiny CPU ones."""
    if dry:
        return {
            "triton_tests": ["tests/test_attention_triton.py", "-k", "kernel_matches_reference and 32-torch.float32"],
            "train_model": ["--model", "tiny/2"],
            "train_data": {"batch": 4, "classes": 10, "channels": 1, "input_size": 8, "model": "tiny/2"},
            "train_steps": 2, "train_specs": ["tread+repa"], "train_parallel": 1,
            "micro": ["--micro-shapes", "2x16x32", "-k", "route_gather and not compile",
                      "--benchmark-max-time", "0.001", "--benchmark-min-rounds", "1"],
            "bench": [("tiny methods x {auto, reference}",
                       ["--model", "tiny/2", "--methods", "sit,tread", "--backend", "auto,reference", "--batch", "2",
                        "--steps", "1", "--warmup", "0", "--repeats", "1", "--no-memory", "--threads", "1"])],
            "diffusers": ["--heads", "2", "--head-dim", "16", "--depth", "1", "--latent", "8", "--text-tokens", "4",
                          "--batch", "2", "--steps", "1", "--warmup", "0", "--repeats", "1", "--threads", "1"],
            "device": "cpu",
        }
    big = gpu_mem_gib >= 100  # H200 (141 GB) vs H100 (80 GB)
    bs, bxl = ("256", "64") if big else ("128", "32")
    timing = ["--steps", "3", "--warmup", "1", "--repeats", "2"]
    return {
        # deselected: it counts Python-level Tensor.__bool__ calls, which the tests' device mode (a torch
        # function mode, helpers.TestDevice) sees twice; measured with EFFKERNELS_TEST_DEVICE=cpu, where
        # it is the one test of these files that fails under the mode (381 pass)
        "triton_tests": [*TRITON_TEST_FILES, "--deselect", "tests/test_routing.py::test_check_route_index_syncs_once"],
        "train_model": ["--model", "SiT-S/2"],
        "train_data": {"batch": 32, "classes": 1000, "channels": 4, "input_size": 32, "model": "SiT-S/2"},
        "train_steps": 5, "train_specs": None, "train_parallel": 4,  # None: every method and composition
        "micro": ["--micro-shapes", "256x1152", "--benchmark-max-time", "0.05", "--benchmark-min-rounds", "5"],
        # whole-step bench runs in priority order; each gets what is left of the step's window
        "bench": [
            (f"SiT-S/2 methods x {{auto, reference}}, eager, batch {bs}",
             S2 + ["--batch", bs, "--methods", BENCH_METHODS, "--backend", "auto,reference"] + timing),
            (f"SiT-S/2 dense step, eager and compiled, batch {bs}", S2 + ["--batch", bs, "--whole-step", "--compile"] + timing),
            (f"SiT-XL/2 dense step, eager, batch {bxl}", XL2 + ["--batch", bxl, "--whole-step"] + timing),
            (f"SiT-XL/2 methods, eager, batch {bxl}", XL2 + ["--batch", bxl, "--methods", BENCH_METHODS] + timing),
            (f"SiT-S/2 methods, compiled, batch {bs}", S2 + ["--batch", bs, "--methods", BENCH_METHODS, "--compile"] + timing),
            (f"SiT-XL/2 dense step, compiled, batch {bxl}", XL2 + ["--batch", bxl, "--whole-step", "--compile"] + timing),
        ],
        # diffusers' DiT, PixArt, SD3, Flux at DiT-XL width (1152), 2 blocks (Flux: 2 double + 4 single),
        # 256 image tokens, bf16 autocast: unpatched vs apply_effkernels, one short interleaved run
        "diffusers": ["--heads", "16", "--head-dim", "72", "--depth", "2", "--latent", "32", "--text-tokens", "32",
                      "--batch", "16", "--steps", "3", "--warmup", "1", "--repeats", "2"],
        "device": "cuda",
    }


# ------------------------------------------------------------------------------------------------
# Running commands under a deadline
# ------------------------------------------------------------------------------------------------


class Run:
    """The run's state: deadline, log, per-step records; writes OUT_DIR's files."""

    def __init__(self, args):
        self.args, self.dry, self.out, self.py = args, args.dry, args.out_dir, args.python
        self.t0 = time.monotonic()
        self.deadline = self.t0 + TOTAL_S - RESERVE_S
        self.steps: list[dict] = []
        self.env: dict = {}
        self.micro: dict = {"rows": []}
        self.bench: dict = {"runs": []}
        self.log_bytes = 0
        self.tmp = tempfile.mkdtemp(prefix="gpu-check-")
        self.step_deadline = self.deadline
        self.step_name = ""

    # -- commands -----------------------------------------------------------------------------

    def left(self) -> float:
        return min(self.step_deadline, self.deadline) - time.monotonic()

    def cmd(self, argv: list[str], env: dict | None = None, limit: float | None = None,
            what: str = "") -> dict:
        """Run argv under `timeout` within the step's window (and `limit`); output to the log.
        Returns {rc, timed_out, out, s}. Never raises for the command's own failure."""
        t = self.left() if limit is None else min(limit, self.left())
        if t < 1:
            self.log(f"== {self.step_name}: not run (no time left in the step's window): {shlex.join(argv)}\n")
            return {"rc": None, "timed_out": True, "out": "", "s": 0.0, "not_run": True}
        full = ["timeout", "-s", "INT", "-k", str(GRACE_S), f"{t:.1f}", *argv]
        e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        start = time.monotonic()
        p = subprocess.run(full, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, check=False)
        s = time.monotonic() - start
        out = p.stdout.decode("utf-8", "replace")
        timed_out = p.returncode in (124, 137)  # timeout's own codes: SIGINT sent, or SIGKILL after GRACE_S
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        self.log(f"== {self.step_name}{' ' + what if what else ''}: {shown + ' ' if shown else ''}{shlex.join(argv)}\n"
                 f"   rc={p.returncode}{f' (timed out at {t:.0f} s)' if timed_out else ''}, {s:.1f} s\n", out)
        return {"rc": p.returncode, "timed_out": timed_out, "out": out, "s": s}

    def python(self, code: str, env: dict | None = None, what: str = "") -> tuple[dict, dict | None]:
        """Run a Python snippet that prints one line 'GPU_CHECK_JSON {...}'; (result, that JSON or None)."""
        r = self.cmd([self.py, "-c", code], env=env, what=what)
        for line in reversed(r["out"].splitlines()):
            if line.startswith("GPU_CHECK_JSON "):
                return r, json.loads(line[len("GPU_CHECK_JSON "):])
        return r, None

    # -- the log and the output files ----------------------------------------------------------

    def log(self, head: str, body: str = "") -> None:
        if len(body) > CMD_HEAD + CMD_TAIL:
            cut = len(body) - CMD_HEAD - CMD_TAIL
            body = body[:CMD_HEAD] + f"\n[... {cut} characters cut ...]\n" + body[-CMD_TAIL:]
        text = head + body + ("\n" if body and not body.endswith("\n") else "")
        room = LOG_CAP - self.log_bytes
        if room <= 0:
            return
        data = text.encode()
        if len(data) > room:
            data = data[: max(0, room - 64)] + b"\n[log.txt reached its cap; later output dropped]\n"
        with open(os.path.join(self.out, "log.txt"), "ab") as f:
            f.write(data)
        self.log_bytes += len(data)

    def write(self) -> None:
        """summary.md, summary.json, micro.json, bench.json (log.txt is appended as it goes)."""
        summary = {"mode": "dry (CPU tensors, tiny sizes)" if self.dry else "gpu", "machine": self.env,
                   "total_s": round(time.monotonic() - self.t0, 1), "limit_s": TOTAL_S + 15,
                   "steps": self.steps, "exit_code": self.exit_code()}
        files = {"summary.json": json.dumps(summary, indent=1, default=str),
                 "micro.json": json.dumps({**self.micro, "machine": self.env}, indent=1, default=str),
                 "bench.json": json.dumps({**self.bench, "machine": self.env}, indent=1, default=str),
                 "summary.md": render(summary, self.micro, self.bench)}
        for name, text in files.items():
            data = text.encode()
            if len(data) > FILE_CAP:
                data = data[:FILE_CAP] + b"\n[truncated at the file cap]\n"
            tmp = os.path.join(self.out, f".{name}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(self.out, name))

    def exit_code(self) -> int:
        return 0 if all(s["status"] in ("passed", "skipped", "dry-skipped") for s in self.steps) else 1


def junit(path: str) -> dict:
    """Counts and failing test ids from pytest's --junitxml file."""
    if not os.path.exists(path):
        return {"error": "no junit file (pytest was stopped before it wrote one)"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    failed, skips = [], {}
    for case in suite.iter("testcase"):
        cid = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            el = case.find("failure") if case.find("failure") is not None else case.find("error")
            failed.append({"test": cid, "message": (el.get("message") or "")[:300]})
        sk = case.find("skipped")
        if sk is not None:
            why = (sk.get("message") or "")[:200]
            skips[why] = skips.get(why, 0) + 1
    n["failed_tests"] = failed[:50]
    n["skip_reasons"] = skips
    return n


def pytest_step(run: Run, argv: list[str], env: dict, name: str) -> tuple[str, str, dict]:
    """Run pytest with a junit file; (status, reason, details)."""
    xml = os.path.join(run.tmp, f"{name}.xml")
    r = run.cmd([run.py, "-m", "pytest", *argv, "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={xml}"],
                env=env)
    d = junit(xml)
    d["command"] = shlex.join(["pytest", *argv])
    if r["timed_out"]:
        return "timeout", f"stopped at the step's limit; {_counts(d)}", d
    if r["rc"] == 0 and d.get("tests", 0) and d["skipped"] == d["tests"]:
        return "skipped", "every test skipped: " + "; ".join(d["skip_reasons"]), d
    if r["rc"] == 0:
        return "passed", _counts(d), d
    return "failed", f"pytest exit {r['rc']}; {_counts(d)}", d


def _counts(d: dict) -> str:
    if "error" in d:
        return d["error"]
    return f"{d['passed']} passed, {d['failures'] + d['errors']} failed, {d['skipped']} skipped"


# ------------------------------------------------------------------------------------------------
# The steps: each returns (status, reason, details)
# ------------------------------------------------------------------------------------------------

ENV_PY = r"""
import json, os, platform, shutil, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable, "cores": os.cpu_count(),
        "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(0)),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
except Exception as e:
    info["torch_error"] = f"{type(e).__name__}: {e}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = f"not importable ({type(e).__name__})"
def first_line(cmd, pick=None):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except Exception as e:
        return f"{type(e).__name__}"
    lines = [l for l in out.splitlines() if (pick is None or pick in l)]
    return lines[0].strip() if lines else None
if shutil.which("nvidia-smi"):
    info["driver"] = first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
nvcc = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")
nvcc = nvcc if os.path.exists(nvcc) else shutil.which("nvcc")
info["nvcc"] = first_line([nvcc, "--version"], "release") if nvcc else None
import importlib.util
info["flash_attn_installed"] = importlib.util.find_spec("flash_attn") is not None
info["pytest_xdist"] = importlib.util.find_spec("xdist") is not None
import sysconfig
info["scripts"] = sysconfig.get_path("scripts")
print("GPU_CHECK_JSON " + json.dumps(info))
"""

PROBE_PY = r"""
import json
import effkernels
from effkernels import backends
ok, why = backends.extension_status()
try:
    from effkernels import _C
    archs = getattr(_C, "CUDA_ARCHS", "")
except Exception:
    archs = ""
print("GPU_CHECK_JSON " + json.dumps({"effkernels": effkernels.__version__, "extension": why,
      "extension_cuda": backends.extension_has_cuda(), "archs": archs, "triton": backends.triton_status()[1],
      "flash_attn": backends.flash_attn_status()[1]}))
"""


def step_env(run: Run) -> tuple[str, str, dict]:
    r, info = run.python(ENV_PY)
    if info is None:
        return "failed", f"the environment probe did not finish (rc {r['rc']})", {}
    run.env.update(info)
    if "torch_error" in info:
        return "failed", f"torch does not import: {info['torch_error']}", info
    gpu = info.get("gpu") or "none"
    return "passed", f"{gpu}; torch {info['torch']}, CUDA {info.get('cuda_runtime')}, triton {info.get('triton')}", info


def archs_for(capability) -> str:
    """EFFKERNELS_CUDA_ARCHS for a device of compute capability (major, minor): its arch alone."""
    major, minor = (int(v) for v in capability)
    return f"{major}.{minor}"


def build_stamp(archs: str) -> str:
    """Hash of the extension's build inputs and target archs (setup.sh hashes the same inputs)."""
    h = hashlib.sha256(archs.encode())
    files = [os.path.join(ROOT, "pyproject.toml"), os.path.join(ROOT, "setup.py")]
    for d, _, names in os.walk(os.path.join(ROOT, "csrc")):
        files += [os.path.join(d, n) for n in names if "__pycache__" not in d]
    for f in sorted(files):
        if os.path.isfile(f):
            h.update(os.path.relpath(f, ROOT).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def step_build(run: Run) -> tuple[str, str, dict]:
    jobs = str(run.env.get("cores") or os.cpu_count() or 1)
    pip = [run.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."]
    if run.dry:
        archs = "<major.minor of torch.cuda.get_device_capability()>"
        would = f"EFFKERNELS_CUDA_ARCHS={archs} MAX_JOBS={jobs} EFFKERNELS_BUILD_SIM=0 {shlex.join(pip)}"
        r, probe = run.python(PROBE_PY, what="(probe of the existing install)")
        if probe is None:
            return "failed", f"effkernels does not import from {run.py} (rc {r['rc']}); see log.txt", {"would_run": would}
        return ("dry-skipped", (f"dry: skipped the nvcc build (no GPU; would run {would}); existing install: "
                                f"{probe['extension']}"), {"would_run": would, "probe": probe})
    archs = archs_for(run.env["capability"])
    stamp_path = os.path.join(ROOT, "build", "gpu_check.stamp")
    stamp = build_stamp(archs)
    _, probe = run.python(PROBE_PY, what="(probe before the build)")
    old = ""
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            old = f.read().strip()
    if probe and probe["extension_cuda"] and archs in probe["archs"].split(";") and old == stamp:
        return "passed", f"up to date, not rebuilt: {probe['extension']}", {"probe": probe, "archs": archs}
    # The CUDA simulator's build (for the CPU tests) is left out: the device runs the real kernels.
    env = {"EFFKERNELS_CUDA_ARCHS": archs, "MAX_JOBS": jobs, "EFFKERNELS_BUILD_SIM": "0"}
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    r = run.cmd(pip, env=env, limit=run.left() - FALLBACK_BUILD_S, what="(nvcc build)")
    ptxas = os.path.join(ROOT, "build", "effkernels_ptxas.log")
    spills = []
    if os.path.exists(ptxas):
        with open(ptxas, errors="replace") as f:
            text = f.read()
        spills = [ln.strip() for ln in text.splitlines() if "spill" in ln and not ln.strip().startswith("0 bytes")
                  and " 0 bytes spill stores, 0 bytes spill loads" not in ln]
        run.log("== build: ptxas -v report (build/effkernels_ptxas.log)\n", text)
    _, probe = run.python(PROBE_PY, what="(probe after the build)")
    d = {"archs": archs, "max_jobs": jobs, "build_s": round(r["s"], 1), "probe": probe, "spill_lines": spills[:20]}
    if probe and probe["extension_cuda"] and archs in probe["archs"].split(";"):
        os.makedirs(os.path.dirname(stamp_path), exist_ok=True)
        with open(stamp_path, "w") as f:
            f.write(stamp + "\n")
        return "passed", f"built for sm_{archs.replace('.', '')} in {r['s']:.0f} s: {probe['extension']}", d
    why = "timed out" if r["timed_out"] else f"rc {r['rc']}"
    if probe is None:  # nothing importable: install without the extension so the later steps can run
        fb = run.cmd(pip, env={"EFFKERNELS_BUILD_EXT": "0"}, what="(fallback install without the extension)")
        d["fallback_install_rc"] = fb["rc"]
    return ("timeout" if r["timed_out"] else "failed",
            f"nvcc build {why}; extension: {probe['extension'] if probe else 'effkernels not importable'}", d)


def step_test_ext_gpu(run: Run) -> tuple[str, str, dict]:
    status, reason, d = pytest_step(run, ["tests/test_ext.py", "-m", "gpu"], {}, "test_ext_gpu")
    if run.dry and status in ("skipped", "passed"):
        return "dry-skipped", f"dry: skipped the CUDA kernels (no GPU); the same pytest command ran: {reason}", d
    return status, reason, d


def step_test_triton_cuda(run: Run, sz: dict) -> tuple[str, str, dict]:
    argv = list(sz["triton_tests"])
    if not run.dry and run.env.get("pytest_xdist"):
        argv += ["-n", str(min(8, max(1, (run.env.get("cores") or 2) // 2)))]  # Triton's JIT compiles in parallel
    env = {"EFFKERNELS_TEST_DEVICE": sz["device"], "TRITON_INTERPRET": "1" if run.dry else "0"}
    status, reason, d = pytest_step(run, argv, env, "test_triton_cuda")
    if run.dry and status == "passed":
        return ("dry-skipped", ("dry: skipped the compiled-for-CUDA run (no GPU); the same command ran on CPU "
                                f"tensors under the interpreter, a subset: {reason}"), d)
    return status, reason, d


def step_test_flash_attn(run: Run) -> tuple[str, str, dict]:
    if run.dry:
        return "dry-skipped", "dry: skipped: flash-attn's varlen kernel needs a GPU (same pytest runner as above)", {}
    if not run.env.get("flash_attn_installed"):
        return "skipped", "flash_attn is not installed on this machine (nothing is downloaded at run time)", {}
    return pytest_step(run, ["tests/test_attention.py", "-k", "flash_attn"], {}, "test_flash_attn")


DATA_PY = r"""
import argparse, json, sys
sys.path.insert(0, "bench")
import bench_train
bench_train.write_data(argparse.Namespace(**json.loads(sys.argv[1])), sys.argv[2])
print("GPU_CHECK_JSON " + json.dumps({"specs": bench_train.all_specs(), "pre": bench_train.PRE}))
"""


def console_script(run: Run, name: str) -> str:
    """The console script `name` in run.py's scripts folder (where pip put it), else on PATH."""
    for d in (run.env.get("scripts"), os.path.dirname(os.path.abspath(run.py))):
        if d and os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return name


def finite_losses(out_dir: str) -> list[float]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln)["loss"] for ln in f if ln.strip() and "loss" in json.loads(ln)]


def step_train(run: Run, sz: dict) -> tuple[str, str, dict]:
    data = os.path.join(run.tmp, "latents.npz")
    r = run.cmd([run.py, "-c", DATA_PY, json.dumps(sz["train_data"]), data], what="(random latents, bench_train.write_data)")
    meta = None
    for line in r["out"].splitlines():
        if line.startswith("GPU_CHECK_JSON "):
            meta = json.loads(line[len("GPU_CHECK_JSON "):])
    if meta is None:
        return "timeout" if r["timed_out"] else "failed", "could not write the random latents (see log.txt)", {}
    specs = sz["train_specs"] or meta["specs"]
    exe = console_script(run, "effkernels-train")
    steps, batch = sz["train_steps"], sz["train_data"]["batch"]

    def one(spec: str) -> dict:
        out = os.path.join(run.tmp, "train", spec.replace("+", "_"))
        argv = [exe, "--method", spec, *sz["train_model"], "--data", data, "--out", out, "--steps", str(steps),
                "--batch-size", str(batch), "--warmup", "0", "--eval-every", "0", "--ckpt-every", "0",
                "--log-every", "1", "--quiet", "--device", sz["device"]]
        if any(p in ("repa", "erw") for p in spec.split("+")):
            argv += meta["pre"]  # the features written beside the latents: no encoder to train or download
        res = run.cmd(argv, env=NO_INTERPRETER, what=f"({spec})")
        losses = finite_losses(out)
        ok = res["rc"] == 0 and len(losses) == steps and all(math.isfinite(v) for v in losses)
        return {"method": spec, "ok": ok, "rc": res["rc"], "timed_out": res["timed_out"], "s": round(res["s"], 1),
                "losses": losses, "command": shlex.join(argv)}

    with concurrent.futures.ThreadPoolExecutor(sz["train_parallel"]) as pool:
        rows = list(pool.map(one, specs))
    d = {"model": sz["train_model"][1], "steps": steps, "batch": batch, "rows": rows,
         "autocast": "bf16 (the trainer's, on CUDA)" if sz["device"] == "cuda" else "none (CPU, fp32)"}
    bad = [x["method"] for x in rows if not x["ok"]]
    if any(x["timed_out"] for x in rows):
        return "timeout", f"{len(rows) - len(bad)}/{len(rows)} ran with finite losses; not done: {', '.join(bad)}", d
    if bad:
        return "failed", f"not finite or failed: {', '.join(bad)} ({len(rows) - len(bad)}/{len(rows)} fine)", d
    if run.dry:
        d["not_run"] = [s for s in meta["specs"] if s not in specs]
        return ("dry-skipped", (f"dry: skipped CUDA bf16 autocast and {len(d['not_run'])} more methods; ran "
                                f"{', '.join(specs)} at {d['model']} on CPU for {steps} steps: finite losses"), d)
    return "passed", f"{len(rows)} methods x {steps} steps at {d['model']}, batch {batch}: every loss finite", d


def step_micro(run: Run, sz: dict) -> tuple[str, str, dict]:
    out = os.path.join(run.tmp, "micro")
    status, reason, d = pytest_step(run, [*MICRO_FILES, "--benchmark-only", *sz["micro"]],
                                    {"EFFKERNELS_MICRO_OUT": out, **NO_INTERPRETER}, "micro")
    path = os.path.join(out, "micro.json")
    if os.path.exists(path):
        with open(path) as f:
            got = json.load(f)
        run.micro = {"rows": got.get("rows", []), "bench_machine": got.get("machine"), "command": d["command"]}
        with open(os.path.join(out, "micro.md")) as f:
            run.micro["markdown"] = f.read()
    n = len(run.micro["rows"])
    reason = f"{n} timed rows; {reason}"
    if run.dry and status == "passed":
        return ("dry-skipped", ("dry: skipped the CUDA rows (no GPU); the same harness timed CPU tensors at a "
                                f"tiny shape ({n} rows, not GPU numbers)"), d)
    return status, reason, d


def step_bench(run: Run, sz: dict) -> tuple[str, str, dict]:
    runs, bad = [], 0
    for label, argv in sz["bench"]:
        out = os.path.join(run.tmp, "bench", str(len(runs)))
        full = [run.py, "bench/bench_train.py", *argv, "--device", sz["device"], "--out", out]
        rec = {"label": label, "command": shlex.join(full[1:])}
        if run.left() < 15:
            rec.update(status="not run", reason=f"out of time ({run.left():.0f} s left in the step's window)")
            runs.append(rec)
            continue
        r = run.cmd(full, env=NO_INTERPRETER, what=f"({label})")
        rec.update(status="passed" if r["rc"] == 0 else ("timeout" if r["timed_out"] else "failed"), s=round(r["s"], 1))
        for stem in ("methods", "whole_step"):
            if os.path.exists(os.path.join(out, f"{stem}.json")):
                with open(os.path.join(out, f"{stem}.json")) as f:
                    rec["rows"] = json.load(f)["rows"]
                with open(os.path.join(out, f"{stem}.md")) as f:
                    rec["markdown"] = f.read()
        bad += rec["status"] == "failed"
        runs.append(rec)
    run.bench = {"runs": runs}
    done = sum(r["status"] == "passed" for r in runs)
    reason = f"{done} of {len(runs)} bench runs done" + (f", {bad} failed" if bad else "")
    if bad:
        return "failed", reason, {}
    if run.dry:
        return ("dry-skipped", (f"dry: skipped the GPU sizes (SiT-S/2, SiT-XL/2, bf16); ran {done} tiny CPU "
                                "run(s) through the same harness (not GPU numbers)"), {})
    # a run that did not fit is recorded, not a failure of the kernels; the first one must fit
    return ("passed" if runs and runs[0]["status"] == "passed" else "timeout"), reason, {}


DIFFUSERS_PROBE_PY = r"""
import importlib.util, json
print("GPU_CHECK_JSON " + json.dumps({"diffusers": importlib.util.find_spec("diffusers") is not None}))
"""


def step_bench_diffusers(run: Run, sz: dict) -> tuple[str, str, dict]:
    """bench/bench_diffusers.py: diffusers' transformers unpatched vs patched; its run joins bench.json's runs."""
    r, probe = run.python(DIFFUSERS_PROBE_PY, what="(is diffusers installed)")
    if probe is None:
        return "timeout" if r["timed_out"] else "failed", "the diffusers probe did not finish (see log.txt)", {}
    if not probe["diffusers"]:
        why = "diffusers is not installed on this machine (nothing is downloaded at run time)"
        return ("dry-skipped", f"dry: skipped: {why}", {}) if run.dry else ("skipped", why, {})
    out = os.path.join(run.tmp, "bench_diffusers")
    full = [run.py, "bench/bench_diffusers.py", *sz["diffusers"], "--device", sz["device"], "--out", out]
    res = run.cmd(full, env=NO_INTERPRETER, what="(diffusers: unpatched vs effkernels)")
    status = "passed" if res["rc"] == 0 else ("timeout" if res["timed_out"] else "failed")
    rec = {"label": "diffusers DiT/PixArt/SD3/Flux, unpatched vs effkernels (bench/bench_diffusers.py)",
           "command": shlex.join(full[1:]), "status": status, "s": round(res["s"], 1)}
    if os.path.exists(os.path.join(out, "diffusers.json")):
        with open(os.path.join(out, "diffusers.json")) as f:
            rec["rows"] = json.load(f)["rows"]
        with open(os.path.join(out, "diffusers.md")) as f:
            rec["markdown"] = f.read()
    run.bench.setdefault("runs", []).append(rec)
    ratios = {r["model"]: round(r["speed_vs_diffusers"], 2) for r in rec.get("rows", []) if r["patched"]}
    reason = f"rc {res['rc']}; speed vs diffusers {ratios}" if ratios else f"rc {res['rc']} (see log.txt)"
    if status != "passed":
        return status, reason, {"command": rec["command"]}
    if run.dry:
        return ("dry-skipped", ("dry: skipped the GPU shapes (width 1152, bf16 autocast); ran the tiny CPU shapes "
                                f"through the same harness (not GPU numbers): {reason}"), {"command": rec["command"]})
    return "passed", reason, {"command": rec["command"]}


# ------------------------------------------------------------------------------------------------
# The summary
# ------------------------------------------------------------------------------------------------


def render(summary: dict, micro: dict, bench: dict) -> str:
    m = summary["machine"]
    gpu = (f"{m['gpu']} (capability {m.get('capability')}, {m.get('gpu_memory_gib')} GiB, {m.get('sms')} SMs, "
           f"L2 {m.get('l2_mib')} MiB)" if m.get("gpu") else "none")
    lines = [f"# effkernels GPU check ({summary['mode']})", "", f"- GPU: {gpu}",
             (f"- driver {m.get('driver')}; nvcc: {m.get('nvcc')}; torch {m.get('torch')} "
              f"(CUDA {m.get('cuda_runtime')}); triton {m.get('triton')}; python {m.get('python')}; "
              f"{m.get('cores')} CPU cores"),
             f"- total {summary['total_s']} s of at most {summary['limit_s']} s; exit code {summary['exit_code']}", "",
             "## Steps", "", "| step | status | seconds | budget s | result |", "|---|---|---|---|---|"]
    for s in summary["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['budget_s']} | "
                     f"{s['reason'].replace('|', '/')} |")
    for s in summary["steps"]:
        d = s.get("details") or {}
        if d.get("failed_tests"):
            lines += ["", f"### {s['name']}: failing tests (first {len(d['failed_tests'])})", ""]
            lines += [f"- `{f['test']}`: {f['message'][:200]}" for f in d["failed_tests"]]
        if s["name"] == "train_bf16" and d.get("rows"):
            lines += ["", f"### Training steps ({d['model']}, batch {d['batch']}, autocast {d['autocast']})", "",
                      "| method | ok | s | losses |", "|---|---|---|---|"]
            lines += [f"| {r['method']} | {'yes' if r['ok'] else 'NO'} | {r['s']} | "
                      f"{', '.join(f'{v:.4g}' for v in r['losses'])} |" for r in d["rows"]]
    if micro.get("markdown"):
        lines += ["", "## Op micro-benchmarks", "", f"`{micro.get('command')}`", "", micro["markdown"].strip()]
        peak = [r for r in micro["rows"] if r.get("fraction_of_peak")]
        if peak:
            lines += ["", "| op | direction | shape | backend | GB/s | % of peak bandwidth |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['op']} | {r['direction']} | {r['shape']} | {r['backend']} | {r['gb_per_s']:.0f} | "
                      f"{100 * r['fraction_of_peak']:.0f} |" for r in peak]
    if bench.get("runs"):
        lines += ["", "## Whole-step benchmarks (bench/bench_train.py, bench/bench_diffusers.py)"]
        for r in bench["runs"]:
            lines += ["", f"### {r['label']}: {r['status']}{' (' + r['reason'] + ')' if r.get('reason') else ''}", "",
                      f"`{r['command']}`"]
            if r.get("markdown"):
                lines += ["", r["markdown"].strip()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="empty or new folder for the (at most 8) result files")
    p.add_argument("--dry", action="store_true", help="every step's code on CPU tensors at tiny sizes, in seconds")
    p.add_argument("--only", default=None, help="comma-separated steps to run (the others are recorded as skipped): "
                                                + ",".join(STEPS))
    p.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                   help="lower a step's budget (tuning, tests); the total must stay within the run's limit")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs every step (the wrapper's)")
    a = p.parse_args(argv)
    if not a.out_dir:
        p.error("OUT_DIR is required: the folder for summary.md, summary.json, log.txt, micro.json, bench.json")
    a.out_dir = os.path.abspath(a.out_dir)
    if os.path.exists(a.out_dir) and (not os.path.isdir(a.out_dir) or os.listdir(a.out_dir)):
        p.error(f"OUT_DIR {a.out_dir} exists and is not an empty folder (the run writes at most {MAX_FILES} files "
                "and must not mix them with others)")
    a.only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else list(STEPS)
    for s in a.only:
        if s not in STEPS:
            p.error(f"--only: unknown step {s!r}; steps: {', '.join(STEPS)}")
    a.budgets = dict(BUDGET_S)
    for item in a.budget:
        name, _, val = item.partition("=")
        if name not in STEPS:
            p.error(f"--budget {item!r}: unknown step {name!r}; steps: {', '.join(STEPS)}")
        try:
            v = float(val)
        except ValueError:
            v = -1.0
        if not 0 < v <= BUDGET_S[name]:
            p.error(f"--budget {item!r}: want 0 < SECONDS <= {BUDGET_S[name]} (the step's budget; raising one "
                    "would break the run's time limit)")
        a.budgets[name] = v
    return a


def main(argv=None) -> int:
    assert sum(BUDGET_S.values()) + GRACE_S * len(STEPS) + RESERVE_S <= TOTAL_S, "budgets exceed TOTAL_S"
    assert len(OUTPUTS) <= MAX_FILES
    a = parse(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    run = Run(a)
    funcs = {"env": step_env, "build": step_build, "test_ext_gpu": step_test_ext_gpu,
             "test_triton_cuda": step_test_triton_cuda, "test_flash_attn": step_test_flash_attn,
             "train_bf16": step_train, "micro": step_micro, "bench_train": step_bench,
             "bench_diffusers": step_bench_diffusers}
    needs_sizes = {"test_triton_cuda", "train_bf16", "micro", "bench_train", "bench_diffusers"}
    run.log(f"gpu_check {'--dry ' if a.dry else ''}{a.out_dir}: python {a.python}, steps {','.join(a.only)}\n")
    try:
        for name in STEPS:
            start = time.monotonic()
            rec = {"name": name, "budget_s": a.budgets[name]}
            if name not in a.only and name != "env":  # env: the machine description every step needs
                rec.update(status="skipped", reason="not in --only", seconds=0.0)
                run.steps.append(rec)
                continue
            run.step_name = name
            run.step_deadline = start + a.budgets[name]
            try:
                if name in needs_sizes:
                    status, reason, details = funcs[name](run, sizes(a.dry, run.env.get("gpu_memory_gib") or 0))
                else:
                    status, reason, details = funcs[name](run)
            except Exception as e:  # noqa: BLE001 - a bug in a step is that step's failure, never the run's end
                run.log(f"== {name}: error in gpu_check.py\n", traceback.format_exc())
                status, reason, details = "failed", f"gpu_check.py error: {type(e).__name__}: {e}", {}
            rec.update(status=status, reason=reason, seconds=round(time.monotonic() - start, 1), details=details)
            run.steps.append(rec)
            print(f"[gpu_check] {name}: {status} ({rec['seconds']} s): {reason}", flush=True)
            if name == "env" and not a.dry and status == "passed" and not run.env.get("cuda_available"):
                msg = (f"gpu_check: error: no CUDA device visible to {a.python} (torch.cuda.is_available() is False); "
                       "run on a GPU machine, or pass --dry")
                print(msg, file=sys.stderr)
                rec.update(status="failed", reason=msg)
                run.write()
                shutil.rmtree(run.tmp, ignore_errors=True)
                return 2
            run.write()
    except KeyboardInterrupt:  # the wrapper's backstop: record what there is
        run.steps.append({"name": run.step_name, "status": "timeout", "budget_s": None, "seconds": None,
                          "reason": "the whole run reached its limit (wrapper's timeout)"})
    run.write()
    shutil.rmtree(run.tmp, ignore_errors=True)
    files = sorted(os.listdir(a.out_dir))
    if len(files) > MAX_FILES:  # cannot happen (OUTPUTS is fixed); checked so that it never silently does
        print(f"gpu_check: error: {len(files)} files in {a.out_dir} > {MAX_FILES}", file=sys.stderr)
        return 1
    code = run.exit_code()
    print(f"[gpu_check] {'dry run ' if a.dry else ''}done in {time.monotonic() - run.t0:.0f} s, exit {code}; "
          f"wrote {', '.join(files)} to {a.out_dir}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
