"""Per-sample token budgets (--route-ratio-range, --mask-ratio-range): a ratio drawn per sample, the
kept tokens packed without padding (TokenPack), and the packed step equal to a loop of dense runs,
one sample at a time with its own keep index, in outputs, losses and every parameter's gradient."""
import argparse

import pytest
import torch

from effkernels import ops
from effkernels.models.backbone.network import Route
from effkernels.models.backbone.configs import build
from effkernels.models.methods import ConfigError, build_method
from effkernels.models.methods.maskdit import MaskDiT
from effkernels.models.methods.tread import TREAD
from effkernels.models.objectives.flow import FlowMatching
from effkernels.nn import DiTBlock
from effkernels.nn.routing import TokenPack, draw_ratios, keep_count

# Float32 sums in another order (packed vs one sample): a few ulps of the largest gradient.
RTOL = 2e-5


def _tread_args(**kw):
    base = dict(route_ratio=0.5, route=None, route_unsorted=False, route_eval=False, route_ratio_range=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _mask_args(**kw):
    base = dict(mask_ratio=0.5, mae_weight=0.1, decoder_depth=None, decoder_width=None, mask_ratio_range=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _batch(seed, b):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(b, 1, 8, 8, generator=g) * 2 - 1, "y": torch.randint(0, 10, (b,), generator=g),
            "t": torch.rand(b, generator=g), "noise": torch.randn(b, 1, 8, 8, generator=g),
            "generator": torch.Generator().manual_seed(seed + 1)}


def _randomize(*mods):
    for m in mods:
        for p in m.parameters():
            p.data.normal_(0, 0.1)


def _sample(batch, b):
    return {k: (v[b:b + 1] if torch.is_tensor(v) else v) for k, v in batch.items()}


def _rows(pack, b):
    """Sample b's kept positions (1, K_b), as a fixed-count keep index for that sample alone."""
    cu = pack.cu_seqlens.tolist()
    return (pack.rows[cu[b]:cu[b + 1]] - b * pack.num_tokens).view(1, -1)


def _grads(params):
    # None stays None (MaskDiT leaves the backbone's own final layer unused): compared as such.
    out = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def _assert_grads_close(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"parameter {i}: gradient in one run only"
        if a is None:
            continue
        scale = max(b.abs().max().item(), 1e-12)
        assert (a - b).abs().max().item() <= RTOL * scale, f"parameter {i}: {(a - b).abs().max().item()} vs {scale}"


def test_tread_packed_step_equals_a_loop_of_dense_runs(seed):
    model = build("tiny/2", depth=6, hidden_size=32, num_heads=2, class_dropout_prob=0.0).train()
    _randomize(model)
    B, N = 5, model.num_patches
    args = _tread_args(route=["2:3", "5:5"], route_ratio_range="0.1:0.8")
    method = build_method("tread", model, args)
    batch = _batch(seed, B)
    out = method.loss(model, batch, 0)
    out["loss"].backward()
    params = list(model.parameters())
    g_packed = _grads(params)

    # The counts are the ones the step's generator draws: per route, B ratios then the pack.
    routes = out["options"]["routes"]
    g = torch.Generator().manual_seed(seed + 1)
    for r in routes:
        ratios = draw_ratios(B, 0.1, 0.8, generator=g)
        assert list(r.idx.counts) == [keep_count(N, q) for q in ratios]
        TokenPack.draw(r.idx.counts, N, generator=g)  # advance g as the method did
    counts = [c for r in routes for c in r.idx.counts]
    assert len(set(counts)) > 1 and all(keep_count(N, 0.8) <= c <= keep_count(N, 0.1) for c in counts)

    fm, total, hidden = FlowMatching(), 0.0, []
    for b in range(B):
        one = [Route(r.start, r.end, 1 - r.idx.counts[b] / N, idx=_rows(r.idx, b)) for r in routes]
        assert [x.keep(N) for x in one] == [r.idx.counts[b] for r in routes]
        s = _sample(batch, b)
        res = fm.loss(model, s["x"], s["y"], t=s["t"], noise=s["noise"], routes=one, return_hidden=(2, 5))
        (res["loss"] / B).backward()
        total += res["loss"].item() / B
        hidden.append(res["hidden"])
    assert out["loss"].item() == pytest.approx(total, rel=1e-6)
    _assert_grads_close(g_packed, _grads(params))
    # Hidden states inside a packed route are full sequences, routed tokens filled in (what an
    # alignment loss composed with TREAD takes), as for each sample alone.
    with torch.no_grad():
        _, h = model(out["x_t"], batch["t"], batch["y"], routes=routes, return_hidden=(2, 5))
    for d in (2, 5):
        torch.testing.assert_close(h[d], torch.cat([hb[d] for hb in hidden]).detach(), rtol=1e-5, atol=1e-6)


def test_maskdit_packed_step_equals_a_loop_of_dense_runs(seed):
    model = build("tiny/2", depth=3, hidden_size=32, num_heads=2, class_dropout_prob=0.0).train()
    m = MaskDiT(model, _mask_args(mask_ratio_range="0.2:0.9"))
    _randomize(model, m.decoder)
    B, N = 5, model.num_patches
    batch = _batch(seed, B)
    opts = m.forward_options(model, batch, 0)
    pack = opts["keep_idx"]
    g = torch.Generator().manual_seed(seed + 1)
    assert list(pack.counts) == [int(N * (1 - q)) for q in draw_ratios(B, 0.2, 0.9, generator=g)]
    assert len(set(pack.counts)) > 1

    out = m.objective(model, batch, 0, opts)
    out["loss"].backward()
    params = list(model.parameters()) + list(m.decoder.parameters())
    g_packed = _grads(params)
    flow, mae, preds = 0.0, 0.0, []
    for b in range(B):
        o = m.objective(model, _sample(batch, b), 0, {"keep_idx": _rows(pack, b)})
        (o["loss"] / B).backward()
        flow, mae = flow + o["loss_flow"].item() / B, mae + o["loss_mae"].item() / B
        preds.append(o["pred"].detach())
    assert out["loss_flow"].item() == pytest.approx(flow, rel=1e-6)
    assert out["loss_mae"].item() == pytest.approx(mae, rel=1e-6)
    torch.testing.assert_close(out["pred"].detach(), torch.cat(preds), rtol=1e-5, atol=1e-6)
    _assert_grads_close(g_packed, _grads(params))


def test_maskdit_sample_that_masks_nothing_adds_zero_mae(seed):
    """A sample drawn at ratio 0 keeps every token: its flow term is over all N, its MAE term 0, and
    the batch means still divide by B (the fixed-count weighting)."""
    model = build("tiny/2", depth=3, hidden_size=32, num_heads=2, class_dropout_prob=0.0).train()
    m = MaskDiT(model, _mask_args(mask_ratio_range="0:0.5"))
    _randomize(model, m.decoder)
    N, batch = model.num_patches, _batch(seed, 2)
    part = ops.draw_route(1, N, 9, generator=torch.Generator().manual_seed(seed))[0]
    pack = TokenPack.from_indices([torch.arange(N), part], N)
    out = m.objective(model, batch, 0, {"keep_idx": pack})
    full = m.objective(model, _sample(batch, 0), 0, {})
    one = m.objective(model, _sample(batch, 1), 0, {"keep_idx": part.view(1, -1)})
    assert out["loss_flow"].item() == pytest.approx((full["loss"].item() + one["loss_flow"].item()) / 2, rel=1e-6)
    assert out["loss_mae"].item() == pytest.approx(one["loss_mae"].item() / 2, rel=1e-6)


def test_packed_block_broadcasts_per_sample_conditioning(seed):
    """DiTBlock on a TokenPack's rows with c per sample equals each sample run alone, dense."""
    g = torch.Generator().manual_seed(seed)
    blk = DiTBlock(16, 2)
    _randomize(blk)
    lengths = [1, 7, 4]
    pack = TokenPack.from_indices([torch.randperm(8, generator=g)[:k].sort().values for k in lengths], 8)
    x, c = torch.randn(pack.total, 16, generator=g), torch.randn(3, 16, generator=g)
    out = blk(x, c, pack)
    cu = pack.cu_seqlens.tolist()
    for b in range(3):
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], blk(x[None, cu[b]:cu[b + 1]], c[b:b + 1])[0],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="with pack"):
        blk(x[:-1], c, pack)
    with pytest.raises(ValueError, match="with pack"):
        blk(x, c[:2], pack)
    with pytest.raises(TypeError, match="pack must be a TokenPack"):
        blk(x, c, pack.cu_seqlens)


