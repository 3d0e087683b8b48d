"""Training-step throughput per method, and the dense step per backend, measured side by side.

  python bench/bench_train.py [--methods all|sit,tread,repa,...] [--model tiny/2] [--input-size 8]
                              [--channels 1] [--classes 10] [--batch 64] [--steps 5] [--warmup 1]
                              [--repeats 3] [--backend auto[,reference]] [--compile] [--out bench/out]
  python bench/bench_train.py --whole-step --model SiT-S/2 --input-size 32 --channels 4 --classes 1000 --batch 8

Methods (the default, `--methods all`): one row per registered method (effkernels.models.methods)
at its default options, and the compositions that work (tread+repa, tread+sra, maskdit+repa,
maskdit+sra). Each row times the trainer's whole iteration, `Trainer.train_step`: the method's
before_step (CT's target EMA), loss, backward, gradient clipping, AdamW, the aux optimizers' steps
(ACT: the discriminator's own step, so ACT's row is G step + D step) and the EMA update; batches are
drawn beforehand (data loading is not timed). Variants:
  repa, erw      the default `dae` encoder's architecture run live, with UNTRAINED weights (the bench
                 measures cost, not quality: training it would take minutes and change no FLOP), and
                 the same features pre-computed and read from the batch extras (precomputed:repa_dae);
                 ERW is timed in its phase 2 (REPA at depth/2 with its decaying weight)
  sra            its teacher stopped at the teacher block (stop_at, what sra.py does) and, for
                 comparison, a full teacher forward (all blocks and the final layer; a wrapper here)
  act            ACT's R1 penalty runs every 16th step; it falls on the warm-up step (step 0), so the
                 timed steps hold none (its amortised cost is 1/16 of a double-backward D step)
The data are random arrays of the given shape (cost does not depend on the values), written to a
temporary .npz with the features beside them, read through the trainer's own loader.

`--backend auto,reference` gives every row once per backend, in the same interleaved rounds (our
kernels vs the pure-PyTorch reference per method); labels then end in [backend].

Whole step (`--whole-step`): the dense SiT step on the auto backend and the reference backend; with
`--compile` also torch.compile of the reference backend and torch.compile of auto.

Timing: `--repeats` interleaved rounds (row A, B, C, A, B, C, ...) so that the drift of a shared
machine hits every row alike; in each round a row gets `--warmup` untimed steps, then `--steps` timed
ones. Eager rows are rebuilt for every round (one model in memory at a time; `--keep` builds each
once and keeps it, its FLOP-count step then being its first warm-up step); compiled rows are built
and compiled once and kept (a recompile per round would dominate). Reported: the median round's
s/step with the rounds' range, images/s, and the ratio to SiT as the median over rounds of
SiT's time / the row's time in the same round (with its range). FLOPs per step: what
torch.utils.flop_counter counts in one eager step (matmuls, convolutions, attention; elementwise
ops are not counted; torch's counter misses the CPU attention kernel, which is added here, so
attention counts on the CPU as on a GPU). Peak memory: on a GPU the CUDA allocator's peak over the warm-up and timed
steps; on the CPU the peak RSS of a forked child process per row that builds the row and runs
2 steps (the second holds AdamW's state and the activations at
once; getrusage of the child), reported with the RSS of the process before the row
(imports, data) subtracted, which is what the row itself adds. Compiled rows on the CPU get no
memory figure (their child would compile again).

Exit code 2 with a message for an unknown method, backend, model or a backend that cannot run here.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from _common import Bar, machine, machine_line, markdown_table, write_outputs
from effkernels.models.methods import encoders as enc
from effkernels.models.backbone.configs import CONFIGS
from effkernels.models.methods import METHODS, ConfigError, parse_spec
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import effkernels
from effkernels import backends

# Compositions that work (docs/methods.md, "Compositions"); tread+maskdit and erw+token plans do not.
COMPOSITIONS = ("tread+repa", "tread+sra", "maskdit+repa", "maskdit+sra")
ORDER = ("sit", "tread", "maskdit", "repa", "erw", "sra", "ct", "act")  # table order; others follow
FEATURE_KEY = "repa_dae"
LIVE = ["--repa-encoder", "dae-untrained"]
PRE = ["--repa-encoder", f"precomputed:{FEATURE_KEY}"]


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    method: str
    argv: list = field(default_factory=list)
    backend: str = "auto"
    compile: bool = False
    full_teacher: bool = False  # SRA: run the teacher through every block (no stop_at)


def variants(spec: str, backend: str) -> list[Row]:
    """The rows that measure `spec` (one method or a composition)."""
    names = spec.split("+")
    if len(names) > 1:
        argv = LIVE if any(n in ("repa", "erw") for n in names) else []
        return [Row(spec + (" [dae live]" if argv else ""), spec, list(argv), backend)]
    n = names[0]
    if n == "repa":
        return [Row("repa [dae live]", n, list(LIVE), backend), Row("repa [precomputed]", n, list(PRE), backend)]
    if n == "erw":
        w = ["--erw-warmup-steps", "0"]
        return [Row("erw phase 2 [dae live]", n, w + LIVE, backend), Row("erw phase 2 [precomputed]", n, w + PRE, backend)]
    if n == "sra":
        return [Row("sra [teacher to t_b]", n, [], backend), Row("sra [full teacher]", n, [], backend, full_teacher=True)]
    if n == "act":
        return [Row("act [G + D step]", n, [], backend)]
    return [Row(n, n, [], backend)]


def method_rows(specs: list[str], backend: str | list[str], compiled: bool) -> list[Row]:
    """SiT first (the baseline of every ratio), then each spec's variants; with --compile each row twice.
    Several backends (`--backend auto,reference`): each variant once per backend, side by side, its
    label ending in [backend]; the first backend's SiT is the baseline."""
    specs = ["sit"] + [s for s in specs if s != "sit"]
    names = [backend] if isinstance(backend, str) else list(backend)
    rows = [r for s in specs for b in names for r in variants(s, b)]
    if len(names) > 1:
        for r in rows:
            r.label += f" [{r.backend}]"
    if compiled:
        rows = [x for r in rows for x in (r, Row("compile " + r.label, r.method, r.argv, r.backend, True, r.full_teacher))]
    return rows


