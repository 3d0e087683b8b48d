"""effkernels.nn modules: shapes, equality with plain-PyTorch formulations written here, gradients,
constructor errors, and backend="reference" against the default selection."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effkernels.nn as enn
from effkernels import ops
from effkernels.nn.routing import TokenPack
from helpers import TOL, TOL_REDUCE, rel_err


def _mod(B, N, D, per_token, *, strided=True):
    """shift, scale, gate as adaLN produces them: strided (B, D) chunks of one (B, 3D) tensor."""
    shape = (B, N, 3 * D) if per_token else (B, 3 * D)
    big = torch.randn(*shape)
    return big.chunk(3, dim=-1) if strided else tuple(t.contiguous() for t in big.chunk(3, dim=-1))


def _plain_modulate(x, shift, scale, eps=1e-6, weight=None, bias=None):
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps) * (1 + scale) + shift


def _plain_gate(x, y, gate):
    return x + (gate.unsqueeze(1) if gate.dim() == 2 else gate) * y


# ---------------------------------------------------------------------------------------------
# adaLN modules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_modulated_layernorm_matches_plain(seed, per_token, affine):
    B, N, D = 3, 7, 24
    ln = enn.ModulatedLayerNorm(D, eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ln.weight.normal_()
            ln.bias.normal_()
    x = torch.randn(B, N, D, requires_grad=True)
    shift, scale, _ = _mod(B, N, D, per_token)
    shift.requires_grad_(False)
    out = ln(x, shift, scale)
    ref = _plain_modulate(x, shift, scale, 1e-6, ln.weight, ln.bias)
    assert out.shape == (B, N, D)
    assert rel_err(out, ref) <= TOL[torch.float32]
    g = torch.randn_like(out)
    dx, = torch.autograd.grad(out, x, g)
    dx_ref, = torch.autograd.grad(ref, x, g)
    assert rel_err(dx, dx_ref) <= TOL_REDUCE[torch.float32]


def test_modulated_layernorm_accepts_non_unit_stride_x(seed):
    # A patch embedding's transpose leaves D with stride != 1; a drop-in module must take it.
    B, N, D = 2, 6, 8
    x = torch.randn(B, D, N).transpose(1, 2)
    shift, scale, _ = _mod(B, N, D, False)
    out = enn.ModulatedLayerNorm(D)(x, shift, scale)
    assert rel_err(out, _plain_modulate(x, shift, scale)) <= TOL[torch.float32]


@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual_and_fused_match_plain(seed, per_token):
    B, N, D = 2, 5, 40
    x, y = torch.randn(B, N, D), torch.randn(B, N, D)
    gate, shift, scale = _mod(B, N, D, per_token)
    out = enn.GatedResidual()(x, y, gate)
    assert rel_err(out, _plain_gate(x, y, gate)) <= TOL[torch.float32]
    h, m = enn.GatedResidualModulatedLayerNorm(D)(x, y, gate, shift, scale)
    h_ref = _plain_gate(x, y, gate)
    assert rel_err(h, h_ref) <= TOL[torch.float32]
    assert rel_err(m, _plain_modulate(h_ref, shift, scale)) <= TOL[torch.float32]


def test_adaln_module_errors():
    with pytest.raises(ValueError, match="dim"):
        enn.ModulatedLayerNorm(0)
    with pytest.raises(ValueError, match="eps"):
        enn.ModulatedLayerNorm(8, eps=-1.0)
    with pytest.raises(TypeError, match="elementwise_affine"):
        enn.ModulatedLayerNorm(8, elementwise_affine=1)
    with pytest.raises(ValueError, match="backend"):
        enn.GatedResidual(backend="fastest")
    with pytest.raises(ValueError, match="dim"):
        enn.ModulatedLayerNorm(8)(torch.randn(1, 2, 4), torch.zeros(1, 4), torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------------
# Token routing
# ---------------------------------------------------------------------------------------------

def test_router_ratio_zero_is_identity_without_copy(seed):
    x = torch.randn(2, 9, 4)
    r = enn.TokenRouter(0.0)
    x_sub, idx = r(x)
    assert x_sub is x and idx is None
    assert r.restore(x, x_sub, idx) is x_sub


@pytest.mark.parametrize("N,ratio", [(9, 0.5), (16, 0.25), (7, 0.75)])
def test_router_gather_and_restore(seed, N, ratio):
    B, D = 3, 5
    x = torch.randn(B, N, D)
    saved = x.clone()
    r = enn.TokenRouter(ratio, generator=torch.Generator().manual_seed(seed))
    x_sub, idx = r(x)
    K = N - round(N * ratio)
    assert r.keep_count(N) == K and x_sub.shape == (B, K, D) and idx.shape == (B, K)
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "kept tokens must be sorted and distinct"
    for b in range(B):
        assert torch.equal(x_sub[b], x[b, idx[b]])
    new = torch.randn_like(x_sub)
    out = r.restore(x, new, idx)
    assert torch.equal(x, saved), "restore must not write into the saved full sequence"
    routed = torch.ones(B, N, dtype=torch.bool)
    routed.scatter_(1, idx, False)
    assert torch.equal(out[routed], x[routed])
    for b in range(B):
        assert torch.equal(out[b, idx[b]], new[b])


def test_router_generator_reproducible(seed):
    draw = [enn.TokenRouter(0.5, torch.Generator().manual_seed(seed)).draw(4, 20) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])


def test_router_errors():
    for bad in (-0.1, 1.0, "half", True):
        with pytest.raises(ValueError, match="ratio"):
            enn.TokenRouter(bad)
    with pytest.raises(TypeError, match="generator"):
        enn.TokenRouter(0.5, generator=3)
    with pytest.raises(ValueError, match="keep at least one"):
        enn.TokenRouter(0.99).draw(1, 10)
    with pytest.raises(ValueError, match="x must be"):
        enn.TokenRouter(0.5)(torch.randn(4, 4))


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def _plain_attention(attn, x):
    B, N, D = x.shape
    H = attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(D, dim=-1)
    q, k, v = (t.reshape(B, N, H, D // H).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ v
    return a.transpose(1, 2).reshape(B, N, D) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("backend", [None, "reference"])
def test_visible_attention_dense(seed, backend):
    attn = enn.VisibleAttention(48, 3, backend=backend)
    x = torch.randn(2, 11, 48)
    out = attn(x)
    assert out.shape == x.shape
    assert rel_err(out, _plain_attention(attn, x)) <= TOL_REDUCE[torch.float32]


def test_visible_attention_packed_equals_per_sample(seed):
    attn = enn.VisibleAttention(32, 4)
    lengths = [3, 7, 1]
    xs = [torch.randn(1, n, 32) for n in lengths]
    packed = torch.cat([x[0] for x in xs])
    cu = torch.tensor([0, 3, 10, 11], dtype=torch.int32)
    out = attn(packed, cu_seqlens=cu, max_seqlen=7)
    ref = torch.cat([_plain_attention(attn, x)[0] for x in xs])
    assert out.shape == packed.shape
    assert rel_err(out, ref) <= TOL_REDUCE[torch.float32]


def test_visible_attention_keep_idx_attends_over_kept_tokens_only(seed):
    attn = enn.VisibleAttention(24, 2)
    x = torch.randn(3, 9, 24, requires_grad=True)
    idx = ops.draw_route(3, 9, 4)
    out = attn(x, keep_idx=idx)
    kept = torch.stack([x[b, idx[b]] for b in range(3)])  # (B, K, D) by plain indexing
    assert out.shape == (3, 4, 24)
    assert rel_err(out, _plain_attention(attn, kept)) <= TOL_REDUCE[torch.float32]
    out.sum().backward()
    dropped = torch.ones(3, 9, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.all(x.grad[dropped] == 0) and x.grad[~dropped].abs().sum() > 0


def test_visible_attention_errors():
    with pytest.raises(ValueError, match="num_heads"):
        enn.VisibleAttention(30, 4)
    with pytest.raises(ValueError, match="num_heads"):
        enn.VisibleAttention(32, 0)
    a = enn.VisibleAttention(16, 2)
    with pytest.raises(ValueError, match="last dim 16"):
        a(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="packed"):
        a(torch.randn(2, 3, 16), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(ValueError, match="not both"):
        a(torch.randn(3, 16), keep_idx=torch.tensor([[0]]), cu_seqlens=torch.tensor([0, 3]), max_seqlen=3)
    with pytest.raises(ValueError, match="idx values"):
        a(torch.randn(1, 3, 16), keep_idx=torch.tensor([[0, 5]]))


# ---------------------------------------------------------------------------------------------
# Alignment head
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["cosine", "smooth_l1", "mse"])
def test_alignment_head(seed, loss):
    head = enn.AlignmentHead(16, 10, hidden=32, loss=loss)
    h = torch.randn(2, 5, 16, requires_grad=True)
    z = torch.randn(2, 5, 10, requires_grad=True)
    p = head.project(h)
    lin = [m for m in head.proj if isinstance(m, nn.Linear)]
    p_ref = F.silu(h @ lin[0].weight.T + lin[0].bias)
    p_ref = F.silu(p_ref @ lin[1].weight.T + lin[1].bias) @ lin[2].weight.T + lin[2].bias
    assert p.shape == (2, 5, 10) and rel_err(p, p_ref) <= TOL[torch.float32]
    val = head(h, z)
    if loss == "cosine":
        ref = -F.cosine_similarity(p_ref, z, dim=-1).mean()
    elif loss == "smooth_l1":
        d = (p_ref - z).abs()
        ref = torch.where(d < 0.05, 0.5 * d ** 2 / 0.05, d - 0.025).mean()  # over all elements
    else:
        ref = (p_ref - z).pow(2).mean()
    assert val.dim() == 0 and val.dtype == torch.float32
    assert rel_err(val, ref) <= TOL_REDUCE[torch.float32]
    val.backward()
    assert h.grad is not None and z.grad is None, "the target must get no gradient"


def test_alignment_head_errors():
    with pytest.raises(ValueError, match="loss"):
        enn.AlignmentHead(8, 8, loss="l2")
    with pytest.raises(ValueError, match="z_dim"):
        enn.AlignmentHead(8, 0)
    with pytest.raises(ValueError, match="last dim 8"):
        enn.AlignmentHead(8, 4, hidden=8).project(torch.randn(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# DiT block against an official-style block written here
# ---------------------------------------------------------------------------------------------

class PlainBlock(nn.Module):
    """The official adaLN-Zero block in plain PyTorch, with the official parameter names."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def _attn(self, x):
        B, N, D = x.shape
        q, k, v = self.attn.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self._attn(self.norm1(x) * (1 + sc1) + s1)
        h = self.norm2(x) * (1 + sc2) + s2
        return x + g2 * self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))


