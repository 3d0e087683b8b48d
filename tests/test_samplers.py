"""Samplers on a 2-D Gaussian target whose exact velocity field is known in closed form.

Data x ~ N(mu_y, S) (class-dependent mean), eps ~ N(0, I), x_t = (1 - t) x + t eps. Then x_t and
v = eps - x are jointly Gaussian, so the exact flow-matching velocity is the conditional mean
    v(x_t, t) = E[eps - x | x_t] = -mu + Cov(v, x_t) C_t^-1 (x_t - (1 - t) mu),
with C_t = Cov(x_t) = (1 - t)^2 S + t^2 I and Cov(v, x_t) = t I - (1 - t) S; the exact score is
-C_t^-1 (x_t - (1 - t) mu). Every sampler must carry N(0, I) to N(mu_y, S).
"""
import pytest
import torch
from effkernels.models.objectives import score_from_velocity
from effkernels.models.sample import guided_velocity, sample, save_grid


def random_spd(g, d=2):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T * 0.3 + 0.2 * torch.eye(d, dtype=torch.float64)


class GaussianVelocity(torch.nn.Module):
    """The exact v(x, t, y) for the class-conditional Gaussian target; the null class has mean 0."""

    def __init__(self, mus, cov):
        super().__init__()
        self.mus = torch.cat([mus, torch.zeros(1, mus.shape[1], dtype=mus.dtype)])  # row num_classes = null
        self.cov, self.num_classes, self.calls = cov, mus.shape[0], []

    def parts(self, x, t, y):
        d = x.shape[1]
        eye = torch.eye(d, dtype=torch.float64)
        # samplers pass one t for the whole batch: one 2x2 solve instead of B of them keeps this fast
        tt = t.double()[:1, None, None] if bool((t == t[0]).all()) else t.double()[:, None, None]
        c_t = (1 - tt) ** 2 * self.cov + tt**2 * eye  # (B, d, d)
        cross = tt * eye - (1 - tt) * self.cov
        mu = self.mus[y]  # (B, d)
        r = (torch.linalg.inv(c_t) @ (x.double() - (1 - tt[:, :, 0]) * mu)[..., None])  # C_t^-1 (x - m_t)
        return -mu + (cross @ r)[..., 0], -r[..., 0]

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        return self.parts(x, t, y)[0].to(x.dtype)


def whitened_noise(n, d, g):
    """N(0, I) draws with sample mean exactly 0 and sample covariance exactly I: the flow of a linear
    velocity field is affine, so the output moments then measure only the integrator's error."""
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    cov = z.T @ z / (n - 1)
    return z @ torch.linalg.inv(torch.linalg.cholesky(cov)).T


def moments_error(x, mu, cov):
    m, c = x.mean(0), torch.cov(x.T)
    return (m - mu).norm().item() / (1 + mu.norm().item()), ((c - cov).norm() / cov.norm()).item()


@pytest.fixture
def target(seed):
    g = torch.Generator().manual_seed(seed)
    mus = torch.randn(3, 2, generator=g, dtype=torch.float64)
    return GaussianVelocity(mus, random_spd(g)), g