def test_pack_draw_equals_draw_route_at_equal_counts_and_is_valid(seed):
    N = 16
    pack = TokenPack.draw([6, 6, 6], N, generator=torch.Generator().manual_seed(seed))
    fixed = ops.draw_route(3, N, 6, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(pack.rows.view(3, 6) - torch.arange(3)[:, None] * N, fixed)
    un = TokenPack.draw([3, 16, 1], N, generator=torch.Generator().manual_seed(seed), sort=False)
    assert un.cu_seqlens.tolist() == [0, 3, 19, 20] and un.seg.tolist() == [0] * 3 + [1] * 16 + [2]
    assert un.max_seqlen == 16 and un.cu_seqlens.dtype == torch.int32
    assert sorted((un.rows[3:19] - N).tolist()) == list(range(N))  # distinct, within its own sample
    assert un.mask().sum(1).tolist() == [3.0, 16.0, 1.0]
    for bad in ([0, 3], [17], []):
        with pytest.raises(ValueError, match="counts"):
            TokenPack.draw(bad, N)
    with pytest.raises(ValueError, match=r"indices\[1\] has a duplicate"):
        TokenPack.from_indices([torch.tensor([0, 1]), torch.tensor([2, 2])], N)
    model = build("tiny/2", depth=2, hidden_size=16, num_heads=2)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"routes\[0\]\.idx packs 3 samples"):
        model(x, t, y, routes=[Route(1, 1, 0.5, idx=pack)])
    two = TokenPack.draw([2, 5], N)
    with pytest.raises(ValueError, match="routes cannot run inside a packed keep_idx"):
        model(x, t, y, keep_idx=two, routes=[Route(1, 1, 0.5)])


