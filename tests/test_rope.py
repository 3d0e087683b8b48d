"""2-D axial RoPE on q and k: the reference vs LightningDiT's formulation and a plain float64 loop,
gradcheck; the kernel backends vs the reference (dense and packed, shared and per-sample positions,
strided views of one qkv projection, odd head dims, forward and both gradients); routed tokens with
their own positions equal the dense result on those tokens; NaN-poisoned outputs; forward-mode AD;
every validation error; opcheck and torch.compile graph capture."""
import math

import pytest
import torch
from helpers import assert_close, poison, rel_err

import effkernels
from effkernels import ops
from effkernels._triton import rope as tk
from effkernels.reference import rope as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU = torch.device("cpu")
# (B, H, N, Dh): Dh 72 (LightningDiT-B's 768 / 12 heads... and XL's 1152 / 16), 6 (odd pair count),
# 2 (one row pair, no column pair), 16.
SHAPES = ((2, 3, 7, 72), (1, 2, 5, 6), (2, 1, 3, 2), (3, 2, 4, 16))


_EXT = effkernels.backends.available("cpp", CPU)[0]
if _EXT:
    from effkernels._ext import rope as xrope


def _backends():
    return ["triton", "cpp"] if _EXT else ["triton"]


def _sid(s):
    return "x".join(map(str, s))


# ---------------------------------------------------------------------------------------------
# The reference: LightningDiT's embedding, a float64 loop, gradcheck
# ---------------------------------------------------------------------------------------------

def _lightningdit_rope(x, grid, theta=10000.0):
    """LightningDiT's VisionRotaryEmbeddingFast(dim=Dh // 2, pt_seq_len=grid) applied to x
    (B, H, grid * grid, Dh), written here from its published formulas (Dh % 4 == 0)."""
    dim = x.shape[-1] // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * grid
    f = (t[:, None] * freqs[None]).repeat_interleave(2, -1)                       # (grid, dim)
    f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], -1)
    f = f.reshape(grid * grid, -1)
    pairs = x.unflatten(-1, (-1, 2))
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)           # rotate_half
    return x * f.cos() + rot * f.sin()


@pytest.mark.parametrize("head_dim", (72, 16, 64))
def test_reference_is_lightningdit_rope(seed, head_dim):
    grid = 5
    q, k = torch.randn(2, 3, grid * grid, head_dim), torch.randn(2, 3, grid * grid, head_dim)
    qr, kr = ref.rope2d(q, k, ops.grid_positions(grid, grid))
    assert_close(qr, _lightningdit_rope(q, grid), torch.float32, name="q")
    assert_close(kr, _lightningdit_rope(k, grid), torch.float32, name="k")


def _loop(x, pos, theta):
    """Python floats, one element pair at a time: x (B, H, N, Dh) float64, pos (B, N, 2)."""
    B, H, N, Dh = x.shape
    P = Dh // 2
    pr = (P + 1) // 2
    out = x.double().clone()
    for b in range(B):
        for n in range(N):
            for kk in range(P):
                axis, j, pa = (0, kk, pr) if kk < pr else (1, kk - pr, P - pr)
                ang = float(pos[b, n, axis]) * theta ** (-2 * j / (2 * pa))
                c, s = math.cos(ang), math.sin(ang)
                for h in range(H):
                    x0, x1 = float(x[b, h, n, 2 * kk]), float(x[b, h, n, 2 * kk + 1])
                    out[b, h, n, 2 * kk] = x0 * c - x1 * s
                    out[b, h, n, 2 * kk + 1] = x1 * c + x0 * s
    return out


@pytest.mark.parametrize("head_dim", (6, 8, 2))
def test_reference_vs_float64_loop_and_gradcheck(seed, head_dim):
    B, H, N = 2, 2, 5
    q, k = (torch.randn(B, H, N, head_dim, dtype=torch.float64) for _ in range(2))
    pos = torch.randint(0, 30, (B, N, 2))
    theta = 100.0
    qr, kr = ref.rope2d(q, k, pos, theta)
    assert_close(qr, _loop(q, pos, theta), torch.float64, name="q")
    assert_close(kr, _loop(k, pos, theta), torch.float64, name="k")
    q32 = ref.rope2d(q.float(), k.float(), pos, theta)[0]
    assert_close(q32, _loop(q, pos, theta), torch.float32, name="q float32")
    qg, kg = (t[:1, :, :3].clone().requires_grad_() for t in (q, k))
    assert torch.autograd.gradcheck(lambda a, b: ref.rope2d(a, b, pos[:1, :3], theta), (qg, kg))
    # Packed (T, H, Dh) with (T, 2) positions is the dense form of one sample.
    qp = q[0].transpose(0, 1)
    assert_close(ref.rope2d(qp, qp, pos[0], theta)[0], qr[0].transpose(0, 1), torch.float64, name="packed")


