"""Convergence per method: every method trained on digits for the same step budget and several seeds,
FD and class accuracy at regular points against steps, wall-clock AND process CPU seconds.

    python bench/convergence.py                                   # every method, 3 seeds, 1000 steps, digits (16 tokens)
    python bench/convergence.py --data digits:16 --model tiny/1   # 256 tokens (digits upsampled to 16x16, patch 1)
    python bench/convergence.py --methods sit,tread --seeds 1 --steps 200 --out runs/conv/quick

Each run is the real trainer (effkernels.models.train.trainer.Trainer) in a subprocess of its own, so the
FD/accuracy points are the trainer's own evaluations (its metrics.jsonl; nothing is re-evaluated),
and the clocks are that process's. The worker wraps the trainer's evaluate() to subtract the
evaluation time, so the seconds at an eval point are training seconds only (data, forward,
backward, optimizer, EMA, the method's hooks). CPU seconds are time.process_time() of the worker
(all its threads): on a machine shared with other jobs the wall clock measures the neighbours as
much as the method, the CPU clock much less, so both are recorded and the CPU one is the steadier.

Methods and their budgets (all inside the same --steps):
  maskdit  masked for the first (1 - --maskdit-finetune) of the steps, then the unmasked fine-tune
           stage (--mask-ratio 0) resumed from that checkpoint for the rest (MaskDiT's recipe)
  erw      its warm-up phase is the first --erw-fraction of the steps (a fifth by default)
  ct, act  `fd`/`acc` are the 1-step sampler's, `fd_2step`/`acc_2step` the 2-step's
  the rest the trainer's defaults for the method.
The baseline is sit: the table gives steps and seconds each method needs to reach its final mean FD.

Outputs under --out: convergence.{png,csv,json,md}, and runs/<method>/seed<k>/ (the trainer's own
folders). The machine description (CPU, cores, torch, load average) is in every output.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import machine as common_machine  # noqa: E402
from convergence_report import render_table, summarise, write_csv, write_plot  # noqa: E402
from flops_at_scale import BATCH, LATENT, MODEL, NOTES, PEAK_TFLOPS  # noqa: E402
from flops_at_scale import table as flops_at_scale  # noqa: E402

ALL_METHODS = ("sit", "tread", "maskdit", "repa", "erw", "sra", "ct", "act")


# -----------------------------------------------------------------------------------------------
# The machine
# -----------------------------------------------------------------------------------------------


def machine() -> dict:
    """The bench's machine description (_common.machine) with the cores usable by this process and the
    load average at the start: a run beside other jobs measures them too."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable = os.cpu_count()
    return {**common_machine(), "usable_cores": usable,
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# -----------------------------------------------------------------------------------------------
# The runs: what each method's trainer is told
# -----------------------------------------------------------------------------------------------


def stages(method: str, steps: int, finetune: float, erw_fraction: float) -> list[list[str]]:
    """The trainer options of each stage of one run (one stage, or two for MaskDiT's fine-tune)."""
    if method == "maskdit" and finetune > 0:
        masked = max(1, min(steps - 1, round(steps * (1 - finetune))))
        return [["--steps", str(masked)], ["--steps", str(steps), "--mask-ratio", "0", "--resume", "auto"]]
    if method == "erw":
        return [["--steps", str(steps), "--erw-warmup-steps", str(max(1, round(steps * erw_fraction)))]]
    return [["--steps", str(steps)]]


def run_plan(a) -> list[dict]:
    """Every run, seeds outermost so that a drift in the machine's load hits every method alike."""
    common = ["--data", a.data, "--model", a.model, "--batch-size", str(a.batch_size),
              "--eval-every", str(max(1, a.steps // a.evals) if a.evals else 0), "--eval-samples", str(a.eval_samples),
              "--ckpt-every", "0", "--log-every", str(max(1, min(50, a.steps // max(1, a.evals)))), "--quiet",
              "--backend", a.backend, "--device", a.device]
    plan = []
    for k in range(a.seeds):
        seed = a.seed0 + k
        for m in a.methods:
            out = os.path.join(a.out, "runs", m, f"seed{seed}")
            st = [common + ["--method", m, "--seed", str(seed), "--out", out] + s + a.train_args
                  for s in stages(m, a.steps, a.maskdit_finetune, a.erw_fraction)]
            plan.append({"method": m, "seed": seed, "out": out, "stages": st, "threads": a.threads,
                         "count_flops": k == 0 and not a.no_flops})
    return plan


def launch(job: dict, timeout: float | None, started=None) -> dict:
    """One run in a subprocess (the worker below); its log goes to <out>/worker.log. started(job) is
    called as it begins."""
    if started is not None:
        started(job)
    os.makedirs(job["out"], exist_ok=True)
    spec = os.path.join(job["out"], "job.json")
    with open(spec, "w") as f:
        json.dump(job, f, indent=1)
    t0 = time.time()
    with open(os.path.join(job["out"], "worker.log"), "w") as log:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", spec], stdout=log,
                           stderr=subprocess.STDOUT, timeout=timeout)
    res = {"method": job["method"], "seed": job["seed"], "out": job["out"], "rc": p.returncode,
           "process_wall_s": time.time() - t0}
    if p.returncode:
        with open(os.path.join(job["out"], "worker.log")) as f:
            res["error"] = f.read()[-2000:]
    return res


# -----------------------------------------------------------------------------------------------
# The worker: one run, in its own process
# -----------------------------------------------------------------------------------------------


def count_step_flops(trainer) -> float:
    """FLOPs of one whole training step of this trainer (torch.utils.flop_counter: matmuls, attention,
    convolutions; elementwise work counts 0), the last step of its stage again: ERW in its phase 2,
    MaskDiT in its masked stage, ACT with its discriminator step. Changes the weights: run it only
    after the stage's checkpoint is written."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer.step = max(0, trainer.step - 1)
    batch = trainer.make_batch(trainer.step)
    with FlopCounterMode(display=False) as fc:
        trainer.train_step(batch)
    return float(fc.get_total_flops())


def worker(spec_path: str) -> int:
    import torch

    import effkernels
    from effkernels.models.data.sources import load_dataset
    from effkernels.models.train.trainer import Trainer
    from effkernels.models.cli.train import parse_args

    with open(spec_path) as f:
        job = json.load(f)
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    timing = os.path.join(job["out"], "timing.jsonl")
    if os.path.exists(timing):
        os.unlink(timing)
    ds, offset_w, offset_c, flops = None, 0.0, 0.0, None
    for argv in job["stages"]:
        a = parse_args(argv)
        with effkernels.use_backend(a.backend):
            if ds is None:
                ds = load_dataset(a.data)
            trainer = Trainer(a, ds=ds)
            clock = {"w0": time.time(), "c0": time.process_time(), "eval_w": 0.0, "eval_c": 0.0}
            evaluate = trainer.evaluate

            def timed_evaluate(grid_path=None, _ev=evaluate, _tr=trainer, _ck=clock, _ow=offset_w, _oc=offset_c):
                # the training seconds so far: this stage's clock minus its evaluations, plus earlier stages
                w, c = time.time(), time.process_time()
                rec = {"step": _tr.step, "train_wall_s": _ow + w - _ck["w0"] - _ck["eval_w"],
                       "train_cpu_s": _oc + c - _ck["c0"] - _ck["eval_c"]}
                res = _ev(grid_path)
                _ck["eval_w"] += time.time() - w
                _ck["eval_c"] += time.process_time() - c
                rec["eval_wall_s"] = time.time() - w
                with open(timing, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                return res

            trainer.evaluate = timed_evaluate
            trainer.run()
            offset_w += time.time() - clock["w0"] - clock["eval_w"]
            offset_c += time.process_time() - clock["c0"] - clock["eval_c"]
            if job.get("count_flops") and flops is None:
                flops = count_step_flops(trainer)  # after the clocks stopped and the checkpoint was written
    with open(os.path.join(job["out"], "run_summary.json"), "w") as f:
        json.dump({"train_wall_s": offset_w, "train_cpu_s": offset_c, "threads": torch.get_num_threads(),
                   "flops_per_step": flops}, f)
    return 0


# -----------------------------------------------------------------------------------------------
# Collecting the points
# -----------------------------------------------------------------------------------------------


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


def progress_line(r: dict, done: int, total: int, elapsed: float) -> str:
    """'  done   sit seed 0: FD 7.26, 24 s  [3/8 runs, 1:10 elapsed, ETA 2:20]' for a finished run: its
    final FD (the last evaluation's) and time, then the job's progress; the ETA assumes the runs
    left go at the pace of those done (runs finished per second of the job, parallel runs included)."""
    fd = [p["fd"] for p in collect(r)] if r["rc"] == 0 else []
    what = (f"FD {fd[-1]:.3g}, " if fd else "") + f"{r['process_wall_s']:.0f} s" if r["rc"] == 0 else \
        f"FAILED (rc {r['rc']})"
    left = total - done
    eta = elapsed / done * left if done else 0.0
    tail = f"ETA {_clock(eta)}" if left else "all runs done"
    return f"  done   {r['method']} seed {r['seed']}: {what}  [{done}/{total} runs, {_clock(elapsed)} elapsed, {tail}]"


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(res: dict) -> list[dict]:
    """Every eval point of one run: the trainer's FD/accuracy joined with the worker's clocks."""
    clocks = {r["step"]: r for r in read_jsonl(os.path.join(res["out"], "timing.jsonl"))}
    points = []
    for r in read_jsonl(os.path.join(res["out"], "metrics.jsonl")):
        if "fd" not in r:
            continue
        c = clocks.get(r["step"])
        if c is None:
            raise RuntimeError(f"{res['out']}: eval at step {r['step']} has no timing record")
        p = {"method": res["method"], "seed": res["seed"], "step": r["step"],
             "train_wall_s": c["train_wall_s"], "train_cpu_s": c["train_cpu_s"]}
        for k in ("fd", "acc", "fd_2step", "acc_2step"):
            if r.get(k) is not None:
                p[k] = float(r[k])
        points.append(p)
    return points


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated registered methods")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (mean and spread)")
    p.add_argument("--seed0", type=int, default=0, help="first seed")
    p.add_argument("--steps", type=int, default=1000, help="the step budget of every method")
    p.add_argument("--evals", type=int, default=4,
                   help="evaluations over the budget (every steps/evals; 0: none, throughput and FLOPs only)")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", default="digits", help="'digits' (8x8) or 'digits:16' (upsampled, for 256 tokens at patch 1)")
    p.add_argument("--model", default="tiny/2")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--jobs", default="1",
                   help="runs at once; 'auto' or 0: the usable cores (each run then wants --threads 1)")
    p.add_argument("--quiet", action="store_true", help="print only the final table (no progress lines)")
    p.add_argument("--maskdit-finetune", type=float, default=0.2,
                   help="fraction of the budget MaskDiT spends in its unmasked fine-tune stage (0: none)")
    p.add_argument("--erw-fraction", type=float, default=0.2, help="fraction of the budget that is ERW's warm-up")
    p.add_argument("--baseline", default="sit")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOPs counts (digits: one extra step per method, first seed, after its run; the papers' "
                        "scale: bench/flops_at_scale.py on the meta device)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is killed")
    p.add_argument("--out", default="runs/convergence")
    p.add_argument("--title", default=None, help="a label for the outputs (default: data and model)")
    p.add_argument("--train-args", default="", help="extra effkernels-train options for every run (one string)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the outputs from the finished runs already under --out")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a._worker:
        return a
    from effkernels.models.methods import METHODS

    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown or not a.methods:
        p.error(f"--methods: unknown {unknown or 'empty list'}; known: {', '.join(sorted(METHODS))}")
    if a.evals < 0:
        p.error(f"--evals must be >= 0 (0: no FD evaluation, throughput only), got {a.evals}")
    try:
        a.jobs = len(os.sched_getaffinity(0)) if a.jobs in ("auto", "0") else int(a.jobs)
    except ValueError:
        p.error(f"--jobs must be a whole number or 'auto', got {a.jobs!r}")
    for name in ("seeds", "steps", "eval_samples", "batch_size", "jobs"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.evals > a.steps:
        p.error(f"--evals {a.evals} exceeds --steps {a.steps}")
    if not (0 <= a.maskdit_finetune < 1) or not (0 <= a.erw_fraction < 1):
        p.error("--maskdit-finetune and --erw-fraction must lie in [0, 1)")
    import shlex
    a.train_args = shlex.split(a.train_args)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._worker:
        return worker(a._worker)
    os.makedirs(a.out, exist_ok=True)
    mach = machine()
    prev = os.path.join(a.out, "convergence.json")
    if a.report_only and os.path.exists(prev):  # the machine as it was while the runs ran
        with open(prev) as f:
            mach = {**json.load(f)["machine"], "reported": mach["date"]}
    title = a.title or f"{a.data}, {a.model}"
    plan = run_plan(a)
    results, t0 = [], time.time()
    if a.report_only:  # re-collect the runs under --out (e.g. of an interrupted bench) without training;
        # an unfinished run adds its eval points to the curves, only finished ones give final numbers
        plan_done = [j for j in plan if any(os.path.exists(os.path.join(j["out"], f))
                                            for f in ("timing.jsonl", "run_summary.json"))]
        results = [{"method": j["method"], "seed": j["seed"], "out": j["out"], "rc": 0, "process_wall_s": 0.0}
                   for j in plan_done]
        plan = []
    say = (lambda *_: None) if a.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if plan:
        say(f"{title}: {len(plan)} runs, {a.jobs} at a time, {a.threads or 'default'} torch thread(s) each")
    lock = threading.Lock()

    def started(job):
        with lock:
            say(f"  start  {job['method']} seed {job['seed']}")

    with cf.ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = [ex.submit(launch, job, a.timeout, started) for job in plan]
        for fut in cf.as_completed(futs):
            r = fut.result()
            results.append(r)
            with lock:
                say(progress_line(r, len(results), len(plan), time.time() - t0))
    failed = [r for r in results if r["rc"] != 0]
    for r in failed:
        print(f"run {r['method']} seed {r['seed']} failed (rc {r['rc']}), see {r['out']}/worker.log:\n"
              f"{r.get('error', '')[-800:]}", file=sys.stderr)
    points = [p for r in results if r["rc"] == 0 for p in collect(r)]
    flops, totals = {}, []
    for r in results:
        summ = os.path.join(r["out"], "run_summary.json")
        if r["rc"] == 0 and os.path.exists(summ):
            with open(summ) as f:
                rs = json.load(f)
            totals.append({"method": r["method"], "seed": r["seed"], "train_wall_s": rs["train_wall_s"],
                           "train_cpu_s": rs["train_cpu_s"]})
            if rs.get("flops_per_step") is not None:
                flops[r["method"]] = rs["flops_per_step"]
    points.sort(key=lambda p: (a.methods.index(p["method"]), p["seed"], p["step"]))
    if not a.report_only:
        mach["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        mach["elapsed_s"] = time.time() - t0
    config = {k: v for k, v in vars(a).items() if k != "_worker"}
    summary = summarise(points, a.methods, a.baseline, a.steps, flops, totals)
    scale = None if a.no_flops else flops_at_scale(a.methods)  # seconds: the meta device, no weights
    setting = f"{MODEL}, {LATENT[1]}x{LATENT[2]}x{LATENT[0]} latents = 256 tokens, batch {BATCH}"
    stem = os.path.join(a.out, "convergence")
    blob = {"title": title, "machine": mach, "config": config, "flops_per_step": flops, "summary": summary,
            "runs": totals, "flops_at_scale": {"setting": setting, "peak_tflops": PEAK_TFLOPS, "flops": scale},
            "failed": [{k: r[k] for k in ("method", "seed", "rc", "out")} for r in failed], "points": points}
    with open(stem + ".json", "w") as f:
        json.dump(blob, f, indent=1, default=float)
    write_csv(points, stem + ".csv", mach, title)
    png = write_plot(points, a.methods, stem + ".png", mach, title, baseline=a.baseline)
    table = render_table(summary, mach, config, title, scale, setting, PEAK_TFLOPS, NOTES)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {stem}.md, {stem}.csv, {stem}.json" + (f", {png}" if png else " (no PNG: no FD points, or no matplotlib)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
