"""Forward-mode AD through every op: torch.func.jvp, forward_ad dual tensors and jacfwd, per backend,
against torch's own forward AD of the plain-torch computation (effkernels.reference called directly,
SDPA's math backend), against central finite differences, and through a whole SiT (dense, routed,
packed). Before the forward-mode rules, every kernel op returned a zero tangent without an error.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import effkernels
from effkernels import ops
from effkernels.models import build
from effkernels.models.backbone.network import Route
from effkernels.nn.routing import TokenPack
from effkernels.reference import adaln as R_ad
from effkernels.reference import align as R_al
from effkernels.reference import attention as R_at
from effkernels.reference import rmsnorm as R_rms
from effkernels.reference import rope as R_rope
from effkernels.reference import routing as R_rt
from effkernels.reference import swiglu as R_sw

from helpers import rel_err

BACKENDS = [b for b in ("reference", "cpp", "triton") if effkernels.backends.available(b, torch.device("cpu"))[0]]
# Kernel JVP vs torch's JVP of the reference: the primal statistics differ by rounding only, fp32
# 1e-5 (1e-4 where a reduction order differs); float64 keeps the tangent's float64 math.
TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
# Central differences, step h: fp64 through the reference is exact to ~h^2; a kernel that
# accumulates in float32 (cpp, even for float64 input) or runs in fp32 (triton) adds eps32 / h.
FD_STEP = {torch.float32: 1e-2, torch.float64: 1e-3}
FD_TOL = {torch.float32: 2e-2, torch.float64: 1e-3}


def _dtypes(backend):
    return [torch.float32] if backend == "triton" else [torch.float32, torch.float64]


def _cases():
    return [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in BACKENDS for d in _dtypes(b)]


def _fd(f, primals, tangents, h):
    """Central difference of f along tangents: (f(p + h t) - f(p - h t)) / 2h, per output."""
    hi = f(*[p + h * t for p, t in zip(primals, tangents)])
    lo = f(*[p - h * t for p, t in zip(primals, tangents)])
    if isinstance(hi, tuple):
        return tuple((a.double() - b.double()) / (2 * h) for a, b in zip(hi, lo))
    return (hi.double() - lo.double()) / (2 * h)


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _arith(backend, dtype):
    """The dtype the backend computes in: cpp accumulates in float32 even for float64 inputs, so its
    finite differences carry float32 rounding (eps32 / h), whatever the input dtype."""
    return torch.float32 if backend == "cpp" else dtype


def check_jvp(name, f, f_ref, primals, dtype, arith=None):
    """f's JVP (torch.func.jvp and dual tensors) equals the reference's and central differences (the
    step and tolerance of the latter follow `arith`, the dtype the kernel computes in; default dtype)."""
    arith = dtype if arith is None else arith
    tangents = tuple(torch.randn_like(p) for p in primals)
    out, tan = torch.func.jvp(f, primals, tangents)
    ref_out, ref_tan = torch.func.jvp(f_ref, primals, tangents)
    with fwAD.dual_level():
        dual = _as_tuple(f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]))
        dual_tan = tuple(fwAD.unpack_dual(o).tangent for o in dual)
    fd = _as_tuple(_fd(f, primals, tangents, FD_STEP[arith]))
    errs = []
    for i, (t, r, d, n) in enumerate(zip(_as_tuple(tan), _as_tuple(ref_tan), dual_tan, fd)):
        assert r.abs().max() > 0, f"{name}[{i}]: the reference tangent is zero, a useless case"
        assert t.dtype == r.dtype and t.shape == r.shape, f"{name}[{i}]: tangent {t.dtype}{tuple(t.shape)}"
        e_ref, e_dual, e_fd = rel_err(t, r), rel_err(d, r), rel_err(t, n)
        errs.append((e_ref, e_fd))
        assert e_ref <= TOL[dtype], f"{name}[{i}]: JVP vs reference {e_ref:.2e} > {TOL[dtype]:.0e}"
        assert e_dual <= TOL[dtype], f"{name}[{i}]: dual-tensor JVP vs reference {e_dual:.2e}"
        assert e_fd <= FD_TOL[arith], f"{name}[{i}]: JVP vs finite differences {e_fd:.2e} > {FD_TOL[arith]:.0e}"
    print(f"{name}: rel err vs reference / vs FD: " + ", ".join(f"{a:.1e} / {b:.1e}" for a, b in errs))


# ---------------------------------------------------------------------------------------------
# adaLN
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", _cases())
@pytest.mark.parametrize("per_token,affine", [(False, False), (True, True)])
def test_adaln_jvp(backend, dtype, per_token, affine):
    B, N, D = 2, 5, 19
    x, y = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    mod = torch.randn(B, N, 6 * D, dtype=dtype) if per_token else torch.randn(B, 6 * D, dtype=dtype)
    w, b = torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype)
    aff = (w, b) if affine else ()

    def chunks(mod):  # strided views, as adaLN(c).chunk(6) gives them
        return mod.chunk(6, -1)

    def ln(op):
        return lambda x, mod, *wb: op(x, chunks(mod)[0], chunks(mod)[1], 1e-6, *wb, **kw(op))

    def fused(op):
        return lambda x, y, mod, *wb: op(x, y, chunks(mod)[2], chunks(mod)[3], chunks(mod)[4], 1e-6, *wb, **kw(op))

    def gr(op):
        return lambda x, y, mod: op(x, y, chunks(mod)[5], **kw(op))

    def kw(op):
        return {"backend": backend} if op.__module__.startswith("effkernels.ops") else {}

    tag = f"[{backend} {dtype} per_token={per_token} affine={affine}]"
    check_jvp(f"modulate_layernorm{tag}", ln(ops.modulate_layernorm), ln(R_ad.modulate_layernorm), (x, mod, *aff), dtype, _arith(backend, dtype))
    check_jvp(f"gated_residual_modulate_layernorm{tag}", fused(ops.gated_residual_modulate_layernorm),
              fused(R_ad.gated_residual_modulate_layernorm), (x, y, mod, *aff), dtype, _arith(backend, dtype))
    check_jvp(f"gated_residual{tag}", gr(ops.gated_residual), gr(R_ad.gated_residual), (x, y, mod), dtype, _arith(backend, dtype))


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", _cases())
def test_routing_jvp(backend, dtype):
    B, N, D, K = 3, 11, 6, 5
    x, sub = torch.randn(B, N, D, dtype=dtype), torch.randn(B, K, D, dtype=dtype)
    idx = ops.draw_route(B, N, K, sort=False).int()
    check_jvp(f"route_gather[{backend} {dtype}]", lambda x: ops.route_gather(x, idx, backend=backend),
              lambda x: R_rt.route_gather(x, idx), (x,), dtype)
    check_jvp(f"route_scatter[{backend} {dtype}]", lambda x, s: ops.route_scatter(x, s, idx, backend=backend),
              lambda x, s: R_rt.route_scatter(x, s, idx), (x, sub), dtype)
    pack = TokenPack.draw([2, 7, 1], N)
    v = torch.randn(3, D, dtype=dtype)
    check_jvp(f"segment_expand[{dtype}]", lambda v: ops.segment_expand(v, pack.seg, pack.cu_seqlens, pack.max_seqlen),
              lambda v: R_rt.segment_expand(v, pack.seg), (v,), dtype)


# ---------------------------------------------------------------------------------------------
# Alignment losses
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", _cases())
def test_align_jvp(backend, dtype):
    B, N, D, Kh = 2, 7, 13, 9
    z_hat, z = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    tw = torch.rand(B, N)
    tag = f"[{backend} {dtype}]"
    check_jvp(f"per_token_cosine{tag}", lambda zh: ops.per_token_cosine(zh, z, backend=backend),
              lambda zh: R_al.per_token_cosine(zh, z), (z_hat,), dtype, _arith(backend, dtype))
    check_jvp(f"cosine_alignment_loss{tag}", lambda zh: ops.cosine_alignment_loss(zh, z, backend=backend, token_weight=tw),
              lambda zh: R_al.cosine_alignment_loss(zh, z, token_weight=tw), (z_hat,), dtype, _arith(backend, dtype))
    check_jvp(f"smooth_l1_alignment_loss{tag}", lambda zh: ops.smooth_l1_alignment_loss(zh, z, 0.5),
              lambda zh: R_al.smooth_l1_alignment_loss(zh, z, 0.5), (z_hat,), dtype, _arith(backend, dtype))
    check_jvp(f"mse_alignment_loss{tag}", lambda zh: ops.mse_alignment_loss(zh, z),
              lambda zh: R_al.mse_alignment_loss(zh, z), (z_hat,), dtype, _arith(backend, dtype))
    h, w, b = torch.randn(B, N, Kh, dtype=dtype), torch.randn(D, Kh, dtype=dtype), torch.randn(D, dtype=dtype)
    check_jvp(f"projected_cosine{tag}", lambda h, w, b: ops.projected_cosine(h, w, b, z, chunk_tokens=4, backend=backend),
              lambda h, w, b: R_al.projected_cosine(h, w, b, z), (h, w, b), dtype, _arith(backend, dtype))
    check_jvp(f"projected_cosine_loss{tag}", lambda h, w: ops.projected_cosine_loss(h, w, None, z, backend=backend),
              lambda h, w: R_al.projected_cosine_loss(h, w, None, z), (h, w), dtype, _arith(backend, dtype))


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def _sdpa_math(q, k, v):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v)


def _varlen_plain(q, k, v, cu):
    """Packed attention as a plain loop of SDPA's math backend per segment, concatenated."""
    b = cu.tolist()
    return torch.cat([_sdpa_math(*[t[s:e].transpose(0, 1) for t in (q, k, v)]).transpose(0, 1)
                      for s, e in zip(b[:-1], b[1:])])


