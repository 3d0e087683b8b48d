"""The trainer's records: a metrics log (JSONL and CSV), a progress bar, and the curves plot."""
from __future__ import annotations

import csv
import json
import os
import sys
import time

CSV_FIELDS = ("step", "wall_s", "loss", "grad_norm", "lr", "img_per_s", "fd", "acc")


class MetricsLog:
    """Appends one record per call to <out>/metrics.jsonl (every key) and <out>/metrics.csv (CSV_FIELDS).

    On resume, records past the checkpoint's step (written after it by the run that died) are dropped
    so that each step appears once.
    """

    def __init__(self, out: str, resume_step: int | None = None):
        self.jsonl, self.csv = os.path.join(out, "metrics.jsonl"), os.path.join(out, "metrics.csv")
        if resume_step is None:
            for p in (self.jsonl, self.csv):
                if os.path.exists(p):
                    os.unlink(p)
        else:
            self._truncate(resume_step)
        if not os.path.exists(self.csv):
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)

    def _truncate(self, step: int) -> None:
        rows = self.read(self.jsonl)
        keep = [r for r in rows if r.get("step", 0) <= step]
        with open(self.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        with open(self.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_FIELDS)
            for r in keep:
                w.writerow([_fmt(r.get(k)) for k in CSV_FIELDS])

    def write(self, record: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(record.get(k)) for k in CSV_FIELDS])

    @staticmethod
    def read(path: str) -> list[dict]:
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


def _fmt(v):
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


class Progress:
    """tqdm when it is installed and stderr is a terminal-like stream, else a plain line every `every` steps."""

    def __init__(self, start: int, total: int, enabled: bool = True, every: int = 50):
        self.total, self.every, self.enabled, self.bar = total, every, enabled, None
        self.step, self.t0 = start, time.time()
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, file=sys.stderr,
                                mininterval=1.0, disable=not sys.stderr.isatty())
            except ImportError:
                self.bar = None

    def update(self, step: int, **info) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        if self.bar is not None and not self.bar.disable:
            self.bar.update(step - self.step)
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} {text}", flush=True)
        self.step = step

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_curves(jsonl: str, path: str) -> str | None:
    """loss (raw and smoothed) and FD against step, one PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = MetricsLog.read(jsonl)
    loss = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    fd = [(r["step"], r["fd"]) for r in rows if r.get("fd") is not None]
    acc = [(r["step"], r["acc"]) for r in rows if r.get("acc") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if loss:
        s, v = zip(*loss)
        axes[0].plot(s, v, alpha=0.3, label="loss")
        k = max(1, len(v) // 20)
        sm = [sum(v[max(0, i - k):i + 1]) / len(v[max(0, i - k):i + 1]) for i in range(len(v))]
        axes[0].plot(s, sm, label=f"moving mean ({k + 1})")
        if min(v) > 0:  # a method's total loss may be negative (alignment terms are -cos)
            axes[0].set_yscale("log")
    axes[0].set_xlabel("step"), axes[0].set_ylabel("training loss"), axes[0].legend()
    if fd:
        s, v = zip(*fd)
        axes[1].plot(s, v, "o-", label="FD (EMA samples)")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("Frechet distance")
    if acc:
        ax2 = axes[1].twinx()
        s, v = zip(*acc)
        ax2.plot(s, v, "s--", color="tab:green", label="class accuracy")
        ax2.set_ylim(0, 1), ax2.set_ylabel("class accuracy")
    axes[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
