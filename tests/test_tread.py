"""TREAD as a training method: the route plan, per-sample draws that replay, dense evaluation,
sparse guidance with two conditional branches, the fine-tune stage, FLOPs, and the CLI."""
import argparse

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effkernels.models import train as train_mod
from effkernels.models.backbone import Route, build
from effkernels.models.checkpoint import load_checkpoint
from effkernels.models.methods import ConfigError, build_method
from effkernels.models.methods.tread import TREAD, SparseGuided, default_routes

SMALL = dict(depth=6, hidden_size=32, num_heads=2)


def _args(**kw):
    base = dict(route_ratio=0.5, route=None, route_unsorted=False, route_eval=False)
    base.update(kw)
    return argparse.Namespace(**base)


def _batch(seed, b=5):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(b, 1, 8, 8, generator=g) * 2 - 1, "y": torch.randint(0, 10, (b,), generator=g),
            "t": torch.rand(b, generator=g), "noise": torch.randn(b, 1, 8, 8, generator=g),
            "generator": torch.Generator().manual_seed(seed)}


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
    sg = SparseGuided(model, [Route(2, 4, 0.5)], scale=1.5)
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
    common = ["--method", "tread", "--model-kwargs", '{"depth": 6, "hidden_size": 32, "num_heads": 2}',
              "--batch-size", "16", "--eval-every", "0", "--quiet", "--log-every", "5", "--lr", "3e-3"]
    assert train_mod.main(["--out", str(tmp_path / "r"), "--steps", "30", *common]) == 0
    rows = train_mod.MetricsLog.read(str(tmp_path / "r" / "metrics.jsonl"))
    assert rows[-1]["loss"] < rows[0]["loss"]
    # the dense fine-tune: the same method resumed with routing off
    assert train_mod.main(["--out", str(tmp_path / "r"), "--steps", "32", "--resume", "auto", "--route-ratio", "0",
                           *common]) == 0
    assert load_checkpoint(str(tmp_path / "r" / "last.pt"))["step"] == 32
    from effkernels.models import sample as sample_mod

    out = str(tmp_path / "s")
    assert sample_mod.main(["--ckpt", str(tmp_path / "r" / "last.pt"), "--out", out, "--num", "4", "--steps", "2",
                            "--sparse-guidance", "1.5"]) == 2  # the fine-tuned run has no routes left
    assert "sparse guidance needs routes" in capsys.readouterr().err
    assert sample_mod.main(["--ckpt", str(tmp_path / "r" / "last.pt"), "--out", out, "--num", "4", "--steps", "2"]) == 0
