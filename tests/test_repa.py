"""REPA as a training method: the loss against a hand-written cosine, where its gradient goes, the
clean-x target, several encoders, the data-trained encoder and its cache, timm/DINOv2 weights from a
local file, pre-computed features, the CLI, and composition with TREAD and with a keep_idx plan."""
import argparse
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from effkernels.models.methods import encoders as enc
from effkernels.models.cli import features as features_mod
from effkernels.models.cli import train as train_mod
from effkernels.models.train.runlog import MetricsLog
from effkernels.models.backbone.configs import build
from effkernels.models.data.sources import load_dataset, load_latents
from effkernels.models.methods import ConfigError, Method
from effkernels.models.methods.base import Composite
from effkernels.models.methods.repa import REPA, default_depth, default_proj_dim
from torch import nn
from helpers import digits_like_batch

SMALL = {"depth": 4, "hidden_size": 32, "num_heads": 2}
SMALL_JSON = '{"depth": 4, "hidden_size": 32, "num_heads": 2}'


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One encoder cache for the module: the digits autoencoder trains once (~15 s), then loads."""
    mp = pytest.MonkeyPatch()
    path = str(tmp_path_factory.mktemp("effkernels_cache"))
    mp.setenv("EFFKERNELS_CACHE", path)
    yield path
    mp.undo()


class ToyEncoder(nn.Module):
    """A user encoder following the protocol: a fixed conv, one token per 2x2 pixels, a spy on its input."""

    def __init__(self, dim=6, channels=1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, dim, 2, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
        self.dim, self.seen = dim, []

    def encode(self, images):
        self.seen.append(images.detach().clone())
        return self.conv(images).flatten(2).transpose(1, 2).contiguous()


def _args(**kw):
    return argparse.Namespace(**{"repa_proj_dim": 16, "data": "digits", **kw})  # the rest: the method's defaults


def _batch(seed, b=3):
    return digits_like_batch(seed, b)


def _hand_loss(head, h, z):
    """-mean over batch and tokens of cos(project(h), z), written out; per sample first, to show that
    every sample counts 1/B (ERW's released code kept only the last batch element)."""
    zh = head.project(h).double()
    cos = (zh * z.double()).sum(-1) / (zh.norm(dim=-1) * z.double().norm(dim=-1))  # (B, N)
    return -cos.mean(1).mean(0)


# -----------------------------------------------------------------------------------------------
# The loss and its gradients
# -----------------------------------------------------------------------------------------------

def test_defaults_depth_and_projector_width():
    assert [default_depth(d) for d in (12, 24, 28, 6, 4)] == [4, 8, 8, 2, 1]
    assert default_proj_dim(1152) == default_proj_dim(384) == 2048 and default_proj_dim(64) == 256
    m = REPA(build("tiny/2"), _args(repa_proj_dim=None), encoders=[ToyEncoder()])
    assert m.depth == 2 and m.projectors[0].proj[0].out_features == 256
    with pytest.raises(ConfigError, match="--repa-depth"):
        REPA(build("tiny/2", **SMALL), _args(repa_depth=5), encoders=[ToyEncoder()])
    with pytest.raises(ConfigError, match="--repa-encoder 'nope'"):
        REPA(build("tiny/2", **SMALL), _args(repa_encoder=["nope"]))


def test_loss_is_the_per_token_cosine_averaged_over_every_sample(seed):
    model = build("tiny/2", **SMALL).train()
    e = ToyEncoder()
    m = REPA(model, _args(repa_depth=2), encoders=[e])
    batch = _batch(seed)
    out = Composite([("repa", m)]).loss(model, batch, 0)
    h = out["hidden"][2]
    z = e.encode(batch["x"])
    ref = _hand_loss(m.projectors[0], h, z)
    assert abs(out["repa"].item() - 0.5 * ref.item()) < 1e-5
    assert torch.allclose(out["loss"], out["loss_base"] + out["repa"])
    # every sample's hidden state gets a gradient from the term, not only the last one
    hh = h.detach().requires_grad_(True)
    m.projectors[0](hh, z).backward()
    assert all(float(hh.grad[b].abs().sum()) > 0 for b in range(hh.shape[0]))


def test_gradient_reaches_projector_and_blocks_up_to_k_only_never_the_encoder(seed):
    model = build("tiny/2", **SMALL).train()
    e = ToyEncoder()
    m = REPA(model, _args(repa_depth=2), encoders=[e])
    out = Composite([("repa", m)]).loss(model, _batch(seed), 0)
    out["repa"].backward()  # the alignment term alone
    for d, blk in enumerate(model.blocks, start=1):
        g = [p.grad for p in blk.parameters()]
        if d <= 2:
            assert any(x is not None and float(x.abs().sum()) > 0 for x in g), f"block {d} got no gradient"
        else:
            assert all(x is None or float(x.abs().sum()) == 0 for x in g), f"block {d} above k got a gradient"
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.final_layer.parameters())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.projectors.parameters())
    assert all(p.grad is None for p in e.parameters()) and not any(p.requires_grad for p in e.parameters())
    assert "repa_projectors" in m.modules() and all(x is not e for x in m.modules().values())


