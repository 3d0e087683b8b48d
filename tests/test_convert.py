"""Checkpoint interop: official DiT / SiT / REPA state dicts load strictly into our backbone and give
the same outputs; apply_effkernels patches an official-style DiT in place without changing them."""
import argparse
import pathlib

import pytest
import torch
from torch import nn

from effkernels.models.backbone import DiT, build
from effkernels.models.convert import (apply_effkernels, infer_config, load_official, read_state_dict,
                                       revert_effkernels)
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
                       num_classes=7, class_dropout_prob=0.1, learn_sigma=True)


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
