"""DiT's objective and samplers (effkernels.models.objectives.ddpm) against closed forms, hand-computed tiny
cases, and DiT's own sampling loop written here from its code (diffusion/gaussian_diffusion.py,
respace.py), on an official-layout DiT checkpoint."""
import math

import numpy as np
import pytest
import torch

from effkernels.models.interop.official import load_official
from effkernels.models.objectives.ddpm import (DDPMObjective, GaussianDiffusion,
                                               discretized_gaussian_log_likelihood, linear_betas, normal_kl,
                                               space_timesteps)
from effkernels.models.sampling.ddpm import diffusion_sample
from effkernels.models.sampling.samplers import sample
from helpers import rel_err
from test_backbone import OfficialStyleDiT, randomized

# -----------------------------------------------------------------------------------------------
# Schedule arithmetic
# -----------------------------------------------------------------------------------------------


def test_linear_schedule_and_cumulative_products():
    d = GaussianDiffusion()
    assert d.num_steps == 1000
    b = d.betas.tolist()
    assert b[0] == pytest.approx(1e-4, abs=1e-15) and b[-1] == pytest.approx(2e-2, abs=1e-15)
    assert b[500] == pytest.approx(1e-4 + 500 * (2e-2 - 1e-4) / 999, abs=1e-15)
    prod = 1.0
    for t in range(1000):  # alpha_bar_t = prod_{s <= t} (1 - beta_s), by a plain loop
        prod *= 1 - b[t]
        if t in (0, 1, 10, 499, 999):
            assert d.alphas_cumprod[t].item() == pytest.approx(prod, rel=1e-12)
    # a 4000-step schedule keeps its shape: betas scaled by 1000 / T
    assert linear_betas(4000)[-1].item() == pytest.approx(2e-2 / 4, rel=1e-12)


@pytest.mark.parametrize("t", [1, 7, 500, 999])
def test_posterior_is_the_gaussian_conditional(t, seed):
    """q(x_{t-1} | x_t, x_0) by conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0:
    x_{t-1} = sqrt(ab_{t-1}) x_0 + sqrt(1 - ab_{t-1}) e1, x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e2."""
    d = GaussianDiffusion()
    ab, abp, beta = d.alphas_cumprod[t].item(), d.alphas_cumprod[t - 1].item(), d.betas[t].item()
    x0, xt = 0.37, -1.21
    cov = math.sqrt(1 - beta) * (1 - abp)
    want_mean = math.sqrt(abp) * x0 + cov / (1 - ab) * (xt - math.sqrt(ab) * x0)
    want_var = (1 - abp) - cov**2 / (1 - ab)
    tt = torch.tensor([t])
    mean, logvar = d.q_posterior(torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), tt)
    assert mean.item() == pytest.approx(want_mean, rel=1e-6)
    assert d.posterior_variance[t].item() == pytest.approx(want_var, rel=1e-9)
    assert math.exp(logvar.item()) == pytest.approx(want_var, rel=1e-6)  # float32, as DiT extracts
    # x_0 from eps and back
    eps = torch.randn(2, 3, dtype=torch.float64)
    x0s = torch.randn(2, 3, dtype=torch.float64)
    xts = math.sqrt(ab) * x0s + math.sqrt(1 - ab) * eps
    assert torch.allclose(d.x0_from_eps(xts, tt.expand(2), eps).double(), x0s, atol=1e-5 * (1 / math.sqrt(ab)))
    assert torch.allclose(d.eps_from_x0(xts, tt.expand(2), x0s).double(), eps, atol=1e-5)


