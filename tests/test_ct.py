"""CT: f(x, sigma_min) = x exactly, the N(k) and mu(k) schedules, the Karras grid, the pair (online
at t_{i+1}, target at t_i, same z), no gradient into the target, the target EMA, one- and two-step
sampling, and training through the CLI with both evaluations."""
import argparse
import math

import pytest
import torch

from effkernels.models.cli import train as train_mod
from effkernels.models.train.runlog import MetricsLog
from effkernels.models.train.trainer import Trainer
from effkernels.models.backbone.configs import build
from effkernels.models.methods import ConfigError
from effkernels.models.methods.ct import CT

SMALL = dict(depth=2, hidden_size=32, num_heads=2, class_dropout_prob=0.0)


def _args(**kw):
    base = dict(steps=100, ct_s0=2, ct_s1=150, ct_mu0=0.9, ct_noise_cond="cm")
    base.update(kw)
    return argparse.Namespace(**base)


def _model():
    m = build("tiny/2", **SMALL)
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    return m


def test_boundary_condition_is_exact(seed):
    model = _model()
    ct = CT(model, _args())
    x = torch.randn(3, 1, 8, 8)
    out = ct.f(model, x, torch.full((3,), ct.s_min), torch.tensor([1, 2, 3]))
    assert torch.equal(out, x)
    assert not torch.allclose(ct.f(model, x, torch.full((3,), 1.0), torch.tensor([1, 2, 3])), x)


def test_schedules_follow_the_formulas():
    ct = CT(_model(), _args(steps=100, ct_s0=2, ct_s1=150, ct_mu0=0.9))
    assert ct.num_scales(0) == 2 and ct.num_scales(100) == 150 and ct.num_scales(1000) == 150
    assert ct.num_scales(50) == round(math.sqrt(0.5 * (150 ** 2 - 4) + 4))
    assert ct.target_decay(0) == pytest.approx(math.exp(2 * math.log(0.9) / 1))  # = 0.81
    assert ct.target_decay(100) == pytest.approx(math.exp(2 * math.log(0.9) / 149))
    g = ct.sigmas(18)
    assert g[0].item() == pytest.approx(0.002) and g[-1].item() == pytest.approx(80.0)
    assert bool((g[1:] > g[:-1]).all())
    mid = (0.002 ** (1 / 7) + (80 ** (1 / 7) - 0.002 ** (1 / 7)) * 9 / 17) ** 7
    assert g[9].item() == pytest.approx(mid)
    for kw, match in ((dict(ct_s0=1), "--ct-s0"), (dict(ct_mu0=1.0), "--ct-mu0")):
        with pytest.raises(ConfigError, match=match):
            CT(_model(), _args(**kw))


def test_pair_uses_adjacent_sigmas_same_noise_and_no_target_gradient(seed):
    model = _model().train()
    ct = CT(model, _args(steps=10))
    calls = []
    for name, net in (("online", model), ("target", ct.target)):
        orig = net.forward

        def spy(x, t, y, _o=orig, _n=name, **kw):
            calls.append((_n, x.clone(), t.clone()))
            return _o(x, t, y, **kw)
        net.forward = spy
    g = torch.Generator().manual_seed(seed)
    x, y, z = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (4,), generator=g), torch.randn(4, 1, 8, 8)
    out = ct.objective(model, {"x": x, "y": y, "noise": z, "generator": torch.Generator().manual_seed(seed)}, 5, {})
    (n1, x_on, c_on), (n2, x_tg, c_tg) = calls
    assert (n1, n2) == ("online", "target")
    grid = ct.sigmas(ct.num_scales(5))
    s_on, s_tg = torch.exp(c_on.double() / 250), torch.exp(c_tg.double() / 250)  # c_noise = 250 ln sigma
    idx_on = torch.tensor([int(torch.argmin((grid - s).abs())) for s in s_on])
    idx_tg = torch.tensor([int(torch.argmin((grid - s).abs())) for s in s_tg])
    assert torch.equal(idx_on, idx_tg + 1)  # t_{i+1} online, t_i target
    # the same z: x_sigma = x + sigma z, divided by c_in = 1 / sqrt(sigma^2 + sd^2)
    for xs, s in ((x_on, s_on), (x_tg, s_tg)):
        c_in = (1 / (s ** 2 + 0.25).sqrt()).view(-1, 1, 1, 1)
        torch.testing.assert_close(xs.double(), ((x + s.view(-1, 1, 1, 1) * z) * c_in).double(), rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in ct.target.parameters())
    assert model.final_layer.linear.weight.grad is not None