# ---------------------------------------------------------------------------------------------
# Kernels vs the reference
# ---------------------------------------------------------------------------------------------

def _qkv(B, H, N, Dh, dtype, packed):
    """q, k as the (strided) views of one qkv projection, as the attention module makes them."""
    if packed:
        return torch.randn(B * N, 3, H, Dh).to(dtype)        # q, k = qkv[:, 0], qkv[:, 1]
    return torch.randn(B, N, 3, H, Dh).to(dtype)             # permuted to (3, B, H, N, Dh)


def _split(qkv, packed):
    if packed:
        return qkv[:, 0], qkv[:, 1]
    t = qkv.permute(2, 0, 3, 1, 4)
    return t[0], t[1]


def _run(fn, qkv, pos, packed, gq, gk):
    qkv = qkv.detach().clone().requires_grad_()
    q, k = _split(qkv, packed)
    q.retain_grad()
    k.retain_grad()
    qo, ko = fn(q, k, pos)
    ((qo.float() * gq).sum() + (ko.float() * gk).sum()).backward()
    return qo.detach(), ko.detach(), q.grad, k.grad


def _cases():
    cases = []
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            forms = [("dense", "per_sample"), ("packed", "per_token")] + ([("dense", "shared")] if i == j % 3 else [])
            for form, pform in forms:
                cases.append(pytest.param(form, pform, dtype, shape, id=f"{form}-{pform}-{str(dtype)[6:]}-{_sid(shape)}"))
    return cases


@pytest.mark.parametrize("form,pform,dtype,shape", _cases())
@pytest.mark.parametrize("backend", _backends())
def test_rope2d_matches_reference(seed, backend, form, pform, dtype, shape):
    B, H, N, Dh = shape
    packed = form == "packed"
    qkv = _qkv(B, H, N, Dh, dtype, packed)
    if packed:
        pos = torch.randint(0, 40, (B * N, 2))
    elif pform == "shared":
        pos = ops.grid_positions(1, N)
    else:
        pos = torch.randint(0, 40, (B, N, 2), dtype=torch.int32)
    oshape = (B * N, H, Dh) if packed else (B, H, N, Dh)
    gq, gk = torch.randn(oshape), torch.randn(oshape)
    got = _run(lambda q, k, p: ops.rope2d(q, k, p, backend=backend), qkv, pos, packed, gq, gk)
    want = _run(ref.rope2d, qkv, pos, packed, gq, gk)
    same = None
    if dtype != torch.float32:
        def same_dtype(q, k, p):  # the rotation done by PyTorch in q's own dtype
            cos, sin = ref._trig(q, p, 10000.0)
            cos, sin = cos.to(dtype), sin.to(dtype)
            rot = [torch.stack([t[..., 0::2] * cos - t[..., 1::2] * sin, t[..., 1::2] * cos + t[..., 0::2] * sin],
                               -1).flatten(-2) for t in (q, k)]
            return tuple(rot)
        same = _run(same_dtype, qkv, pos, packed, gq, gk)
    for i, name in enumerate(("q", "k", "dq", "dk")):
        assert got[i].dtype == dtype and got[i].shape == want[i].shape, name
        assert_close(got[i], want[i], dtype, name=name, same_dtype_ref=None if same is None else same[i])
    assert got[0].is_contiguous() and got[1].is_contiguous()


