"""The standard metrics: the FID Inception-v3 in pytorch-fid's weight layout (a random-weight network of
that layout saved by the test, never a download), its FID-specific blocks, ADM-style reference npz,
FID/sFID against it, IS and precision/recall by hand, TorchScript files and the CLI."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from effkernels.models.metrics import inception as inc
from effkernels.models.metrics.frechet import frechet_distance

tv = pytest.importorskip("torchvision.models.inception")


def random_inception(seed, resize=75):
    """Random weights that keep activations O(1) through the 20 blocks (He init, BN at identity stats),
    so features carry the input; 75 px is the smallest input the network takes (cheap on the CPU)."""
    torch.manual_seed(seed)
    net = inc.FIDInceptionV3(resize=resize).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def test_weight_layout_is_pytorch_fids_and_the_fid_blocks_differ_from_torchvision(tmp_path, seed):
    net = random_inception(seed)
    with torch.device("meta"):  # names and shapes only
        ref = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    ours, theirs = net.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)
    assert ours["fc.weight"].shape == (1008, 2048)
    # the FID graph's pooling: without padding in the average (Mixed_5b), max in Mixed_7c's pool branch
    x = torch.randn(2, 192, 9, 9)
    blk = net.net.Mixed_5b
    with torch.no_grad():
        got = blk(x)[:, -32:]  # the pool branch comes last
        want = blk.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        plain = tv.InceptionA(192, 32)
        plain.load_state_dict(blk.state_dict())  # torchvision's block, same weights: counts the padding
        assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(plain.eval()(x)[:, -32:], got, atol=1e-4)
        x7 = torch.randn(1, 2048, 4, 4)
        b7 = net.net.Mixed_7c
        torch.testing.assert_close(b7(x7)[:, -192:], b7.branch_pool(F.max_pool2d(x7, 3, stride=1, padding=1)))
    # a file without BatchNorm's num_batches_tracked (older torch, as pytorch-fid's) loads; a foreign one does not
    path = tmp_path / "pt_inception.pth"
    torch.save({k: v for k, v in ours.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = inc.load_inception(str(path), resize=75)
    img = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = net(img), loaded(img)
    for k in ("pool", "spatial", "logits"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing .*Conv2d_1a_3x3.*unexpected .*conv.weight"):
        inc.load_inception(str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        inc.load_inception(str(tmp_path / "none.pth"))


def test_feature_shapes_at_299_are_adms():
    net = inc.FIDInceptionV3().eval()  # default 299 px
    with torch.no_grad():
        f = net(torch.zeros(1, 3, 40, 40))
    # pool_3 2048; mixed_6/conv's first 7 channels on its 17 x 17 grid; the 1008-way softmax input
    assert f["pool"].shape == (1, 2048) and f["spatial"].shape == (1, 7 * 17 * 17) and f["logits"].shape == (1, 1008)


def test_sample_space_frechet_distance_equals_the_dense_one(seed):
    g = np.random.default_rng(seed)
    ref = g.standard_normal((40, 30)) @ g.standard_normal((30, 30))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    for n in (5, 12, 60):  # fewer samples than dimensions (sample space) and more (the dense form)
        f = g.standard_normal((n, 30)) * 1.5 + 0.3
        want = frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu, sigma)
        # 1e-7: the dense form takes square roots of the rank-deficient product's round-off eigenvalues
        # (each ~1e-16 adds ~1e-8), which the sample-space form never sees
        assert inc.fid_from_features(f, mu, sigma) == pytest.approx(want, rel=1e-7)


def test_inception_score_and_precision_recall_by_hand():
    assert inc.inception_score(np.zeros((6, 5))) == pytest.approx(1.0)  # one class distribution for all: 1
    onehot = np.full((4, 4), -1e4)
    np.fill_diagonal(onehot, 0.0)
    assert inc.inception_score(onehot) == pytest.approx(4.0)  # confident and every class once: K
    # splits of 4: the first scores 4, the second (two confident samples of two classes) 2
    assert inc.inception_score(np.concatenate([onehot, onehot[:2]]), split_size=4) == pytest.approx((4 + 2) / 2)
    # precision/recall with k = 1: reference points 0, 1, 2, 10 on a line (radii 1, 1, 1, 8)
    ref = np.array([[0.0], [1.0], [2.0], [10.0]])
    gen = np.array([[0.5], [5.0], [30.0], [31.0]])  # radii 4.5, 4.5, 1, 1
    p, r = inc.precision_recall(ref, gen, k=1)
    # inside a ref ball: 0.5 (of 0), 5.0 (of 10, radius 8); 30, 31 not -> 2/4
    # ref inside a gen ball: 0, 1, 2 (of 0.5, radius 4.5); 10 is 5 from 5.0, outside its 4.5 -> 3/4
    assert (p, r) == (0.5, 0.75)
    with pytest.raises(ValueError, match="more than k"):
        inc.precision_recall(ref[:1], gen, k=1)


def _images(seed, n, smooth):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    if smooth:
        x = F.avg_pool2d(x, 3, stride=1, padding=1) * 2
    return F.interpolate(x, size=(32, 32), mode="nearest").clamp(-1, 1)


def test_fid_sfid_against_an_adm_reference_npz_and_the_cli(tmp_path, seed, capsys):
    net = random_inception(seed)
    ref_imgs, same, other = _images(seed, 12, False), _images(seed + 1, 12, False), _images(seed + 2, 12, True)
    stats = inc.reference_stats(net, ref_imgs)
    u8 = np.asarray(
        ((ref_imgs.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=u8, **stats)  # ADM's reference batch layout
    ref = inc.load_reference(str(tmp_path / "VIRTUAL_ref.npz"))
    assert set(ref) == {"mu", "sigma", "mu_s", "sigma_s", "arr_0"}
    r_same, r_other = inc.evaluate_images(net, same, ref), inc.evaluate_images(net, other, ref)
    assert set(r_same) == {"fid", "sfid", "inception_score", "precision", "recall"}
    # the FID is the Frechet distance of the features' Gaussians: recompute the sFID from the features by
    # hand (63 dims at 75 px; the 2048-dim pool takes the same sample-space path, and a dense 2048 x 2048
    # eigendecomposition costs tens of seconds on this CPU)
    f = inc.inception_features(net, other)["spatial"]
    mu, sig = f.mean(0), np.cov(f, rowvar=False)
    assert r_other["sfid"] == pytest.approx(frechet_distance(mu, sig, stats["mu_s"], stats["sigma_s"]), rel=1e-7)
    # another draw of the same distribution is closer than a different (smoothed) distribution
    assert r_same["fid"] < r_other["fid"] and r_same["sfid"] < r_other["sfid"]
    assert r_same["recall"] > r_other["recall"]
    # mu/sigma only (a pytorch-fid stats file): FID alone of the reference-side metrics
    np.savez(tmp_path / "mu_sigma.npz", mu=stats["mu"], sigma=stats["sigma"])
    assert set(inc.load_reference(str(tmp_path / "mu_sigma.npz"))) == {"mu", "sigma"}
    np.savez(tmp_path / "bad.npz", m=stats["mu"])
    with pytest.raises(ValueError, match="no mu/sigma"):
        inc.load_reference(str(tmp_path / "bad.npz"))
    # the CLI: the weights file, the ADM reference, float samples in [-1, 1]
    torch.save(net.state_dict(), tmp_path / "pt_inception.pth")
    np.savez(tmp_path / "samples.npz", images=other.numpy())
    assert inc.main(["--weights", str(tmp_path / "pt_inception.pth"), "--ref", str(tmp_path / "VIRTUAL_ref.npz"),
                     "--samples", str(tmp_path / "samples.npz"), "--resize", "75"]) == 0
    out = capsys.readouterr().out
    assert f"fid: {r_other['fid']:.4f}" in out and f"sfid: {r_other['sfid']:.4f}" in out and "recall: " in out


class NVlabsLike(torch.nn.Module):
    """NVlabs' detector's calling convention: 0..255 images, return_features=True for pool features."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 5))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = x.mean((2, 3)) @ self.w
        return f if return_features else f.softmax(1)


class DictLike(torch.nn.Module):
    """A TorchScript network with FIDInceptionV3's outputs (what torch.jit.trace of it gives)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": x.mean((2, 3)), "spatial": x[:, :1].flatten(1), "logits": x.amax((2, 3))}


def test_nvlabs_style_torchscript_gives_pool_features(tmp_path):
    torch.jit.script(DictLike()).save(str(tmp_path / "ours.pt"))
    f = inc.inception_features(inc.load_inception(str(tmp_path / "ours.pt")), torch.rand(3, 3, 4, 4))
    assert set(f) == {"pool", "spatial", "logits"} and f["spatial"].shape == (3, 16)
    m = torch.jit.script(NVlabsLike())
    m.save(str(tmp_path / "inception-2015-12-05.pt"))
    net = inc.load_inception(str(tmp_path / "inception-2015-12-05.pt"))
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    f = inc.inception_features(net, x)
    assert set(f) == {"pool"}
    torch.testing.assert_close(torch.from_numpy(f["pool"]).float(), m((x + 1) * 127.5, return_features=True))
