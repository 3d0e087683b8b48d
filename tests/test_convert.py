"""Checkpoint interop: official DiT / SiT / REPA state dicts load strictly into our backbone and give
the same outputs; apply_effkernels patches an official-style DiT in place without changing them."""
import argparse
import pathlib
import re

import pytest
import torch
from torch import nn

from effkernels.models.backbone.network import DiT
from effkernels.models.backbone.configs import build
from effkernels.models.interop.patch import apply_effkernels, revert_effkernels
from effkernels.models.interop.official import infer_config, load_official, read_state_dict
from effkernels.models.sampling.samplers import sample
from helpers import TOL, TOL_REDUCE, rel_err
from test_backbone import OfficialStyleDiT, randomized

SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=7)


def _official(**kw):
    cfg = {**SMALL, **kw}
    model = randomized(OfficialStyleDiT(**cfg)).eval()
    with torch.no_grad():  # a checkpoint's pos_embed is whatever it stores: make it visibly non-default
        model.pos_embed.normal_()
    return model


def _inputs(cfg=SMALL, B=3):
    S, C = cfg["input_size"], cfg["in_channels"]
    return torch.randn(B, C, S, S), torch.rand(B), torch.randint(0, cfg["num_classes"], (B,))


def _assert_filled(model, sd):
    ours = model.state_dict()
    assert set(ours) == set(sd)
    for k, v in ours.items():
        assert torch.equal(v, sd[k]), f"{k} was not loaded"


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_official_state_dict_loads_strictly_with_equal_outputs(seed, learn_sigma):
    official = _official(learn_sigma=learn_sigma)
    sd = official.state_dict()
    model = load_official(sd, num_heads=SMALL["num_heads"]).eval()
    _assert_filled(model, sd)
    assert model.learn_sigma == learn_sigma and model.depth == SMALL["depth"]
    x, t, y = _inputs()
    want, want_h = official(x, t, y, return_hidden_at=2)
    got, got_h = model(x, t, y, return_hidden=(2,))
    assert rel_err(got, want) <= TOL[torch.float32]
    assert rel_err(got_h[2], want_h) <= TOL[torch.float32]


def test_infer_config_reads_shapes():
    sd = OfficialStyleDiT(**SMALL).state_dict()
    cfg = infer_config(sd)
    assert cfg == dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, mlp_ratio=4.0,
                       num_classes=7, class_dropout_prob=0.1, learn_sigma=True, qk_norm=False,
                       norm="layernorm", mlp="gelu", pos="sincos")


def test_repa_checkpoint_with_projectors_and_wrappers(seed, tmp_path):
    official = _official(learn_sigma=False, z_dims=(24, 16))
    # A training checkpoint: EMA weights saved from a DDP-wrapped, compiled model, plus other entries.
    ema = {"module._orig_mod." + k: v for k, v in official.state_dict().items()}
    path = tmp_path / "repa.pt"
    args = argparse.Namespace(model="SiT-B/2", enc_type="dinov2-vit-b", proj_coeff=0.5, qk_norm=False)
    torch.save({"model": {k: torch.zeros_like(v) for k, v in ema.items()}, "ema": ema, "args": args,
                "steps": 400}, path)
    target = DiT(**SMALL, learn_sigma=False)
    model, heads = load_official(path, target, return_projectors=True)
    assert model is target and len(heads) == 2
    _assert_filled(model, {k: v for k, v in official.state_dict().items() if not k.startswith("projectors")})
    h = torch.randn(2, 5, SMALL["hidden_size"])
    for head, proj, z in zip(heads, official.projectors, (24, 16)):
        assert head.z_dim == z
        assert rel_err(head.project(h), proj(h)) <= TOL_REDUCE[torch.float32]
    # The model key picks the other copy of the weights.
    zeroed = load_official(path, DiT(**SMALL, learn_sigma=False), key="model")
    assert all(not v.any() for v in zeroed.state_dict().values())