def test_target_is_an_ema_of_the_online_net(seed):
    model = _model()
    ct = CT(model, _args(steps=10))
    before = [p.detach().clone() for p in ct.target.parameters()]
    for p in model.parameters():
        p.data.add_(1.0)
    ct.before_step(None, 0)  # nothing to average before the first step
    assert all(torch.equal(a, b) for a, b in zip(before, ct.target.parameters()))
    ct.before_step(None, 4)
    mu = ct.target_decay(3)
    for b, t, o in zip(before, ct.target.parameters(), model.parameters()):
        torch.testing.assert_close(t, mu * b + (1 - mu) * o.detach())


def test_one_and_two_step_sampling(seed):
    model = _model().eval()
    ct = CT(model, _args())
    noise = torch.randn(4, 1, 8, 8)
    one = ct.sample({"backbone": model}, torch.arange(4), noise, steps=1)
    want = ct.f(model, noise * 80.0, torch.full((4,), 80.0), torch.arange(4))
    torch.testing.assert_close(one, want, rtol=0, atol=0)
    two = ct.sample({"backbone": model}, torch.arange(4), noise, steps=2, generator=torch.Generator().manual_seed(1),
                    clamp=(-1.0, 1.0))
    assert two.shape == noise.shape and two.abs().max() <= 1.0
    with pytest.raises(ConfigError, match="1 or 2 steps"):
        ct.sample({"backbone": model}, torch.arange(4), noise, steps=10)


def test_trains_through_the_cli_and_reports_both_samplers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EFFKERNELS_CACHE", str(tmp_path / "cache"))
    argv = ["--out", str(tmp_path / "r"), "--method", "ct", "--model-kwargs", '{"depth": 2, "hidden_size": 32, "num_heads": 2}',
            "--batch-size", "16", "--quiet", "--log-every", "10", "--steps", "40", "--eval-every", "40",
            "--eval-samples", "50", "--ct-s1", "10"]
    assert train_mod.main(argv) == 0
    rows = MetricsLog.read(str(tmp_path / "r" / "metrics.jsonl"))
    evals = [r for r in rows if "fd" in r]
    assert evals and all("fd_2step" in r and "acc_2step" in r for r in evals)
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["ct_scales"] == 10 and train_rows[0]["ct_scales"] < 10


# --- LPIPS (VGG16 from a local file, random weights in torchvision's official layout) -------------------------

@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Random VGG16 trunk weights saved under torchvision's official keys (`features.N.*`), built by
    torchvision's own VGG code. Only `features` is saved: the classifier (102M parameters) takes
    half a minute to initialise on a busy CPU and LPIPS does not read it."""
    pytest.importorskip("torchvision")
    pytest.importorskip("lpips")
    from torchvision.models import vgg as tv_vgg

    torch.manual_seed(1234)
    features = tv_vgg.make_layers(tv_vgg.cfgs["D"]).eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return str(path), features


def _lpips_by_hand(vgg, a, b, size):
    """LPIPS v0.1 written out: scale, VGG16 relu{1_2,2_2,3_3,4_3,5_3}, unit-normalised channels,
    squared difference, the wheel's 1x1 heads, spatial mean, summed over the five layers."""
    import os

    import lpips

    heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"), map_location="cpu")
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(x):
        x = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(size, size), mode="bilinear",
                                            align_corners=False)
        h, out = (x - shift) / scale, []
        for lo, hi in ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)):
            h = vgg[lo:hi](h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for k, (fa, fb) in enumerate(zip(feats(a), feats(b.clamp(-1, 1)))):
        total = total + torch.nn.functional.conv2d((fa - fb) ** 2, heads[f"lin{k}.model.1.weight"]).mean((1, 2, 3))
    return total


def test_lpips_from_a_local_official_layout_file_equals_the_formula_and_downloads_nothing(vgg_file, monkeypatch, seed):
    import torchvision.models._api as tv_api

    from effkernels.models.metrics.lpips_distance import LPIPSDistance

    def no_download(*a, **k):
        raise AssertionError("LPIPS tried to download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_download, raising=False)
    path, vgg = vgg_file
    dist = LPIPSDistance(path, size=32)
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(3, 1, 8, 8, generator=g) * 2 - 1).requires_grad_(True)
    b = torch.rand(3, 1, 8, 8, generator=g) * 2.4 - 1.2  # outside [-1, 1]: the target is clipped
    d = dist(a, b)
    with torch.no_grad():
        want = _lpips_by_hand(vgg, a, b, 32)
    torch.testing.assert_close(d.detach(), want, rtol=1e-4, atol=1e-6)
    assert d.shape == (3,) and bool((d > 0).all())
    # 1 channel is the same image as its 3-channel repeat; identical images are at distance 0
    torch.testing.assert_close(dist(a.detach().expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)), d.detach())
    assert torch.equal(dist(b.clamp(-1, 1), b), torch.zeros(3))
    d.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in dist.parameters())
    assert not dist.train().training  # the heads' dropout never turns on


