"""The benchmark harnesses (bench/): the per-method throughput table, its FLOP count, its argument
errors, and the kernel micro-benchmarks under --benchmark-disable. No timing is asserted: the machine
is shared, so the tests check that the tables are well formed and computed from one run."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import bench_train
from effkernels.models.methods import METHODS


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the benches never time the interpreter
    return env


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def methods_table(tmp_path_factory):
    """One harness run on a tiny config: every registered method and composition, memory children included."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, os.path.join(BENCH, "bench_train.py"), "--model", "tiny/2", "--batch", "4",
           "--steps", "1", "--warmup", "0", "--repeats", "2", "--threads", "1", "--out", str(out)]
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "methods.json") as f:
        return json.load(f), res.stdout, out


@pytest.mark.slow  # one harness run over every method: ~20 s of CPU
def test_methods_table_covers_every_method_and_is_well_formed(methods_table):
    data, stdout, out = methods_table
    rows = data["rows"]
    seen = {n for r in rows for n in r["method"].split("+")}
    assert set(METHODS) <= seen, f"methods without a row: {set(METHODS) - seen}"
    assert {"tread+repa", "tread+sra", "maskdit+repa", "maskdit+sra"} <= {r["method"] for r in rows}
    base = rows[0]
    assert base["method"] == "sit" and base["speed_vs_sit"] == 1.0 and base["flops_vs_sit"] == 1.0
    for r in rows:
        for k in ("s_per_step", "images_per_s", "speed_vs_sit", "gflops_per_step", "flops_vs_sit", "peak_mib",
                  "memory_vs_sit", "params"):
            assert _finite_positive(r[k]), (r["row"], k, r[k])
        assert len(r["times"]) == 2 and all(_finite_positive(t) for t in r["times"])
        # ratios come from the same run: SiT's time over the row's, round by round
        per_round = sorted(b / t for b, t in zip(base["times"], r["times"]))
        assert r["speed_vs_sit_min"] == pytest.approx(per_round[0])
        assert r["speed_vs_sit_max"] == pytest.approx(per_round[-1])
        assert r["flops_vs_sit"] == pytest.approx(r["gflops_per_step"] / base["gflops_per_step"])
        assert r["memory_vs_sit"] == pytest.approx(r["peak_mib"] / base["peak_mib"])
        assert r["s_per_step_min"] <= r["s_per_step"] <= r["s_per_step_max"]
    labels = [r["row"] for r in rows]
    for want in ("repa [dae live]", "repa [precomputed]", "sra [teacher to t_b]", "sra [full teacher]",
                 "act [G + D step]"):
        assert want in labels
    by = {r["row"]: r for r in rows}
    # the full teacher runs more blocks than the stopped one
    assert by["sra [full teacher]"]["gflops_per_step"] > by["sra [teacher to t_b]"]["gflops_per_step"]
    # the machine description in every output, and the table printed
    assert data["machine"]["cpu"] and data["machine"]["torch"] == torch.__version__
    md = (out / "methods.md").read_text()
    csv_text = (out / "methods.csv").read_text()
    for text in (md, csv_text, stdout):
        assert "torch " + torch.__version__ in text and "GPU " in text
    assert md.count("\n| ") == len(rows) + 1  # header + one line per row
    assert len(csv_text.strip().splitlines()) == len(rows) + 2  # machine comment + header + rows


def hand_count(model, B: int) -> int:
    """FLOPs of one flow-matching training step of a dense DiT, by hand: 2 m n k per matmul; the
    backward computes the input and the weight gradient of every layer (2x its forward) except where
    the input needs none (the patch embedding's x_t, the time embedder's sinusoid: 1x); attention
    4 B N^2 D forward and 2.5x that backward (torch's count: the scores recomputed, four matmuls)."""
    D, N, depth = model.hidden_size, model.num_patches, model.depth
    p, C, Co = model.patch_size, model.in_channels, model.out_channels
    T = B * N
    conv = 2 * T * C * p * p * D
    t1, t2 = 2 * B * 256 * D, 2 * B * D * D
    dense = 2 * B * D * 6 * D + 2 * T * D * 3 * D + 2 * T * D * D + 2 * T * D * 4 * D * 2
    attn = 4 * B * N * N * D
    final = 2 * B * D * 2 * D + 2 * T * D * p * p * Co
    linear = t2 + depth * dense + final
    return 3 * linear + 2 * (conv + t1) + depth * attn * 3.5


@pytest.mark.parametrize("name,size", [("tiny/2", 8), ("tiny/1", 8)])
def test_flop_count_matches_hand_count(tmp_path, name, size):
    args = bench_train.parse(["--model", name, "--input-size", str(size), "--batch", "4", "--steps", "1",
                              "--warmup", "0"])
    data = str(tmp_path / "d.npz")
    bench_train.write_data(args, data)
    run = bench_train.Runner(args, bench_train.Row("sit", "sit"), None, data, str(tmp_path))
    got = bench_train.count_flops(run.step)
    want = hand_count(run.trainer.model, 4)
    assert got == pytest.approx(want, rel=0.02), (got, want)


@pytest.mark.parametrize("argv,words", [
    (["--methods", "sit,nosuch"], ["'nosuch' is not registered", "known:"]),
    (["--methods", "tread+nosuch"], ["'nosuch' is not registered"]),
    (["--backend", "nosuch"], ["--backend 'nosuch' is unknown"]),
    (["--backend", "cuda", "--device", "cpu"], ["--backend cuda cannot run on cpu"]),
])
def test_unknown_method_or_backend_exits_2_with_a_message(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        bench_train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err


@pytest.mark.slow  # ~80 cases on a tiny shape, 8 of them traced by torch.compile: ~20 s of CPU
def test_micro_benchmarks_run_under_benchmark_disable(tmp_path):
    """CI's run of bench/: tiny shapes, every case once, outputs checked against the reference."""
    cmd = [sys.executable, "-m", "pytest", "bench", "--benchmark-disable", "-q", "-p", "no:cacheprovider",
           "-o", "addopts="]
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 40, summary  # 8 ops x 2 directions x backends
