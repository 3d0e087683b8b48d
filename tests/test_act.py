"""ACT: the discriminator trains only in its step and the generator only in its own, disjoint real
halves, the adaptive augmentation moves p both ways within [0, 1], the augmentation is
differentiable, resume equals an uninterrupted run (losses and p), and the CLI."""
import argparse

import pytest
import torch

from effkernels.models.cli import train as train_mod
from effkernels.models.train.runlog import MetricsLog
from effkernels.models.train.trainer import Trainer
from effkernels.models.backbone.configs import build
from effkernels.models.checkpoint import load_checkpoint
from effkernels.models.methods import ConfigError
from effkernels.models.methods.act import ACT, augment

KW = '{"depth": 2, "hidden_size": 32, "num_heads": 2, "class_dropout_prob": 0.0}'


def _argv(out, *extra):
    return ["--out", str(out), "--method", "act", "--model-kwargs", KW, "--batch-size", "16", "--eval-every", "0",
            "--quiet", "--log-every", "1", "--warmup", "0", "--ct-s1", "10", "--r1-every", "2", *extra]


def test_generator_and_discriminator_steps_touch_only_their_own_parameters(tmp_path, seed):
    tr = Trainer(train_mod.parse_args(_argv(tmp_path, "--steps", "4")))
    act = tr.method.parts[0][1]
    disc, opt_d = act.disc, tr.aux_opts["disc"]
    g_ids = {id(p) for grp in tr.opt.param_groups for p in grp["params"]}
    d_ids = {id(p) for grp in opt_d.param_groups for p in grp["params"]}
    assert d_ids == {id(p) for p in disc.parameters()} and not (g_ids & d_ids)
    seen = {}
    orig = tr._aux_step

    def spy(name, aux, batch, out):
        seen["d_grad_after_g"] = [p.grad for p in disc.parameters()]
        g0 = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        logs = orig(name, aux, batch, out)
        seen["g_moved_in_d_step"] = any(not torch.equal(g0[n], p) for n, p in tr.model.named_parameters())
        return logs

    tr._aux_step = spy
    d0 = [p.detach().clone() for p in disc.parameters()]
    logs = tr.train_step(tr.make_batch(0))
    assert all(g is None for g in seen["d_grad_after_g"])  # the generator's backward left D alone
    assert not seen["g_moved_in_d_step"]
    assert any(not torch.equal(a, p) for a, p in zip(d0, disc.parameters()))
    assert {"disc_loss", "g_adv", "ct_distance", "disc_r1"} <= set(logs)


def test_disjoint_halves(seed):
    b = {"x": torch.arange(8.0).view(8, 1, 1, 1), "y": torch.arange(8), "generator": None}
    g, d = ACT.halves(b)
    assert g["x"].flatten().tolist() == [0, 1, 2, 3] and d["x"].flatten().tolist() == [4, 5, 6, 7]
    with pytest.raises(ConfigError, match="even"):
        ACT.halves({"x": torch.zeros(3, 1, 1, 1)})


def test_adaptive_augmentation_moves_p_both_ways(monkeypatch):
    act = ACT(build("tiny/2", depth=1, hidden_size=32, num_heads=2), argparse.Namespace(steps=100, ada_target=1.0, ada_step=0.3))
    for _ in range(6):
        act.update_p(100.0)  # R1 far above the threshold
    assert act.p == 1.0
    rising = act.r1_ema
    for _ in range(100):  # R1 at 0: the EMA (0.93) sinks below the threshold, then p falls
        act.update_p(0.0)
    assert act.p == 0.0 and act.r1_ema < 1.0 < rising


