"""scripts/gpu_check.sh: the dry run (every step's code on CPU tensors) writes at most 8 files, a
summary naming every step with its status, and exits 0; a step over its budget is recorded as timed
out and the run goes on; bad arguments and a missing GPU without --dry are clear errors. The GPU
path itself can only run on a GPU (see the README's "Measured numbers")."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_check


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable)
    for k in ("TRITON_INTERPRET", "EFFKERNELS_TEST_DEVICE"):  # the script sets what each step needs
        env.pop(k, None)
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"  # absent: the script creates it
    res = _run("--dry", str(out))
    return res, out


@pytest.mark.slow  # ~40 s: one subprocess per step (torch imports), tiny CPU work
def test_dry_run_writes_every_step_within_the_file_cap(dry):
    res, out = dry
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and set(files) == set(gpu_check.OUTPUTS), files
    for f in files:
        assert os.path.getsize(out / f) < 16 * 2**20
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == list(gpu_check.STEPS)
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status["env"] == "passed"
    # nothing GPU-only passes on the dry path: it says what it skipped, and why
    for name in gpu_check.STEPS[1:]:
        assert status[name] == "dry-skipped", (name, status[name])
        assert next(s for s in summary["steps"] if s["name"] == name)["reason"].startswith("dry: skipped")
    assert summary["exit_code"] == 0 and summary["total_s"] < summary["limit_s"]
    md = (out / "summary.md").read_text()
    for name in gpu_check.STEPS:
        assert f"| {name} | {status[name]} |" in md
    assert "torch" in md and "triton" in md and "GPU: none" in md
    # the steps that could run on CPU tensors did, through the same harnesses
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["test_triton_cuda"]["details"]["passed"] >= 1
    train = steps["train_bf16"]["details"]["rows"]
    assert train and all(r["ok"] and len(r["losses"]) == 2 for r in train)
    micro = json.loads((out / "micro.json").read_text())
    assert micro["rows"] and all(r["median_ms"] > 0 and r["gb_per_s"] > 0 for r in micro["rows"])
    bench = json.loads((out / "bench.json").read_text())
    assert bench["runs"][0]["status"] == "passed"
    assert {r["row"] for r in bench["runs"][0]["rows"]} >= {"sit [auto]", "sit [reference]"}
    log = (out / "log.txt").read_text()
    assert "pytest" in log and "bench_train.py" in log


def test_a_step_over_its_budget_is_recorded_and_the_run_goes_on(tmp_path):
    res = _run("--dry", str(tmp_path / "o"), "--only", "test_ext_gpu,test_flash_attn", "--budget", "test_ext_gpu=1")
    assert res.returncode == 1, res.stdout + res.stderr
    steps = {s["name"]: s for s in json.loads((tmp_path / "o" / "summary.json").read_text())["steps"]}
    assert steps["test_ext_gpu"]["status"] == "timeout"
    assert steps["test_ext_gpu"]["seconds"] < 1 + gpu_check.GRACE_S + 2
    assert steps["test_flash_attn"]["status"] == "dry-skipped"  # the next step still ran
    assert steps["micro"]["status"] == "skipped" and steps["micro"]["reason"] == "not in --only"


@pytest.mark.parametrize("args,msg", [
    ([], "OUT_DIR is required"),
    (["--dry", "{tmp}/full"], "is not an empty folder"),
    (["--dry", "--only", "nope", "{tmp}/o"], "--only: unknown step 'nope'"),
    (["--dry", "--budget", "build=9999", "{tmp}/o"], "--budget 'build=9999'"),
    (["--dry", "--budget", "micro", "{tmp}/o"], "--budget 'micro'"),
])
def test_bad_arguments_are_errors_naming_the_argument(tmp_path, args, msg):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    res = _run(*(a.format(tmp=tmp_path) for a in args), timeout=60)
    assert res.returncode == 2 and msg in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU (cuda device) is present: the no-GPU error cannot show")
def test_no_gpu_without_dry_is_an_error(tmp_path):
    res = _run(str(tmp_path / "o"), "--only", "env", timeout=120)
    assert res.returncode == 2
    assert "no CUDA device visible" in res.stderr and "--dry" in res.stderr


def test_budgets_fit_the_time_limit_and_archs_come_from_the_device():
    per_step = sum(gpu_check.BUDGET_S.values()) + gpu_check.GRACE_S * len(gpu_check.STEPS)
    assert per_step + gpu_check.RESERVE_S <= gpu_check.TOTAL_S <= 480 - 15
    assert set(gpu_check.BUDGET_S) == set(gpu_check.STEPS)
    assert len(gpu_check.OUTPUTS) <= gpu_check.MAX_FILES <= 8
    assert gpu_check.archs_for((9, 0)) == "9.0" and gpu_check.archs_for((8, 6)) == "8.6"


def test_test_device_mode_places_unplaced_tensors_and_keeps_cpu_generators_draws():
    """helpers.TestDevice (EFFKERNELS_TEST_DEVICE): checked with the meta device, which needs no GPU."""
    from helpers import TestDevice

    g = torch.Generator().manual_seed(3)
    with TestDevice("meta"):
        a = torch.zeros(2, 3)
        b = torch.randn(4, 5, generator=g, requires_grad=True)
        c = torch.zeros(2, device="cpu")
    assert a.device.type == "meta" and c.device.type == "cpu"
    assert b.device.type == "meta" and b.requires_grad and b.is_leaf and b.shape == (4, 5)
    ref = torch.Generator().manual_seed(3)
    torch.randn(4, 5, generator=ref)
    # the draw was made on the CPU with g: g advanced exactly as a CPU draw advances it
    assert torch.equal(torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=ref))
