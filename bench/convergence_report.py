"""The convergence bench's outputs: per-method summaries (mean and spread over seeds), the markdown
table, the CSV of every point and the PNG of the curves. Pure functions of the points, so the test
checks them on a real tiny run and a reader can re-render from convergence.json."""
from __future__ import annotations

import csv
import math
import statistics

METRICS = ("fd", "acc", "fd_2step", "acc_2step", "train_wall_s", "train_cpu_s")
CSV_FIELDS = ("method", "seed", "step", "train_wall_s", "train_cpu_s", "fd", "acc", "fd_2step", "acc_2step",
              "cpu_model", "cores", "torch")


def mean_sd(xs) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value); (None, None) for none."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def curve(points: list[dict], method: str) -> list[dict]:
    """The method's mean curve: per eval step, mean and sd over seeds of every metric."""
    steps = sorted({p["step"] for p in points if p["method"] == method})
    out = []
    for s in steps:
        at = [p for p in points if p["method"] == method and p["step"] == s]
        row = {"step": s, "n": len(at)}
        for k in METRICS:
            m, sd = mean_sd(p.get(k) for p in at)
            if m is not None:
                row[k], row[k + "_sd"] = m, sd
        out.append(row)
    return out


def _interp(xs, ys, x):
    """Linear interpolation of y at x inside [xs[0], xs[-1]]; None outside (no extrapolation)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] if xs and math.isclose(x, xs[-1]) else None


def summarise(points: list[dict], methods, baseline: str, steps: int, flops: dict | None = None,
              totals: list[dict] | None = None) -> dict:
    """Per method: final FD/accuracy (mean, sd over seeds), throughput, FLOPs, and how many steps and
    seconds its mean curve needs to reach the baseline's final mean FD (first eval point at or below
    it: the resolution is the eval interval).

    Throughput comes from `totals` (each run's whole training seconds: method, seed, train_wall_s,
    train_cpu_s) when given, else from the clocks at the final eval points (the same numbers up to
    the last checkpoint write)."""
    flops = flops or {}
    rows = {}
    for m in methods:
        c = curve(points, m)
        finals = [p for p in points if p["method"] == m and p["step"] == steps]
        r = {"method": m, "seeds": sorted({p["seed"] for p in finals}), "curve": c}
        for k in ("fd", "acc", "fd_2step", "acc_2step"):
            r[k], r[k + "_sd"] = mean_sd(p.get(k) for p in finals)
        clocks = [t for t in totals if t["method"] == m] if totals is not None else finals
        r["steps_per_s"], r["steps_per_s_sd"] = mean_sd(steps / p["train_wall_s"] for p in clocks
                                                        if p["train_wall_s"] > 0)
        r["cpu_s_per_step"], r["cpu_s_per_step_sd"] = mean_sd(p["train_cpu_s"] / steps for p in clocks)
        r["train_wall_s"], _ = mean_sd(p["train_wall_s"] for p in clocks)
        r["train_cpu_s"], _ = mean_sd(p["train_cpu_s"] for p in clocks)
        if not r["seeds"]:
            r["seeds"] = sorted({p["seed"] for p in clocks})
        r["flops_per_step"] = flops.get(m)
        rows[m] = r
    base = rows.get(baseline)
    target = base["fd"] if base else None
    for m, r in rows.items():
        r["baseline"] = baseline
        r["speed_vs_baseline"] = (r["steps_per_s"] / base["steps_per_s"]
                                  if base and r["steps_per_s"] and base["steps_per_s"] else None)
        r["cpu_speed_vs_baseline"] = (base["cpu_s_per_step"] / r["cpu_s_per_step"]
                                      if base and r["cpu_s_per_step"] and base["cpu_s_per_step"] else None)
        r["flops_vs_baseline"] = (r["flops_per_step"] / base["flops_per_step"]
                                  if base and r["flops_per_step"] and base.get("flops_per_step") else None)
        r["reach"] = None
        if target is not None:
            for row in r["curve"]:
                if row["step"] > 0 and row.get("fd") is not None and row["fd"] <= target:
                    r["reach"] = {"step": row["step"], "train_wall_s": row["train_wall_s"],
                                  "train_cpu_s": row["train_cpu_s"]}
                    break
        # FD at equal CPU time: the method's mean curve at the baseline's final CPU seconds
        r["fd_at_baseline_cpu_s"] = None
        # (the baseline's CPU seconds at its final eval point, not its run total, which adds the last
        # checkpoint write: the baseline itself then reads its own final FD)
        base_end = [row for row in base["curve"] if row["step"] == steps and row.get("train_cpu_s") is not None] if base else []
        if base_end:
            pts = [(row["train_cpu_s"], row["fd"]) for row in r["curve"] if row.get("fd") is not None]
            if pts:
                xs, ys = zip(*pts)
                r["fd_at_baseline_cpu_s"] = _interp(list(xs), list(ys), base_end[0]["train_cpu_s"])
    return {"baseline": baseline, "target_fd": target, "steps": steps, "methods": rows}


def _pm(m, sd, fmt="{:.3g}") -> str:
    if m is None:
        return "-"
    return fmt.format(m) + (f" ± {fmt.format(sd)}" if sd else "")


def _x(v, fmt="{:.2f}x") -> str:
    return "-" if v is None else fmt.format(v)


def machine_line(mach: dict) -> str:
    la = mach.get("loadavg_start")
    la_end = mach.get("loadavg_end")
    load = ""
    if la:
        load = f"; 1-min load average {la[0]:.1f} at the start" + (f", {la_end[0]:.1f} at the end" if la_end else "")
    return (f"{mach.get('cpu')}, {mach.get('usable_cores')} usable of {mach.get('cores')} cores, torch "
            f"{mach.get('torch')}, Python {mach.get('python')}, {mach.get('date')}{load}")


def render_scale(summary: dict, scale: dict, setting: str, peak_tflops: float, notes: dict | None = None) -> list[str]:
    """The FLOPs of each method's step at the papers' scale beside the digits ratios, and what the
    digits setting can and cannot show, in those numbers."""
    b = summary["baseline"]
    base = scale.get(b) if isinstance(scale.get(b), float) else None
    lines = ["", f"FLOPs per training step at the papers' scale ({setting}; counted on the meta device, "
             f"no weights; the bound is FLOPs / {peak_tflops:.0f} TFLOP/s, a dense-bf16 H200 at full use):", "",
             f"| method | digits GFLOP/step (vs {b}) | TFLOP/step at scale | vs {b} | step-time bound |",
             "|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        v = scale.get(m)
        gf = r["flops_per_step"]
        dig = "-" if gf is None else f"{gf / 1e9:.3g} ({_x(r['flops_vs_baseline'])})"
        if isinstance(v, float):
            lines.append(f"| {m} | {dig} | {v / 1e12:.1f} | {_x(v / base) if base else '-'} | "
                         f"{v / (peak_tflops * 1e12) * 1e3:.0f} ms |")
        else:
            lines.append(f"| {m} | {dig} | not counted ({v}) | - | - |")
    told = [f"{m}: {t}" for m, t in (notes or {}).items() if m in summary["methods"]]
    if told:
        lines += ["", "At scale, " + "; ".join(told) + "."]
    saving = [(m, summary["methods"][m]["flops_vs_baseline"], scale.get(m)) for m in ("tread", "maskdit")
              if m in summary["methods"] and isinstance(scale.get(m), float) and base]
    if saving:
        parts = ", ".join(f"{m} {d:.2f}x at 16 tokens but {v / base:.2f}x at scale" for m, d, v in saving
                          if d is not None)
        lines += ["", f"What the digits setting can and cannot show: the token-dropping methods' FLOPs per step "
                  f"relative to {b} are {parts}; at 16 tokens the saving is too small to show in the wall clock, "
                  "so the digits table compares quality at equal steps, not the speed-ups that 256-token "
                  "models get."]
    return lines


def render_table(summary: dict, mach: dict, config: dict, title: str, scale: dict | None = None,
                 scale_setting: str = "", peak_tflops: float = 989.0, scale_notes: dict | None = None) -> str:
    b, steps = summary["baseline"], summary["steps"]
    rows = summary["methods"]
    n_seeds = max((len(r["seeds"]) for r in rows.values()), default=0)
    tfd = summary["target_fd"]
    lines = [
        f"### Convergence on {title}: {steps} steps of batch {config.get('batch_size')}, "
        f"{n_seeds} seed(s) per method",
        "",
        f"Machine: {machine_line(mach)}. Runs: {config.get('jobs', 1)} at once, "
        f"{config.get('threads') or 'default'} torch thread(s) each.",
        "Seconds are training only (evaluation excluded), mean over seeds; CPU s is the run's process CPU time "
        "(all its threads), steadier than the wall clock on a shared machine. FD/acc: mean ± sd over seeds at "
        f"step {steps}, the trainer's evaluation of {config.get('eval_samples')} EMA samples (CT/ACT: `fd` 1-step, 2-step beside it). "
        f"'to {b}'s FD' = first eval point (every {max(1, steps // max(1, config.get('evals', 4)))} steps) where "
        f"the mean FD <= {b}'s final mean FD ({'-' if tfd is None else f'{tfd:.3g}'}).",
        "",
        f"| method | FD | acc | 2-step FD / acc | steps/s (wall) | vs {b} | CPU s/step | vs {b} | GFLOP/step | "
        f"vs {b} | steps to {b}'s FD | wall s | CPU s | FD at {b}'s CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        two = "-" if r["fd_2step"] is None else f"{_pm(r['fd_2step'], r['fd_2step_sd'])} / {_pm(r['acc_2step'], r['acc_2step_sd'], '{:.3f}')}"
        reach = r["reach"]
        gf = None if r["flops_per_step"] is None else r["flops_per_step"] / 1e9
        fd_eq = r["fd_at_baseline_cpu_s"]
        r_step = reach["step"] if reach else ("not reached" if r["fd"] is not None else "-")
        r_wall = f"{reach['train_wall_s']:.0f}" if reach else "-"
        r_cpu = f"{reach['train_cpu_s']:.0f}" if reach else "-"
        lines.append(
            f"| {m} | {_pm(r['fd'], r['fd_sd'])} | {_pm(r['acc'], r['acc_sd'], '{:.3f}')} | {two} | "
            f"{_pm(r['steps_per_s'], r['steps_per_s_sd'])} | {_x(r['speed_vs_baseline'])} | "
            f"{_pm(r['cpu_s_per_step'], r['cpu_s_per_step_sd'])} | {_x(r['cpu_speed_vs_baseline'])} | "
            f"{'-' if gf is None else f'{gf:.3g}'} | {_x(r['flops_vs_baseline'])} | "
            f"{r_step} | {r_wall} | {r_cpu} | {'-' if fd_eq is None else f'{fd_eq:.3g}'} |")
    if scale:
        lines += render_scale(summary, scale, scale_setting, peak_tflops, scale_notes)
    # FD at equal steps: every eval point of every method's mean curve
    evsteps = sorted({row["step"] for r in rows.values() for row in r["curve"]})
    if not evsteps:  # a throughput-only run (--evals 0)
        return "\n".join(lines) + "\n"
    lines += ["", "FD (mean over seeds) at each eval step:", "",
              "| method | " + " | ".join(str(s) for s in evsteps) + " |",
              "|---|" + "---|" * len(evsteps)]
    for m, r in rows.items():
        at = {row["step"]: row.get("fd") for row in r["curve"]}
        lines.append(f"| {m} | " + " | ".join("-" if at.get(s) is None else f"{at[s]:.3g}" for s in evsteps) + " |")
    return "\n".join(lines) + "\n"


def write_csv(points: list[dict], path: str, mach: dict, title: str) -> None:
    """One row per (method, seed, eval step); the machine in its own columns (any CSV reader works)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + ("setting",))
        w.writeheader()
        for p in points:
            w.writerow({**{k: p.get(k, "") for k in CSV_FIELDS[:9]}, "cpu_model": mach.get("cpu"),
                        "cores": mach.get("usable_cores"), "torch": mach.get("torch"), "setting": title})


