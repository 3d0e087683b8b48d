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
import importlib
import sys
import time

FAMILIES = ("routing", "adaln", "align")


def specs():
    for fam in FAMILIES:
        mod = importlib.import_module(f"effkernels._triton.{fam}")
        for spec in mod.aot_specs():
            yield fam, spec


def compile_all(archs=(80, 90), verbose=False) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    n = 0
    for fam, (fn, sig, constexprs, options) in specs():
        for cc in archs:
            t = time.time()
            triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", cc, 32),
                           options=dict(options))
            n += 1
            if verbose:
                print(f"sm_{cc} {fam}.{fn.__name__} {constexprs} {options} {time.time() - t:.1f}s", flush=True)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="80,90", help="comma-separated compute capabilities")
    a = p.parse_args(argv)
    n = compile_all(tuple(int(x) for x in a.archs.split(",")), verbose=True)
    print(f"compiled {n} kernel configurations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
