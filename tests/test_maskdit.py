"""MaskDiT as a training method: exact-count masking, the encoder on kept tokens only, the decoder
and its zero-initialised parts, both losses over the right token sets (hand-computed), the MAE
target (noisy input, per-patch normalised), the unmasked fine-tune, sampling through the decoder,
FLOPs, and the CLI."""
import argparse

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effkernels.models.cli import train as train_mod
from effkernels.models.train.runlog import MetricsLog
from effkernels.models.backbone.configs import build
from effkernels.models.checkpoint import load_checkpoint
from effkernels.models.train.rebuild import generator_from_checkpoint
from effkernels.models.methods import ConfigError, build_method
from effkernels.models.methods.maskdit import MaskDiT, MaskDiTGenerator, patch_normalize
from helpers import digits_like_batch

SMALL = dict(depth=3, hidden_size=32, num_heads=2, class_dropout_prob=0.0)


def _args(**kw):
    return argparse.Namespace(**kw)  # the options not given take the method's defaults


def _batch(seed, b=3):
    return digits_like_batch(seed, b)


def _randomize(*mods):
    for m in mods:
        for p in m.parameters():
            p.data.normal_(0, 0.1)


def test_decoder_defaults_and_bad_options():
    big = MaskDiT(build("SiT-S/2", depth=1), _args())
    assert len(big.decoder.blocks) == 8 and big.decoder.width == 512
    assert big.decoder.blocks[0].attn.num_heads == 16
    tiny = MaskDiT(build("tiny/2"), _args())
    assert len(tiny.decoder.blocks) == 2 and tiny.decoder.width == 64
    assert MaskDiT(build("tiny/2"), _args(decoder_depth=3, decoder_width=48)).decoder.width == 48
    for kw, match in ((dict(mask_ratio=1.0), "--mask-ratio"), (dict(mae_weight=-1.0), "--mae-weight"),
                      (dict(decoder_width=30), "multiple of 4"), (dict(mask_ratio=0.99), "keeps no token")):
        with pytest.raises(ConfigError, match=match):
            MaskDiT(build("tiny/2"), _args(**kw))
    with pytest.raises(ConfigError, match="TREAD and MaskDiT do not combine"):
        build_method("tread+maskdit", build("tiny/2"), argparse.Namespace(**vars(_args()), route_ratio=0.5, route=None,
                                                                          route_unsorted=False, route_eval=False))


def test_encoder_sees_exactly_the_kept_tokens_per_sample(seed):
    model = build("tiny/2", **SMALL).train()
    m = build_method("maskdit", model, _args(mask_ratio=0.3))
    shapes = []
    hook = model.blocks[0].register_forward_pre_hook(lambda mod, a: shapes.append(tuple(a[0].shape)))
    out = m.loss(model, _batch(seed), 0)
    hook.remove()
    assert shapes == [(3, int(16 * (1 - 0.3)), 32)]  # int(N (1 - ratio)) = 11 of 16
    keep = out["options"]["keep_idx"]
    assert keep.shape == (3, 11) and len({tuple(r.tolist()) for r in keep}) > 1  # drawn per sample
    assert torch.isfinite(out["loss"])


def test_fresh_decoder_outputs_zero_and_mask_token_gets_gradient(seed):
    model = build("tiny/2", **SMALL).train()
    m = MaskDiT(model, _args())
    out = m.loss(model, _batch(seed), 0)
    assert torch.count_nonzero(out["pred"]) == 0  # zero-initialised final layer, as the backbone's
    _randomize(m.decoder.final, m.decoder.bridge)
    out = m.loss(model, _batch(seed), 0)
    out["loss"].backward()
    assert m.decoder.mask_token.grad is not None and m.decoder.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.final_layer.parameters())  # the backbone's own head is unused


