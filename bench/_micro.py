"""The kernel micro-benchmarks' harness (pytest-benchmark): shapes, backends, bytes moved, one runner.

    pytest bench/ --benchmark-only                 # DiT shapes, every backend here, timed
    pytest bench/ --benchmark-only -k "adaln and 256x384"
    pytest bench/ --benchmark-disable -q           # CI: tiny shapes, each case run once, outputs checked

Each case is one op family's op, forward ("fwd") or forward + backward ("fwd+bwd"), on one backend:
`reference`, `cpp` (the extension's C++ CPU path), `compile(reference)` (torch.compile of the
reference, inductor: what every peer uses as its baseline), and `triton` / `cuda` on a GPU. On a
machine without a GPU those rows are skipped with that reason, never estimated. Before timing, a
case checks its output (and gradients) against the reference's, so a timed row is a correct row.

Shapes (full mode): B x N x D with N = 256 tokens at D = 384, 768, 1152 (DiT-S, B, XL widths) and
N = 1024 at D = 1152; B is chosen per shape so that the (B, N, D) fp32 activation is at least twice
the last-level cache (on a GPU its L2, else the CPU's, read from sysfs, 32 MiB if unknown): smaller,
and the bandwidth figure would be a cache figure. Under --benchmark-disable (CI) one tiny shape, 1
thread. `--micro-shapes 256x1152,2x16x32` (the conftest's option) runs only the listed shapes: NxD
takes B from the cache rule, BxNxD names B (scripts/gpu_check.sh sizes its run so).

Bytes: each case writes down the bytes the op must move at the least (every input read once, every
output written once; index tensors included), so `extra_info` holds bytes, the achieved GB/s of
the median time, and on a GPU the fraction of the device's peak. At session end the conftest prints
(and with EFFKERNELS_MICRO_OUT=<dir> writes micro.md/.csv/.json) a table per case: each backend's
median, its speed-up over the reference and over compile(reference), and GB/s.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from effkernels import backends

BACKENDS = ("reference", "cpp", "compile(reference)", "triton", "cuda")
DIRECTIONS = ("fwd", "fwd+bwd")
FULL_SHAPES = ((256, 384), (256, 768), (256, 1152), (1024, 1152))  # (tokens, width)
CI_SHAPES = ((16, 32),)
RESULTS: list[dict] = []  # filled by run(), reported by conftest at session end
# torch.compile's backend for the compile(reference) rows. The conftest sets "aot_eager" under
# --benchmark-disable: CI then checks the traced forward and backward (dynamo + AOTAutograd, the
# custom ops' fake kernels) without inductor's code generation, which costs seconds per case on CPU.
COMPILE_BACKEND = {"name": "inductor"}


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 * 2**20


def cache_bytes() -> int:
    """The last-level cache of the device the cases run on: the GPU's L2, else the CPU's."""
    if device().type == "cuda":
        return torch.cuda.get_device_properties(device()).L2_cache_size
    return llc_bytes()


def batch_for(n: int, d: int, es: int = 4) -> int:
    """The batch that makes a (B, n, d) activation at least twice the last-level cache."""
    return max(1, math.ceil(2 * cache_bytes() / (n * d * es)))


@dataclass
class Shape:
    B: int
    N: int
    D: int
    heads: int

    @property
    def id(self) -> str:
        return f"{self.B}x{self.N}x{self.D}"


def parse_shapes(spec: str) -> list[Shape]:
    """"256x1152,2x16x32" -> shapes: NxD (B from batch_for, heads D/64) or BxNxD (heads 4 if D < 64).
    A bad entry is a ValueError naming --micro-shapes."""
    out = []
    for item in filter(None, (t.strip() for t in spec.split(","))):
        try:
            dims = [int(v) for v in item.split("x")]
        except ValueError:
            dims = []
        if len(dims) not in (2, 3) or min(dims) < 1:
            raise ValueError(f"--micro-shapes: bad entry {item!r} in {spec!r}; want NxD or BxNxD, e.g. 256x1152")
        b, n, d = dims if len(dims) == 3 else (batch_for(*dims), *dims)
        out.append(Shape(b, n, d, d // 64 if d >= 64 and d % 64 == 0 else 4))
    if not out:
        raise ValueError(f"--micro-shapes is empty: {spec!r}")
    return out


def shapes(ci: bool, only: str | None = None) -> list[Shape]:
    """The shapes to run: `only` (parse_shapes) if given, else CI's tiny one or the full set."""
    if only:
        return parse_shapes(only)
    if ci:
        return [Shape(2, n, d, 4) for n, d in CI_SHAPES]
    return [Shape(batch_for(n, d), n, d, d // 64) for n, d in FULL_SHAPES]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def skip_reason(backend: str, dev: torch.device) -> str | None:
    """Why `backend` is not run here, or None."""
    if backend in ("triton", "cuda") and dev.type != "cuda":
        return f"{backend} rows need a GPU (CUDA device); none here, so not run (never estimated)"
    if backend == "compile(reference)":
        return None
    ok, why = backends.available(backend, dev)
    return None if ok else f"{backend} cannot run here: {why}"


@dataclass
class Case:
    """One op: make(shape, gen) -> inputs (tensors; the float ones get grads in fwd+bwd), call(inputs,
    backend) -> a tensor or a tuple of tensors, and the bytes the forward and the backward must move."""
    family: str
    op: str
    make: Callable
    call: Callable
    fwd_bytes: Callable  # (shape, element size) -> bytes
    bwd_bytes: Callable
    grad_inputs: tuple = (0,)  # positions of the inputs whose gradients the backward computes
    flops: Callable | None = None  # (shape) -> forward FLOPs, for the compute-bound ones (attention)


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _step(case: Case, fn, inputs, grads_out, direction: str):
    """One call: the forward, or the forward and the gradients of the chosen inputs."""
    out = _outputs(fn(inputs))
    if direction == "fwd":
        return out
    wrt = [inputs[i] for i in case.grad_inputs]
    return out + list(torch.autograd.grad(out, wrt, grads_out))


def _check(got, want, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        # fp32 1e-4 (a reduction order differs between the backends)
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"{what} output {i}: {m}")


def run(benchmark, case: Case, shape: Shape, backend: str, direction: str) -> None:
    dev = device()
    why = skip_reason(backend, dev)
    if not why and backend == "compile(reference)" and direction == "fwd" and COMPILE_BACKEND["name"] != "inductor":
        why = "CI mode (--benchmark-disable): compile(reference) is checked in fwd+bwd, which traces the same forward"
    if why:
        pytest.skip(why)
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [t.to(dev) for t in case.make(shape, g)]
    if direction == "fwd+bwd":
        for i in case.grad_inputs:
            inputs[i].requires_grad_(True)
    if backend == "compile(reference)":
        torch._dynamo.reset()  # every case compiles afresh, not into an earlier case's cache limit
        compiled = torch.compile(lambda inp: case.call(inp, "reference"), backend=COMPILE_BACKEND["name"])
        fn = compiled
    else:
        fn = lambda inp: case.call(inp, backend)
    with torch.no_grad() if direction == "fwd" else torch.enable_grad():
        ref_out = _outputs(case.call(inputs, "reference"))
    grads_out = [torch.randn(o.shape, generator=g).to(dev, o.dtype) for o in ref_out]
    want = _step(case, lambda inp: case.call(inp, "reference"), inputs, grads_out, direction)
    got = _step(case, fn, inputs, grads_out, direction)  # also the warm-up (compiles)
    _check(got, want, f"{case.op} [{backend}] {direction}")

    def call():
        _step(case, fn, inputs, grads_out, direction)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    es = inputs[0].element_size()
    nbytes = case.fwd_bytes(shape, es) + (case.bwd_bytes(shape, es) if direction == "fwd+bwd" else 0)
    benchmark.group = f"{case.family}: {case.op} {direction} {shape.id}"
    benchmark.extra_info.update(op=case.op, backend=backend, direction=direction, shape=shape.id,
                                bytes=nbytes, compile_backend=COMPILE_BACKEND["name"] if "compile" in backend else None,
                                dtype=str(inputs[0].dtype).replace("torch.", ""),
                                larger_than_llc=shape.B * shape.N * shape.D * es >= cache_bytes())
    if direction == "fwd":
        with torch.no_grad():
            benchmark(call)
    else:
        benchmark(call)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None and not getattr(benchmark, "disabled", False) else None
    row = dict(benchmark.extra_info, family=case.family, median_s=median)
    if median:
        row["gb_per_s"] = benchmark.extra_info["gb_per_s"] = nbytes / median / 1e9
        if case.flops is not None:
            f = case.flops(shape) * (1 if direction == "fwd" else 3.5)  # backward: 2.5x (recompute + 4 matmuls)
            row["gflop_per_s"] = benchmark.extra_info["gflop_per_s"] = f / median / 1e9
        peak = peak_bandwidth(dev)
        if peak:
            row["fraction_of_peak"] = benchmark.extra_info["fraction_of_peak"] = nbytes / median / peak
    RESULTS.append(row)


def peak_bandwidth(dev: torch.device) -> float | None:
    """The GPU's theoretical DRAM bandwidth (bytes/s) from its memory clock and bus width; None on CPU."""
    if dev.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(dev)
    clock, width = getattr(p, "memory_clock_rate", None), getattr(p, "memory_bus_width", None)
    return 2 * clock * 1e3 * width / 8 if clock and width else None  # double data rate, kHz, bits


def cases_test(cases: dict[str, Case]):
    """The test function of one op family: every case x backend x direction x shape (micro_shape)."""
    @pytest.mark.parametrize("direction", DIRECTIONS)
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("op", list(cases))
    def test(benchmark, micro_shape, op, backend, direction):
        run(benchmark, cases[op], micro_shape, backend, direction)
    return test


def randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g)