def test_respacing():
    keep = space_timesteps(1000, 250)
    assert len(keep) == 250 and keep[0] == 0 and keep[-1] == 999
    assert keep == [round(k * 999 / 249) for k in range(250)]
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    with pytest.raises(ValueError, match="stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(1000, 1001)
    base = GaussianDiffusion()
    d = base.respace(250)
    assert d.timestep_map == keep and d.num_steps == 250
    # the marginals are the base process's: alpha_bar at the kept steps
    assert torch.allclose(d.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12)
    k = 17
    beta = 1 - base.alphas_cumprod[keep[k]] / base.alphas_cumprod[keep[k - 1]]
    assert d.betas[k].item() == pytest.approx(beta.item(), rel=1e-12)
    assert d.respace(50).timestep_map == [keep[i] for i in space_timesteps(250, 50)]


# -----------------------------------------------------------------------------------------------
# Likelihood terms, by hand
# -----------------------------------------------------------------------------------------------


def test_normal_kl_hand_cases():
    def kl(m1, v1, m2, v2):
        return normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, math.log(v1), m2, math.log(v2)))).item()

    assert kl(0.0, 1.0, 0.0, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert kl(1.0, 1.0, 0.0, 1.0) == pytest.approx(0.5, abs=1e-15)
    # 0.5 (log(2 / 0.5) + 0.5 / 2 + 0.5^2 / 2 - 1)
    assert kl(0.3, 0.5, -0.2, 2.0) == pytest.approx(0.5 * (math.log(4) + 0.25 + 0.125 - 1), rel=1e-12)


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_discretized_gaussian_log_likelihood_hand_cases():
    def ll(x, m, s):
        t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
        return discretized_gaussian_log_likelihood(t(x), t(m), t(math.log(s))).item()

    # an inner bin: log(Phi((x - m + 1/255) / s) - Phi((x - m - 1/255) / s)); the tanh approximation
    # of Phi (kept: it is DiT's) is within 3e-4 of erf's, so the log within 1e-2 here
    for x, m, s in ((0.0, 0.0, 0.1), (0.5, 0.3, 0.2), (-0.4, 0.1, 1.0)):
        want = math.log(_phi((x - m + 1 / 255) / s) - _phi((x - m - 1 / 255) / s))
        assert ll(x, m, s) == pytest.approx(want, abs=1e-2), (x, m, s)
    # the edge bins are open: x = -1 -> log Phi((-1 - m + 1/255) / s), x = 1 -> log(1 - Phi((1 - m - 1/255) / s))
    assert ll(-1.0, -0.9, 0.2) == pytest.approx(math.log(_phi((-1 + 0.9 + 1 / 255) / 0.2)), abs=1e-3)
    assert ll(1.0, 0.95, 0.1) == pytest.approx(math.log(1 - _phi((1 - 0.95 - 1 / 255) / 0.1)), abs=1e-3)
    # a narrow Gaussian centred in the bin holds nearly all the mass
    assert ll(0.0, 0.0, 1e-4) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(torch.zeros(2), torch.zeros(3), torch.zeros(2))


class FixedOutput(torch.nn.Module):
    """A 'network' whose output is a parameter: the loss's gradient w.r.t. it is read directly."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out.clone())
        self.seen = []

    def forward(self, x, t, y):
        self.seen.append(t.clone())
        return self.out


def test_hybrid_loss_by_hand(seed):
    g = torch.Generator().manual_seed(seed)
    B, C = 2, 3
    d = GaussianDiffusion()
    x0 = torch.rand(B, C, 2, 2, generator=g) * 2 - 1
    noise = torch.randn(B, C, 2, 2, generator=g)
    out = torch.randn(B, 2 * C, 2, 2, generator=g) * 0.5
    t = torch.tensor([0, 371])
    net = FixedOutput(out)
    res = DDPMObjective(d).loss(net, x0, None, t=t, noise=noise)
    assert torch.equal(net.seen[0], t.float())  # the network sees the step index
    eps, v = out[:, :C].double(), out[:, C:].double()
    mse = ((eps - noise.double()) ** 2).flatten(1).mean(1)
    vb = []
    for i, ti in enumerate(t.tolist()):
        ab, beta = d.alphas_cumprod[ti].item(), d.betas[ti].item()
        abp = d.alphas_cumprod_prev[ti].item()
        xt = math.sqrt(ab) * x0[i].double() + math.sqrt(1 - ab) * noise[i].double()
        x0_hat = (xt - math.sqrt(1 - ab) * eps[i]) / math.sqrt(ab)
        c1, c2 = beta * math.sqrt(abp) / (1 - ab), (1 - abp) * math.sqrt(1 - beta) / (1 - ab)
        mean = c1 * x0_hat + c2 * xt
        post_var = d.posterior_variance[max(ti, 1)].item()  # beta~_0 = 0 is clipped to beta~_1
        logvar = (v[i] + 1) / 2 * math.log(beta) + (1 - v[i]) / 2 * math.log(post_var)
        if ti == 0:
            nll = -discretized_gaussian_log_likelihood(x0[i].double(), mean, 0.5 * logvar)
            vb.append(nll.mean().item() / math.log(2))
        else:
            tm = c1 * x0[i].double() + c2 * xt
            kl = 0.5 * (-1 + logvar - math.log(post_var) + post_var / logvar.exp() + (tm - mean) ** 2 / logvar.exp())
            vb.append(kl.mean().item() / math.log(2))
    want = mse + torch.tensor(vb, dtype=torch.float64)
    assert torch.allclose(res["loss_per_sample"].double(), want, rtol=1e-4), (res["loss_per_sample"], want)
    assert res["mse"].item() == pytest.approx(mse.mean().item(), rel=1e-5)
    assert res["vb"].item() == pytest.approx(sum(vb) / B, rel=1e-4)
    # stop-gradient: the bound reaches only the variance half; the mean half gets the MSE's gradient alone
    res["loss"].backward()
    grad = net.out.grad
    want_mean_grad = 2 * (out[:, :C] - noise) / (C * 4) / B
    assert torch.allclose(grad[:, :C], want_mean_grad, atol=1e-6)
    assert grad[:, C:].abs().sum() > 0
    with pytest.raises(ValueError, match="integer steps"):
        DDPMObjective(d).loss(net, x0, None, t=torch.rand(B), noise=noise)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        DDPMObjective(d).loss(net, x0, None, t=torch.tensor([0, 1000]), noise=noise)
    with pytest.raises(ValueError, match="6 output channels"):
        DDPMObjective(d).loss(FixedOutput(out[:, :C]), x0, None, t=t, noise=noise)


# -----------------------------------------------------------------------------------------------
# Sampling an official DiT checkpoint, as DiT's sample.py does
# -----------------------------------------------------------------------------------------------

DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
           learn_sigma=True)


def dit_schedule(num_sampling_steps):
    """DiT's create_diffusion(str(n)): numpy float64 arrays of the respaced process."""
    betas = np.linspace(1e-4, 2e-2, 1000, dtype=np.float64)
    ac = np.cumprod(1 - betas)
    size, count = 1000, num_sampling_steps
    stride = (size - 1) / (count - 1)
    use, cur = [], 0.0
    for _ in range(count):
        use.append(round(cur))
        cur += stride
    new_betas, last = [], 1.0
    for i, a in enumerate(ac):
        if i in set(use):
            new_betas.append(1 - a / last)
            last = a
    b = np.array(new_betas)
    ac = np.cumprod(1 - b)
    acp = np.append(1.0, ac[:-1])
    pv = b * (1 - acp) / (1 - ac)
    return dict(map=sorted(set(use)), betas=b, ac=ac, acp=acp, plog=np.log(np.append(pv[1], pv[1:])),
                c1=b * np.sqrt(acp) / (1 - ac), c2=(1 - acp) * np.sqrt(1 - b) / (1 - ac))


def dit_forward_with_cfg(net, x, t, y, cfg_scale):
    half = x[: len(x) // 2]
    out = net(torch.cat([half, half]), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def dit_loop(net, z, y, cfg_scale, n, gen, ddim=False):
    """DiT's p_sample_loop (clip_denoised=False) / ddim_sample_loop (eta 0) on the doubled CFG batch;
    the per-step noise of the kept (first) half is drawn from `gen`."""
    s = dit_schedule(n)
    y_null = torch.full_like(y, DIT["num_classes"])
    x, yy = torch.cat([z, z]), torch.cat([y, y_null])
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731  (_extract_into_tensor's .float())
    for i in reversed(range(n)):
        t = torch.full((x.shape[0],), s["map"][i], dtype=torch.float32)
        out = dit_forward_with_cfg(net, x, t, yy, cfg_scale)
        eps, v = out[:, :4], out[:, 4:]
        logvar = (v + 1) / 2 * f(np.log(s["betas"][i])) + (1 - v) / 2 * f(s["plog"][i])
        x0 = f(np.sqrt(1 / s["ac"][i])) * x - f(np.sqrt(1 / s["ac"][i] - 1)) * eps
        mean = f(s["c1"][i]) * x0 + f(s["c2"][i]) * x
        if ddim:
            e = (f(np.sqrt(1 / s["ac"][i])) * x - x0) / f(np.sqrt(1 / s["ac"][i] - 1))
            x = x0 * f(np.sqrt(s["acp"][i])) + f(np.sqrt(1 - s["acp"][i])) * e
        else:
            noise = torch.randn(z.shape, generator=gen)
            noise = torch.cat([noise, torch.randn(z.shape)])  # the dropped half's draws do not matter
            x = mean + float(i != 0) * torch.exp(0.5 * logvar) * noise
    return x[: len(z)]


def test_official_dit_checkpoint_samples_as_dits_loop(seed):
    official = randomized(OfficialStyleDiT(**DIT)).eval()
    with torch.no_grad():
        official.pos_embed.normal_()
    model = load_official(official.state_dict(), "DiT-S/2", hidden_size=32, depth=2, num_heads=2).eval()
    assert model.interop.flavor == "dit" and model.interop.prediction == "eps"
    assert model.interop.guided_channels == 3
    g = torch.Generator().manual_seed(seed)
    z, y = torch.randn(3, 4, 8, 8, generator=g), torch.randint(0, 5, (3,), generator=g)
    with torch.no_grad():
        for ddim, n in ((False, 100), (True, 25)):  # 250 (DiT's) is test_respacing's
            want = dit_loop(lambda x, t, y: official(x, t, y), z, y, 4.0, n, torch.Generator().manual_seed(seed), ddim)
            # sample() sees interop.prediction == "eps": DDPM (default) or DDIM, 3 guided channels
            got = sample(model, y, noise=z, sampler="ddim" if ddim else None, steps=n, cfg_scale=4.0,
                         generator=torch.Generator().manual_seed(seed))
            assert rel_err(got, want) <= 1e-5, (ddim, rel_err(got, want))
        with pytest.raises(ValueError, match="does not fit"):
            sample(model, y, noise=z, sampler="heun")
        # the whole-channel guidance differs: the 3-channel default is what DiT's FIDs were sampled with
        other = sample(model, y, noise=z, sampler="ddim", steps=25, cfg_scale=4.0, guided_channels=None)
        assert rel_err(other, want) > 1e-4


def test_fixed_variance_without_learned_sigma(seed):
    """A model with C outputs trains on the MSE alone and samples with the fixed large variance."""
    d = GaussianDiffusion(learn_sigma=False)
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 1, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    res = DDPMObjective(d).loss(FixedOutput(torch.zeros(2, 1, 2, 2)), x0, None, t=torch.tensor([3, 9]), noise=noise)
    assert "vb" not in res and res["loss"].item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    p = d.p_mean_variance(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([5]))
    assert math.exp(p["log_variance"].item()) == pytest.approx(d.betas[5].item(), rel=1e-6)

    class Zero(torch.nn.Module):
        learn_sigma, num_classes = False, 2

        def forward(self, x, t, y):
            return torch.zeros_like(x)

    # eps = 0: DDIM's x_0 = x_T / sqrt(alpha_bar_T) exactly... then carried to alpha_bar_prev = 1
    z = torch.randn(4, 1, 2, 2, generator=g)
    out = diffusion_sample(Zero(), None, z, sampler="ddim", steps=10)
    ab_last = GaussianDiffusion().alphas_cumprod[-1].item()
    assert torch.allclose(out, z / math.sqrt(ab_last), rtol=1e-4)


# -----------------------------------------------------------------------------------------------
# The trainer: --model DiT-S/2 trains with DiT's objective, and the checkpoint samples
# -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # end to end, about 20 s
def test_train_dit_s2_on_digits_then_sample(tmp_path, seed, capsys):
    from effkernels.models.cli import sample as sample_mod
    from effkernels.models.cli import train as train_mod

    out = tmp_path / "run"
    args = ["--model", "DiT-S/2", "--data", "digits", "--out", str(out), "--steps", "3", "--batch-size", "8",
            "--eval-every", "0", "--log-every", "1", "--quiet", "--seed", str(seed % 1000),
            "--model-kwargs", '{"depth": 2}']
    a = train_mod.parse_args(args)
    assert a.method == "dit"  # chosen for DiT-* models
    assert train_mod.main(args) == 0
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["meta"]["method"] == "dit"
    import json

    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert logged and all(math.isfinite(r["loss"]) and "vb" in r and "mse" in r for r in logged)
    grid = str(tmp_path / "s" / "g")
    for extra in ([], ["--sampler", "ddim"]):
        assert sample_mod.main(["--ckpt", str(out / "last.pt"), "--out", grid, "--num", "6", "--steps", "4",
                                "--cfg-scale", "2", *extra]) == 0
        z = np.load(grid + ".npz")
        assert z["images"].shape == (6, 1, 8, 8) and np.isfinite(z["images"]).all()
        assert np.abs(z["images"]).max() <= 1.0  # digits are images in [-1, 1]: clamped there
    assert sample_mod.main(["--ckpt", str(out / "last.pt"), "--out", grid, "--sampler", "heun"]) == 2
    assert "does not fit" in capsys.readouterr().err