def test_encoder_sees_the_clean_x_not_x_t(seed):
    model = build("tiny/2", **SMALL).train()
    e = ToyEncoder()
    m = REPA(model, _args(repa_depth=2), encoders=[e])
    batch = _batch(seed)
    out = Composite([("repa", m)]).loss(model, batch, 0)
    assert len(e.seen) == 1 and torch.equal(e.seen[0], batch["x"])
    assert not torch.allclose(e.seen[0], out["x_t"])
    e.train()
    Composite([("repa", m)]).loss(model, batch, 0)
    assert not e.training  # the encoder is put back in eval before every encode


def test_several_encoders_one_projector_each_losses_averaged(seed):
    model = build("tiny/2", **SMALL).train()
    e1, e2 = ToyEncoder(dim=6, seed=1), ToyEncoder(dim=10, seed=2)
    m = REPA(model, _args(repa_depth=3, repa_weight=0.7), encoders=[("a", e1), ("b", e2)])
    assert [p.z_dim for p in m.projectors] == [6, 10]
    batch = _batch(seed)
    out = Composite([("repa", m)]).loss(model, batch, 0)
    h = out["hidden"][3]
    per = [_hand_loss(p, h, e.encode(batch["x"])).item() for p, e in zip(m.projectors, (e1, e2))]
    assert abs(out["repa"].item() - 0.7 * (per[0] + per[1]) / 2) < 1e-5


def test_token_grids_are_resampled_to_the_dit_grid():
    z = torch.arange(16.0).reshape(1, 16, 1).expand(2, 16, 3).contiguous()  # a 4x4 grid
    down = enc.resample_tokens(z, 4)  # area pooling: each 2x2 block's mean
    assert torch.allclose(down[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))
    assert enc.resample_tokens(z, 64).shape == (2, 64, 3) and enc.resample_tokens(z, 16) is z
    with pytest.raises(enc.EncoderError, match="square"):
        enc.resample_tokens(torch.zeros(1, 5, 2), 4)


# -----------------------------------------------------------------------------------------------
# The data-trained encoder
# -----------------------------------------------------------------------------------------------

