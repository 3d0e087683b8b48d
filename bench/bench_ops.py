"""Per-op micro-benchmark: every backend that can run here, side by side in one run.

On CPU: the reference and the extension's C++ path (`cpp`, when built); Triton's interpreter is a
test tool and is not timed. On a GPU: reference, `torch.compile` of the reference, Triton and the
CUDA extension, timed with triton.testing.do_bench. `--compile` adds, on either device,
`torch.compile` of the reference and of each kernel backend's op (our ops are custom ops, opaque
to inductor: what `auto` under torch.compile should pick is read from these rows). Reports time per call, the ratio to the
reference, and achieved bandwidth against the bytes the op must move (read inputs + write outputs).

  python bench/bench_ops.py [--device cpu|cuda] [--dtype float32] [--shape 32,256,384] [--backward]
                            [--compile] [--threads N] [--out bench/out/ops.json]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import effkernels
from _common import machine, machine_line, write_rows
from effkernels import backends, ops


def cases(B: int, N: int, D: int, dtype, device, backward: bool):
    """(name, make_inputs, fn(inputs, backend), bytes moved) for each op family."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    es = torch.tensor([], dtype=dtype).element_size()
    K = N // 2
    idx = ops.draw_route(B, N, K, generator=g).to(device)

    def grad_of(fn):
        if not backward:
            return fn

        def run(inp, b):
            out = fn(inp, b)
            out = out if isinstance(out, torch.Tensor) else out[-1]
            out.float().sum().backward()
            return out
        return run

    def needs_grad(*ts):
        return [t.requires_grad_(backward) for t in ts]

    x_bnd = B * N * D * es
    mod = rnd(B, 6 * D)
    yield ("route_gather", lambda: needs_grad(rnd(B, N, D)) + [idx],
           grad_of(lambda i, b: ops.route_gather(i[0], i[1], backend=b)), 2 * B * K * D * es)
    yield ("route_scatter", lambda: needs_grad(rnd(B, N, D), rnd(B, K, D)) + [idx],
           grad_of(lambda i, b: ops.route_scatter(i[0], i[1], i[2], backend=b)), 2 * x_bnd)
    yield ("modulate_layernorm", lambda: needs_grad(rnd(B, N, D), mod.clone()),
           grad_of(lambda i, b: ops.modulate_layernorm(i[0], *i[1].chunk(6, -1)[:2], backend=b)), 2 * x_bnd)
    yield ("gated_residual", lambda: needs_grad(rnd(B, N, D), rnd(B, N, D), mod.clone()),
           grad_of(lambda i, b: ops.gated_residual(i[0], i[1], i[2].chunk(6, -1)[2], backend=b)), 3 * x_bnd)
    yield ("gated_residual_modulate_layernorm", lambda: needs_grad(rnd(B, N, D), rnd(B, N, D), mod.clone()),
           grad_of(lambda i, b: ops.gated_residual_modulate_layernorm(
               i[0], i[1], *i[2].chunk(6, -1)[2:5], backend=b)), 4 * x_bnd)
    yield ("rmsnorm_modulate", lambda: needs_grad(rnd(B, N, D), mod.clone()),
           grad_of(lambda i, b: ops.rmsnorm_modulate(i[0], *i[1].chunk(6, -1)[:2], backend=b)), 2 * x_bnd)
    yield ("gated_residual_rmsnorm_modulate", lambda: needs_grad(rnd(B, N, D), rnd(B, N, D), mod.clone()),
           grad_of(lambda i, b: ops.gated_residual_rmsnorm_modulate(
               i[0], i[1], *i[2].chunk(6, -1)[2:5], backend=b)), 4 * x_bnd)
    yield ("per_token_cosine", lambda: needs_grad(rnd(B, N, D)) + [rnd(B, N, D)],
           grad_of(lambda i, b: ops.cosine_alignment_loss(i[0], i[1], backend=b)), 2 * x_bnd)
    # SwiGLU on the halves of one (B, N, 2Hm) projection, Hm = LightningDiT's 2/3 * 4D; RoPE on the
    # permuted q, k views of one (B, N, 3, D / 64, 64) qkv projection, DiT's grid positions.
    hm = int(2 * 4 * D / 3)
    yield ("swiglu", lambda: needs_grad(rnd(B, N, 2 * hm)),
           grad_of(lambda i, b: ops.swiglu(*i[0].chunk(2, -1), backend=b)), 3 * B * N * hm * es)
    heads = max(1, D // 64)
    side = max(1, int(N ** 0.5))
    pos = torch.stack([torch.arange(N) // side, torch.arange(N) % side], -1).to(device)  # (N, 2) row, column
    yield ("rope2d", lambda: needs_grad(rnd(B, N, 3, heads, D // heads)),
           grad_of(lambda i, b: ops.rope2d(*i[0].permute(2, 0, 3, 1, 4)[:2], pos, backend=b)), 4 * x_bnd)


def timer(device: str, fn, reps: int) -> float:
    """Median seconds per call."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, rep=100) * 1e-3
    for _ in range(3):  # warm-up (a compiled fn: its backward compiles and its guards settle here)
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    B, N, D = (int(v) for v in args.shape.split(","))
    names = ["reference", "triton", "cuda", "cpp"]
    runnable = [b for b in names if backends.available(b, device)[0]
                and not (b == "triton" and device.type == "cpu")]
    rows = []
    for name, make, fn, nbytes in cases(B, N, D, dtype, device, args.backward):
        row = {"op": name + (" fwd+bwd" if args.backward else ""), "shape": [B, N, D], "dtype": args.dtype}
        for b in runnable:
            inp = make()
            row[b] = timer(device.type, lambda: fn(inp, b), args.reps)
        compiled_backends = ["reference"] + (runnable[1:] if args.compile else [])
        if device.type == "cuda" or args.compile:
            for b in compiled_backends:
                torch._dynamo.reset()
                compiled = torch.compile(lambda i, b=b: fn(i, b))
                inp = make()
                row[f"compile({b})"] = timer(device.type, lambda: compiled(inp), args.reps)
        row["bytes"] = nbytes
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    cols = [c for c in ("reference", "compile(reference)", "triton", "cuda", "cpp", "compile(triton)",
                        "compile(cuda)", "compile(cpp)") if c in rows[0]]
    head = f"{'op':<44}" + "".join(f"{c:>22}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for c in cols:
            t = r[c]
            gbs = r["bytes"] / t / 1e9
            cells.append(f"{t * 1e3:8.3f} ms {r['reference'] / t:4.2f}x {gbs:5.1f}GB/s".rjust(22))
        lines.append(f"{r['op']:<44}" + "".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shape", default="32,256,384", help="B,N,D (DiT-S/2 on 256 tokens by default)")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="add torch.compile rows of every backend (CPU too)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device; none is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"effkernels {effkernels.__version__}, torch {torch.__version__}, {args.device}, {args.dtype}, "
          f"B,N,D={args.shape}, threads={torch.get_num_threads()}; each cell: median time, "
          f"speed-up over the reference, achieved bandwidth\n{machine_line(machine())}")
    rows = run(args)
    print(render(rows))
    write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