@pytest.mark.parametrize("option,spec,match", [
    ("route", "0.5", "expected A:B"), ("route", "0.7:0.2", "A <= B"), ("route", "0:1", "< 1"),
    ("route", "a:b", "--route-ratio-range 'a:b'"), ("route", "0.1:0.2:0.3", "expected A:B"),
    ("route", "0:0.99", "routes every one"),
    ("mask", "-0.1:0.5", "0 <= A"), ("mask", "0.4:0.3", "A <= B"), ("mask", "0.1:0.97", "keeps no token"),
])
def test_bad_ranges_name_the_option(option, spec, match):
    model = build("tiny/2", depth=6, hidden_size=32, num_heads=2)
    name = "--route-ratio-range" if option == "route" else "--mask-ratio-range"
    with pytest.raises(ConfigError, match=name) as e:
        if option == "route":
            TREAD(model, _tread_args(route_ratio_range=spec))
        else:
            MaskDiT(model, _mask_args(mask_ratio_range=spec))
    assert e.match(match)
    with pytest.raises(ConfigError, match="START:END only"):
        TREAD(model, _tread_args(route_ratio_range="0.2:0.4", route=["1:2:0.3"]))


class _PatchEncoder(torch.nn.Module):
    """A fixed random conv, one 5-dim token per 2x2 patch: a REPA target for the packed tests."""

    dim = 5

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 5, 2, stride=2)
        _randomize(self)

    def encode(self, images):
        return self.conv(images).flatten(2).transpose(1, 2).contiguous()


def _alignment_term(name, model):
    from effkernels.models.methods.repa import REPA
    from effkernels.models.methods.sra import SRA

    if name == "repa":
        args = argparse.Namespace(repa_encoder=None, repa_depth=2, repa_weight=0.5, repa_proj_dim=16,
                                  repa_image_key="x", repa_value_range=None, data="digits")
        return REPA(model, args, encoders=[_PatchEncoder()])
    args = argparse.Namespace(sra_student_depth=1, sra_teacher_depth=2, sra_t_max=0.2, sra_loss=name[4:] or "cosine",
                              sra_weight=0.5, sra_weight_schedule="constant")
    import copy
    term = SRA(model, args, teacher=copy.deepcopy(model))
    term.teacher_t = lambda t, generator: 0.7 * t  # no draw: the loop's per-sample batches replay it
    return term