@pytest.mark.parametrize("backend", _backends())
def test_routed_tokens_carry_their_positions(seed, backend):
    """rope of the tokens kept by an index, with pos gathered by the same index, equals the dense
    rope restricted to those tokens (what TREAD / MaskDiT rely on)."""
    B, H, grid, Dh = 2, 2, 4, 8
    N = grid * grid
    q, k = torch.randn(B, H, N, Dh), torch.randn(B, H, N, Dh)
    pos = ops.grid_positions(grid, grid)
    dq, dk = ops.rope2d(q, k, pos, backend=backend)
    keep = torch.stack([torch.randperm(N)[:7] for _ in range(B)])              # (B, K)
    take = keep[:, None, :, None].expand(B, H, 7, Dh)
    sq, sk = ops.rope2d(q.gather(2, take), k.gather(2, take), pos[keep], backend=backend)
    assert torch.equal(sq, dq.gather(2, take)) and torch.equal(sk, dk.gather(2, take))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_primitives_write_every_output(seed, dtype):
    B, H, N, Dh = 2, 3, 5, 12
    q, k = torch.randn(B, H, N, Dh, dtype=dtype), torch.randn(B, H, N, Dh, dtype=dtype)
    pos = torch.randint(0, 9, (B, N, 2))
    inv = ref.rope2d_inv_freq(Dh)
    big = poison((B, H + 1, N, Dh + 4), dtype)
    qo = big[:, 1:, :, 2:Dh + 2]
    ko = poison((B, H, N, Dh), dtype)
    tk.rope2d_fwd(q, k, pos, inv, qo, ko)
    qr, kr = ref.rope2d(q, k, pos)
    assert_close(qo, qr, dtype, name="q_out")
    assert_close(ko, kr, dtype, name="k_out")
    assert big[:, 0].isnan().all() and big[..., :2].isnan().all() and big[..., Dh + 2:].isnan().all()
    dq, dk = tk.rope2d_bwd(qr, kr, pos, inv, poison(q.shape, dtype), poison(q.shape, dtype))
    assert_close(dq, q, dtype, name="dq (the inverse rotation)")
    assert_close(dk, k, dtype, name="dk")
    e = torch.randn(2, 3, 0, 4, dtype=dtype)
    assert tk.rope2d_fwd(e, e, torch.zeros(2, 0, 2, dtype=torch.long), ref.rope2d_inv_freq(4))[0].shape == e.shape


@pytest.mark.parametrize("backend", ["reference"] + _backends())
def test_forward_ad(seed, backend):
    q, k = torch.randn(2, 2, 5, 6), torch.randn(2, 2, 5, 6)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    pos = torch.randint(0, 9, (2, 5, 2))
    out, tan = torch.func.jvp(lambda a, b: ops.rope2d(a, b, pos, backend=backend), (q, k), (dq, dk))
    r_out, r_tan = torch.func.jvp(lambda a, b: ref.rope2d(a, b, pos), (q, k), (dq, dk))
    for o, r in zip(out + tan, r_out + r_tan):
        assert rel_err(o, r) <= 1e-5
    jac = torch.func.jacfwd(lambda a: ops.rope2d(a, k[:1, :1], pos[:1], backend=backend)[0])(q[:1, :1])
    want = torch.func.jacfwd(lambda a: ref.rope2d(a, k[:1, :1], pos[:1])[0])(q[:1, :1])
    assert_close(jac, want, torch.float32, name="jacfwd")


def _valid():
    return torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6), torch.randint(0, 5, (2, 4, 2))


_BAD = [
    ("q", lambda q, k, p: (q[0, 0], k[0, 0], p), ValueError),                     # 2-D
    ("q", lambda q, k, p: (q.tolist(), k, p), TypeError),
    ("q", lambda q, k, p: (q.int(), k, p), TypeError),
    ("q", lambda q, k, p: (q.transpose(2, 3), k.transpose(2, 3), torch.zeros(2, 6, 2, dtype=torch.long)), ValueError),
    ("q", lambda q, k, p: (q[..., :5], k[..., :5], p), ValueError),              # odd head dim
    ("k", lambda q, k, p: (q, k[:, :2], p), ValueError),
    ("k", lambda q, k, p: (q, k.half(), p), TypeError),
    ("k", lambda q, k, p: (q, k.to("meta"), p), ValueError),
    ("k", lambda q, k, p: (q, torch.randn(2, 3, 4, 12)[..., ::2], p), ValueError),
    ("pos", lambda q, k, p: (q, k, p.float()), TypeError),
    ("pos", lambda q, k, p: (q, k, p[:, :3]), ValueError),
    ("pos", lambda q, k, p: (q, k, p[..., :1]), ValueError),
    ("pos", lambda q, k, p: (q, k, p.to("meta")), ValueError),
    ("pos", lambda q, k, p: (q[0].transpose(0, 1), k[0].transpose(0, 1), p), ValueError),  # packed wants (T, 2)
]