def test_losses_average_over_the_right_token_sets(seed):
    """Hand-computed with loops: the flow loss over kept tokens, 0.1 x MAE over masked ones
    against the per-patch-normalised noisy input (unbiased variance, eps 1e-6, as the release)."""
    model = build("tiny/2", **SMALL).train()
    m = MaskDiT(model, _args())
    _randomize(model, m.decoder)
    batch = _batch(seed)
    out = m.loss(model, batch, 0)
    keep = out["options"]["keep_idx"]
    pred, x, noise, t = out["pred"].double(), batch["x"].double(), batch["noise"].double(), batch["t"].double()
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    v = noise - x
    flow, mae = 0.0, 0.0
    for b in range(3):
        kept = set(keep[b].tolist())
        f_b, m_b, n_k, n_m = 0.0, 0.0, 0, 0
        for n in range(16):
            r, c = divmod(n, 4)  # 4x4 grid of 2x2 patches
            sl = (b, 0, slice(2 * r, 2 * r + 2), slice(2 * c, 2 * c + 2))
            pp, vv, xx = pred[sl].flatten(), v[sl].flatten(), x_t[sl].flatten()
            if n in kept:
                f_b += ((pp - vv) ** 2).mean().item()
                n_k += 1
            else:
                mu, var = xx.mean(), ((xx - xx.mean()) ** 2).sum() / (xx.numel() - 1)  # unbiased
                m_b += ((pp - (xx - mu) / (var + 1e-6).sqrt()) ** 2).mean().item()
                n_m += 1
        assert n_k == 8 and n_m == 8
        flow += f_b / n_k / 3
        mae += m_b / n_m / 3
    assert out["loss_flow"].item() == pytest.approx(flow, rel=1e-5)
    assert out["loss_mae"].item() == pytest.approx(mae, rel=1e-5)
    assert out["loss"].item() == pytest.approx(flow + 0.1 * mae, rel=1e-5)


def test_patch_normalize(seed):
    """The release's MAE target: (p - mean) / sqrt(var + 1e-6), var unbiased (divisor P - 1)."""
    print(f"seed={seed}")
    p = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    z = patch_normalize(p)
    # mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3
    want = torch.tensor([[-2.0, -1.0, 0.0, 3.0]]) / (14 / 3 + 1e-6) ** 0.5
    torch.testing.assert_close(z, want, rtol=1e-6, atol=1e-7)
    assert z.mean().abs() < 1e-6 and (z.pow(2).sum() / 3 - 1).abs() < 1e-5
    q = torch.randn(3, 5, 12, dtype=torch.float64)
    for b in range(3):
        for n in range(5):
            v = q[b, n].tolist()
            mu = sum(v) / 12
            var = sum((a - mu) ** 2 for a in v) / 11
            got = patch_normalize(q)[b, n].tolist()
            assert got == pytest.approx([(a - mu) / (var + 1e-6) ** 0.5 for a in v], rel=1e-12, abs=1e-12)


def test_decoder_blocks_start_xavier_with_zero_biases_then_adaln_zero(seed):
    """As the release's initialize_weights (and our backbone): every Linear of a decoder block
    xavier-uniform with a zero bias, then the modulation's last Linear (shifts, scales, gates) zero."""
    print(f"seed={seed}")
    torch.manual_seed(seed)
    m = MaskDiT(build("tiny/2", depth=3, hidden_size=48, num_heads=2), _args(decoder_depth=2))
    for blk in m.decoder.blocks:
        lins = [mod for mod in blk.modules() if isinstance(mod, torch.nn.Linear)]
        assert len(lins) >= 5  # qkv, proj, fc1, fc2, adaLN
        for lin in lins:
            if lin is blk.adaLN_modulation[-1]:
                assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
                continue
            assert lin.bias is None or torch.count_nonzero(lin.bias) == 0
            fan_out, fan_in = lin.weight.shape
            bound, w = (6.0 / (fan_in + fan_out)) ** 0.5, lin.weight.detach()
            assert float(w.abs().max()) <= bound
            assert float(w.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    x, c = torch.randn(2, 16, 48), torch.randn(2, 48)
    blk = m.decoder.blocks[0]
    torch.testing.assert_close(blk(x, c), x, rtol=0, atol=0)  # adaLN-Zero: the identity at init


def test_unmasked_stage_and_generator_use_all_tokens(seed):
    model = build("tiny/2", **SMALL).train()
    m = MaskDiT(model, _args(mask_ratio=0.0))
    _randomize(model, m.decoder)
    assert m.forward_options(model, _batch(seed), 0) == {}
    out = m.loss(model, _batch(seed), 0)
    assert "loss_mae" not in out
    batch = _batch(seed)
    model.eval()
    gen = MaskDiTGenerator(model, m.decoder)
    x_t = (1 - batch["t"].view(-1, 1, 1, 1)) * batch["x"] + batch["t"].view(-1, 1, 1, 1) * batch["noise"]
    v = gen(x_t, batch["t"], batch["y"])
    ref = ((v - (batch["noise"] - batch["x"])) ** 2).mean()
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=0)