def _pair(D=48, H=4, backend=None):
    plain = PlainBlock(D, H)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.2)
    block = enn.DiTBlock(D, H, backend=backend)
    block.load_state_dict(plain.state_dict(), strict=True)  # same parameter names, nothing left over
    return plain, block


def test_dit_block_matches_official_style(seed):
    plain, block = _pair()
    x = torch.randn(3, 10, 48, requires_grad=True)
    c = torch.randn(3, 48)
    out, ref = block(x, c), plain(x, c)
    assert out.shape == x.shape
    assert rel_err(out, ref) <= TOL[torch.float32]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + list(block.parameters()), g)
    want = torch.autograd.grad(ref, [x] + list(plain.parameters()), g)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= TOL_REDUCE[torch.float32]


def test_dit_block_reference_backend_agrees_with_default(seed):
    _, block = _pair()
    ref_block = enn.DiTBlock(48, 4, backend="reference")
    ref_block.load_state_dict(block.state_dict())
    x, c = torch.randn(2, 9, 48), torch.randn(2, 48)
    assert rel_err(block(x, c), ref_block(x, c)) <= TOL_REDUCE[torch.float32]


def test_dit_block_packed_equals_per_sample(seed):
    _, block = _pair(32, 2)
    lengths = [4, 6]
    xs = [torch.randn(1, n, 32) for n in lengths]
    cs = [torch.randn(1, 32) for _ in lengths]
    packed = torch.cat([x[0] for x in xs])
    pack = TokenPack.from_indices([torch.arange(n) for n in lengths], max(lengths))
    out = block(packed, torch.cat(cs), pack)
    ref = torch.cat([block(x, c)[0] for x, c in zip(xs, cs)])
    assert rel_err(out, ref) <= TOL_REDUCE[torch.float32]