def whole_step_rows(compiled: bool) -> list[Row]:
    rows = [Row("SiT [auto]", "sit"), Row("SiT [reference]", "sit", backend="reference")]
    if compiled:
        rows += [Row("compile SiT [reference]", "sit", backend="reference", compile=True),
                 Row("compile SiT [auto]", "sit", compile=True)]
    return rows


def all_specs() -> list[str]:
    names = [n for n in ORDER if n in METHODS] + sorted(set(METHODS) - set(ORDER))
    return names + [c for c in COMPOSITIONS if all(p in METHODS for p in c.split("+"))]


# ------------------------------------------------------------------------------------------------
# The encoder of the live REPA/ERW rows: the dae architecture, untrained
# ------------------------------------------------------------------------------------------------


class UntrainedDAE(enc.DataEncoder):
    """The default `dae` encoder's network with its initial weights: the same per-step cost as the
    trained one (same convolutions on the same images), without the minutes of training and the cache."""

    def prepare(self, ds, *, retrain: bool = False, verbose: bool = False) -> None:
        if self.net is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net = enc.DenoisingAutoencoder(ds.channels, self.dim, self.train_kw["width"])
            self._set(net, {"untrained": True})


if "dae-untrained" not in enc.ENCODERS:
    enc.register_encoder("dae-untrained")(lambda arg, *, grid: UntrainedDAE())


