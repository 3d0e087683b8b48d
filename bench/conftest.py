"""pytest setup of the kernel micro-benchmarks (bench/test_micro_*.py); see _micro.py for what they do.

`pytest bench/ --benchmark-only` times DiT shapes; `pytest bench/ --benchmark-disable` (CI) runs
each case once on a tiny shape with one thread, checking the harness and every backend's output
against the reference, timing nothing. `--micro-shapes` picks the shapes (see _micro.py). tests/ is
collected on its own (pyproject's testpaths), so this folder never changes the test suite's collection.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # _micro, _common

import _micro
from _common import machine, machine_line, markdown_table, write_outputs


def _ci(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_addoption(parser):
    parser.addoption("--micro-shapes", default=None,
                     help="comma-separated shapes to run instead of the default set: NxD (B from the cache "
                          "rule) or BxNxD, e.g. 256x1152,2x16x32")


def pytest_configure(config):
    if _ci(config):
        torch.set_num_threads(1)  # tiny shapes: OpenMP start-up would dominate
        _micro.COMPILE_BACKEND["name"] = "aot_eager"  # see _micro.COMPILE_BACKEND


def pytest_generate_tests(metafunc):
    if "micro_shape" in metafunc.fixturenames:
        try:
            sh = _micro.shapes(_ci(metafunc.config), metafunc.config.getoption("micro_shapes"))
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None
        metafunc.parametrize("micro_shape", sh, ids=[s.id for s in sh])


def _summary() -> tuple[list[dict], str]:
    """Per case (op, direction, shape): each backend's median, x reference, x compile(reference), GB/s."""
    timed = [r for r in _micro.RESULTS if r.get("median_s")]
    groups = {}
    for r in timed:
        groups.setdefault((r["family"], r["op"], r["direction"], r["shape"]), {})[r["backend"]] = r
    rows, lines = [], []
    for (fam, op, d, shape), by in groups.items():
        ref, comp = by.get("reference"), by.get("compile(reference)")
        for b in _micro.BACKENDS:
            if b not in by:
                continue
            r = by[b]
            rec = {"op": op, "direction": d, "shape": shape, "backend": b, "median_ms": r["median_s"] * 1e3,
                   "vs_reference": ref["median_s"] / r["median_s"] if ref else None,
                   "vs_compile_reference": comp["median_s"] / r["median_s"] if comp else None,
                   "gb_per_s": r.get("gb_per_s"), "fraction_of_peak": r.get("fraction_of_peak"), "bytes": r["bytes"]}
            rows.append(rec)
            fmt = lambda v: "-" if v is None else f"{v:.2f}"
            lines.append([f"{op} {d}", shape, b, f"{rec['median_ms']:.3f}", fmt(rec["vs_reference"]),
                          fmt(rec["vs_compile_reference"]), f"{rec['gb_per_s']:.1f}"])
    table = markdown_table(["op", "B x N x D", "backend", "median ms", "x reference", "x compile(reference)",
                            "GB/s"], lines)
    return rows, table


def pytest_terminal_summary(terminalreporter, config):
    rows, table = _summary()
    if not rows:
        return
    m = machine()
    md = f"kernel micro-benchmarks (median of pytest-benchmark's rounds)\n{machine_line(m)}\n\n{table}\n"
    terminalreporter.write_line(md)
    out = os.environ.get("EFFKERNELS_MICRO_OUT")
    if out:
        for p in write_outputs(out, "micro", rows, md, {"machine": m}):
            terminalreporter.write_line(f"wrote {p}")