def test_dit_block_autocast_keeps_residual_dtype(seed):
    _, block = _pair(32, 2)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, c)
    assert out.dtype == torch.float32
    assert rel_err(out, block(x, c)) <= 5e-2  # bf16 matmuls inside, fp32 residual stream


def test_dit_block_errors():
    with pytest.raises(ValueError, match="num_heads"):
        enn.DiTBlock(30, 4)
    with pytest.raises(ValueError, match="mlp_ratio"):
        enn.DiTBlock(32, 4, mlp_ratio=0)
    with pytest.raises(ValueError, match="backend"):
        enn.DiTBlock(32, 4, backend="gpu")


def test_dit_block_and_router_through_triton(seed):
    # Triton on CPU tensors runs in its interpreter (conftest sets TRITON_INTERPRET=1): tiny shapes.
    _, block = _pair(32, 2, backend="triton")
    ref_block = enn.DiTBlock(32, 2, backend="reference")
    ref_block.load_state_dict(block.state_dict())
    x = torch.randn(2, 5, 32, requires_grad=True)
    c = torch.randn(2, 32)
    router = enn.TokenRouter(0.4, torch.Generator().manual_seed(seed), backend="triton")
    x_sub, idx = router(x)
    out = router.restore(x, block(x_sub, c), idx)
    ref = ref_block(x[torch.arange(2)[:, None], idx], c)
    ref = x.detach().clone().index_put((torch.arange(2)[:, None], idx), ref.detach())
    assert x_sub.shape == (2, 3, 32)
    assert rel_err(out, ref) <= TOL_REDUCE[torch.float32]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + list(block.parameters()), g)
    r_sub = x.detach()[torch.arange(2)[:, None], idx].requires_grad_(True)
    r_out = ref_block(r_sub, c)
    want = torch.autograd.grad(r_out, [r_sub] + list(ref_block.parameters()), g[torch.arange(2)[:, None], idx])
    routed = torch.ones(2, 5, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.equal(got[0][routed], g[routed]), "routed tokens pass their gradient straight through"
    assert rel_err(got[0][torch.arange(2)[:, None], idx], want[0]) <= TOL_REDUCE[torch.float32]
    for a, b in zip(got[1:], want[1:]):
        assert rel_err(a, b) <= TOL_REDUCE[torch.float32]
