"""Fused alignment-projection loss vs the unfused projector + loss: time and peak memory, forward+backward.

  python bench/bench_align.py [--batches 8,32] [--dims 384,768] [--tokens 256] [--repeats 5] [--dtype float32]

Variants, each a full forward+backward (gradients of the input, the weights and the bias):
  unfused  y = F.linear(x, W, b) then ops.cosine_alignment_loss(y, z)  (y (B, N, 768) saved for backward)
  fused    ops.projected_cosine_loss(x, W, b, z)                        (y never materialised whole)
at two scopes: `last`, the projector's last Linear + loss on x (B, N, 2048); `head`, REPA's whole
AlignmentHead(D, 768) (Linear(D, 2048)-SiLU-Linear(2048, 2048)-SiLU-Linear(2048, 768)) with fused=False/True.

Time: all variants interleaved in one process, `--repeats` rounds, median and the rounds' range.
Peak memory: one fresh subprocess per (row, variant); after a warm-up step it drops the gradients,
resets the kernel's peak-RSS counter (/proc/self/clear_refs) and reports VmHWM - VmRSS over one more
step, i.e. the extra memory the step needed above its inputs and parameters (gradients included). glibc's mmap threshold is pinned
(MALLOC_MMAP_THRESHOLD_) so freed large buffers go back to the kernel and RSS tracks live memory.
On a GPU (CUDA tensors) it reports torch.cuda.max_memory_allocated over the step instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from effkernels import ops, use_backend
from effkernels.nn import AlignmentHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, machine_line, markdown_table

HIDDEN, Z_DIM = 2048, 768


def fused_backend(device) -> str:
    # The op's kernel path: C++ on CPU tensors, Triton on CUDA ones (auto picks these once
    # CPP_FASTER_ON_CPU lists the op; the `reference` variant is what auto picks otherwise).
    return "triton" if device.type == "cuda" else "cpp"


def build(scope: str, B: int, N: int, D: int, dtype, device):
    """run(variant): one forward+backward of a row; inputs and parameters made once."""
    fb = fused_backend(device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, N, Z_DIM, generator=g).to(device, dtype)
    if scope == "last":
        x = torch.randn(B, N, HIDDEN, generator=g).to(device, dtype).requires_grad_()
        lin = torch.nn.Linear(HIDDEN, Z_DIM).to(device, dtype)
        params = [x, lin.weight, lin.bias]

        def step(variant):
            if variant in ("fused", "reference"):
                loss = ops.projected_cosine_loss(x, lin.weight, lin.bias, z,
                                                 backend=fb if variant == "fused" else "reference")
            else:
                loss = ops.cosine_alignment_loss(F.linear(x, lin.weight, lin.bias), z)
            loss.backward()
    else:
        h = torch.randn(B, N, D, generator=g).to(device, dtype).requires_grad_()
        head = AlignmentHead(D, Z_DIM, hidden=HIDDEN).to(device, dtype)
        params = [h, *head.parameters()]

        def step(variant):
            with use_backend(fb if variant == "fused" else "auto"):
                head(h, z, fused=variant == "fused").backward()

    def run(variant):
        for p in params:
            p.grad = None
        step(variant)

    def clear():
        for p in params:
            p.grad = None
    run.clear = clear
    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(spec: dict) -> dict:
    """Peak extra memory of one step of one variant, in MiB (run in a fresh process)."""
    device = torch.device(spec["device"])
    run = build(spec["scope"], spec["B"], spec["N"], spec["D"], getattr(torch, spec["dtype"]), device)
    run(spec["variant"])  # warm-up: lazy initialisation (oneDNN/cuBLAS workspaces, Triton compiles)
    run.clear()  # the measured step allocates every gradient afresh: they count in its peak
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(spec["variant"])
        _sync(device)
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    run(spec["variant"])
    return {"peak_mib": (_status_kib("VmHWM") - base) / 1024}


def peak_memory(spec: dict) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="8,32")
    p.add_argument("--dims", default="384,768", help="D of the head rows (the last-layer rows do not depend on D)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--scopes", default="last,head")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    rows = []
    for scope in a.scopes.split(","):
        for B in (int(b) for b in a.batches.split(",")):
            for D in ([0] if scope == "last" else [int(d) for d in a.dims.split(",")]):
                rows.append((scope, B, D))
    results = []
    for scope, B, D in rows:
        # `reference`: ops.projected_cosine_loss on the reference backend (autograd through F.linear),
        # what auto runs on CPU tensors unless the op is listed in CPP_FASTER_ON_CPU.
        variants = ("unfused", "fused", "reference") if scope == "last" else ("unfused", "fused")
        run = build(scope, B, a.tokens, D, dtype, device)
        times = {v: [] for v in variants}
        for v in variants:
            run(v)  # warm-up
        for _ in range(a.repeats):
            for v in variants:  # interleaved, so a busy spell on the shared machine hits both
                _sync(device)
                t = time.perf_counter()
                run(v)
                _sync(device)
                times[v].append(time.perf_counter() - t)
        del run
        mem = {v: peak_memory({"scope": scope, "B": B, "N": a.tokens, "D": D, "dtype": a.dtype,
                               "device": a.device, "variant": v}) for v in variants}
        r = {"scope": scope, "B": B, "N": a.tokens, "D": D or None, "dtype": a.dtype,
             "fused_backend": fused_backend(device)}
        for v in variants:
            r[f"{v}_s"] = statistics.median(times[v])
            r[f"{v}_s_range"] = (min(times[v]), max(times[v]))
            r[f"{v}_peak_mib"] = mem[v]
        results.append(r)
        print(json.dumps(r), flush=True)
    header = ["scope", "B x N", "D", "unfused s (range)", "fused s (range)", "fused/unfused time",
              "unfused peak MiB", "fused peak MiB", "saved MiB", "op on reference: s, peak MiB"]
    table = []

    def fmt(r, v):
        return f"{r[v + '_s']:.3f} ({r[v + '_s_range'][0]:.3f}-{r[v + '_s_range'][1]:.3f})"
    for r in results:
        table.append([r["scope"] if r["scope"] == "head" else "last Linear + loss", f"{r['B']} x {r['N']}",
                      r["D"] or "-", fmt(r, "unfused"), fmt(r, "fused"), f"{r['fused_s'] / r['unfused_s']:.2f}",
                      f"{r['unfused_peak_mib']:.0f}", f"{r['fused_peak_mib']:.0f}",
                      f"{r['unfused_peak_mib'] - r['fused_peak_mib']:.0f}",
                      f"{r['reference_s']:.3f}, {r['reference_peak_mib']:.0f}" if "reference_s" in r else "-"])
    print()
    print(machine_line(machine()))
    print(f"{a.dtype}, {a.device}, {a.repeats} interleaved rounds; unfused: auto backend, "
          f"fused: {fused_backend(device)}")
    print(markdown_table(header, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