def test_lpips_bad_files_are_clear_errors_naming_them(vgg_file, tmp_path):
    from effkernels.models.metrics.lpips_distance import LPIPSDistance

    path, vgg = vgg_file
    with pytest.raises(ValueError, match="nowhere.pth"):
        LPIPSDistance(str(tmp_path / "nowhere.pth"))
    sd = {f"features.{k}": v for k, v in vgg.state_dict().items()}
    short = {k: v for k, v in sd.items() if k != "features.28.weight"}
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short\.pth.*features\.28\.weight"):
        LPIPSDistance(str(tmp_path / "short.pth"))
    wrong = dict(sd, **{"features.0.weight": torch.zeros(64, 1, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth.*features\.0\.weight"):
        LPIPSDistance(str(tmp_path / "wrong.pth"))
    with pytest.raises(ValueError, match="--lpips-size"):
        LPIPSDistance(path, size=16)
    with pytest.raises(ConfigError, match="--lpips-vgg"):
        CT(_model(), _args(ct_distance="lpips"))


def test_ct_trains_on_lpips_through_the_cli(vgg_file, tmp_path, monkeypatch):
    ct = CT(_model(), _args(ct_distance="lpips", lpips_vgg=vgg_file[0], lpips_size=32))
    assert ct.lpips is None  # built on first use (or by the trainer's attach), so sampling never needs the file
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    d = ct.dist(x, x.flip(-1))
    torch.testing.assert_close(d, ct.lpips(x, x.flip(-1)))
    bad = CT(_model(), _args(ct_distance="lpips", lpips_vgg=str(tmp_path / "gone.pth")))
    with pytest.raises(ValueError, match="gone.pth"):
        bad.attach(None)
    monkeypatch.setenv("EFFKERNELS_CACHE", str(tmp_path / "cache"))
    argv = ["--out", str(tmp_path / "r"), "--method", "ct", "--model-kwargs", '{"depth": 1, "hidden_size": 32, "num_heads": 2}',
            "--batch-size", "4", "--quiet", "--log-every", "1", "--steps", "2", "--eval-every", "0", "--ct-s1", "10",
            "--ct-distance", "lpips", "--lpips-vgg", vgg_file[0], "--lpips-size", "32"]
    assert train_mod.main(argv) == 0
    rows = [r for r in MetricsLog.read(str(tmp_path / "r" / "metrics.jsonl")) if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)


def test_defaults_follow_the_width(seed):
    """The paper's grid, decay and conditioning at DiT widths; the settings measured on digits
    (s1 10, iCT's mu0 0, ECT's ln(sigma)/4) for the tiny models; explicit options win."""
    tiny = CT(_model(), argparse.Namespace(steps=100))
    assert (tiny.s1, tiny.mu0, tiny.noise_cond, tiny.target_decay(50)) == (10, 0.0, "ect", 0.0)
    wide = CT(build("tiny/2", depth=1, hidden_size=384, num_heads=6), argparse.Namespace(steps=100))
    assert (wide.s1, wide.mu0, wide.noise_cond) == (150, 0.9, "cm")
    given = CT(_model(), argparse.Namespace(steps=100, ct_s1=40, ct_mu0=0.5, ct_noise_cond="raw"))
    assert (given.s1, given.mu0, given.noise_cond) == (40, 0.5, "raw")


# --- the generator's optimizer, label dropout, iCT's options -----------------------------------------------

def _trainer(tmp_path, *extra):
    argv = ["--out", str(tmp_path), "--model-kwargs", '{"depth": 2, "hidden_size": 32, "num_heads": 2}',
            "--batch-size", "8", "--eval-every", "0", "--quiet", "--ct-s1", "10", *extra]
    return Trainer(train_mod.parse_args(argv))


def _betas(tr):
    return {tuple(g["betas"]) for g in tr.opt.param_groups}


def test_ct_and_act_step_the_generator_with_acts_betas_and_the_flag_overrides(tmp_path):
    assert _betas(_trainer(tmp_path / "ct", "--method", "ct")) == {(0.0, 0.99)}
    assert _betas(_trainer(tmp_path / "act", "--method", "act")) == {(0.0, 0.99)}
    assert _betas(_trainer(tmp_path / "sit", "--method", "sit")) == {(0.9, 0.999)}
    assert _betas(_trainer(tmp_path / "o", "--method", "ct", "--adam-betas", "0.5,0.95")) == {(0.5, 0.95)}
    assert _betas(_trainer(tmp_path / "s", "--method", "sit", "--adam-betas", "0,0.99")) == {(0.0, 0.99)}


@pytest.mark.parametrize("bad", ["0.9", "0.9,1.0", "a,b", "-0.1,0.9"])
def test_bad_adam_betas_are_argparse_errors(bad, capsys):
    with pytest.raises(SystemExit):
        train_mod.parse_args(["--adam-betas", bad])
    assert "--adam-betas" in capsys.readouterr().err


def test_resume_reapplies_the_configured_betas_over_the_checkpoints(tmp_path):
    old = _trainer(tmp_path, "--method", "ct")
    for g in old.opt.param_groups:  # a checkpoint written before CT asked for (0, 0.99)
        g["betas"] = (0.9, 0.999)
    old.train_step(old.make_batch(0))
    old.save(str(tmp_path / "old.pt"))
    new = _trainer(tmp_path, "--method", "ct")
    new.load(str(tmp_path / "old.pt"))
    assert _betas(new) == {(0.0, 0.99)}
    assert new.opt.state_dict()["state"]  # the moments themselves were restored
    again = _trainer(tmp_path, "--method", "ct", "--adam-betas", "0.3,0.9")
    again.load(str(tmp_path / "old.pt"))
    assert _betas(again) == {(0.3, 0.9)}


def _spy_drops(ct, model):
    seen = []
    for name, net in (("online", model), ("target", ct.target)):
        orig = net.forward

        def spy(x, t, y, _o=orig, _n=name, **kw):
            seen.append((_n, kw.get("force_drop_ids")))
            return _o(x, t, y, **kw)
        net.forward = spy
    return seen


def test_online_and_target_share_one_label_dropout_draw(seed):
    model = build("tiny/2", depth=1, hidden_size=32, num_heads=2, class_dropout_prob=0.5).train()
    ct = CT(model, _args(steps=10))
    seen = _spy_drops(ct, model)
    b = 64
    batch = {"x": torch.rand(b, 1, 8, 8) * 2 - 1, "y": torch.randint(0, 10, (b,)),
             "generator": torch.Generator().manual_seed(seed)}
    ct.objective(model, batch, 3, {})
    (n1, d1), (n2, d2) = seen
    assert (n1, n2) == ("online", "target") and d1 is not None and d2 is d1
    assert 0 < int(d1.sum()) < b  # a real draw at rate 0.5
    seen.clear()
    ct_ind = CT(model, _args(steps=10, ct_label_dropout="independent"))
    seen_ind = _spy_drops(ct_ind, model)
    ct_ind.objective(model, batch, 3, {})
    assert [d for _, d in seen_ind[-2:]] == [None, None]  # each forward draws its own


def _lognormal_probs_by_hand(grid, p_mean, p_std):
    cdf = [math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std)) for s in grid]
    w = [cdf[i + 1] - cdf[i] for i in range(len(grid) - 1)]
    return [v / sum(w) for v in w]


def test_ict_pair_sampling_and_weighting_follow_the_formulas(seed):
    model = _model().train()
    ct = CT(model, _args(steps=10, ct_s1=40, ct_weighting="ict", ct_pair_sampling="lognormal"))
    grid = ct.sigmas(ct.num_scales(10))
    want = _lognormal_probs_by_hand(grid.tolist(), -1.1, 2.0)
    torch.testing.assert_close(ct.pair_probs(grid), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    uni = CT(model, _args(steps=10, ct_s1=40)).pair_probs(grid)
    assert torch.allclose(uni, torch.full_like(uni, 1 / (grid.numel() - 1)))
    hi, lo = grid[1:], grid[:-1]
    torch.testing.assert_close(ct.pair_weight(hi, lo), 1 / (hi - lo), rtol=1e-12, atol=0)
    # the objective draws i from pair_probs and weights each pair's distance by 1 / (t_{i+1} - t_i)
    ct.pair_probs = lambda g: torch.nn.functional.one_hot(torch.tensor(5), g.numel() - 1).double()
    g = torch.Generator().manual_seed(seed)
    x, y, z = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (4,), generator=g), torch.randn(4, 1, 8, 8)
    out = ct.objective(model, {"x": x, "y": y, "noise": z, "generator": torch.Generator().manual_seed(seed)}, 10, {})
    assert torch.equal(out["sigma"], grid[6].expand(4))
    with torch.no_grad():
        on = ct.f(model, x + grid[6] * z, grid[6].expand(4), y)
        tg = ct.f(ct.target, x + grid[5] * z, grid[5].expand(4), y)
    want_loss = (ct.dist(on, tg) / (grid[6] - grid[5])).mean()
    torch.testing.assert_close(out["loss"].detach().double(), want_loss.double(), rtol=1e-5, atol=0)
    with pytest.raises(ConfigError, match="--ct-p-std"):
        CT(_model(), _args(ct_pair_sampling="lognormal", ct_p_std=0.0))