def write_plot(points: list[dict], methods, path: str, mach: dict, title: str, baseline: str = "sit") -> str | None:
    """FD against steps, training wall seconds and CPU seconds (log scale), and accuracy against
    steps: one line per method (mean over seeds), a band of mean ± sd."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not any(p.get("fd") is not None for p in points):
        return None  # a throughput-only run (--evals 0): nothing to plot
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [(axes[0, 0], "step", "fd", "steps"), (axes[0, 1], "train_wall_s", "fd", "training wall-clock s"),
              (axes[1, 0], "train_cpu_s", "fd", "training process CPU s"), (axes[1, 1], "step", "acc", "steps")]
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        c = [row for row in curve(points, m) if row.get("fd") is not None]
        if not c:
            continue
        for ax, xk, yk, _ in panels:
            xs = [row[xk] for row in c]
            ys = [row[yk] for row in c]
            sd = [row[yk + "_sd"] for row in c]
            style = dict(lw=2.2) if m == baseline else dict(lw=1.4)
            ax.plot(xs, ys, "o-", color=cmap(i % 10), label=m + (" (1-step)" if c[0].get("fd_2step") is not None
                                                                and yk == "fd" else ""), ms=3, **style)
            lo = [max(y - s, 1e-6 if yk == "fd" else 0.0) for y, s in zip(ys, sd)]
            hi = [y + s for y, s in zip(ys, sd)]
            ax.fill_between(xs, lo, hi, color=cmap(i % 10), alpha=0.15, lw=0)
    for ax, _, yk, xl in panels:
        ax.set_xlabel(xl)
        if yk == "fd":
            ax.set_yscale("log")
            ax.set_ylabel("Frechet distance (EMA samples)")
        else:
            ax.set_ylim(0, 1)
            ax.set_ylabel("class accuracy")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{title}: mean over seeds, band = ± sd\n{machine_line(mach)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