def test_exact_score_matches_score_from_velocity(target):
    model, g = target
    x = torch.randn(64, 2, generator=g, dtype=torch.float64) * 2
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    y = torch.randint(0, 3, (64,), generator=g)
    v, score = model.parts(x, t, y)
    assert torch.allclose(score_from_velocity(v, x, t), score, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("steps", [8, 20])
def test_ode_samplers_reach_target_and_heun_beats_euler(target, steps):
    model, g = target
    y = torch.full((4000,), 1, dtype=torch.long)
    noise = whitened_noise(4000, 2, g)
    errs = {}
    for s in ("euler", "heun"):
        out = sample(model, y, noise=noise, sampler=s, steps=steps, clamp=None)
        errs[s] = moments_error(out, model.mus[1], model.cov)
    print(steps, errs)
    assert sum(errs["heun"]) < 0.2 * sum(errs["euler"]), errs
    assert max(errs["heun"]) < (2e-3 if steps == 20 else 3e-2), errs
    assert max(errs["euler"]) < 4.0 / steps, errs  # first order: error ~ 1/steps


def test_euler_converges_with_steps(target):
    model, g = target
    y, noise = torch.zeros(2000, dtype=torch.long), whitened_noise(2000, 2, g)
    e = [sum(moments_error(sample(model, y, noise=noise, sampler="euler", steps=n, clamp=None),
                           model.mus[0], model.cov)) for n in (10, 40)]
    assert e[1] < 0.5 * e[0], e  # first order: 4x the steps, about 4x less error


def test_sde_sampler_reaches_target(target):
    model, g = target
    n = 10000
    y = torch.full((n,), 2, dtype=torch.long)
    out = sample(model, y, noise=torch.randn(n, 2, generator=g, dtype=torch.float64), sampler="euler-maruyama",
                 steps=100, generator=g, clamp=None)
    em, ec = moments_error(out, model.mus[2], model.cov)
    print(em, ec)
    assert em < 0.05 and ec < 0.08, (em, ec)  # sampling error alone is ~0.015 (cov) at n = 10000
    # the SDE is stochastic, the ODE is not: two SDE runs from the same start differ
    a = sample(model, y[:10], noise=torch.ones(10, 2, dtype=torch.float64), sampler="euler-maruyama", steps=10,
               generator=g, clamp=None)
    b = sample(model, y[:10], noise=torch.ones(10, 2, dtype=torch.float64), sampler="euler-maruyama", steps=10,
               generator=g, clamp=None)
    assert not torch.allclose(a, b)


def test_cfg_scale_one_is_the_conditional_prediction(target):
    model, g = target
    x, y = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    model.calls.clear()
    v1 = guided_velocity(model, x, 0.5, y, cfg_scale=1.0)
    assert torch.equal(v1, model(x, torch.full((16,), 0.5), y)) and model.calls == [16, 16]
    noise = torch.randn(16, 2, generator=g, dtype=torch.float64)
    guided = sample(model, y, noise=noise, steps=5, cfg_scale=1.0, clamp=None)
    plain = sample(model, y, noise=noise, steps=5, clamp=None)
    assert torch.equal(guided, plain)


def test_cfg_formula_and_interval(target):
    model, g = target
    x, y = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    t = torch.full((8,), 0.5)
    v_c, v_u = model(x, t, y), model(x, t, torch.full_like(y, 3))
    v = guided_velocity(model, x, 0.5, y, cfg_scale=3.0, guidance_interval=(0.2, 0.7))
    assert torch.allclose(v, v_u + 3.0 * (v_c - v_u), atol=1e-12)
    model.calls.clear()
    outside = guided_velocity(model, x, 0.9, y, cfg_scale=3.0, guidance_interval=(0.2, 0.7))
    assert torch.equal(outside, model(x, torch.full((8,), 0.9), y)) and model.calls[0] == 8  # one plain forward
    # guidance > 1 pushes the conditional mean away from the null class's (0), scale 1 does not
    noise = whitened_noise(3000, 2, g)
    yy = torch.full((3000,), 2, dtype=torch.long)
    m1 = sample(model, yy, noise=noise, steps=20, clamp=None).mean(0)
    m3 = sample(model, yy, noise=noise, steps=20, cfg_scale=3.0, clamp=None).mean(0)
    assert m3.norm() > m1.norm() * 1.5


def test_clamp_and_bad_arguments(target):
    model, g = target
    y = torch.zeros(50, dtype=torch.long)
    out = sample(model, y, noise=torch.randn(50, 2, generator=g, dtype=torch.float64) * 5, steps=3, clamp=(-1, 1))
    assert out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample(model, y, shape=(50, 2), sampler="rk4")
    with pytest.raises(ValueError, match="steps"):
        sample(model, y, shape=(50, 2), steps=0)
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(model, y, shape=(50, 2), guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="labels"):
        sample(model, y[:3], shape=(50, 2))
    with pytest.raises(ValueError, match="noise or shape"):
        sample(model, y)


def test_save_grid_writes_png(tmp_path, seed):
    from PIL import Image

    imgs = torch.rand(12, 1, 8, 8) * 2 - 1
    p = save_grid(imgs, str(tmp_path / "g.png"), nrow=4)
    im = Image.open(p)
    assert im.mode == "L" and im.size == (4 * 9 + 1, 3 * 9 + 1) or im.size[0] >= 32 * 4
    with pytest.raises(ValueError, match="images must be"):
        save_grid(torch.rand(2, 2, 8, 8), str(tmp_path / "bad.png"))