def test_digits_encoder_trains_caches_and_is_not_the_metric_classifier(cache, monkeypatch):
    from effkernels.models.metrics import classifier as metrics

    ds = load_dataset("digits")
    a = enc.DataEncoder()
    a.prepare(ds)
    assert a.info["recon_mse"] < 0.2  # reconstructs the digits: it learned something about them
    assert a.info["path"].startswith(os.path.join(cache, "repa_encoder"))
    z = a.encode(ds.x[:5])
    assert z.shape == (5, 16, a.dim) and torch.isfinite(z).all()
    # a second encoder loads from the cache: training would fail here
    monkeypatch.setattr(enc, "train_dae", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    b = enc.DataEncoder()
    b.prepare(ds)
    assert b.info["cached"] is True and torch.equal(b.encode(ds.x[:5]), z)
    # not the metric's classifier: another type, its own file, no shared weights
    assert not isinstance(b.net, metrics.FeatureClassifier)
    cls_dir = os.path.join(cache, "feature_classifier")
    assert not b.info["path"].startswith(cls_dir)
    if os.path.isdir(cls_dir):  # (a CLI test may have trained the classifier into this cache)
        for f in os.listdir(cls_dir):
            sd = torch.load(os.path.join(cls_dir, f), weights_only=True)["state"]
            assert not any(v.shape == w.shape and torch.equal(v, w) for v in sd.values()
                           for w in b.net.state_dict().values())


def test_digits_encoder_never_sees_labels(seed):
    """Reconstruction only: the same pixels with permuted labels train the identical network."""
    ds = load_dataset("digits")
    sub = type(ds)(ds.x[:256], ds.y[:256], 10, "sub")
    perm = type(ds)(ds.x[:256], ds.y[:256][torch.randperm(256)], 10, "perm")
    n1, _ = enc.train_dae(sub, epochs=1, seed=seed % 1000)
    n2, _ = enc.train_dae(perm, epochs=1, seed=seed % 1000)
    assert all(torch.equal(p, q) for p, q in zip(n1.state_dict().values(), n2.state_dict().values()))


# -----------------------------------------------------------------------------------------------
# timm / DINOv2 from a local file
# -----------------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")


def _vit(img, depth=2):
    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=img, depth=depth)
    with torch.no_grad():  # layer scale starts at 1e-5: make the blocks matter to the test
        for n, p in m.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return m.eval()


