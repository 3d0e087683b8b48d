"""Ahead-of-time compile of every shipped Triton kernel for sm_80 and sm_90, no GPU needed.

The interpreter that runs our Triton tests on the CPU accepts programs the GPU compiler rejects,
so CI also compiles each kernel at every configuration its launcher can pick. Each family module
exposes `aot_specs()`: a list of (jit_fn, signature, constexprs, options) with signature as in
triton.compiler.ASTSource ({"X": "*fp16", "n": "i32", "BLOCK": "constexpr", ...}) and options such
as {"num_warps": 4}.

  python -m effkernels._triton.aot [--archs 80,90]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import sys
import time

FAMILIES = ("routing", "adaln", "align", "attention", "swiglu", "rope")  # adaln.py holds the RMSNorm kernels


def specs():
    for fam in FAMILIES:
        mod = importlib.import_module(f"effkernels._triton.{fam}")
        for i, spec in enumerate(mod.aot_specs()):
            yield fam, i, spec


def _compile_one(job):
    """Compile spec number i of a family for one arch; runs in a worker process (specs hold
    JIT functions, which do not pickle, so workers look them up again by index)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fam, i, cc = job
    fn, sig, constexprs, options = importlib.import_module(f"effkernels._triton.{fam}").aot_specs()[i]
    t = time.time()
    triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", cc, 32),
                   options=dict(options))
    return f"sm_{cc} {fam}.{fn.__name__} {constexprs} {options} {time.time() - t:.1f}s"


def compile_all(archs=(80, 90), verbose=False, jobs: int | None = None) -> int:
    """Compile every spec for every arch, `jobs` processes at a time; the first error is raised."""
    work = [(fam, i, cc) for fam, i, _ in specs() for cc in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        done = map(_compile_one, work)
    else:
        ctx = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx)
        done = pool.map(_compile_one, work, chunksize=8)
    for line in done:
        if verbose:
            print(line, flush=True)
    return len(work)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="80,90", help="comma-separated compute capabilities")
    p.add_argument("--jobs", type=int, default=0, help="worker processes (0: one per core)")
    p.add_argument("--quiet", action="store_true", help="print only the total")
    a = p.parse_args(argv)
    t = time.time()
    n = compile_all(tuple(int(x) for x in a.archs.split(",")), verbose=not a.quiet, jobs=a.jobs or None)
    print(f"compiled {n} kernel configurations in {time.time() - t:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
