"""The DiT/SiT backbone: every named config on the meta device, parameter layout equal to an
official-style DiT written here, hidden states, adaLN-Zero identity, keep_idx / routes / stop_at."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effkernels import ops
from effkernels.models.backbone.configs import CONFIGS, build
from effkernels.models.backbone.network import DiT, Route
from effkernels.models.backbone.positions import get_2d_sincos_pos_embed
from helpers import TOL, rel_err, count_index_checks


#################################################################################
#          An official-style DiT, written independently for comparison          #
#################################################################################

class _Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class OfficialBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), s2, sc2))


class OfficialFinal(nn.Module):
    def __init__(self, dim, p, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, p * p * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class OfficialStyleDiT(nn.Module):
    """DiT / SiT / REPA-SiT layout: pos_embed a frozen Parameter, t in as given, optional projectors."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, z_dims=()):
        super().__init__()
        self.p, self.c_out = patch_size, in_channels * (2 if learn_sigma else 1)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)
        n = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, n, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([OfficialBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        if z_dims:
            self.projectors = nn.ModuleList([
                nn.Sequential(nn.Linear(hidden_size, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, z))
                for z in z_dims])
        self.final_layer = OfficialFinal(hidden_size, patch_size, self.c_out)

    def forward(self, x, t, y, return_hidden_at=None):
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)) + self.y_embedder.embedding_table(y)
        hidden = None
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c)
            if i + 1 == return_hidden_at:
                hidden = tokens
        out = self.final_layer(tokens, c)
        B, h = x.shape[0], x.shape[-1] // self.p
        out = out.reshape(B, h, h, self.p, self.p, self.c_out).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(B, self.c_out, h * self.p, h * self.p)
        return out if return_hidden_at is None else (out, hidden)