def test_config_name_builds_with_checkpoint_shapes(seed, tmp_path):
    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=6, num_heads=4, num_classes=10,
               learn_sigma=False)
    official = _official(**cfg)
    torch.save(official.state_dict(), tmp_path / "sit.pt")
    model = load_official(str(tmp_path / "sit.pt"), "tiny/2").eval()
    _assert_filled(model, official.state_dict())
    x, t, y = _inputs(cfg)
    assert rel_err(model(x, t, y), official(x, t, y)) <= TOL[torch.float32]


def test_load_errors(tmp_path):
    sd = OfficialStyleDiT(**SMALL).state_dict()
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official(missing, num_heads=2)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_official(garbage, num_heads=2)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"ema": sd, "args": argparse.Namespace(path=pathlib.PurePosixPath("/data"))}, unsafe)
    with pytest.raises(ValueError, match="unsafe.pt.*weights_only"):
        load_official(unsafe, num_heads=2)
    with pytest.raises(TypeError, match="source"):
        load_official(42)
    with pytest.raises(ValueError, match="no entry 'ema'"):
        read_state_dict(sd, key="ema")
    with pytest.raises(ValueError, match="no state dict"):
        read_state_dict({"args": 3})
    with pytest.raises(TypeError, match="model"):
        load_official(sd, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="overrides"):
        load_official(sd, DiT(**SMALL, learn_sigma=True), depth=2)
    cut = dict(sd)
    del cut["blocks.1.attn.qkv.bias"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.attn.qkv.bias'\]"):
        load_official(cut, DiT(**SMALL, learn_sigma=True))
    extra = {**sd, "blocks.0.attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(ValueError, match="unexpected.*q_norm"):
        load_official(extra, DiT(**SMALL, learn_sigma=True))
    with pytest.raises(ValueError, match="shape mismatches.*final_layer.linear"):
        load_official(sd, DiT(**SMALL, learn_sigma=False))


def test_apply_effkernels_keeps_outputs_and_gradients(seed):
    official = _official()
    x, t, y = _inputs()
    want = official(x, t, y)
    want.square().mean().backward()
    want_grads = [p.grad.clone() for p in official.parameters() if p.requires_grad]
    official.zero_grad()

    assert apply_effkernels(official) is official
    patched = [m for m in official.modules() if "forward" in m.__dict__]
    assert len(patched) == SMALL["depth"] + 1  # every block and the final layer
    got = official(x, t, y)
    assert rel_err(got, want) <= TOL[torch.float32]
    got.square().mean().backward()
    for g, w in zip((p.grad for p in official.parameters() if p.requires_grad), want_grads):
        assert rel_err(g, w) <= TOL_REDUCE[torch.float32]

    apply_effkernels(official, backend="reference")
    assert rel_err(official(x, t, y), want) <= TOL[torch.float32]
    revert_effkernels(official)
    assert not any("forward" in m.__dict__ for m in official.modules())
    assert torch.equal(official(x, t, y), want)


def test_apply_effkernels_errors_and_own_models():
    with pytest.raises(TypeError, match="model"):
        apply_effkernels("DiT")
    with pytest.raises(ValueError, match="no DiT-style block"):
        apply_effkernels(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="backend"):
        apply_effkernels(OfficialStyleDiT(**SMALL), backend="warp")
    ours = build("tiny/2")
    assert apply_effkernels(ours) is ours
    assert not any("forward" in m.__dict__ for m in ours.modules())


# -----------------------------------------------------------------------------------------------
# SiT / REPA / DiT semantics: what a load means, checked against the official samplers
# -----------------------------------------------------------------------------------------------
# The official networks below are test_backbone's official-layout DiT (DiT's, SiT's and REPA's
# models.py share it) with each paper's own forward around it; the official samplers are written
# here from their code (SiT transport/integrators.py + torchdiffeq's fixed-grid Euler, REPA
# samplers.py), independently of effkernels.models.cli.sample.

LATENT = dict(SMALL, in_channels=4)  # 4 channels, so guiding only the first 3 is visible


class OfficialSiT(OfficialStyleDiT):
    """SiT's models.py: the learned-sigma half dropped in forward; forward_with_cfg guides 3 channels."""

    def forward(self, x, t, y):
        out = super().forward(x, t, y)
        return out.chunk(2, dim=1)[0] if self.c_out == 2 * x.shape[1] else out

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def sit_euler_ode(fn, z, num_steps, **kw):
    """SiT's ODE sampler with sampling_method="euler": t = linspace(0, 1, num_steps) (velocity model,
    so t0 = 0, t1 = 1), torchdiffeq's fixed-grid Euler between consecutive points."""
    t = torch.linspace(0, 1, num_steps)
    x = z
    for t0, t1 in zip(t[:-1], t[1:]):
        x = x + (t1 - t0) * fn(x, torch.ones(x.shape[0]) * t0, **kw)
    return x


def test_sit_checkpoint_with_learned_sigma_samples_as_sits_euler_ode(seed):
    cfg = dict(LATENT, learn_sigma=True)
    official = _official(**cfg)
    official.__class__ = OfficialSiT  # same parameters; SiT's forward
    sd = official.state_dict()
    # the README's call shape: a "SiT-*" name means SiT semantics (overrides give the tiny test sizes)
    model = load_official(sd, "SiT-S/2", hidden_size=32, depth=3, num_heads=2).eval()
    assert model.interop.flavor == "sit" and model.interop.sigma_dropped and model.interop.guided_channels == 3
    _assert_filled(model, sd)  # the sigma half's weights load too; the adapter ignores it
    B, N = 4, 12
    z = torch.randn(B, 4, 8, 8)
    y = torch.randint(0, cfg["num_classes"], (B,))
    with torch.no_grad():
        want = sit_euler_ode(official, z, N, y=y)
        got = sample(model, y, noise=z, sampler="euler", steps=N - 1)  # N grid points = N - 1 steps
        assert got.shape == z.shape
        assert rel_err(got, want) <= TOL[torch.float32], rel_err(got, want)
        # the adapter is what makes it so: the raw network in our time is far off
        raw = load_official(sd, num_heads=2).eval()
        off = sample(raw, y, noise=z, sampler="euler", steps=N - 1)
        assert rel_err(off, want) > 0.05
        # CFG as SiT's sample.py: doubled batch, forward_with_cfg (3 channels), the first half kept
        y_null = torch.full_like(y, cfg["num_classes"])
        want_cfg = sit_euler_ode(official.forward_with_cfg, torch.cat([z, z]), N, y=torch.cat([y, y_null]),
                                 cfg_scale=4.0)[:B]
        got_cfg = sample(model, y, noise=z, sampler="euler", steps=N - 1, cfg_scale=4.0)
        assert rel_err(got_cfg, want_cfg) <= TOL[torch.float32], rel_err(got_cfg, want_cfg)
        all4 = sample(model, y, noise=z, sampler="euler", steps=N - 1, cfg_scale=4.0, guided_channels=None)
        assert rel_err(all4, want_cfg) > 1e-3  # guiding the 4th channel too is measurably different
        # our convention everywhere: forward(x, t) = -sit(x, 1 - t), sigma dropped, hidden states kept
        x, t = torch.randn(B, 4, 8, 8), torch.rand(B)
        out, hid = model(x, t, y, return_hidden=(2,))
        assert out.shape == x.shape and rel_err(out, -official(x, 1 - t, y)) <= TOL[torch.float32]
        assert set(hid) == {2}


class OfficialREPA(OfficialStyleDiT):
    """REPA's models/sit.py: timm Attention (with qk_norm), forward returns (x, zs)."""

    def __init__(self, qk_norm=False, **kw):
        from timm.models.vision_transformer import Attention

        super().__init__(**kw)
        for blk in self.blocks:
            d = kw["hidden_size"]
            blk.attn = Attention(d, num_heads=kw["num_heads"], qkv_bias=True, qk_norm=qk_norm,
                                 norm_layer=nn.LayerNorm)

    def forward(self, x, t, y):
        return super().forward(x, t, y), []


def official_repa(qk_norm=False):
    pytest.importorskip("timm")
    m = randomized(OfficialREPA(qk_norm=qk_norm, **LATENT, learn_sigma=False, z_dims=(16,))).eval()
    with torch.no_grad():
        m.pos_embed.normal_()
    return m


@pytest.mark.parametrize("qk_norm", [False, True])
def test_repa_layouts_load_in_our_convention(seed, qk_norm):
    official = official_repa(qk_norm)
    sd = official.state_dict()
    assert any(".attn.q_norm.weight" in k for k in sd) == qk_norm
    model = load_official(sd, num_heads=2).eval()
    assert model.interop.flavor == "repa" and model.interop.guided_channels is None
    assert model.qk_norm == qk_norm and model.interop.layout.startswith("REPA --qk-norm" if qk_norm else "REPA (")
    x, t, y = _inputs(LATENT)
    # REPA's time is ours (t = 0 data): the network is used as it is, no adapter
    assert type(model) is DiT
    assert rel_err(model(x, t, y), official(x, t, y)[0]) <= TOL[torch.float32]
    # the legacy layout: blocks after the encoder depth stored as decoder_blocks.j
    enc = 2
    legacy = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= enc:
            k = ".".join(["decoder_blocks", str(int(parts[1]) - enc)] + parts[2:])
        legacy[k] = v
    assert any(k.startswith("decoder_blocks.0.") for k in legacy)
    old = load_official(legacy, num_heads=2).eval()
    assert old.interop.layout.startswith("REPA legacy")
    assert rel_err(old(x, t, y), official(x, t, y)[0]) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="collides"):
        load_official(legacy, num_heads=2, encoder_depth=1)


def test_unknown_layouts_are_rejected_naming_the_keys(seed):
    sd = _official(learn_sigma=False).state_dict()
    for bad in ("blocks.0.attn.rope.freqs", "decoder_embed.weight", "blocks.1.attn.q_norm.scale"):
        with pytest.raises(ValueError, match=rf"no layout that loads: \['{re.escape(bad)}'\].*REPA legacy"):
            load_official({**sd, bad: torch.ones(3)}, num_heads=2)
    with pytest.raises(ValueError, match="encoder_depth"):
        load_official(sd, num_heads=2, encoder_depth=2)
    with pytest.raises(ValueError, match="flavor"):
        load_official(sd, num_heads=2, flavor="edm")
    with pytest.raises(ValueError, match="learned variance"):
        load_official(sd, num_heads=2, flavor="dit")


def test_sample_cli_reads_an_official_checkpoint(tmp_path, seed, capsys):
    import numpy as np

    from effkernels.models.cli import sample as sample_mod

    # tiny/2's architecture in SiT's layout (learned sigma, 4 latent channels)
    official = _official(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=6, num_heads=4,
                         num_classes=10, learn_sigma=True)
    path = tmp_path / "sit.pt"
    torch.save({"ema": official.state_dict(), "args": argparse.Namespace(model="SiT-XL/2")}, path)
    out = str(tmp_path / "s")
    assert sample_mod.main(["--ckpt", str(path), "--official", "tiny/2", "--flavor", "sit", "--out", out,
                            "--num", "4", "--steps", "5", "--sampler", "euler", "--cfg-scale", "3"]) == 0
    z = np.load(out + ".npz")
    model = load_official(str(path), "tiny/2", flavor="sit").eval()
    assert model.interop.guided_channels == 3
    gen = torch.Generator().manual_seed(0)  # the CLI's --seed 0: noise drawn first
    noise = torch.randn((4, 4, 8, 8), generator=gen)
    want = sample(model, torch.arange(4), noise=noise, sampler="euler", steps=5, cfg_scale=3.0, generator=gen)
    assert z["images"].shape == (4, 4, 8, 8) and rel_err(torch.from_numpy(z["images"]), want) <= 1e-6
    assert sample_mod.main(["--ckpt", str(path), "--official", "tiny/2", "--out", out, "--num", "2"]) == 0  # raw
    with pytest.raises(SystemExit):
        sample_mod.main(["--ckpt", str(path), "--flavor", "sit", "--out", out])