class FullTeacher(nn.Module):
    """SRA's teacher run through every block and the final layer (stop_at dropped), its hidden state
    at the teacher block taken on the way: what the teacher costs without stopping early."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, *args, stop_at=None, **kw):
        return self.teacher(*args, **kw)


# ------------------------------------------------------------------------------------------------
# Building and stepping one row
# ------------------------------------------------------------------------------------------------


def patch_size(model: str) -> int:
    return int(model.rsplit("/", 1)[1])


def write_data(args, path: str) -> None:
    """Random data of the benchmark's shape, every class present, with dae-sized features beside it."""
    g = np.random.default_rng(0)
    n = max(2 * args.batch, args.classes, 16)
    tokens = (args.input_size // patch_size(args.model)) ** 2
    y = g.integers(0, args.classes, n)
    y[0] = args.classes - 1  # the loader sets num_classes to max(y) + 1
    np.savez(path, x=g.standard_normal((n, args.channels, args.input_size, args.input_size), dtype=np.float32),
             y=y.astype(np.int64), **{FEATURE_KEY: g.standard_normal((n, tokens, enc.DataEncoder().dim)).astype(np.float16)})


def train_args(args, row: Row, data: str, out: str):
    from effkernels.models.cli.train import parse_args

    argv = ["--method", row.method, "--model", args.model, "--data", data, "--out", out,
            "--batch-size", str(args.batch), "--steps", "1000", "--warmup", "0", "--eval-every", "0",
            "--ckpt-every", "0", "--quiet", "--device", args.device, "--backend", row.backend] + row.argv
    return parse_args(argv + (["--compile"] if row.compile else []))


class Runner:
    """One row's trainer and its pre-drawn batches."""

    def __init__(self, args, row: Row, ds, data: str, out: str, compiled: bool | None = None):
        from effkernels.models.train.trainer import Trainer

        self.row, self.device = row, torch.device(args.device)
        a = train_args(args, row, data, out)
        if compiled is not None:
            a.compile = compiled
        with effkernels.use_backend(row.backend):
            self.trainer = Trainer(a, ds=ds)
        if row.full_teacher:
            parts = [p for n, p in self.trainer.method.parts if n == "sra"]
            for p in parts:
                p.teacher = FullTeacher(p.teacher)
        n = args.warmup + args.steps + 1
        self.batches = [self.trainer.make_batch(i) for i in range(n)]
        self.i = 0

    def step(self) -> None:
        with effkernels.use_backend(self.row.backend):
            self.trainer.train_step(self.batches[self.i % len(self.batches)])
        self.i += 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kw) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kw) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch's flop counter knows the CUDA attention kernels but not the CPU one SDPA dispatches to here,
# so attention (4 B N^2 D per block forward) was silently missing from CPU counts: counted as the
# CUDA kernels are.
CPU_ATTENTION_FLOPS = {}
for _name, _fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa),
                   ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward)):
    if hasattr(torch.ops.aten, _name):
        CPU_ATTENTION_FLOPS[getattr(torch.ops.aten, _name)] = _fn