def randomized(model, std=0.1):
    """Every parameter drawn at random, so no block is the identity and every path is exercised."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def tiny(**kw):
    return build("tiny/2", **kw)


def _inputs(model, B=3):
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size)
    return x, torch.rand(B), torch.randint(0, model.num_classes, (B,))


#################################################################################
#                                     Tests                                     #
#################################################################################

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_shapes_on_meta(name):
    size, p = name.split("/")
    with torch.device("meta"):
        model = build(name)
        # The output shape does not depend on depth; one block keeps the meta-device forward fast.
        shallow = build(name, depth=1)
    if not name.startswith(("tiny", "LightningDiT")):  # LightningDiT's sizes: tests/test_modern_backbone.py
        depth, width, heads = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                               "XL": (28, 1152, 16)}[size.split("-")[1]]
        assert (model.depth, model.hidden_size, model.num_heads) == (depth, width, heads)
        assert (model.input_size, model.in_channels, model.num_classes) == (32, 4, 1000)
    assert model.patch_size == int(p) and len(model.blocks) == model.depth
    assert model.pos_embed.shape == (1, (model.input_size // int(p)) ** 2, model.hidden_size)
    assert model.token_pos.shape == (model.num_patches, 2)
    B, C, S = 2, model.in_channels, model.input_size
    x = torch.randn(B, C, S, S, device="meta")
    y = torch.randint(0, model.num_classes, (B,), device="meta")
    out, hidden = shallow(x, torch.rand(B, device="meta"), y, return_hidden=(1,))
    assert out.shape == (B, model.out_channels, S, S)
    assert hidden[1].shape == (B, model.num_patches, model.hidden_size)
    assert model.out_channels == C * (2 if name.startswith("DiT") else 1)


@pytest.mark.parametrize("size,heads", [("S", 6), ("B", 12), ("L", 16), ("XL", 16)])
@pytest.mark.parametrize("family", ["DiT", "SiT"])
def test_parameter_layout_equals_official_style(size, heads, family):
    depth, width = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}[size]
    with torch.device("meta"):
        ours = build(f"{family}-{size}/2")
        official = OfficialStyleDiT(hidden_size=width, depth=depth, num_heads=heads, learn_sigma=family == "DiT")
    assert ours.num_heads == heads and ours.depth == depth and ours.hidden_size == width
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert a == b
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(ours) == count(official)


def test_param_count_of_dit_xl2_is_the_published_675m():
    with torch.device("meta"):
        n = sum(p.numel() for p in build("DiT-XL/2").parameters())
    assert 674e6 < n < 676e6, n


def test_pos_embed_matches_numpy_meshgrid_construction():
    D, g = 32, 5
    gw, gh = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))  # w first

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    want = np.concatenate([one(D // 2, gw), one(D // 2, gh)], 1)
    assert np.allclose(get_2d_sincos_pos_embed(D, g).numpy(), want, atol=1e-6)


def test_fresh_model_blocks_are_identity(seed):
    model = tiny()
    x, t, y = _inputs(model)
    out, hidden = model(x, t, y, return_hidden=tuple(range(1, model.depth + 1)))
    tokens, _ = model.embed(x, t, y)
    for d in range(1, model.depth + 1):
        assert torch.equal(hidden[d], tokens), f"fresh block {d} changed its input"
    assert torch.equal(out, torch.zeros_like(out))


def test_hidden_states_at_requested_depths(seed):
    model = randomized(tiny()).eval()
    x, t, y = _inputs(model)
    out, hidden = model(x, t, y, return_hidden=(2, 5))
    assert set(hidden) == {2, 5} and hidden[2].shape == (3, model.num_patches, model.hidden_size)
    h, c = model.embed(x, t, y)
    for d, block in enumerate(model.blocks, 1):
        h = block(h, c)
        if d in (2, 5):
            assert torch.equal(hidden[d], h), f"hidden state {d} is not block {d}'s output"
    assert torch.equal(out, model(x, t, y))
    _, single = model(x, t, y, return_hidden=5)  # one depth may be given as a bare int
    assert set(single) == {5} and torch.equal(single[5], hidden[5])


def test_stop_at_runs_only_the_first_blocks(seed):
    model = randomized(tiny()).eval()
    x, t, y = _inputs(model)
    calls = []
    for i, b in enumerate(model.blocks, 1):
        b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    _, full = model(x, t, y, return_hidden=(3,))
    calls.clear()
    out, part = model(x, t, y, stop_at=3, return_hidden=(3,))
    assert out is None and calls == [1, 2, 3]
    assert torch.equal(part[3], full[3])


def test_keep_all_tokens_and_ratio_zero_route_are_bit_identical(seed):
    model = randomized(tiny()).eval()
    x, t, y = _inputs(model)
    base = model(x, t, y)
    idx = torch.arange(model.num_patches).expand(x.shape[0], -1)
    tokens = model(x, t, y, keep_idx=idx)
    assert tokens.shape == (3, model.num_patches, model.patch_size ** 2 * model.out_channels)
    assert torch.equal(model.unpatchify(tokens), base)
    assert torch.equal(model(x, t, y, routes=[Route(2, 4, 0.0)]), base)


def test_keep_idx_subset_equals_running_on_those_tokens(seed):
    model = randomized(tiny()).eval()
    x, t, y = _inputs(model)
    idx = ops.draw_route(3, model.num_patches, 5)
    out, hidden = model(x, t, y, keep_idx=idx, return_hidden=(model.depth,))
    h, c = model.embed(x, t, y)
    h = ops.route_gather(h, idx)
    for block in model.blocks:
        h = block(h, c)
    assert out.shape == (3, 5, model.patch_size ** 2 * model.out_channels)
    assert torch.equal(hidden[model.depth], h)


def test_tread_route(seed):
    model = randomized(tiny()).eval()
    x, t, y = _inputs(model)
    start, end, ratio = 2, 4, 0.5
    out, hidden = model(x, t, y, routes=[Route(start, end, ratio)], return_hidden=(start - 1, 3, end),
                        generator=torch.Generator().manual_seed(seed))
    assert out.shape == x.shape
    N = model.num_patches
    idx = ops.draw_route(3, N, N - round(N * ratio), generator=torch.Generator().manual_seed(seed))
    routed = torch.ones(3, N, dtype=torch.bool).scatter_(1, idx, False)
    before = hidden[start - 1]
    for d in (3, end):  # inside the span and at its end, routed tokens hold their pre-route values
        assert hidden[d].shape == before.shape
        assert torch.equal(hidden[d][routed], before[routed])
    h, c = ops.route_gather(before, idx), model.embed(x, t, y)[1]
    for block in model.blocks[start - 1:end]:
        h = block(h, c)
    assert torch.equal(ops.route_gather(hidden[end], idx), h)
    again = model(x, t, y, routes=Route(start, end, ratio), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again, out), "a bare Route and the same generator seed must give the same draw"


def test_routes_and_keep_idx_backpropagate(seed):
    model = randomized(tiny())
    x, t, y = _inputs(model)
    idx = ops.draw_route(3, model.num_patches, 10)
    out = model(x, t, y, keep_idx=idx, routes=[Route(1, 2, 0.5), Route(4, 5, 0.3)])
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_label_dropout_and_cfg(seed):
    model = randomized(tiny()).eval()
    x, t, y = _inputs(model)
    null = model(x, t, torch.full_like(y, model.num_classes))
    assert torch.equal(model(x, t, y, force_drop_ids=torch.ones_like(y)), null)
    assert torch.equal(model(x, t, None), null)
    cond = model(x, t, y)
    assert rel_err(model.forward_with_cfg(x, t, y, 1.0), cond) <= TOL[torch.float32]
    assert rel_err(model.forward_with_cfg(x, t, y, 0.0), null) <= TOL[torch.float32]
    guided = model.forward_with_cfg(x, t, y, 4.0)
    assert rel_err(guided, null + 4.0 * (cond - null)) <= 1e-4
    model.train()
    model.y_embedder.dropout_prob = 0.999999  # drops (practically) every label in training mode
    assert torch.equal(model(x, t, y), null)


def test_patchify_inverts_unpatchify(seed):
    model = build("tiny/4", input_size=16, in_channels=3)
    img = torch.randn(2, 3, 16, 16)
    tok = model.patchify(img)
    assert tok.shape == (2, 16, 48) and torch.equal(model.unpatchify(tok), img)
    with torch.no_grad():  # patchify's layout is the patch embedding's: a 1x1-patch identity check
        pe = model.x_embedder.proj
        pe.weight.zero_()
        pe.bias.zero_()
        pe.weight[0, 1, 2, 3] = 1.0
    emb = model.x_embedder(img)[..., 0]
    assert torch.equal(emb, tok[..., (2 * 4 + 3) * 3 + 1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown config"):
        build("DiT-XXL/2")
    with pytest.raises(ValueError, match="patch_size"):
        DiT(input_size=9, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        DiT(input_size=8, hidden_size=32, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="Route.end"):
        Route(3, 2)
    with pytest.raises(ValueError, match="Route.ratio"):
        Route(1, 2, 1.0)
    model = tiny()
    x, t, y = _inputs(model, 2)
    with pytest.raises(ValueError, match="non-overlapping"):
        model(x, t, y, routes=[Route(2, 4), Route(4, 5)])
    with pytest.raises(ValueError, match="last block"):
        model(x, t, y, routes=[Route(2, 7)])
    with pytest.raises(ValueError, match="stop_at"):
        model(x, t, y, stop_at=7, return_hidden=(1,))
    with pytest.raises(ValueError, match="return_hidden"):
        model(x, t, y, stop_at=2, return_hidden=(3,))
    with pytest.raises(ValueError, match="return_hidden"):
        model(x, t, y, stop_at=2)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 1, 6, 6), t, y)
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.rand(3), y)
    with pytest.raises(ValueError, match="idx"):
        model(x, t, y, keep_idx=torch.tensor([[0, 0], [1, 2]]))


def test_predrawn_routes_equal_routes_drawn_inside(seed):
    model = randomized(tiny()).eval()
    x, t, y = _inputs(model)
    routes = [Route(1, 2, 0.5), Route(4, 5, 0.3)]
    inside = model(x, t, y, routes=routes, generator=torch.Generator().manual_seed(seed))
    drawn = model.draw_routes(routes, 3, generator=torch.Generator().manual_seed(seed))
    assert [(r.start, r.end, r.ratio) for r in drawn] == [(1, 2, 0.5), (4, 5, 0.3)]
    assert [r.idx.shape for r in drawn] == [(3, 8), (3, 11)] and drawn == routes  # idx is not compared
    assert torch.equal(model(x, t, y, routes=drawn), inside)
    # With keep_idx the routes see its K tokens; Route.draw is the one-route form.
    keep = ops.draw_route(3, model.num_patches, 10)
    g = torch.Generator().manual_seed(seed + 1)
    inside = model(x, t, y, keep_idx=keep, routes=Route(2, 3, 0.5), generator=g)
    one = Route(2, 3, 0.5).draw(3, 10, generator=torch.Generator().manual_seed(seed + 1))
    assert one.idx.shape == (3, 5)
    assert torch.equal(model(x, t, y, keep_idx=keep, routes=[one]), inside)
    assert torch.equal(model.draw_routes(Route(2, 3, 0.5), 3, num_tokens=10,
                                         generator=torch.Generator().manual_seed(seed + 1))[0].idx, one.idx)


def test_forward_builds_no_module(seed, monkeypatch):
    model = randomized(tiny())
    x, t, y = _inputs(model)
    built = []
    real = nn.Module.__init__
    monkeypatch.setattr(nn.Module, "__init__", lambda self, *a, **k: built.append(type(self)) or real(self, *a, **k))
    model(x, t, y, routes=[Route(2, 4, 0.5)])
    model(x, t, y, routes=model.draw_routes([Route(2, 4, 0.5)], 3))
    assert built == []




@pytest.mark.parametrize("backend", [None, "reference"])
def test_each_user_index_is_checked_once_per_forward(seed, monkeypatch, backend):
    """One value check (a host sync) per index the caller passes in, none for drawn ones, none in the
    ops' forward or backward, although each index feeds several gathers and scatters."""
    model = randomized(tiny(backend=backend))
    x, t, y = _inputs(model)
    keep = ops.draw_route(3, model.num_patches, 12)
    routes = model.draw_routes([Route(1, 2, 0.5), Route(4, 6, 0.25)], 3, num_tokens=12)
    calls = count_index_checks(monkeypatch)
    out, hidden = model(x, t, y, keep_idx=keep, routes=routes, return_hidden=(1, 5))
    assert calls == ["keep_idx", "routes[0].idx", "routes[1].idx"]
    (out.square().mean() + hidden[5].mean()).backward()
    assert len(calls) == 3, f"checks in the backward: {calls[3:]}"
    calls.clear()
    model(x, t, y, routes=[Route(2, 5, 0.5)]).mean().backward()  # drawn inside: valid by construction
    assert calls == []
    monkeypatch.setenv("EFFKERNELS_CHECK_INDICES", "0")
    model(x, t, y, keep_idx=keep, routes=routes)
    assert calls == []


