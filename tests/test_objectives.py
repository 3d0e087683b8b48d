"""Flow-matching objective: the interpolant, its velocity, the score from v, and the loss's reduction."""
import math

import pytest
import torch
from effkernels.models.objectives.flow import FlowMatching, interpolate, score_from_velocity, velocity_target


class ConvNet(torch.nn.Module):
    """A small real network v(x, t, y) that uses all three inputs."""

    def __init__(self, c=2, ncls=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.emb = torch.nn.Embedding(ncls, c)

    def forward(self, x, t, y):
        return self.conv(x) * (1 + t[:, None, None, None]) + self.emb(y)[:, :, None, None]


def test_interpolant_endpoints_and_velocity(seed):
    x, eps = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randn(5, 2, 4, 4, dtype=torch.float64)
    assert torch.equal(interpolate(x, eps, torch.zeros(5, dtype=torch.float64)), x)  # t = 0 is data
    assert torch.equal(interpolate(x, eps, torch.ones(5, dtype=torch.float64)), eps)  # t = 1 is noise
    t, h = torch.rand(5, dtype=torch.float64) * 0.8 + 0.1, 1e-6
    fd = (interpolate(x, eps, t + h) - interpolate(x, eps, t - h)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x, eps), atol=1e-8)  # v = d x_t / dt


def test_loss_matches_hand_computation(seed):
    net = ConvNet()
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    t, eps = torch.rand(6), torch.randn(6, 2, 5, 5)
    res = FlowMatching().loss(net, x, y, t=t, noise=eps)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    per = ((net(x_t, t, y) - (eps - x)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(res["loss_per_sample"], per, rtol=1e-6)
    assert torch.allclose(res["loss"], per.mean(), rtol=1e-6)
    res["loss"].backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


def test_loss_draws_from_generator(seed):
    net, fm = ConvNet(), FlowMatching()
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    a = fm.loss(net, x, y, torch.Generator().manual_seed(seed))
    b = fm.loss(net, x, y, torch.Generator().manual_seed(seed))
    c = fm.loss(net, x, y, torch.Generator().manual_seed(seed + 1))
    assert torch.equal(a["loss"], b["loss"]) and not torch.equal(a["t"], c["t"])


def test_time_distribution(seed):
    fm = FlowMatching(t_min=0.2, t_max=0.6)
    t = fm.sample_t(20000, "cpu", torch.Generator().manual_seed(seed))
    assert t.min() >= 0.2 and t.max() <= 0.6
    assert abs(t.mean().item() - 0.4) < 0.005 and abs(t.var().item() - 0.4**2 / 12) < 0.002


def test_score_from_velocity_1d_gaussian(seed):
    # data x ~ N(m, s^2): x_t ~ N((1-t) m, (1-t)^2 s^2 + t^2), exact score and velocity in closed form
    m, s = 0.7, 0.5
    t = torch.rand(50, dtype=torch.float64) * 0.98 + 0.01
    xt = torch.randn(50, dtype=torch.float64) * 2
    var = (1 - t) ** 2 * s**2 + t**2
    mean = (1 - t) * m
    cov_v_xt = t - (1 - t) * s**2  # Cov(eps - x, x_t)
    v = -m + cov_v_xt / var * (xt - mean)
    score = -(xt - mean) / var
    assert torch.allclose(score_from_velocity(v[:, None], xt[:, None], t)[:, 0], score, rtol=1e-10, atol=1e-10)


def test_bad_inputs_name_the_argument():
    net, fm = ConvNet(), FlowMatching()
    x, y = torch.randn(4, 2, 5, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="t must have shape"):
        fm.loss(net, x, y, t=torch.rand(3))
    with pytest.raises(ValueError, match="noise must have"):
        fm.loss(net, x, y, noise=torch.randn(4, 2, 5, 4))
    with pytest.raises(ValueError, match="x must be a tensor"):
        fm.loss(net, [1, 2], y)
    with pytest.raises(ValueError, match="t_min"):
        FlowMatching(t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match="t must be > 0"):
        score_from_velocity(x, x, 0.0)
    assert math.isfinite(fm.loss(net, x, y)["loss"].item())