def _official(sd):
    """timm's state dict in facebookresearch/dinov2's hub layout: the same names plus mask_token."""
    return {**sd, "mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}


def test_dinov2_official_layout_loads_and_gives_the_patch_tokens(tmp_path, seed):
    ref = _vit(28)  # grid 2 at patch 14: the 2x2 grid of a tiny/4 DiT on 8x8 digits
    path = str(tmp_path / "dinov2_vits14_pretrain.pth")
    torch.save(_official(ref.state_dict()), path)
    e = enc.TimmEncoder("vit_small_patch14_dinov2", path, grid=2, value_range=(-1, 1), model_kwargs={"depth": 2})
    assert e.dim == 384 and e.resolution == 28 and e.model is None  # nothing read before prepare
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    z = e.encode(x)
    # by hand: [0, 1], RGB, ImageNet mean/std, bicubic to 28, patch tokens after the final norm
    xx = ((x + 1) / 2).expand(-1, 3, -1, -1)
    xx = (xx - torch.tensor(enc.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(enc.IMAGENET_STD).view(1, 3, 1, 1)
    xx = F.interpolate(xx, size=(28, 28), mode="bicubic", align_corners=False)
    with torch.no_grad():
        want = ref.forward_features(xx)[:, ref.num_prefix_tokens:]
    assert z.shape == (3, 4, 384) and torch.allclose(z, want, atol=1e-5)
    # a checkpoint trained at another resolution (42px: a 3x3 position table) loads, resampled
    path42 = str(tmp_path / "at42.pth")
    torch.save(_official(_vit(42).state_dict()), path42)
    e42 = enc.TimmEncoder("vit_small_patch14_dinov2", path42, grid=2, model_kwargs={"depth": 2})
    assert e42.encode(x).shape == (3, 4, 384)
    # and a REPA method runs on it, the encoder going to the data's device in attach
    model = build("tiny/4", depth=2, hidden_size=32, num_heads=2)
    m = REPA(model, _args(repa_depth=1), encoders=[("dino", e)])
    m.attach(argparse.Namespace(ds=load_dataset("digits"), device=torch.device("cpu")))
    out = Composite([("repa", m)]).loss(model.train(), _batch(seed), 0)
    assert torch.isfinite(out["repa"])


def test_timm_encoder_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "no_such.pth")
    with pytest.raises(enc.EncoderError, match="no_such.pth"):
        enc.TimmEncoder("vit_small_patch14_dinov2", missing, grid=2).prepare()
    with pytest.raises(ConfigError, match=r"--repa-encoder 'dinov2-vits14'.*local weights file"):
        REPA(build("tiny/2", **SMALL), _args(repa_encoder=["dinov2-vits14"]))
    small = str(tmp_path / "small_depth2.pth")
    torch.save(_official(_vit(28).state_dict()), small)
    # the full-depth ViT-S: blocks 2..11 are missing from the file
    with pytest.raises(enc.EncoderError, match=r"small_depth2.pth.*missing keys"):
        enc.build_encoder(f"dinov2-vits14:{small}", grid=2).prepare()
    # ViT-B's widths: every tensor has the wrong shape
    with pytest.raises(enc.EncoderError, match=r"small_depth2.pth.*does not fit vit_base_patch14_dinov2"):
        enc.TimmEncoder("vit_base_patch14_dinov2", small, grid=2, model_kwargs={"depth": 2}).prepare()
    junk = str(tmp_path / "junk.pth")
    with open(junk, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(enc.EncoderError, match="junk.pth"):
        enc.TimmEncoder("vit_small_patch14_dinov2", junk, grid=2).prepare()


# -----------------------------------------------------------------------------------------------
# Pre-computed features and the CLI
# -----------------------------------------------------------------------------------------------

def test_precomputed_features_equal_the_live_encoder_and_skip_it(cache, tmp_path, monkeypatch, seed):
    f32 = str(tmp_path / "f32.npz")
    assert features_mod.main(["--data", "digits", "--encoder", "dae", "--out", f32, "--dtype", "float32"]) == 0
    ds = load_latents(f32)
    assert ds.extras["repa_dae"].shape == (1797, 16, 64) and torch.equal(ds.x, load_dataset("digits").x)
    model = build("tiny/2", **SMALL).train()
    live = REPA(model, _args(repa_encoder=["dae"], repa_depth=2))
    pre = REPA(model, _args(repa_encoder=["precomputed:repa_dae"], repa_depth=2, data=f32))
    assert pre.batch_keys == ("repa_dae",) and live.batch_keys == ()
    pre.projectors.load_state_dict(live.projectors.state_dict())
    live.attach(argparse.Namespace(ds=ds, device=torch.device("cpu")))
    pre.attach(argparse.Namespace(ds=ds, device=torch.device("cpu")))
    idx = torch.arange(5) * 7
    batch = {**_batch(seed, 5), "x": ds.x[idx], "repa_dae": ds.extras["repa_dae"][idx]}
    a = Composite([("repa", live)]).loss(model, batch, 0)["repa"]
    b = Composite([("repa", pre)]).loss(model, batch, 0)["repa"]
    assert torch.allclose(a, b, atol=1e-6)
    # the default fp16 file: half the bytes, the same loss to fp16 rounding
    f16 = str(tmp_path / "f16.npz")
    assert features_mod.main(["--data", "digits", "--encoder", "dae", "--out", f16]) == 0
    with np.load(f16) as z:
        assert z["repa_dae"].dtype == np.float16
    c = Composite([("repa", pre)]).loss(model, {**batch, "repa_dae": load_latents(f16).extras["repa_dae"][idx]}, 0)
    assert abs(c["repa"].item() - b.item()) < 1e-3
    # training on the file reads the batch extras: running any encoder would fail
    monkeypatch.setattr(enc.DataEncoder, "encode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    assert train_mod.main(["--data", f16, "--method", "repa", "--repa-encoder", "precomputed:repa_dae",
                           "--model-kwargs", SMALL_JSON, "--steps", "3", "--eval-every", "0", "--log-every", "1",
                           "--out", str(tmp_path / "run"), "--quiet", "--seed", str(seed % 1000)]) == 0
    # a key the file lacks is a clear error naming both
    assert train_mod.main(["--data", f16, "--method", "repa", "--repa-encoder", "precomputed:repa_x",
                           "--model-kwargs", SMALL_JSON, "--steps", "1", "--eval-every", "0",
                           "--out", str(tmp_path / "run2"), "--quiet"]) == 2


def test_repa_trains_through_the_cli_and_the_loss_falls(cache, tmp_path, seed):
    out = str(tmp_path / "r")
    assert train_mod.main(["--method", "repa", "--model-kwargs", SMALL_JSON, "--steps", "90", "--log-every", "30",
                           "--warmup", "10", "--eval-every", "0", "--out", out, "--quiet",
                           "--seed", str(seed % 1000)]) == 0
    rows = [r for r in MetricsLog.read(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert len(rows) == 3 and "repa" in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1  # interval means: first 30 steps vs last 30
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert any(k.startswith("repa_projectors.0.proj.") for k in ck["method"]["modules"])
    assert not any("encoder" in k for k in ck["method"]["modules"])  # the frozen encoder is not checkpointed


def test_tread_plus_repa_trains_a_step(cache, tmp_path, seed):
    """Routes over blocks 2..3 with the alignment at depth 2, inside the route: the backbone fills the
    routed tokens in, so the hidden state is the full sequence and the target is used as it is."""
    assert train_mod.main(["--method", "tread+repa", "--route", "2:3", "--repa-depth", "2",
                           "--model-kwargs", SMALL_JSON, "--steps", "1", "--eval-every", "0", "--log-every", "1",
                           "--out", str(tmp_path / "t"), "--quiet", "--seed", str(seed % 1000)]) == 0
    row = MetricsLog.read(str(tmp_path / "t" / "metrics.jsonl"))[-1]
    assert np.isfinite(row["repa"]) and row["repa"] < 0.5


def test_packed_maskdit_plus_repa_trains_a_step(cache, tmp_path, seed):
    """A mask ratio per sample: the hidden state is the packed kept rows, the target gathered by the pack."""
    assert train_mod.main(["--method", "maskdit+repa", "--mask-ratio-range", "0.2:0.7", "--repa-depth", "2",
                           "--model-kwargs", SMALL_JSON, "--steps", "2", "--eval-every", "0", "--log-every", "1",
                           "--out", str(tmp_path / "m"), "--quiet", "--seed", str(seed % 1000)]) == 0
    row = MetricsLog.read(str(tmp_path / "m" / "metrics.jsonl"))[-1]
    assert np.isfinite(row["repa"]) and np.isfinite(row["loss"])


class ToyKeep(Method):
    """A MaskDiT-like token plan: the backbone sees a fixed half of the tokens."""

    token_plan = ("keep_idx",)
    owns_objective = True

    def __init__(self, idx):
        super().__init__()
        self.idx = idx

    def forward_options(self, model, batch, step):
        return {"keep_idx": self.idx}

    def objective(self, model, batch, step, options):
        out, hidden = model(batch["x"], batch["t"], batch["y"], **options)
        return {"loss": out.float().pow(2).mean(), "hidden": hidden}


def test_keep_idx_plan_gathers_the_target_at_the_kept_tokens(seed):
    model = build("tiny/2", **SMALL).train()
    e = ToyEncoder()
    m = REPA(model, _args(repa_depth=2), encoders=[e])
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(16, generator=g)[:8].sort().values for _ in range(3)])
    batch = _batch(seed)
    out = Composite([("keep", ToyKeep(idx)), ("repa", m)]).loss(model, batch, 0)
    h = out["hidden"][2]
    assert h.shape == (3, 8, 32)
    z = e.encode(batch["x"])
    z_kept = torch.stack([z[b, idx[b]] for b in range(3)])  # by hand
    assert abs(out["repa"].item() - 0.5 * _hand_loss(m.projectors[0], h, z_kept).item()) < 1e-5


def test_fitting_or_loading_a_cached_network_leaves_the_callers_rng_alone(tmp_path, seed):
    """A run that fits the data encoder and the metric's classifier and one that loads them from the
    cache continue with the same global RNG stream (label dropout draws from it), and what is fitted
    does not depend on the caller's RNG state."""
    from effkernels.models.metrics import classifier as metrics

    ds = load_dataset("digits")
    nets = []
    # fits into cache a, loads from a, fits into b from another caller state
    for caller_seed, cache in ((seed, "a"), (seed, "a"), (seed + 1, "b")):
        torch.manual_seed(caller_seed)
        e = enc.DataEncoder(8, cache=str(tmp_path / cache), epochs=1)
        e.prepare(ds)
        metrics.get_classifier(ds, cache=str(tmp_path / cache))
        drawn = torch.rand(3)
        torch.manual_seed(caller_seed)
        assert torch.equal(drawn, torch.rand(3))  # as if nothing had been fitted or loaded
        nets.append(e.net.state_dict())
    assert all(torch.equal(nets[0][k], nets[2][k]) for k in nets[0])