@pytest.mark.parametrize("backend,dtype", _cases())
def test_attention_jvp(backend, dtype):
    q, k, v = (torch.randn(2, 3, 7, 5, dtype=dtype) for _ in range(3))
    check_jvp(f"visible_attention dense[{backend} {dtype}]", lambda q, k, v: ops.visible_attention(q, k, v, backend=backend),
              _sdpa_math, (q, k, v), dtype)
    if backend == "triton" and dtype != torch.float32:
        return
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    q, k, v = (torch.randn(11, 2, 6, dtype=dtype) for _ in range(3))
    check_jvp(f"visible_attention packed[{backend} {dtype}]",
              lambda q, k, v: ops.visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=6, backend=backend),
              lambda q, k, v: _varlen_plain(q, k, v, cu), (q, k, v), dtype)


# ---------------------------------------------------------------------------------------------
# jacfwd, forward-over-reverse, and the paths without a rule
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_jacfwd_and_hvp(backend):
    x = torch.randn(1, 3, 5)
    sh, sc = torch.randn(1, 5), torch.randn(1, 5)
    J = torch.func.jacfwd(lambda x: ops.modulate_layernorm(x, sh, sc, backend=backend))(x)
    Jr = torch.func.jacfwd(lambda x: R_ad.modulate_layernorm(x, sh, sc))(x)
    assert rel_err(J, Jr) <= TOL[torch.float32], rel_err(J, Jr)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    q, k, v = (torch.randn(5, 1, 3) for _ in range(3))
    J = torch.func.jacfwd(lambda q: ops.visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=3, backend=backend))(q)
    Jr = torch.func.jacfwd(lambda q: _varlen_plain(q, k, v, cu))(q)
    assert rel_err(J, Jr) <= TOL[torch.float32], rel_err(J, Jr)
    # forward-over-reverse (a Hessian-vector product): the backward under forward AD is exact too
    z, dz = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    f = lambda x: ops.cosine_alignment_loss(ops.modulate_layernorm(x, sh, sc, backend=backend), z, backend=backend)  # noqa: E731
    fr = lambda x: R_al.cosine_alignment_loss(R_ad.modulate_layernorm(x, sh, sc), z)  # noqa: E731
    hv = torch.func.jvp(torch.func.grad(f), (x,), (dz,))[1]
    hr = torch.func.jvp(torch.func.grad(fr), (x,), (dz,))[1]
    assert rel_err(hv, hr) <= TOL[torch.float32], rel_err(hv, hr)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backward_reached_with_tangents_raises(backend):
    """A registered kernel backward has no forward-mode rule: reached with tangents (forward AD
    opened after the forward ran) it raises, naming the op, instead of dropping them."""
    x = torch.randn(2, 3, 5, requires_grad=True)
    sh, sc = torch.randn(2, 5), torch.randn(2, 5)
    out = ops.modulate_layernorm(x, sh, sc, backend=backend)
    with fwAD.dual_level():
        g = fwAD.make_dual(torch.ones_like(out), torch.randn_like(out))
        with pytest.raises(NotImplementedError, match="modulate_layernorm"):
            torch.autograd.grad(out, x, g)


