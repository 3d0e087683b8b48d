"""Test setup: Triton's interpreter on CPU tensors, fixed printed seeds, and no silent skips under CI.

Seeds. Every test runs with its own seed, seeded into torch, numpy and Python's `random` before the
test starts (autouse), whether or not the test asks for the `seed` fixture:

    per-test seed = crc32("<base>:<nodeid>") mod 2**31

`base` is EFFKERNELS_SEED (default 0), so a plain `pytest` is deterministic. With EFFKERNELS_FUZZ=1
and no EFFKERNELS_SEED, the run draws a fresh base (printed in the header); every test's seed
follows from it, so `EFFKERNELS_SEED=<base> pytest '<nodeid>'` replays any one test of a fuzz run
exactly: each test prints that line, which pytest shows with a failure's captured stdout.
crc32, not hash(): Python salts str hashes per process.

Device. The tests are written for CPU tensors (Triton under its interpreter). EFFKERNELS_TEST_DEVICE=cuda
runs them on the GPU instead: every tensor a test makes without naming a device is made there
(helpers.TestDevice, entered per test), and the Triton interpreter is off unless TRITON_INTERPRET
is set, so the Triton kernels are compiled for the device. scripts/gpu_check.sh runs the kernel
test files so. Tests that check CPU-only behaviour (the `cpp` backend, the interpreter) are not
meant for that mode. Unset, or `cpu`: the default CPU run, unchanged.
"""
import os
import random
import secrets
import zlib

import pytest

TEST_DEVICE = os.environ.get("EFFKERNELS_TEST_DEVICE", "").strip()
if TEST_DEVICE not in ("", "cpu", "cuda"):
    raise pytest.UsageError(f"EFFKERNELS_TEST_DEVICE must be 'cpu' or 'cuda' (or unset), got {TEST_DEVICE!r}")

# Must happen before anything imports triton: the interpreter is chosen at import time.
os.environ.setdefault("TRITON_INTERPRET", "0" if TEST_DEVICE == "cuda" else "1")
# The interpreter runs tl.dot as np.matmul; numpy's OpenBLAS threads, contending with the other
# core's work, made a 64x128 @ 128x64 take ~35 ms instead of ~0.03 ms (measured). Read at numpy's
# import, so set before it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers import TestDevice  # noqa: E402

if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError("EFFKERNELS_TEST_DEVICE=cuda: torch sees no CUDA device here")

# The suite runs tiny shapes: one intra-op thread avoids OpenMP overhead that dominates them (and
# contention with the other core's work); measured ~20x on a tiny DiT forward here.
torch.set_num_threads(1)

# Skips allowed under CI=true: only what needs hardware or packages this machine cannot have.
_ALLOWED_SKIP_WORDS = ("gpu", "cuda device", "flash_attn", "flash-attn")


def _base_seed() -> tuple[int, str]:
    """(base seed, mode): EFFKERNELS_SEED if set, else a fresh one under EFFKERNELS_FUZZ=1, else 0."""
    env = os.environ.get("EFFKERNELS_SEED")
    if env is not None:
        return int(env), "fixed (EFFKERNELS_SEED)"
    if os.environ.get("EFFKERNELS_FUZZ", "0") not in ("", "0"):
        return secrets.randbelow(2**31), "fuzz (fresh, EFFKERNELS_FUZZ=1)"
    return 0, "fixed (default)"


# Drawn once at import, and exported so that subprocesses and pytest-xdist workers share it.
BASE_SEED, SEED_MODE = _base_seed()
os.environ["EFFKERNELS_SEED"] = str(BASE_SEED)


def seed_for(nodeid: str, base: int = BASE_SEED) -> int:
    """The seed of the test `nodeid` under base seed `base`: stable across processes and machines."""
    return zlib.crc32(f"{base}:{nodeid}".encode()) % (2**31)


def _seed_line() -> str:
    return (f"effkernels seeds: {SEED_MODE}, base EFFKERNELS_SEED={BASE_SEED}; per test crc32(base:nodeid); "
            f"replay one test with EFFKERNELS_SEED={BASE_SEED} pytest '<nodeid>'")


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(_seed_line())  # also under -q, which hides the header


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Seed torch, numpy and random with this test's seed before every test, and print it."""
    s = seed_for(request.node.nodeid)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    print(f"[seed] {request.node.nodeid}: seed={s}; replay: EFFKERNELS_SEED={BASE_SEED} "
          f"pytest '{request.node.nodeid}'")
    return s


@pytest.fixture(autouse=True)
def _test_device():
    """With EFFKERNELS_TEST_DEVICE set, the test's unplaced tensors are made on that device."""
    if not TEST_DEVICE:
        yield
        return
    with TestDevice(TEST_DEVICE):
        yield


@pytest.fixture
def seed(_seed_everything):
    """This test's seed (already applied to torch, numpy and random), for explicit generators."""
    return _seed_everything


def pytest_runtest_logreport(report):
    if os.environ.get("CI") != "true" or not report.skipped:
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr).lower()
    if not any(w in reason for w in _ALLOWED_SKIP_WORDS):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which only GPU- or flash-attn-only tests may do: {reason}"
