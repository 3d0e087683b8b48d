"""Training-step throughput of the SiT baseline: images/s, FLOPs per step and peak memory for each
backend that can run here, and for the token-routing mechanism (blocks 3..depth-3 on half the
tokens, TREAD's placement), all measured side by side in one run and given as ratios to the
baseline on the reference backend.

  python bench/bench_train.py [--model tiny/1] [--batch 128] [--input-size 8] [--channels 1]
                              [--steps 5] [--device cpu|cuda] [--out bench/out/train.json]
  python bench/bench_train.py --methods sit,tread,maskdit [--repeats 3] ...   # per method, interleaved

With --methods each row is a training method's whole step (effkernels.models.methods with its
default options: TREAD routes 3..depth-3 at 0.5, MaskDiT masks 0.5 with its decoder; ACT's step includes
its discriminator's forward in the generator loss, not the discriminator's own step; REPA and ERW
need a prepared encoder and are not rows yet), on the auto
backend, timed in `--repeats` interleaved rounds (method A, B, C, A, B, C, ...) so that drift of a
shared machine hits every row alike; the median round is reported, with the spread.

On a GPU the same command times bf16-autocast steps with CUDA events; on the CPU plain fp32 steps
with perf_counter (peak memory is then not reported: PyTorch does not track CPU allocations).
FLOPs are what torch.utils.flop_counter counts (matmuls, convolutions, attention).
"""
from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import effkernels
from _common import write_rows
from effkernels import backends
from effkernels.models.backbone import Route, build
from effkernels.models.ema import EMA
from effkernels.models.methods import args_from_json, build_method
from effkernels.models.objectives import FlowMatching


def variants(depth: int, device: torch.device):
    """(label, backend, routes) rows to time: every runnable backend, then the routed baseline."""
    rows = []
    for b in ("reference", "triton", "cuda", "cpp"):
        if backends.available(b, device)[0] and not (b == "triton" and device.type == "cpu"):
            rows.append((f"SiT [{b}]", b, None))
    if depth - 3 >= 3:
        best = rows[-1][1]
        rows.append((f"SiT + route 3..{depth - 3} @0.5 [{best}]", best, [Route(3, depth - 3, 0.5)]))
    return rows


def step_fn(model, opt, objective, x, y, routes, amp):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = objective.loss(model, x, y, routes=routes)["loss"] if routes else objective.loss(model, x, y)["loss"]
        loss.backward()
        opt.step()
    return step


def timed(step, n: int, device: torch.device) -> tuple[float, float | None]:
    """(seconds per step over n steps, peak CUDA MiB or None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    return dt, (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None)


def measure(args, label, backend, routes) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.model, input_size=args.input_size, in_channels=args.channels,
                  num_classes=args.classes, backend=backend).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.channels, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    step = step_fn(model, opt, FlowMatching(), x, y, routes, amp=device.type == "cuda")
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    for _ in range(args.warmup):
        step()
    dt, peak = timed(step, args.steps, device)
    return {"variant": label, "backend": backend, "s_per_step": dt, "images_per_s": args.batch / dt,
            "gflops_per_step": flops / 1e9, "peak_mib": peak,
            "params": sum(p.numel() for p in model.parameters())}


def method_runner(args, spec: str):
    """(step, flops, params, extra params) for one method's full training step at default options."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.model, input_size=args.input_size, in_channels=args.channels,
                  num_classes=args.classes).to(device).train()
    method = build_method(spec, model, args_from_json(None))
    mods = torch.nn.ModuleDict(method.modules()).to(device).train()
    # what attach() reads from a trainer: the EMA (SRA's teacher), the device, the options
    gen = {"backbone": model, **{k: mods[k] for k in method.generator_modules}}
    method.attach(SimpleNamespace(ema=EMA(gen, 0.999), device=device, args=SimpleNamespace(out=None), ds=None))
    for a in method.aux_modules().values():
        a.module.to(device)
    params = list(model.parameters()) + list(mods.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    amp = device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = method.loss(model, {"x": x, "y": y, "generator": g}, 0)["loss"]
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step()
    return step, fc.get_total_flops(), sum(p.numel() for p in params)


def measure_methods(args, specs: list[str]) -> list[dict]:
    device = torch.device(args.device)
    runners = {s: method_runner(args, s) for s in specs}
    for s, (step, _, _) in runners.items():
        for _ in range(args.warmup):
            step()
    times = {s: [] for s in specs}
    peaks = {s: 0.0 for s in specs}
    for _ in range(args.repeats):
        for s, (step, _, _) in runners.items():
            dt, peak = timed(step, args.steps, device)
            times[s].append(dt)
            peaks[s] = max(peaks[s], peak or 0.0)
    rows = []
    for s in specs:
        ts = sorted(times[s])
        dt = ts[len(ts) // 2]
        rows.append({"variant": s, "backend": "auto", "s_per_step": dt, "images_per_s": args.batch / dt,
                     "spread": (ts[0], ts[-1]), "gflops_per_step": runners[s][1] / 1e9,
                     "peak_mib": peaks[s] if device.type == "cuda" else None, "params": runners[s][2]})
    return rows


def render(rows: list[dict]) -> str:
    base = rows[0]
    head = f"{'variant':<36}{'s/step':>9}{'img/s':>9}{'x base':>8}{'GFLOP/step':>12}{'x base':>8}{'peak MiB':>10}"
    out = [head, "-" * len(head)]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        out.append(f"{r['variant']:<36}{r['s_per_step']:>9.3f}{r['images_per_s']:>9.1f}"
                   f"{r['images_per_s'] / base['images_per_s']:>8.2f}{r['gflops_per_step']:>12.2f}"
                   f"{r['gflops_per_step'] / base['gflops_per_step']:>8.2f}{peak:>10}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny/1")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--input-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--methods", default=None, help="comma-separated methods to compare (e.g. sit,tread,maskdit)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds with --methods")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device; none is visible")
    for name in ("batch", "steps", "input_size", "channels", "classes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    depth = build(args.model, input_size=args.input_size, in_channels=args.channels,
                  num_classes=args.classes).depth if args.model else 0
    print(f"effkernels {effkernels.__version__}, torch {torch.__version__}, {args.device}, "
          f"threads={torch.get_num_threads()}, model {args.model} (depth {depth}), batch {args.batch}, "
          f"{args.channels}x{args.input_size}x{args.input_size}, {args.steps} timed steps")
    if args.methods:
        rows = measure_methods(args, [m.strip() for m in args.methods.split(",") if m.strip()])
    else:
        rows = [measure(args, *v) for v in variants(depth, torch.device(args.device))]
    print(render(rows))
    if args.methods:
        print("spread of the rounds (s/step): " + ", ".join(
            f"{r['variant']} {r['spread'][0]:.3f}-{r['spread'][1]:.3f}" for r in rows))
    write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