def count_flops(fn) -> int:
    """FLOPs torch.utils.flop_counter counts while fn() runs (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as fc:
        fn()
    return fc.get_total_flops()


def rss_kib() -> int:
    """This process's resident set now (VmRSS), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cpu_peak_mib(args, row: Row, ds, data: str, out: str) -> tuple[float, float] | None:
    """(peak RSS MiB, MiB above its RSS at the fork) of a forked child that builds `row` and runs 2 steps. The parent has run no torch op yet (no OpenMP pool to inherit), so the child is a clean
    copy; the RSS at the fork (the imports) is subtracted, as it is the same for every row."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(r)
            base = rss_kib()  # what the child holds of the parent's pages when it starts
            run = Runner(args, row, ds, data, out)
            for _ in range(min(args.warmup, 1) + 1):  # the 2nd step holds the optimizer state and activations
                run.step()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            os.write(w, json.dumps({"peak": peak, "base": base}).encode())
        except BaseException as e:  # noqa: BLE001 - report anything, never fall back into the parent's code
            os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
            code = 1
        finally:
            os.close(w)
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        msg = json.loads(f.read() or '{"error": "child died"}')
    os.waitpid(pid, 0)
    if "error" in msg:
        raise RuntimeError(f"memory child of row {row.label!r} failed: {msg['error']}")
    return msg["peak"] / 1024, (msg["peak"] - msg["base"]) / 1024


# ------------------------------------------------------------------------------------------------
# The measurement
# ------------------------------------------------------------------------------------------------


def measure(args, rows: list[Row]) -> list[dict]:
    from effkernels.models.data.sources import load_dataset

    device = torch.device(args.device)
    tmp = tempfile.mkdtemp(prefix="effkernels-bench-")
    data = os.path.join(tmp, "data.npz")
    write_data(args, data)
    cpu_mem = device.type == "cpu" and args.memory
    bar = Bar((len(rows) if cpu_mem else 0) + len(rows) * (args.repeats + 1), "bench")
    peaks = {}
    if cpu_mem:  # first, while this process has run no torch op
        for i, row in enumerate(rows):
            peaks[i] = None if row.compile else cpu_peak_mib(args, row, None, data, tmp)
            bar.update(f"memory {row.label}")
    ds = load_dataset(data)  # after the children: each child loads its own copy
    flops, kept = {}, {}
    for i, row in enumerate(rows):  # FLOPs of one eager step (the same math as the compiled one)
        run = Runner(args, row, ds, data, tmp, compiled=False)
        if run.trainer.aux:
            run.step()  # step 0 is ACT's R1 step (a double backward the flop counter cannot run), and not timed
        flops[i] = count_flops(run.step)
        params = sum(p.numel() for p in run.trainer.params)
        flops[i] = (flops[i], params)
        if args.keep and not row.compile:
            kept[i] = run  # its counted step was its first warm-up step
        del run
        bar.update(f"flops {row.label}")
    times = {i: [] for i in range(len(rows))}
    gpu_peak = {i: 0.0 for i in range(len(rows))}
    for _ in range(args.repeats):
        for i, row in enumerate(rows):
            run = kept.get(i) or Runner(args, row, ds, data, tmp)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(max(0, args.warmup - run.i)):  # a kept row warms up once, in its first round
                run.step()
            run.sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                run.step()
            run.sync()
            times[i].append((time.perf_counter() - t) / args.steps)
            if device.type == "cuda":
                gpu_peak[i] = max(gpu_peak[i], torch.cuda.max_memory_allocated() / 2**20)
            if row.compile or args.keep:
                kept[i] = run
            del run
            bar.update(f"{row.label}")
    bar.close()
    base = times[0]
    out = []
    for i, row in enumerate(rows):
        ts = times[i]
        med = statistics.median(ts)
        ratio = [b / t for b, t in zip(base, ts)]
        f, params = flops[i]
        peak = peaks.get(i)
        rec = {"row": row.label, "method": row.method, "backend": row.backend, "compile": row.compile,
               "s_per_step": med, "s_per_step_min": min(ts), "s_per_step_max": max(ts),
               "images_per_s": args.batch / med, "speed_vs_sit": statistics.median(ratio),
               "speed_vs_sit_min": min(ratio), "speed_vs_sit_max": max(ratio),
               "gflops_per_step": f / 1e9, "flops_vs_sit": f / flops[0][0], "params": params,
               "rounds": len(ts), "times": ts}
        if device.type == "cuda":
            rec["peak_mib"] = gpu_peak[i]
            rec["memory"] = "CUDA allocator peak"
        elif peak is not None:
            rec["peak_rss_mib"], rec["peak_mib"] = peak
            rec["memory"] = "peak RSS of a forked child, above its RSS at the fork"
        else:
            rec["peak_mib"] = None
            rec["memory"] = "not measured (compiled row on the CPU)" if cpu_mem else "not measured (--no-memory)"
        out.append(rec)
    for rec in out:
        p0 = out[0]["peak_mib"]
        rec["memory_vs_sit"] = rec["peak_mib"] / p0 if rec["peak_mib"] is not None and p0 else None
    return out


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def render(rows: list[dict], head: str) -> str:
    def ms(r):
        return f"{r['s_per_step']:.3g} ({r['s_per_step_min']:.3g}-{r['s_per_step_max']:.3g})"

    def mem(r):
        return "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"

    def memx(r):
        return "-" if r["memory_vs_sit"] is None else f"{r['memory_vs_sit']:.2f}"

    table = markdown_table(
        ["row", "s/step (range)", "images/s", "speed vs SiT (range)", "GFLOP/step", "FLOPs vs SiT",
         "peak MiB", "memory vs SiT"],
        [[r["row"], ms(r), f"{r['images_per_s']:.3g}",
          f"{r['speed_vs_sit']:.2f} ({r['speed_vs_sit_min']:.2f}-{r['speed_vs_sit_max']:.2f})",
          f"{r['gflops_per_step']:.3g}", f"{r['flops_vs_sit']:.2f}", mem(r), memx(r)] for r in rows])
    return head + "\n\n" + table + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="all",
                   help="comma-separated methods or compositions (e.g. sit,tread,tread+repa), or 'all': every "
                        "registered method and " + ", ".join(COMPOSITIONS))
    p.add_argument("--whole-step", action="store_true",
                   help="the dense SiT step on auto and reference instead (with --compile also compile(reference), "
                        "compile(auto))")
    p.add_argument("--model", default="tiny/2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per round before the timed ones")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--backend", default="auto",
                   help="the methods' backend, or several comma-separated (rows per backend): "
                        + ", ".join(backends.BACKENDS))
    p.add_argument("--compile", action="store_true", help="add a torch.compile row beside each eager row")
    p.add_argument("--keep", action="store_true",
                   help="build each row once and keep it for every round (all rows in memory at once; no "
                        "rebuild and warm-up per round)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the per-row memory children on the CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="folder for <name>.md, .csv and .json")
    return p


def parse(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device; none is visible")
    for name in ("batch", "steps", "repeats", "input_size", "channels", "classes"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 0 or a.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    if a.model not in CONFIGS:
        p.error(f"--model {a.model!r} is unknown; known: {', '.join(CONFIGS)}")
    if a.input_size % patch_size(a.model):
        p.error(f"--input-size {a.input_size} is not a multiple of {a.model}'s patch size")
    a.backends = [b.strip() for b in a.backend.split(",") if b.strip()]
    if not a.backends:
        p.error("--backend is empty")
    for b in a.backends:
        if b not in backends.BACKENDS:
            p.error(f"--backend {b!r} is unknown; known: {', '.join(backends.BACKENDS)}")
        ok, why = (True, "") if b == "auto" else backends.available(b, torch.device(a.device))
        if not ok or (b == "triton" and a.device == "cpu"):
            p.error(f"--backend {b} cannot run on {a.device} here: "
                    f"{why if not ok else 'the Triton interpreter is a test tool, not timed'}")
    if a.whole_step:
        a.specs = ["sit"]
    else:
        a.specs = all_specs() if a.methods == "all" else [m.strip() for m in a.methods.split(",") if m.strip()]
        if not a.specs:
            p.error("--methods is empty")
        for s in a.specs:
            try:
                parse_spec(s)
            except ConfigError as e:
                p.error(f"--methods: {e}")
        if any("act" in s.split("+") for s in a.specs) and a.batch % 2:
            p.error(f"act splits the batch into halves: --batch must be even, got {a.batch}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = whole_step_rows(a.compile) if a.whole_step else method_rows(a.specs, a.backends, a.compile)
    m = machine()
    what = "whole dense SiT step per backend" if a.whole_step else "training step per method"
    head = (f"{what}: {a.model}, {a.channels}x{a.input_size}x{a.input_size}, {a.classes} classes, batch {a.batch}, "
            f"{a.device}, fp32{' (bf16 autocast)' if a.device == 'cuda' else ''}; {a.repeats} interleaved rounds of "
            f"{a.warmup} warm-up + {a.steps} timed steps; median (range)\n{machine_line(m)}\ncommand: {m['command']}")
    print(head.split("\n")[0], file=sys.stderr)
    try:
        res = measure(a, rows)
    except ConfigError as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    md = render(res, head)
    print(md)
    stem = "whole_step" if a.whole_step else "methods"
    for path in write_outputs(a.out, stem, res, md, {"machine": m, "args": {k: v for k, v in vars(a).items()}}):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