def test_flash_attn_path_raises_under_forward_ad():
    """flash-attn's varlen kernel has no JVP: backend 'cuda' raises naming the op; 'auto' avoids it."""
    from effkernels.ops import attention as A
    q = torch.randn(4, 1, 8)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="visible_attention.*forward-mode"):
            A._packed_path("cuda", q, forward_ad=True)
    assert A._packed_path("auto", q, forward_ad=True) == "reference"


# ---------------------------------------------------------------------------------------------
# A whole SiT: dense, routed (TREAD) and packed (TokenPack) plans
# ---------------------------------------------------------------------------------------------

def _plain_ops(monkeypatch):
    """Swap every op the model calls for its plain-torch reference (SDPA's math backend for attention)."""
    def attn(q, k, v, *, cu_seqlens=None, max_seqlen=None, scale=None, backend=None):
        return _sdpa_math(q, k, v) if cu_seqlens is None else _varlen_plain(q, k, v, cu_seqlens)
    drop = lambda f: (lambda *a, backend=None, check_idx=True, **k: f(*a, **k))  # noqa: E731
    monkeypatch.setattr(ops, "modulate_layernorm", drop(R_ad.modulate_layernorm))
    monkeypatch.setattr(ops, "gated_residual", drop(R_ad.gated_residual))
    monkeypatch.setattr(ops, "gated_residual_modulate_layernorm", drop(R_ad.gated_residual_modulate_layernorm))
    monkeypatch.setattr(ops, "route_gather", drop(R_rt.route_gather))
    monkeypatch.setattr(ops, "route_scatter", drop(R_rt.route_scatter))
    monkeypatch.setattr(ops, "segment_expand", lambda v, seg, cu, m: R_rt.segment_expand(v, seg))
    monkeypatch.setattr(ops, "visible_attention", attn)
    monkeypatch.setattr(ops, "rmsnorm_modulate", drop(R_rms.rmsnorm_modulate))
    monkeypatch.setattr(ops, "gated_residual_rmsnorm_modulate", drop(R_rms.gated_residual_rmsnorm_modulate))
    monkeypatch.setattr(ops, "swiglu", drop(R_sw.swiglu))
    monkeypatch.setattr(ops, "rope2d", drop(R_rope.rope2d))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plan", ["dense", "routed", "packed"])
