"""What the benchmark scripts share (they run as `python bench/<name>.py`, so bench/ is on sys.path;
the pytest micro-benchmarks import it through bench/conftest.py)."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import sys


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict:
    """The machine a number was measured on; every output of every bench carries it."""
    import torch

    import effkernels

    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mem = memory_gib()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(mem, 1) if mem else None, "gpu": gpu or "none",
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_v,
            "effkernels": effkernels.__version__, "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def machine_line(m: dict) -> str:
    return (f"{m['date']}; CPU {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
            f"{m['memory_gib']} GiB; GPU {m['gpu']}; python {m['python']}, torch {m['torch']}, "
            f"triton {m['triton']}, effkernels {m['effkernels']}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_outputs(out_dir: str | None, stem: str, rows: list[dict], markdown: str, meta: dict) -> list[str]:
    """<out>/<stem>.md (the printed table with the machine line), .csv (one row per table row, the
    machine description in a leading comment) and .json ({"machine": ..., "rows": [...]})."""
    if not out_dir:
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("md", "csv", "json")]
    with open(paths[0], "w") as f:
        f.write(markdown.rstrip() + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths[1], "w", newline="") as f:
        f.write("# " + machine_line(meta["machine"]) + "\n")
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in r.items()})
    with open(paths[2], "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    return paths


def write_rows(rows: list[dict], path: str | None) -> None:
    """Save a table's rows as JSON when a path is given (bench_ops.py's --out)."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    print(f"wrote {path}")


class Bar:
    """A progress bar on stderr (tqdm when installed, else one line per unit of work)."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        except ImportError:
            self.bar = None
        self.n, self.total, self.desc = 0, total, desc

    def update(self, what: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.desc} {self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
