"""TREAD as a training method: the route plan, per-sample draws that replay, dense evaluation,
sparse guidance with two conditional branches, the fine-tune stage, FLOPs, and the CLI."""
import argparse

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effkernels.models.cli import train as train_mod
from effkernels.models.train.runlog import MetricsLog
from effkernels.models.train.trainer import Trainer
from effkernels.models.backbone.network import Route
from effkernels.models.backbone.configs import build
from effkernels.models.checkpoint import load_checkpoint
from effkernels.models.methods import ConfigError, build_method
from effkernels.models.methods.tread import TREAD, SparseGuided, default_routes
from effkernels.models.cli import sample as sample_mod
from helpers import digits_like_batch

SMALL = dict(depth=6, hidden_size=32, num_heads=2)


def _args(**kw):
    return argparse.Namespace(**kw)  # the options not given take the method's defaults


def _batch(seed, b=5):
    return digits_like_batch(seed, b)


def test_default_placement_and_route_specs():
    assert default_routes(12, 0.5) == [Route(3, 9, 0.5)] and default_routes(28, 0.5) == [Route(3, 25, 0.5)]
    assert default_routes(12, 0.0) == []
    model = build("tiny/2", **SMALL)
    assert TREAD(model, _args()).routes == [Route(3, 3, 0.5)]
    m = TREAD(model, _args(route=["1:2", "4:6:0.25"]))
    assert m.routes == [Route(1, 2, 0.5), Route(4, 6, 0.25)]
    for bad, match in ((["2:1"], "must be >= Route.start"), (["1:3", "3:4"], "non-overlapping"),
                       (["1:7"], "ends after the last block"), (["x:2"], "--route 'x:2'"), (["1:2:1.5"], "ratio")):
        with pytest.raises(ConfigError, match=match):
            TREAD(model, _args(route=bad))
    with pytest.raises(ConfigError, match="--route-ratio"):
        TREAD(model, _args(route_ratio=1.0))


def test_draws_differ_per_sample_replay_from_the_seed_and_stay_sorted(seed):
    model = build("tiny/2", **SMALL).train()
    m = TREAD(model, _args(route=["1:2", "4:5:0.25"]))
    a = m.forward_options(model, _batch(seed), 0)["routes"]
    b = m.forward_options(model, _batch(seed), 0)["routes"]
    c = m.forward_options(model, _batch(seed + 1), 0)["routes"]
    assert [r.idx.shape for r in a] == [(5, 8), (5, 12)]
    assert all(torch.equal(r.idx, s.idx) for r, s in zip(a, b))  # the step's generator replays the draw
    assert not all(torch.equal(r.idx, s.idx) for r, s in zip(a, c))
    assert len({tuple(row.tolist()) for row in a[0].idx}) > 1  # samples draw independently
    assert not torch.equal(a[0].idx[:, :4], a[1].idx[:, :4])  # and so do the two routes
    assert all(bool((r.idx[:, 1:] > r.idx[:, :-1]).all()) for r in a)  # raster order
    un = TREAD(model, _args(route=["1:2"], route_unsorted=True)).forward_options(model, _batch(seed), 0)["routes"]
    assert not bool((un[0].idx[:, 1:] > un[0].idx[:, :-1]).all())


def test_loss_is_the_flow_objective_of_the_routed_model_on_all_tokens(seed):
    model = build("tiny/2", **SMALL).train()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.y_embedder.dropout_prob = 0.0  # no label dropout: compare two forwards exactly
    m = build_method("tread", model, _args())
    batch = _batch(seed)
    out = m.loss(model, batch, 0)
    (route,) = TREAD(model, _args()).forward_options(model, _batch(seed), 0)["routes"]
    x_t = (1 - batch["t"].view(-1, 1, 1, 1)) * batch["x"] + batch["t"].view(-1, 1, 1, 1) * batch["noise"]
    v = model(x_t, batch["t"], batch["y"], routes=[route])
    ref = (v - (batch["noise"] - batch["x"])).pow(2).mean()
    torch.testing.assert_close(out["loss"], ref, rtol=1e-6, atol=0)
    dense = (model(x_t, batch["t"], batch["y"]) - (batch["noise"] - batch["x"])).pow(2).mean()
    assert (out["loss"] - dense).abs() > 1e-6  # the route changed the prediction


