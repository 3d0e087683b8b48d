"""The modern backbone options (RMSNorm, SwiGLU, 2-D RoPE, QK-norm) and the LightningDiT configs:
a LightningDiT release checkpoint (its model written here from the release's formulas, random
weights) loads strictly and gives the release's forward; with RoPE, MaskDiT's kept tokens and
TREAD's routed tokens (fixed counts and packed per-sample budgets) carry their own positions, so a
routed or masked forward equals the blocks run on those tokens alone; every method trains on
LightningDiT-tiny/2 with its loss falling."""
import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F
from effkernels.models.backbone.configs import CONFIGS, LIGHTNING_SIZES, build
from effkernels.models.backbone.network import DiT, Route
from effkernels.models.backbone.positions import get_2d_sincos_pos_embed
from effkernels.models.cli import train as train_mod
from effkernels.models.interop.official import infer_config, load_official
from effkernels.models.interop.patch import apply_effkernels, revert_effkernels
from effkernels.models.methods.maskdit import MaskDiT
from effkernels.models.train.runlog import MetricsLog
from helpers import TOL, rel_err
from torch import nn

from effkernels import ops
from effkernels.nn import DiTBlock, ModulatedRMSNorm, SwiGLUMlp, VisibleAttention
from effkernels.nn.routing import TokenPack

#################################################################################
#         LightningDiT as released (hustvl/LightningDiT), written from its        #
#         formulas for comparison: RMSNorm, SwiGLUFFN, EVA's 2-D RoPE tables      #
#################################################################################


class _RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class _Rope(nn.Module):
    """EVA's VisionRotaryEmbeddingFast(dim=Dh // 2, pt_seq_len=grid): tables (N, Dh), pairs interleaved,
    the first half of the head dim turned by the row, the second by the column."""

    def __init__(self, head_dim, grid, theta=10000.0):
        super().__init__()
        dim = head_dim // 2
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        t = torch.arange(grid) / grid * grid
        f = (t[:, None] * freqs[None]).repeat_interleave(2, -1)  # (grid, dim)
        f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], -1)
        f = f.reshape(grid * grid, -1)
        self.register_buffer("freqs_cos", f.cos())
        self.register_buffer("freqs_sin", f.sin())

    def forward(self, x):
        pairs = x.unflatten(-1, (-1, 2))
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
        return x * self.freqs_cos + rot * self.freqs_sin


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Attention(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.heads, self.qk_norm = heads, qk_norm
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        if qk_norm:
            self.q_norm, self.k_norm = _RMSNorm(dim // heads), _RMSNorm(dim // heads)

    def forward(self, x, rope=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class _SwiGLUFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class _Block(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.norm1, self.norm2 = _RMSNorm(dim), _RMSNorm(dim)
        self.attn = _Attention(dim, heads, qk_norm)
        self.mlp = _SwiGLUFFN(dim, int(2 / 3 * int(dim * 4.0)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, feat_rope=None):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), s1, sc1), rope=feat_rope)
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), s2, sc2))