def test_bad_predrawn_routes():
    model = tiny()
    x, t, y = _inputs(model, 2)
    N = model.num_patches
    with pytest.raises(TypeError, match="Route.idx"):
        Route(1, 2, 0.5, idx=torch.zeros(2, 8))
    with pytest.raises(TypeError, match="Route.idx"):
        Route(1, 2, 0.5, idx=[[0, 1]])
    with pytest.raises(ValueError, match=r"routes\[0\]\.idx must have shape .*\(2, 8\)"):
        model(x, t, y, routes=[Route(1, 2, 0.5, idx=ops.draw_route(2, N, 7))])
    with pytest.raises(ValueError, match=r"routes\[0\]\.idx must have shape"):
        model(x, t, y, routes=[Route(1, 2, 0.5, idx=ops.draw_route(3, N, 8))])
    dup = ops.draw_route(2, N, 8)
    dup[1, 1] = dup[1, 0]
    with pytest.raises(ValueError, match=r"routes\[1\]\.idx has a duplicate"):
        model(x, t, y, routes=[Route(1, 2, 0.5), Route(3, 4, 0.5, idx=dup)])
    with pytest.raises(ValueError, match=r"routes\[0\]\.idx values must lie in \[0, 16\)"):
        model(x, t, y, routes=[Route(1, 2, 0.5, idx=dup + N)])
    with pytest.raises(ValueError, match="keep_idx values"):
        model(x, t, y, keep_idx=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="non-overlapping"):
        model.draw_routes([Route(2, 4), Route(4, 5)], 2)