def test_evaluation_and_sampling_run_dense(seed):
    model = build("tiny/2", **SMALL).eval()
    m = TREAD(model, _args())
    assert m.forward_options(model, _batch(seed), 0) == {}
    calls = []
    orig = model.forward

    def spy(*a, **kw):
        calls.append(kw)
        return orig(*a, **kw)

    model.forward = spy
    m.sample({"backbone": model}, torch.arange(3), torch.randn(3, 1, 8, 8), steps=2)
    assert calls and all("routes" not in kw for kw in calls)
    calls.clear()
    TREAD(model, _args(route_eval=True)).sample({"backbone": model}, torch.arange(3), torch.randn(3, 1, 8, 8), steps=2)
    assert calls and all(kw["routes"] == [Route(3, 3, 0.5)] for kw in calls)


def test_sparse_guidance_uses_two_conditional_branches(seed):
    model = build("tiny/2", **SMALL).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    seen = []
    orig = model.forward

    def spy(x, t, y, **kw):
        seen.append((y.clone(), [r.ratio for r in kw["routes"]]))
        torch.manual_seed(0)  # the same draw for the reference below
        return orig(x, t, y, **kw)

    model.forward = spy
    sg = SparseGuided(model, [Route(2, 4, 0.5)], scale=1.5, strong=0.3, weak=0.7)
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 0.6), torch.tensor([1, 2, 3, 4])
    v = sg(x, t, y)
    assert [r for _, r in seen] == [[0.3], [0.7]]
    assert all(torch.equal(lab, y) for lab, _ in seen)  # both conditional: never the null class
    torch.manual_seed(0)
    strong = orig(x, t, y, routes=[Route(2, 4, 0.3)])
    torch.manual_seed(0)
    weak = orig(x, t, y, routes=[Route(2, 4, 0.7)])
    torch.testing.assert_close(v, weak + 1.5 * (strong - weak), rtol=0, atol=0)


def _step_flops(model, method, seed):
    batch = _batch(seed, b=4)
    with FlopCounterMode(display=False) as fc:
        method.loss(model, batch, 0)["loss"].backward()
    return fc.get_total_flops()


def test_routing_cuts_the_step_flops(seed):
    model = build("tiny/2", **SMALL).train()
    dense = _step_flops(model, build_method("sit", model, None), seed)
    routed = _step_flops(model, build_method("tread", model, _args(route=["2:5"])), seed)
    # blocks 2..5 of 6 on 8 of 16 tokens: their linear FLOPs halve, attention's quarter
    assert routed < 0.8 * dense
    assert _step_flops(model, build_method("tread", model, _args(route_ratio=0.0)), seed) == dense


def test_trains_through_the_cli_then_fine_tunes_dense(tmp_path, capsys):
    # an explicit per-route ratio: the dense fine-tune below must still turn it off
    common = ["--method", "tread", "--model-kwargs", '{"depth": 6, "hidden_size": 32, "num_heads": 2}',
              "--batch-size", "16", "--eval-every", "0", "--quiet", "--log-every", "5", "--lr", "3e-3",
              "--route", "2:4:0.5"]
    assert train_mod.main(["--out", str(tmp_path / "r"), "--steps", "30", *common]) == 0
    rows = MetricsLog.read(str(tmp_path / "r" / "metrics.jsonl"))
    assert rows[-1]["loss"] < rows[0]["loss"]
    out, ckpt = str(tmp_path / "s"), str(tmp_path / "r" / "last.pt")
    # sparse guidance with the rates given at sampling; a bad rate names its flag
    assert sample_mod.main(["--ckpt", ckpt, "--out", out, "--num", "4", "--steps", "2", "--sparse-guidance", "1.5",
                            "--sparse-guidance-strong", "0.25", "--sparse-guidance-weak", "0.5"]) == 0
    capsys.readouterr()
    assert sample_mod.main(["--ckpt", ckpt, "--out", out, "--num", "4", "--steps", "2", "--sparse-guidance", "1.5",
                            "--sparse-guidance-weak", "1.0"]) == 2
    assert "--sparse-guidance-weak must lie in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_mod.main(["--ckpt", ckpt, "--out", out, "--num", "4", "--sparse-guidance-strong", "0.2"])
    assert "go with --sparse-guidance" in capsys.readouterr().err
    # the dense fine-tune: the same method resumed with routing off
    tr = Trainer(train_mod.parse_args(["--out", str(tmp_path / "probe"), "--steps", "1", "--route-ratio",
                                                 "0", *common]))
    assert tr.method.parts[0][1].routes == []
    assert train_mod.main(["--out", str(tmp_path / "r"), "--steps", "32", "--resume", "auto", "--route-ratio", "0",
                           *common]) == 0
    assert load_checkpoint(str(tmp_path / "r" / "last.pt"))["step"] == 32

    assert sample_mod.main(["--ckpt", str(tmp_path / "r" / "last.pt"), "--out", out, "--num", "4", "--steps", "2",
                            "--sparse-guidance", "1.5"]) == 2  # the fine-tuned run has no routes left
    assert "sparse guidance needs routes" in capsys.readouterr().err
    assert sample_mod.main(["--ckpt", str(tmp_path / "r" / "last.pt"), "--out", out, "--num", "4", "--steps", "2"]) == 0