@pytest.mark.parametrize("name", ["tiny/2", "LightningDiT-tiny/2"])  # DiT's block; RMSNorm + SwiGLU + RoPE
def test_model_jvp(backend, plan, name, monkeypatch):
    model = build(name, depth=3, hidden_size=32, num_heads=2, class_dropout_prob=0.0).eval()
    for p in model.parameters():  # adaLN-Zero starts at zero gates: perturb so every block matters
        p.data.add_(0.05 * torch.randn_like(p))
    B, N = 3, model.num_patches
    x, t, y = torch.randn(B, 1, 8, 8), torch.rand(B), torch.randint(0, 10, (B,))
    kw = {}
    if plan == "routed":
        kw["routes"] = [Route(2, 3, 0.5, idx=ops.draw_route(B, N, N - round(N * 0.5)), checked=True)]
    elif plan == "packed":
        kw["keep_idx"] = TokenPack.draw([5, 16, 9], N)
    f = lambda x, t: model(x, t, y, **kw)  # noqa: E731
    primals, tangents = (x, t), (torch.randn_like(x), torch.randn_like(t))
    with effkernels.use_backend(backend):
        _, tan_t = torch.func.jvp(lambda t: f(x, t), (t,), (tangents[1],))
        _, tan_x = torch.func.jvp(lambda x: f(x, t), (x,), (tangents[0],))
        fd_t = _fd(lambda t: f(x, t), (t,), (tangents[1],), 1e-2)
        fd_x = _fd(lambda x: f(x, t), (x,), (tangents[0],), 1e-2)
    with monkeypatch.context() as m:
        _plain_ops(m)
        _, ref_t = torch.func.jvp(lambda t: f(x, t), (t,), (tangents[1],))
        _, ref_x = torch.func.jvp(lambda x: f(x, t), (x,), (tangents[0],))
    for name, tan, ref, fd in (("d/dt", tan_t, ref_t, fd_t), ("d/dx", tan_x, ref_x, fd_x)):
        assert ref.abs().max() > 0
        e_ref, e_fd = rel_err(tan, ref), rel_err(tan, fd)
        print(f"model {plan} [{backend}] {name}: |tangent| {tan.norm():.3e}, rel err vs plain torch {e_ref:.1e}, "
              f"vs FD {e_fd:.1e}")
        assert e_ref <= 1e-4, f"{name}: {e_ref:.2e} vs plain torch"
        assert e_fd <= 2e-2, f"{name}: {e_fd:.2e} vs finite differences"