def test_augment_is_differentiable_and_identity_at_p0(seed):
    x = torch.randn(6, 1, 8, 8, requires_grad=True)
    assert augment(x, 0.0) is x
    y = augment(x, 1.0, torch.Generator().manual_seed(seed))
    assert y.shape == x.shape and not torch.equal(y, x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_resume_in_the_middle_equals_an_uninterrupted_run(tmp_path):
    # p must move for its resume to be tested; one N(k) schedule (K = 6) for both runs
    extra = ("--ada-target", "0.0", "--ada-step", "0.1", "--ct-total-steps", "6")
    assert train_mod.main(_argv(tmp_path / "a", "--steps", "6", *extra)) == 0
    assert train_mod.main(_argv(tmp_path / "b", "--steps", "3", *extra)) == 0
    assert train_mod.main(_argv(tmp_path / "b", "--steps", "6", "--resume", "auto", *extra)) == 0
    a, b = load_checkpoint(str(tmp_path / "a" / "last.pt")), load_checkpoint(str(tmp_path / "b" / "last.pt"))
    sa, sb = a["method"]["state"]["act"], b["method"]["state"]["act"]
    assert float(sa["ada_p"]) == float(sb["ada_p"]) > 0
    assert float(sa["r1_ema"]) == pytest.approx(float(sb["r1_ema"]), rel=1e-6)
    for k, v in a["method"]["aux"]["disc"]["module"].items():
        torch.testing.assert_close(b["method"]["aux"]["disc"]["module"][k], v, rtol=0, atol=1e-6)
    ra = MetricsLog.read(str(tmp_path / "a" / "metrics.jsonl"))
    rb = MetricsLog.read(str(tmp_path / "b" / "metrics.jsonl"))
    assert [round(r["loss"], 5) for r in ra] == [round(r["loss"], 5) for r in rb]


def _act(**kw):
    base = dict(steps=100, ct_s1=21, act_lambda=None, act_lambda_schedule="t-weighted", act_lambda_mid=0.2)
    base.update(kw)
    model = build("tiny/2", depth=1, hidden_size=32, num_heads=2, class_dropout_prob=0.0)
    return model, ACT(model, argparse.Namespace(**base))


def test_t_weighted_lambda_follows_the_release_formula_at_several_t():
    import math

    _, act = _act()
    assert act.lam == 0.6  # the ImageNet64 config's gan_ratio; mid_weight 0.2
    for n in (11, 21, 151):  # w depends on the grid position of t only, not on N
        grid = act.sigmas(n)
        for j in (0, 1, (n - 1) // 4, (n - 1) // 2, n - 2, n - 1):
            want = 0.6 * (j / (n - 1)) ** (math.log(0.2 / 0.6) / math.log(0.5))
            got = float(act.lambda_t(grid[j:j + 1]))
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (n, j)
    ends = act.lambda_t(torch.tensor([0.002, 80.0], dtype=torch.float64))
    assert ends[0].item() == pytest.approx(0.0, abs=1e-12) and ends[1].item() == pytest.approx(0.6)
    assert float(act.lambda_t(act.sigmas(21)[10:11])) == pytest.approx(0.2)  # the grid's middle
    _, const = _act(act_lambda_schedule="constant")
    assert const.lam == 0.3 and torch.equal(const.lambda_t(act.sigmas(11)), torch.full((11,), 0.3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="--act-lambda-mid"):
        _act(act_lambda=0.3, act_lambda_mid=0.4)


def test_t_weighted_losses_mix_per_sample_and_weight_the_discriminator(seed):
    model, act = _act()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (8,), generator=g)
    batch = {"x": x, "y": y, "generator": torch.Generator().manual_seed(seed)}
    out = act.objective(model, batch, 50, {})
    lam = act.lambda_t(out["sigma"]).float()
    adv = torch.nn.functional.softplus(-act.disc(out["pred"], act.cond(out["sigma"]).float()))  # p = 0: no augmentation
    want = ((1 - lam) * out["loss_per_sample"] + lam * adv).mean()
    torch.testing.assert_close(out["loss"], want, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(want, 0.7 * out["loss_per_sample"].mean() + 0.3 * adv.mean())  # not the constant mix
    # D: per-image w(t) on its real and fake terms; the reals' t is the step generator's first draw
    fake_sigma = act.sigmas(act.num_scales(50))[torch.tensor([1, 3, 5, 7])]
    fake = out["pred"].detach()
    step = 3  # not an R1 step (r1_every 16)
    res = act.aux_loss("disc", act.disc, {"x": x, "y": y, "generator": torch.Generator().manual_seed(seed)}, step,
                       {"pred": fake, "sigma": fake_sigma})
    grid = act.sigmas(act.num_scales(step))
    s_real = grid[torch.randint(0, grid.numel(), (4,), generator=torch.Generator().manual_seed(seed))]
    sp = torch.nn.functional.softplus
    want_d = (sp(-act.disc(x[4:], act.cond(s_real).float())) * act.t_weight(s_real).float()).mean() \
        + (sp(act.disc(fake, act.cond(fake_sigma).float())) * act.t_weight(fake_sigma).float()).mean()
    torch.testing.assert_close(res["loss"], want_d, rtol=1e-6, atol=1e-7)


def test_t_weighted_trains_through_the_cli(tmp_path):
    assert train_mod.main(_argv(tmp_path, "--steps", "3", "--act-lambda-schedule", "t-weighted")) == 0
    rows = MetricsLog.read(str(tmp_path / "metrics.jsonl"))
    assert len(rows) == 3 and all(0 < r["act_lambda"] <= 0.6 for r in rows)


def test_r1_is_unscaled_as_in_acts_release_and_lazy_scaling_is_an_option(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (8,), generator=g)
    losses = {}
    for lazy in (False, True):
        model, act = _act(act_lambda_schedule="constant", r1_every=16, r1_lazy_scale=lazy)
        torch.manual_seed(seed)
        act.disc = type(act.disc)(1, 16)
        sig = act.sigmas(10)[torch.tensor([1, 2, 3, 4])]
        fake = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 1))
        res = act.aux_loss("disc", act.disc, {"x": x, "y": y, "generator": torch.Generator().manual_seed(seed)}, 0,
                           {"pred": fake, "sigma": sig})
        losses[lazy] = (float(res["loss"]), float(res["r1"]))
    (plain, r1), (lazy, r1_lazy) = losses[False], losses[True]
    assert r1 == pytest.approx(r1_lazy, rel=1e-6) and r1 > 0
    base = plain - 0.5 * 10.0 * r1  # gamma / 2 E||grad||^2, once
    assert lazy == pytest.approx(base + 0.5 * 10.0 * 16 * r1, rel=1e-5)