def test_route_help_says_blocks_are_1_based_and_inclusive():
    p = argparse.ArgumentParser()
    TREAD.add_args(p)
    helps = {a.dest: a.help for a in p._actions}
    assert "1-based" in helps["route"] and "inclusive" in helps["route"]
    assert "0-based 2:8 is our 3:9" in helps["route"]


def test_route_ratio_zero_is_dense_whatever_the_routes_say(seed):
    """The dense fine-tune (--route-ratio 0) runs no route, explicit per-route ratios included; the
    specs are still checked; a ratio range with it is a contradiction."""
    print(f"seed={seed}")
    model = build("tiny/2", **SMALL).train()
    m = TREAD(model, _args(route_ratio=0.0, route=["1:2:0.5", "4:5:0.25"]))
    assert m.routes == [] and m.forward_options(model, _batch(seed), 0) == {}
    dense = _step_flops(model, build_method("sit", model, None), seed)
    assert _step_flops(model, build_method("tread", model, _args(route_ratio=0.0, route=["2:5:0.5"])), seed) == dense
    assert TREAD(model, _args(route=["1:2:0.5", "4:5"])).routes == [Route(1, 2, 0.5), Route(4, 5, 0.5)]
    with pytest.raises(ConfigError, match="ends after the last block"):
        TREAD(model, _args(route_ratio=0.0, route=["1:7:0.5"]))
    with pytest.raises(ConfigError, match="--route-ratio 0 .* contradicts --route-ratio-range"):
        TREAD(model, _args(route_ratio=0.0, route_ratio_range="0.2:0.6"))


def test_sparse_guidance_rates_are_options(seed):
    """--sparse-guidance-strong/--sparse-guidance-weak set the two forced rates (training options kept
    in the checkpoint, overridable at sampling), each checked to lie in [0, 1), errors naming the flag."""
    print(f"seed={seed}")
    model = build("tiny/2", **SMALL).eval()
    seen = []
    orig = model.forward

    def spy(x, t, y, **kw):
        seen.append([r.ratio for r in kw["routes"]])
        return orig(x, t, y, **kw)

    model.forward = spy
    y, noise = torch.arange(2), torch.randn(2, 1, 8, 8)
    m = TREAD(model, _args(route=["2:4"], sparse_guidance_strong=0.2, sparse_guidance_weak=0.6))
    m.sample({"backbone": model}, y, noise, steps=1, sampler="euler", sparse_guidance=1.5)
    assert seen and all(r in ([0.2], [0.6]) for r in seen) and [0.2] in seen and [0.6] in seen
    seen.clear()
    m.sample({"backbone": model}, y, noise, steps=1, sampler="euler", sparse_guidance=1.5,
             sparse_guidance_strong=0.0, sparse_guidance_weak=0.5)
    assert [0.0] in seen and [0.5] in seen and all(r in ([0.0], [0.5]) for r in seen)
    seen.clear()
    TREAD(model, _args(route=["2:4"])).sample({"backbone": model}, y, noise, steps=1, sampler="euler",
                                              sparse_guidance=1.5)
    assert [0.3] in seen and [0.7] in seen  # the paper's rates by default
    for kw, flag in ((dict(sparse_guidance_strong=1.0), "--sparse-guidance-strong"),
                     (dict(sparse_guidance_weak=-0.1), "--sparse-guidance-weak"),
                     (dict(sparse_guidance_weak=0.99), "--sparse-guidance-weak")):  # 0.99 of 16: none left
        with pytest.raises(ConfigError, match=flag):
            TREAD(model, _args(route=["2:4"], **kw))
    with pytest.raises(ConfigError, match="--sparse-guidance-strong must lie in"):
        m.sample({"backbone": model}, y, noise, steps=1, sparse_guidance=1.5, sparse_guidance_strong=1.5)
    with pytest.raises(ConfigError, match="go with --sparse-guidance"):
        m.sample({"backbone": model}, y, noise, steps=1, sparse_guidance_weak=0.5)
    with pytest.raises(ConfigError, match="--sparse-guidance-weak"):
        SparseGuided(model, [Route(2, 4, 0.5)], 1.5, strong=0.3, weak=1.0)
