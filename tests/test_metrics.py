"""Frechet distance against closed forms, the cached feature classifier, class accuracy, external nets."""
import math
import time

import numpy as np
import pytest
import torch
from effkernels.models.cache import load_or_fit
from effkernels.models.data.sources import load_digits
from effkernels.models.metrics.classifier import Evaluator, class_accuracy, get_classifier, load_feature_net, predict
from effkernels.models.metrics.frechet import fd_from_features, frechet_distance


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_fd_closed_form_2x2(seed):
    # For 2x2 SPD A, B the eigenvalues l1, l2 of AB are positive and tr (AB)^1/2 = sqrt(l1) + sqrt(l2)
    # = sqrt(tr(AB) + 2 sqrt(det(AB))): an independent closed form, no matrix square root needed.
    rng = np.random.default_rng(seed)
    for _ in range(5):
        m1, m2, s1, s2 = rng.standard_normal(2), rng.standard_normal(2), _spd(rng, 2), _spd(rng, 2)
        ab = s1 @ s2
        tr_sqrt = math.sqrt(np.trace(ab) + 2 * math.sqrt(np.linalg.det(ab)))
        expect = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expect, rel=1e-9, abs=1e-9)


def test_fd_closed_form_diagonal_and_identities(seed):
    rng = np.random.default_rng(seed)
    d = 7
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    expect = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    s = _spd(rng, d)
    assert abs(frechet_distance(m1, s, m1, s)) < 1e-9
    s2 = _spd(rng, d)
    assert frechet_distance(m1, s, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s), rel=1e-8)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(m1, s, m2[:3], s2)


def test_fd_of_samples_approaches_gaussian_value(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(40000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(40000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + 1
    expect = 3 * 1.0 + (0 + 1 + 0.25)  # |dmu|^2 + sum (1 - sqrt(var_b))^2
    assert fd_from_features(a, b) == pytest.approx(expect, rel=0.03)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    t0 = time.time()
    net, acc = get_classifier(digits, cache=cache)
    return net, acc, cache, time.time() - t0


def test_feature_classifier_reaches_95_percent_and_is_cached(classifier, digits):
    net, acc, cache, t_train = classifier
    print(f"held-out accuracy {acc:.4f}, trained in {t_train:.1f}s")
    assert acc >= 0.95
    t0 = time.time()
    net2, acc2 = get_classifier(digits, cache=cache)
    assert time.time() - t0 < t_train and acc2 == acc
    x = digits.x[:64]
    assert torch.equal(predict(net, x), predict(net2, x))
    # the held-out split really was held out: accuracy on it matches what was reported
    _, ho = digits.split()
    assert class_accuracy(net, digits.x[ho], digits.y[ho]) == pytest.approx(acc, abs=1e-6)


def test_class_accuracy_and_evaluator(classifier, digits, seed):
    net, _, cache, _ = classifier
    _, ho = digits.split()
    y = digits.y[ho]
    assert class_accuracy(net, digits.x[ho], y[torch.randperm(len(y))]) < 0.3  # wrong labels -> chance level
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(net, digits.x[:5], y[:4])
    ev = Evaluator(digits, cache=cache)
    real = ev(digits.x[ho], y)
    noise = ev(torch.rand(len(ho), 1, 8, 8) * 2 - 1, y)
    assert real["acc"] >= 0.95 and noise["fd"] > 10 * real["fd"]


class SmallFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated, still supported
@pytest.mark.parametrize("kind", ["export", "torchscript"])
def test_external_feature_net_from_local_file(tmp_path, seed, kind):
    m = SmallFeatures().eval()
    x = torch.randn(4, 3, 16, 16)
    if kind == "export":
        path = str(tmp_path / "feat.pt2")
        ep = torch.export.export(m, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.export.save(ep, path)
    else:
        path = str(tmp_path / "feat.pt")
        torch.jit.save(torch.jit.trace(m, (x,)), path)
    net = load_feature_net(path, input_size=16, channels=3)
    grey = torch.rand(6, 1, 8, 8) * 2 - 1  # grey 8x8: repeated to 3 channels, resized to 16x16
    expect = m(torch.nn.functional.interpolate(grey.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear",
                                               align_corners=False))
    got = predict(net, grey, fn="features")
    assert got.shape == (6, 5) and torch.allclose(got, expect, atol=1e-5)


def test_feature_net_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt2"):
        load_feature_net(str(tmp_path / "nothing.pt2"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.pt"):
        load_feature_net(str(bad))


def test_load_or_fit_fits_once_then_loads_and_refits_an_unreadable_file(tmp_path, capsys):
    from torch import nn

    from effkernels.models.cache import load_or_fit

    class Net(nn.Linear):
        def __init__(self, n):
            super().__init__(n, 1)
            self.config = {"n": n}

    calls = []

    def fit():
        calls.append(1)
        net = Net(3)
        nn.init.constant_(net.weight, 0.5)
        return net, {"score": 0.9}

    path = str(tmp_path / "sub" / "net.pt")
    a, info_a, loaded_a = load_or_fit(path, Net, fit)
    b, info_b, loaded_b = load_or_fit(path, Net, fit)
    assert (loaded_a, loaded_b, len(calls)) == (False, True, 1) and info_b == {"score": 0.9}
    assert torch.equal(b.weight, a.weight)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    c, _, loaded_c = load_or_fit(path, Net, fit, what="test cache")
    assert not loaded_c and len(calls) == 2 and "test cache" in capsys.readouterr().out


def test_a_cached_network_is_fitted_with_one_thread(tmp_path):
    """load_or_fit fits with one torch thread whatever the caller uses, then gives the caller's count
    back: sums split over threads round differently (the digits classifier fitted with 2 threads has
    other weights than with 1), so the cache, and every FD measured with it, would depend on the
    machine and on the run that happened to fit it."""
    seen = []

    def build(**config):
        net = torch.nn.Linear(config["d"], 1)
        net.config = config
        return net

    def fit():
        seen.append(torch.get_num_threads())
        return build(d=3), {"fitted_with": torch.get_num_threads()}

    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        net, info, loaded = load_or_fit(str(tmp_path / "n.pt"), build, fit)
        assert seen == [1] and info == {"fitted_with": 1} and not loaded
        assert torch.get_num_threads() == 2
        again, _, loaded = load_or_fit(str(tmp_path / "n.pt"), build, fit)
        assert loaded and seen == [1] and torch.equal(again.weight, net.weight)
    finally:
        torch.set_num_threads(prev)