@pytest.mark.parametrize("term_name", ["repa", "sra", "sra-smooth_l1"])
def test_packed_maskdit_alignment_term_equals_a_loop_of_dense_runs(seed, term_name):
    """MaskDiT with a ratio per sample composed with an alignment term: the packed step's loss and
    every gradient (backbone, decoder, projector) equal a per-sample loop of fixed-count runs, each
    sample weighted 1/B, so the alignment term weighs each sample's own kept tokens as a fixed count
    does; the term's target is gathered by the pack."""
    from effkernels.models.methods import Composite

    model = build("tiny/2", depth=3, hidden_size=32, num_heads=2, class_dropout_prob=0.0).train()
    m = MaskDiT(model, _mask_args(mask_ratio_range="0.1:0.9"))
    term = _alignment_term(term_name, model)
    _randomize(model, m.decoder, *term.modules().values())
    comp = Composite([("maskdit", m), (term_name.split("-")[0], term)])
    B, batch = 5, _batch(seed, 5)
    out = comp.loss(model, batch, 0)
    pack = out["options"]["keep_idx"]
    assert isinstance(pack, TokenPack) and len(set(pack.counts)) > 1
    key = "repa" if term_name == "repa" else "sra"
    assert torch.isfinite(out[key]) and out[key].item() != 0
    out["loss"].backward()
    params = list(model.parameters()) + list(m.decoder.parameters()) + [
        p for mod in term.modules().values() for p in mod.parameters()]
    g_packed = _grads(params)

    total, aligned = 0.0, 0.0
    depth = term.depth if key == "repa" else term.student_depth
    for b in range(B):
        s = _sample(batch, b)
        opts = {"keep_idx": _rows(pack, b), "return_hidden": (depth,)}
        o = m.objective(model, s, 0, opts)
        o["options"] = opts
        a = term.extra_losses(o, model, s, 0)[key]
        ((o["loss"] + a) / B).backward()
        total, aligned = total + (o["loss"] + a).item() / B, aligned + a.item() / B
    assert out[key].item() == pytest.approx(aligned, rel=1e-5)
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)
    _assert_grads_close(g_packed, _grads(params))


def test_packed_maskdit_with_an_unaware_extra_loss_is_an_error_at_build(seed):
    """An extra loss that does not declare takes_packed_hidden (a user's method reading a (B, K)
    keep_idx) must stop the run when it is built with a packed MaskDiT, not fail inside a step."""
    from effkernels.models.methods import Composite
    from effkernels.models.methods.base import Method

    class Spy(Method):
        def extra_losses(self, out, model, batch, step):
            return {}

    model = build("tiny/2", depth=6, hidden_size=32, num_heads=2)
    packed = MaskDiT(model, _mask_args(mask_ratio_range="0.3:0.6"))
    with pytest.raises(ConfigError, match="do not take packed hidden states"):
        Composite([("maskdit", packed), ("spy", Spy(model))])
    Composite([("maskdit", MaskDiT(model, _mask_args())), ("spy", Spy(model))])  # fixed ratio: fine


@pytest.mark.slow
def test_compiled_packed_route_step_matches_eager(seed):
    """fullgraph torch.compile of a routed step with a pre-drawn TokenPack: one graph, eager's loss
    and gradients (aot_eager: the traced graphs run by eager kernels, no inductor compile time)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = build("tiny/2", depth=4, hidden_size=32, num_heads=2, class_dropout_prob=0.0).train()
    _randomize(model)
    fm, B, N = FlowMatching(), 3, model.num_patches
    b = _batch(seed, B)
    routes = [Route(2, 3, 0.5, idx=TokenPack.draw([3, 9, 14], N, generator=torch.Generator().manual_seed(seed)))]

    def loss_fn(x, y, t, noise, routes):
        return fm.loss(model, x, y, t=t, noise=noise, routes=routes)["loss"]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    params = list(model.parameters())
    compiled(b["x"], b["y"], b["t"], b["noise"], routes).backward()
    g_c = _grads(params)
    loss_fn(b["x"], b["y"], b["t"], b["noise"], routes).backward()
    assert counter.frame_count == 1
    _assert_grads_close(g_c, _grads(params))
    torch._dynamo.reset()