def _flops(model, method, seed):
    with FlopCounterMode(display=False) as fc:
        method.loss(model, _batch(seed, b=4), 0)["loss"].backward()
    return fc.get_total_flops()


def test_masking_cuts_the_encoder_flops(seed):
    model = build("tiny/2", depth=6, hidden_size=32, num_heads=2).train()
    masked = _flops(model, build_method("maskdit", model, _args(decoder_depth=1)), seed)
    unmasked = _flops(model, build_method("maskdit", model, _args(decoder_depth=1, mask_ratio=0.0)), seed)
    assert masked < 0.75 * unmasked  # 6 encoder blocks on 8 of 16 tokens; the 1-block decoder on all


def test_trains_through_the_cli_fine_tunes_unmasked_and_samples(tmp_path):
    common = ["--method", "maskdit", "--model-kwargs", '{"depth": 3, "hidden_size": 32, "num_heads": 2}',
              "--batch-size", "16", "--eval-every", "0", "--quiet", "--log-every", "5", "--lr", "3e-3"]
    assert train_mod.main(["--out", str(tmp_path), "--steps", "30", *common]) == 0
    rows = MetricsLog.read(str(tmp_path / "metrics.jsonl"))
    assert rows[-1]["loss"] < rows[0]["loss"] and "loss_mae" in rows[0]
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    assert any(k.startswith("decoder.") for k in ck["method"]["modules"]) and "decoder" in ck["method"]["ema"]
    assert train_mod.main(["--out", str(tmp_path), "--steps", "32", "--resume", "auto", "--mask-ratio", "0",
                           *common]) == 0
    rows = MetricsLog.read(str(tmp_path / "metrics.jsonl"))
    assert rows[-1]["step"] == 32 and "loss_mae" not in rows[-1]
    method, models, _ = generator_from_checkpoint(load_checkpoint(str(tmp_path / "last.pt")))
    imgs = method.sample(models, torch.arange(4), torch.randn(4, 1, 8, 8), steps=2)
    assert imgs.shape == (4, 1, 8, 8) and torch.isfinite(imgs).all()


class _PatchEncoder(torch.nn.Module):
    """A user encoder following the REPA protocol: one 8-d token per 2x2 patch."""
    dim = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 2, 2)

    def encode(self, images):
        return self.conv(images).flatten(2).transpose(1, 2)  # (B, 16, 8)


def test_maskdit_composes_with_repa_on_the_kept_tokens(seed):
    from effkernels.models.methods import Composite
    from effkernels.models.methods.repa import REPA

    model = build("tiny/2", **SMALL).train()
    enc = _PatchEncoder()
    repa = REPA(model, argparse.Namespace(repa_depth=2, repa_weight=0.5, repa_proj_dim=16), encoders=[enc])
    m = Composite([("maskdit", MaskDiT(model, _args())), ("repa", repa)])
    batch = _batch(seed)
    out = m.loss(model, batch, 0)
    keep = out["options"]["keep_idx"]
    assert out["hidden"][2].shape == (3, 8, 32)  # the kept tokens only
    z = enc.encode(batch["x"]).detach()
    z_kept = torch.stack([z[b, keep[b]] for b in range(3)])
    head = repa.projectors[0]
    want = 0.5 * head(out["hidden"][2], z_kept)
    torch.testing.assert_close(out["repa"], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss"], out["loss_base"] + want, rtol=1e-6, atol=0)