class _Final(nn.Module):
    def __init__(self, dim, p, out_channels):
        super().__init__()
        self.norm_final = _RMSNorm(dim)
        self.linear = nn.Linear(dim, p * p * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class ReleaseLightningDiT(nn.Module):
    """LightningDiT(use_rmsnorm, use_swiglu, use_rope[, use_qknorm]) with its parameter and buffer names."""

    def __init__(self, input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=3, num_heads=4,
                 num_classes=7, qk_norm=False):
        super().__init__()
        self.p, self.c = patch_size, in_channels
        grid = input_size // patch_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(hidden_size, grid)[None].clone(), requires_grad=False)
        self.feat_rope = _Rope(hidden_size // num_heads, grid)
        self.blocks = nn.ModuleList([_Block(hidden_size, num_heads, qk_norm) for _ in range(depth)])
        self.final_layer = _Final(hidden_size, patch_size, in_channels)

    def forward(self, x, t, y):
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            tokens = block(tokens, c, self.feat_rope)
        out = self.final_layer(tokens, c)
        B, h = x.shape[0], x.shape[-1] // self.p
        out = out.reshape(B, h, h, self.p, self.p, self.c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, self.c, h * self.p, h * self.p)


def _release(**kw):
    model = ReleaseLightningDiT(**kw).eval()
    with torch.no_grad():  # every weight random, RMSNorm weights included: no block is the identity
        for p in model.parameters():
            if p is not model.pos_embed:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("qk_norm", (False, True), ids=("no_qk_norm", "rmsnorm_qk_norm"))
def test_lightningdit_checkpoint_loads_and_matches_the_release_forward(seed, qk_norm):
    """Every key of the release (pos_embed Parameter, feat_rope tables, RMSNorm weights, w12/w3)
    is read; our forward at time t equals the release's -v at 1 - t (SiT's transport) to 1e-5."""
    release = _release(qk_norm=qk_norm)
    sd = {"ema": release.state_dict(), "opt": {}}  # train.py's checkpoint layout
    assert "feat_rope.freqs_cos" in sd["ema"]
    model = load_official(sd, num_heads=4).eval()
    assert (model.norm_kind, model.mlp_kind, model.pos_kind) == ("rmsnorm", "swiglu", "sincos+rope2d")
    assert model.qk_norm == ("rmsnorm" if qk_norm else False)
    assert model.interop.flavor == "lightningdit" and model.interop.layout.startswith("LightningDiT")
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.randint(0, 7, (3,))
    with torch.no_grad():
        want = -release(x, 1 - t, y)
        got = model(x, t, y)
    assert rel_err(got, want) <= TOL[torch.float32]

    # By name: the config fixes the architecture, the checkpoint the data sizes.
    named = load_official(sd, "LightningDiT-tiny/2", depth=3).eval()
    with torch.no_grad():
        assert rel_err(named(x, t, y), want) <= TOL[torch.float32]


def test_lightningdit_infer_config_and_bad_rope_tables():
    sd = ReleaseLightningDiT().state_dict()
    cfg = infer_config(sd)
    assert cfg["mlp_ratio"] == 4.0 and (cfg["norm"], cfg["mlp"], cfg["pos"]) == ("rmsnorm", "swiglu", "sincos+rope2d")
    bad = dict(sd, **{"feat_rope.freqs_cos": sd["feat_rope.freqs_cos"] * 0.5})
    with pytest.raises(ValueError, match="feat_rope.freqs_cos .* is not the 2-D axial RoPE table"):
        load_official(bad, num_heads=4)
    with pytest.raises(ValueError, match="not both"):
        load_official({k: v for k, v in sd.items() if k != "feat_rope.freqs_sin"}, num_heads=4)


@pytest.mark.parametrize("qk_norm", (False, True), ids=("no_qk_norm", "rmsnorm_qk_norm"))
def test_apply_effkernels_patches_a_lightningdit_model_keeping_outputs_and_gradients(seed, qk_norm):
    """The release's own model, patched in place: fused RMSNorm + modulate / gated-residual pair in
    every block and the final layer, ops.swiglu in every SwiGLUFFN; same outputs and gradients."""
    release = _release(qk_norm=qk_norm).train()
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.randint(0, 7, (3,))
    params = list(release.parameters())

    def run():
        out = release(x, t, y)
        grads = torch.autograd.grad(out.square().mean(), [p for p in params if p.requires_grad])
        return out.detach(), grads

    want, want_g = run()
    keys = set(release.state_dict())
    apply_effkernels(release)
    patched = [m for m in release.modules() if "forward" in m.__dict__]
    assert len(patched) == 3 + 3 + 1  # 3 blocks, their 3 SwiGLUFFNs, the final layer
    assert set(release.state_dict()) == keys
    got, got_g = run()
    assert rel_err(got, want) <= TOL[torch.float32]
    for a, b in zip(got_g, want_g):
        assert rel_err(a, b) <= 1e-4  # gradients: sums over tokens in another order (TOL_REDUCE)
    revert_effkernels(release)
    assert not any("forward" in m.__dict__ for m in release.modules())
    assert torch.equal(release(x, t, y).detach(), want)


@pytest.mark.parametrize("name", sorted(n for n in CONFIGS if n.startswith("LightningDiT-") and "tiny" not in n))
def test_lightningdit_configs_have_the_published_sizes(name):
    size, p = name[len("LightningDiT-"):].split("/")
    with torch.device("meta"):
        model = build(name)
    assert (model.depth, model.hidden_size, model.num_heads) == LIGHTNING_SIZES[size]
    assert model.patch_size == int(p) and not model.learn_sigma
    blk = model.blocks[0]
    assert blk.mlp.w12.out_features == 2 * int(2 / 3 * 4 * model.hidden_size)
    assert isinstance(blk.norm1, ModulatedRMSNorm) and blk.attn.rope and model.pos_embed is not None


#################################################################################
#                    Blocks and options on their own                             #
#################################################################################

def test_block_options_and_errors(seed):
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    blk = DiTBlock(32, 4, norm="rmsnorm", mlp="swiglu", rope=True, qk_norm="rmsnorm")
    pos = ops.grid_positions(4, 4)
    assert blk(x, c, pos=pos).shape == x.shape
    with pytest.raises(ValueError, match="give pos"):
        blk(x, c)
    with pytest.raises(ValueError, match="rope=False"):
        DiTBlock(32, 4)(x, c, pos=pos)
    with pytest.raises(ValueError, match="norm must be one of"):
        DiTBlock(32, 4, norm="batchnorm")
    with pytest.raises(ValueError, match="mlp must be one of"):
        DiTBlock(32, 4, mlp="relu")
    with pytest.raises(ValueError, match="qk_norm must be"):
        VisibleAttention(32, 4, qk_norm="l2")
    with pytest.raises(ValueError, match="even head dim"):
        VisibleAttention(30, 2, rope=True)
    with pytest.raises(ValueError, match="pos must be one of"):
        DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=4, pos="learned")
    m = SwiGLUMlp(32, 40)
    a, b = m.w12(x).chunk(2, -1)
    torch.testing.assert_close(m(x), m.w3(F.silu(a) * b))


def test_packed_attention_with_rope_equals_dense_per_sample(seed):
    """Packed rows (T, D) with their positions (T, 2) equal each sample's dense run on its tokens."""
    attn = VisibleAttention(32, 4, rope=True, qk_norm="rmsnorm").eval()
    pack = TokenPack.draw([5, 9, 2], 16, generator=torch.Generator().manual_seed(seed))
    x, grid = torch.randn(3, 16, 32), ops.grid_positions(4, 4)
    rows = pack.rows
    packed = attn(x.reshape(-1, 32)[rows], pos=grid[rows % 16], cu_seqlens=pack.cu_seqlens, max_seqlen=pack.max_seqlen)
    cu = pack.cu_seqlens.tolist()
    for b in range(3):
        idx = rows[cu[b]:cu[b + 1]] - b * 16
        dense = attn(x[b:b + 1, idx], pos=grid[idx])
        torch.testing.assert_close(packed[cu[b]:cu[b + 1]], dense[0], rtol=1e-5, atol=1e-6)


#################################################################################
#          RoPE through the token plans: positions travel with the tokens         #
#################################################################################

# LightningDiT's block (sin-cos + RoPE), and DDT-style RoPE alone with RMSNorm QK-norm
MODELS = {"lightningdit": ("LightningDiT-tiny/2", {}),
          "rope_only": ("tiny/2", {"pos": "rope2d", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": "rmsnorm"})}


def _model(kind, **kw):
    name, opts = MODELS[kind]
    model = build(name, depth=4, hidden_size=32, num_heads=4, **opts, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _inputs(model, B=3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, 1, 8, 8, generator=g), torch.rand(B, generator=g), torch.randint(0, 10, (B,), generator=g))


def _blocks(model, h, c, pos, blocks=None):
    for blk in model.blocks if blocks is None else blocks:
        h = blk(h, c, pos=pos)
    return h


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_keep_idx_with_rope_equals_the_blocks_on_those_tokens(seed, kind):
    model = _model(kind)
    x, t, y = _inputs(model)
    N, D = model.num_patches, model.depth
    idx = ops.draw_route(3, N, 7, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, hidden = model(x, t, y, keep_idx=idx, return_hidden=(D,))
        h, c = model.embed(x, t, y)
        want = _blocks(model, ops.route_gather(h, idx), c, model.token_pos[idx])
        torch.testing.assert_close(hidden[D], want, rtol=1e-5, atol=1e-6)
        # The kept tokens in another order give the same tokens in that order: each carries its position.
        perm = torch.randperm(7, generator=torch.Generator().manual_seed(seed + 1))
        _, shuffled = model(x, t, y, keep_idx=idx[:, perm], return_hidden=(D,))
        torch.testing.assert_close(shuffled[D], hidden[D][:, perm], rtol=1e-5, atol=1e-6)
        # Keeping every token is the dense forward, bit for bit.
        full = torch.arange(N).expand(3, -1)
        assert torch.equal(model.unpatchify(model(x, t, y, keep_idx=full)), model(x, t, y))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_packed_keep_with_rope_equals_each_sample_alone(seed, kind):
    model = _model(kind)
    x, t, y = _inputs(model)
    N, D = model.num_patches, model.depth
    pack = TokenPack.draw([3, 11, 6], N, generator=torch.Generator().manual_seed(seed))
    cu = pack.cu_seqlens.tolist()
    with torch.no_grad():
        _, hidden = model(x, t, y, keep_idx=pack, return_hidden=(D,))
        for b in range(3):
            idx = (pack.rows[cu[b]:cu[b + 1]] - b * N).view(1, -1)
            _, one = model(x[b:b + 1], t[b:b + 1], y[b:b + 1], keep_idx=idx, return_hidden=(D,))
            torch.testing.assert_close(hidden[D][cu[b]:cu[b + 1]], one[D][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("packed", (False, True), ids=("fixed", "per_sample"))
def test_tread_route_with_rope_equals_the_span_on_the_routed_tokens(seed, kind, packed):
    model = _model(kind)
    x, t, y = _inputs(model)
    N, start, end = model.num_patches, 2, 3
    g = torch.Generator().manual_seed(seed)
    if packed:
        idx = TokenPack.draw([4, 12, 8], N, generator=g)
        route = Route(start, end, 0.5, idx=idx)
    else:
        route = Route(start, end, 0.5).draw(3, N, generator=g)
        idx = route.idx
    with torch.no_grad():
        _, hidden = model(x, t, y, routes=[route], return_hidden=(start - 1, end))
        before, c = hidden[start - 1], model.embed(x, t, y)[1]
        span = model.blocks[start - 1:end]
        if packed:
            cu = idx.cu_seqlens.tolist()
            for b in range(3):
                k = idx.rows[cu[b]:cu[b + 1]] - b * N
                want = _blocks(model, before[b:b + 1, k], c[b:b + 1], model.token_pos[k], span)
                torch.testing.assert_close(hidden[end][b, k], want[0], rtol=1e-5, atol=1e-6)
        else:
            want = _blocks(model, ops.route_gather(before, idx), c, model.token_pos[idx], span)
            torch.testing.assert_close(ops.route_gather(hidden[end], idx), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_maskdit_decoder_takes_the_backbone_options(seed, kind):
    model = _model(kind)
    m = MaskDiT(model, argparse.Namespace(mask_ratio=0.5, mae_weight=0.1, decoder_depth=None, decoder_width=None,
                                          mask_ratio_range=None))
    blk = m.decoder.blocks[0]
    assert isinstance(blk.norm1, ModulatedRMSNorm) and isinstance(blk.mlp, SwiGLUMlp) and blk.attn.rope
    assert isinstance(m.decoder.bridge.norm, ModulatedRMSNorm)
    assert (m.decoder.pos_embed is None) == (model.pos_embed is None)


#################################################################################
#                 Every method trains on LightningDiT-tiny/2                     #
#################################################################################

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for REPA's and ERW's digits encoder, fitted once for the module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EFFKERNELS_CACHE", str(tmp_path_factory.mktemp("effkernels_cache")))
    yield
    mp.undo()


@pytest.mark.parametrize("method,extra", [
    ("sit", []), ("tread", []), ("tread", ["--route-ratio-range", "0.2:0.7"]), ("maskdit", []),
    ("maskdit", ["--mask-ratio-range", "0.2:0.7"]), ("repa", []), ("erw", []), ("sra", []), ("ct", []), ("act", []),
], ids=lambda v: v if isinstance(v, str) else "-".join(a.strip("-") for a in v[:1]) or "default")
def test_every_method_trains_on_lightningdit_tiny(cache, tmp_path, method, extra):
    out = str(tmp_path / "run")
    assert train_mod.main(["--model", "LightningDiT-tiny/2", "--method", method, *extra, "--steps", "30",
                           "--batch-size", "32", "--log-every", "15", "--eval-every", "0", "--out", out, "--quiet", "--seed", "0"]) == 0
    rows = [r for r in MetricsLog.read(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert len(rows) == 2 and rows[-1]["loss"] < rows[0]["loss"], rows  # interval means: steps 1-15 vs 16-30