@pytest.mark.parametrize("arg,bad,exc", _BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(_BAD)])
def test_validation_errors(arg, bad, exc):
    q, k, p = bad(*_valid())
    for backend in ("reference", "triton"):
        with pytest.raises(exc, match=arg):
            ops.rope2d(q, k, p, backend=backend)


@pytest.mark.parametrize("theta", (0.0, -1.0, float("inf"), float("nan"), True, "1e4", None))
def test_validation_theta(theta):
    with pytest.raises(ValueError, match="theta"):
        ops.rope2d(*_valid(), theta, backend="triton")


def test_primitive_errors_and_grid_positions():
    q, k, p = _valid()
    inv = ref.rope2d_inv_freq(6)
    with pytest.raises(TypeError, match="q"):
        ops.rope2d(q.double(), k.double(), p, backend="triton")
    with pytest.raises(ValueError, match="512"):
        tk.rope2d_fwd(torch.randn(1, 1, 1, 514), torch.randn(1, 1, 1, 514), torch.zeros(1, 1, 2, dtype=torch.long),
                      ref.rope2d_inv_freq(514))
    with pytest.raises(ValueError, match="inv_freq"):
        tk.rope2d_fwd(q, k, p, inv.double())
    with pytest.raises(ValueError, match="q_out"):
        tk.rope2d_fwd(q, k, p, inv, q_out=torch.empty(2, 3, 4, 5))
    assert ops.grid_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    with pytest.raises(ValueError, match="grid_w"):
        ops.grid_positions(2, 0)


def test_opcheck(seed):
    q, k, p = _valid()
    q.requires_grad_()
    k.requires_grad_()
    lib = torch.ops.effkernels
    torch.library.opcheck(lib.rope2d.default, (q, k, p, 10000.0, "triton"))
    qp = torch.randn(8, 2, 6).requires_grad_()
    torch.library.opcheck(lib.rope2d.default, (qp, qp.detach().clone(), torch.randint(0, 5, (8, 2)), 100.0,
                                               "triton"))
    torch.library.opcheck(lib.rope2d_backward.default, (torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6), p, 10000.0,
                                                        "triton"))


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_compile_fullgraph_keeps_ops(seed):
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    B, N, H, Dh = 2, 6, 2, 8
    qkv_w = torch.randn(3 * H * Dh, 16, requires_grad=True)
    x = torch.randn(B, N, 16)
    pos = ops.grid_positions(2, 3)

    def attn(x, w):
        q, k, v = (x @ w.t()).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = ops.rope2d(q, k, pos, backend="triton")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).square().sum()

    rec = AotEagerAndRecordGraphs()
    compiled = torch.compile(attn, fullgraph=True, backend=rec)
    res = []
    for fn in (compiled, attn):
        w = qkv_w.detach().clone().requires_grad_()
        loss = fn(x, w)
        loss.backward()
        res.append((loss.detach(), w.grad))
    assert_close(res[0][0], res[1][0], torch.float32, name="loss")
    assert_close(res[0][1], res[1][1], torch.float32, name="dW")
    assert "effkernels.rope2d." in "\n".join(str(g.graph) for g in rec.graphs)
    assert "rope2d_backward" in "\n".join(str(g.graph) for g in rec.bw_graphs)


@pytest.mark.skipif(not _EXT, reason="effkernels._C is not built (CI builds it, where a skip fails)")
def test_raw_op_opcheck_and_no_autograd(seed):
    """The extension's raw op (fake in effkernels/_ext/__init__.py), on permuted qkv views, shared
    (stride 0) positions and strided outputs; one place (effkernels.ops) defines its backward."""
    q, k, _ = torch.randn(2, 4, 3, 3, 6).permute(2, 0, 3, 1, 4).unbind(0)
    pos = ops.grid_positions(2, 2).unsqueeze(0).expand(2, -1, -1)
    qo = torch.empty(2, 4, 3, 6).transpose(1, 2)
    C = torch.ops.effkernels_C
    assert xrope.RAW_OPS == ("rope2d",)
    for sign in (1.0, -1.0):
        torch.library.opcheck(C.rope2d.default, (q, k, pos.int(), ref.rope2d_inv_freq(6), sign, qo,
                                                 torch.empty(2, 3, 4, 6)))
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("effkernels_C::rope2d", "Autograd")
