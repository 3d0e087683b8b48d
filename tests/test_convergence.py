"""bench/convergence.py: the convergence harness on a tiny real budget writes well-formed, finite
CSV/JSON/markdown/PNG; its summary (mean and spread, the steps to the baseline's FD) is right on
hand-made points; bad method names are a clear argparse error."""
import csv
import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import convergence  # noqa: E402
import convergence_report as report  # noqa: E402


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.slow
def test_tiny_budget_writes_every_output(tmp_path, capsys):
    out = tmp_path / "conv"
    # two methods (one with the 2-step sampler), two seeds, 4 steps, an eval at 0, 2 and 4; a small
    # backbone and few eval samples keep it short. Runs in subprocesses: the real trainer.
    argv = ["--methods", "sit,ct", "--seeds", "2", "--steps", "4", "--evals", "2", "--eval-samples", "40",
            "--batch-size", "8", "--threads", "1", "--jobs", "2", "--out", str(out),
            "--train-args", "--eval-steps 2 --warmup 0 --model-kwargs '{\"depth\": 2, \"hidden_size\": 32, \"num_heads\": 2}'"]
    assert convergence.main(argv) == 0
    cap = capsys.readouterr()
    printed = cap.out
    # progress on stderr while it works: a line as each run starts and ends (FD, time, runs done, ETA)
    err = cap.err.splitlines()
    assert sum(ln.strip().startswith("start ") for ln in err) == 4
    done = [ln for ln in err if ln.strip().startswith("done ")]
    assert len(done) == 4 and all(" FD " in ln and " s  [" in ln for ln in done), done
    assert "[4/4 runs" in done[-1] and "all runs done" in done[-1] and "ETA" in done[0]
    stem = out / "convergence"
    for ext in ("json", "csv", "md", "png"):
        assert (stem.with_suffix("." + ext)).stat().st_size > 0, ext
    assert (stem.with_suffix(".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    blob = json.loads(stem.with_suffix(".json").read_text())
    mach = blob["machine"]
    assert mach["cpu"] and mach["cores"] >= 1 and mach["torch"]
    pts = blob["points"]
    # every (method, seed) has the evals at 0, 2 and 4, with finite numbers and clocks that grow
    for m in ("sit", "ct"):
        for s in (0, 1):
            run = sorted((p for p in pts if p["method"] == m and p["seed"] == s), key=lambda p: p["step"])
            assert [p["step"] for p in run] == [0, 2, 4], (m, s)
            assert run[0]["train_wall_s"] < run[1]["train_wall_s"] < run[2]["train_wall_s"]
            assert run[0]["train_cpu_s"] < run[1]["train_cpu_s"] < run[2]["train_cpu_s"]
            for p in run:
                assert all(_finite(p[k]) for k in ("fd", "acc", "train_wall_s", "train_cpu_s"))
                assert p["fd"] > 0 and 0 <= p["acc"] <= 1
                assert ("fd_2step" in p) == (m == "ct") and (m != "ct" or _finite(p["fd_2step"]))
    summ = blob["summary"]["methods"]
    for m in ("sit", "ct"):
        r = summ[m]
        assert r["seeds"] == [0, 1]
        assert all(_finite(r[k]) and r[k] > 0 for k in ("fd", "steps_per_s", "cpu_s_per_step", "flops_per_step"))
        assert r["fd_sd"] >= 0
    assert summ["sit"]["speed_vs_baseline"] == 1.0 and summ["sit"]["flops_vs_baseline"] == 1.0
    assert summ["ct"]["flops_per_step"] > summ["sit"]["flops_per_step"]  # its EMA-target forward on top

    with open(stem.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(pts) == 12
    assert set(report.CSV_FIELDS) <= set(rows[0])
    assert all(math.isfinite(float(r["fd"])) and r["cpu_model"] == mach["cpu"] for r in rows)

    md = stem.with_suffix(".md").read_text()
    assert md in printed or md.strip() in printed
    table = [ln for ln in md.splitlines() if ln.startswith("| sit |") or ln.startswith("| ct |")]
    assert len(table) == 6  # the summary row, the FLOPs-at-scale row and the per-step FD row of each method
    assert mach["cpu"] in md and "CPU s" in md
    # the FLOPs of each method's step at SiT-XL/2 x 256 (meta device), beside the digits ratios
    scale = blob["flops_at_scale"]
    assert "SiT-XL/2" in scale["setting"] and scale["flops"]["ct"] > scale["flops"]["sit"] > 1e14
    assert "TFLOP/step at scale" in md and any(ln.startswith("| ct | ") and " ms |" in ln for ln in md.splitlines())
    # the trainer's own folders are kept (its metrics.jsonl is where the FD points came from)
    assert (out / "runs" / "ct" / "seed1" / "metrics.jsonl").exists()

    # The same runs one at a time (--jobs 1, --quiet: no progress lines) give the same numbers: every
    # run is its own process with fixed seeds and one thread.
    seq = tmp_path / "seq"
    # (seed 0 of each method is enough to compare: it halves the test's second half)
    argv_seq = [*argv[:argv.index("--jobs")], "--jobs", "1", "--quiet", "--out", str(seq),
                *argv[argv.index("--train-args"):]]
    argv_seq[argv_seq.index("--seeds") + 1] = "1"
    assert convergence.main(argv_seq) == 0
    assert "start " not in capsys.readouterr().err
    clocks = ("wall_s", "img_per_s", "time", "cpu_s", "s_per_step", "steps_per_s")
    for m in ("sit", "ct"):
        for sd in (0,):
            par = convergence.read_jsonl(str(out / "runs" / m / f"seed{sd}" / "metrics.jsonl"))
            one = convergence.read_jsonl(str(seq / "runs" / m / f"seed{sd}" / "metrics.jsonl"))
            strip = lambda rows: [{k: v for k, v in r.items() if k not in clocks} for r in rows]  # noqa: E731
            assert strip(par) == strip(one) and len(par) > 0, (m, sd)


def _pts(method, seed, fds, dt=1.0):
    return [{"method": method, "seed": seed, "step": 10 * i, "train_wall_s": dt * 10 * i,
             "train_cpu_s": 2 * dt * 10 * i, "fd": fd, "acc": 0.5} for i, fd in enumerate(fds)]


def test_summary_spread_throughput_and_reach():
    # sit: final FDs 4 and 6 (mean 5); fast reaches <= 5 at step 10 on its mean curve, slow never does
    pts = (_pts("sit", 0, [60, 20, 4]) + _pts("sit", 1, [60, 30, 6]) +
           _pts("fast", 0, [60, 5, 3], dt=2.0) + _pts("fast", 1, [60, 5, 3], dt=2.0) +
           _pts("slow", 0, [60, 40, 9]))
    s = report.summarise(pts, ["sit", "fast", "slow"], "sit", 20, {"sit": 2e9, "fast": 1e9})
    sit, fast, slow = (s["methods"][m] for m in ("sit", "fast", "slow"))
    assert s["target_fd"] == 5.0
    assert sit["fd"] == 5.0 and math.isclose(sit["fd_sd"], math.sqrt(2))
    assert fast["reach"] == {"step": 10, "train_wall_s": 20.0, "train_cpu_s": 40.0}
    assert slow["reach"] is None and slow["fd_sd"] == 0.0
    assert sit["reach"]["step"] == 20
    assert math.isclose(fast["speed_vs_baseline"], 0.5) and math.isclose(fast["flops_vs_baseline"], 0.5)
    assert slow["flops_vs_baseline"] is None
    # at sit's final CPU seconds (40), fast's mean curve is at its step-10 point
    assert math.isclose(fast["fd_at_baseline_cpu_s"], 5.0)
    md = report.render_table(s, {"cpu": "X"}, {"batch_size": 8, "evals": 2, "eval_samples": 10}, "t")
    assert "| slow |" in md and "not reached" in md


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        convergence.parse_args(["--methods", "sit,nosuch"])
    assert e.value.code == 2 and "nosuch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convergence.parse_args(["--steps", "0"])


def test_maskdit_and_erw_stages_stay_inside_the_budget():
    ft = convergence.stages("maskdit", 100, 0.2, 0.2)
    assert ft[0] == ["--steps", "80"] and ft[1][:4] == ["--steps", "100", "--mask-ratio", "0"]
    assert convergence.stages("erw", 100, 0.2, 0.25) == [["--steps", "100", "--erw-warmup-steps", "25"]]
    assert convergence.stages("sit", 100, 0.2, 0.2) == [["--steps", "100"]]
