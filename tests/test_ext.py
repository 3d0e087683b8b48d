"""effkernels._C's C++ CPU paths (backend="cpp") against the reference, forward and backward, plus
opcheck on every effkernels_C op, out= poisoning, determinism and error paths.

These run the __host__ __device__ arithmetic shared with the CUDA kernels (csrc/adaln_math.h), not
the CUDA launches themselves (vector loads, warp reductions): those run on a GPU here and, on every
machine, on the CUDA execution simulator (tests/test_cuda_sim.py).
"""
import pytest
import torch

import effkernels._C  # noqa: F401  (must import here: CI fails a skipped extension test)
from effkernels import backends
from effkernels import _ext
from effkernels._ext import adaln as xadaln
from effkernels._ext import align as xalign
from effkernels._ext import routing as xrouting
from effkernels.ops import adaln as ops_adaln
from effkernels.ops import align as ops_align
from effkernels.ops import routing as ops_routing
from effkernels.reference import adaln as ref_adaln
from effkernels.reference import align as ref_align
from effkernels.reference import routing as ref_routing

from helpers import assert_close, cosine_loss_scale, poison

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DIMS = [1, 17, 384, 1000]
C = torch.ops.effkernels_C


def test_extension_reported_built():
    ok, why = backends.extension_status()
    assert ok, why
    assert backends.available("cpp", torch.device("cpu"))[0]
    assert _ext.AVAILABLE


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("kfrac", ["one", "half", "all"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_routing_vs_reference(seed, dtype, D, kfrac, idx_dtype):
    B, N = 3, 10
    K = {"one": 1, "half": N // 2, "all": N}[kfrac]
    x = torch.randn(B, N, D, dtype=dtype, requires_grad=True)
    sub = torch.randn(B, K, D, dtype=dtype, requires_grad=True)
    idx = ref_routing.draw_route(B, N, K, sort=False).to(idx_dtype)
    g = ops_routing.route_gather(x, idx, backend="cpp")
    s = ops_routing.route_scatter(x, sub, idx, backend="cpp")
    xr, subr = x.detach().clone().requires_grad_(), sub.detach().clone().requires_grad_()
    gr, sr = ref_routing.route_gather(xr, idx), ref_routing.route_scatter(xr, subr, idx)
    assert torch.equal(g, gr) and torch.equal(s, sr)  # pure data movement: exact
    dg, ds = torch.randn_like(g), torch.randn_like(s)
    torch.autograd.backward([g, s], [dg, ds])
    torch.autograd.backward([gr, sr], [dg, ds])
    assert torch.equal(x.grad, xr.grad) and torch.equal(sub.grad, subr.grad)


def test_routing_out_poisoned(seed):
    x = torch.randn(2, 9, 17)
    idx = torch.tensor([[8, 0, 3], [1, 2, 7]])
    out = xrouting.gather(x, idx, out=poison((2, 3, 17), x.dtype))
    assert torch.equal(out, ref_routing.route_gather(x, idx))
    sub = torch.randn(2, 3, 17)
    out = xrouting.scatter(x, sub, idx, 9, out=poison((2, 9, 17), x.dtype))
    assert torch.equal(out, ref_routing.route_scatter(x, sub, idx))
    out = xrouting.scatter(None, sub, idx, 9, out=poison((2, 9, 17), x.dtype))
    assert torch.equal(out, ref_routing.route_scatter(torch.zeros_like(x), sub, idx))
    out = xrouting.scatter(x, None, idx, 9, out=poison((2, 9, 17), x.dtype))
    assert torch.equal(out, ref_routing.route_scatter(x, None, idx))


def test_routing_bad_input_through_cpp():
    x = torch.randn(2, 6, 4)
    with pytest.raises(TypeError, match="idx"):
        ops_routing.route_gather(x, torch.zeros(2, 3), backend="cpp")
    with pytest.raises(ValueError, match="duplicate"):
        ops_routing.route_gather(x, torch.tensor([[1, 1], [0, 2]]), backend="cpp")
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        ops_routing.route_gather(x, torch.tensor([[1, 6], [0, 2]]), backend="cpp")
    with pytest.raises(ValueError, match="x_sub"):
        ops_routing.route_scatter(x, torch.randn(2, 3, 5), torch.tensor([[0, 1], [2, 3]]), backend="cpp")
    with pytest.raises(ValueError, match="out"):
        xrouting.gather(x, torch.tensor([[0], [1]]), out=torch.empty(2, 2, 4))
    # A direct call of the raw op with an out-of-range index is refused, never a wild write.
    with pytest.raises(RuntimeError, match="out of range"):
        C.gather(x, torch.tensor([[0], [99]]))


# ---------------------------------------------------------------------------------------------
# adaln
# ---------------------------------------------------------------------------------------------

def _mods(kind, B, N, D, dtype, n=3):
    """n modulation tensors: per sample (B, D), per token (B, N, D), or strided adaLN chunks."""
    if kind == "sample":
        return [torch.randn(B, D, dtype=dtype) * 0.5 for _ in range(n)]
    if kind == "token":
        return [torch.randn(B, N, D, dtype=dtype) * 0.5 for _ in range(n)]
    if kind == "chunk":  # adaLN(c).chunk(6, -1): (B, D) views with row stride 6D
        return list((torch.randn(B, 6 * D, dtype=dtype) * 0.5).chunk(6, dim=-1)[:n])
    return list((torch.randn(B, N, 6 * D, dtype=dtype) * 0.5).chunk(6, dim=-1)[:n])  # token chunks


def _leaf(t):
    """A leaf copy of t with t's layout: strides (adaLN chunks) and storage offset (misaligned rows),
    which clone() would drop, so the kernels see the layout the test asked for."""
    if t is None:
        return None
    s = t.detach()
    u = torch.empty(s.untyped_storage().nbytes() // s.element_size(), dtype=s.dtype, device=s.device)
    u = u.as_strided(s.shape, s.stride(), s.storage_offset())
    u.copy_(s)
    return u.requires_grad_()


def _leaf64(t):
    return t.detach().double().requires_grad_() if t is not None else None


def _pt(m):
    return m.unsqueeze(1) if m.dim() == 2 else m


# Independent float64 versions (the reference computes in float32 whatever the input dtype, and its
# LayerNorm backward at D=1, where rstd = 1/sqrt(eps), carries ~1e-4 of float32 rounding).
def _ln64(x, shift, scale, eps, w=None, b=None):
    mu = x.mean(-1, keepdim=True)
    h = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
    h = h * w if w is not None else h
    h = h + b if b is not None else h
    return h * (1 + _pt(scale)) + _pt(shift)


def _gr64(x, y, gate):
    return x + _pt(gate) * y


def _fused64(x, y, gate, shift, scale, eps, w=None, b=None):
    h = _gr64(x, y, gate)
    return h, _ln64(h, shift, scale, eps, w, b)


def _compare(fn_ext, fn_ref, fn64, inputs, dtype, names, seed, out_scale=None):
    """Run fn_ext on leaves of `inputs`, fn64 on float64 copies (the truth) and fn_ref on same-dtype
    copies (PyTorch's own error for the 2x rule of 16-bit dtypes); compare outputs and the gradients
    of every input (at TOL_REDUCE: several are reductions over rows)."""
    ins = [_leaf(t) for t in inputs]
    outs = fn_ext(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads_out = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads_out)
    refs = {}
    for key, conv, fn in (("f64", _leaf64, fn64), ("same", _leaf, fn_ref)):
        r_in = [conv(t) for t in inputs]
        r_out = fn(*r_in)
        r_out = r_out if isinstance(r_out, tuple) else (r_out,)
        torch.autograd.backward(r_out, [g.to(o.dtype) for g, o in zip(grads_out, r_out)])
        refs[key] = (r_out, r_in)
    for i, o in enumerate(outs):
        assert_close(o, refs["f64"][0][i], dtype, name=f"out{i}", same_dtype_ref=refs["same"][0][i],
                     scale=out_scale)  # out_scale: a loss whose terms cancel, see helpers.rel_err
    for name, t, r32, rsame in zip(names, ins, refs["f64"][1], refs["same"][1]):
        if t is None:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.shape == t.shape
        assert_close(t.grad, r32.grad, dtype, reduce=True, name=f"d{name}", same_dtype_ref=rsame.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("mod", ["sample", "token", "chunk", "token_chunk"])
@pytest.mark.parametrize("affine", [False, True])
def test_modulate_layernorm(seed, dtype, D, mod, affine):
    B, N = 2, 5
    x = torch.randn(B, N, D, dtype=dtype) * 2 + 0.3
    shift, scale = _mods(mod, B, N, D, dtype, 2)
    w = (1 + 0.1 * torch.randn(D)).to(dtype) if affine else None
    b = (0.1 * torch.randn(D)).to(dtype) if affine else None
    _compare(lambda *a: ops_adaln.modulate_layernorm(*a[:3], 1e-6, *a[3:], backend="cpp"),
             lambda *a: ref_adaln.modulate_layernorm(*a[:3], 1e-6, *a[3:]),
             lambda *a: _ln64(*a[:3], 1e-6, *a[3:]),
             [x, shift, scale, w, b], dtype, ["x", "shift", "scale", "weight", "bias"], seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("mod", ["sample", "token", "chunk"])
def test_gated_residual(seed, dtype, D, mod):
    B, N = 2, 5
    x, y = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    (gate,) = _mods(mod, B, N, D, dtype, 1)
    _compare(lambda *a: ops_adaln.gated_residual(*a, backend="cpp"), ref_adaln.gated_residual, _gr64,
             [x, y, gate], dtype, ["x", "y", "gate"], seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("mod", ["sample", "token", "chunk", "token_chunk"])
@pytest.mark.parametrize("affine", [False, True])
def test_fused_residual_layernorm(seed, dtype, D, mod, affine):
    B, N = 2, 5
    x, y = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    gate, shift, scale = _mods(mod, B, N, D, dtype, 3)
    w = (1 + 0.1 * torch.randn(D)).to(dtype) if affine else None
    b = (0.1 * torch.randn(D)).to(dtype) if affine else None
    _compare(lambda *a: ops_adaln.gated_residual_modulate_layernorm(*a[:5], 1e-6, *a[5:], backend="cpp"),
             lambda *a: ref_adaln.gated_residual_modulate_layernorm(*a[:5], 1e-6, *a[5:]),
             lambda *a: _fused64(*a[:5], 1e-6, *a[5:]),
             [x, y, gate, shift, scale, w, b], dtype, ["x", "y", "gate", "shift", "scale", "weight", "bias"], seed)


def test_adaln_out_poisoned_and_stats(seed):
    B, N, D = 2, 7, 33
    x = torch.randn(B, N, D)
    shift, scale = _mods("chunk", B, N, D, torch.float32, 2)
    out, mean, rstd = xadaln.ln_modulate_fwd(x, shift, scale, None, None, 1e-6, out=poison((B, N, D), x.dtype))
    assert_close(out, ref_adaln.modulate_layernorm(x, shift, scale, 1e-6), torch.float32)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (B, N)
    assert_close(mean, x.mean(-1), torch.float32)
    assert_close(rstd, torch.rsqrt(x.var(-1, unbiased=False) + 1e-6), torch.float32)
    y = torch.randn(B, N, D)
    out = xadaln.gated_residual_fwd(x, y, shift, out=poison((B, N, D), x.dtype))
    assert_close(out, ref_adaln.gated_residual(x, y, shift), torch.float32)


def test_adaln_backward_deterministic(seed):
    """Row reductions go through fixed partial buffers: two runs agree bit for bit."""
    B, N, D = 3, 70, 129
    x, y, dh, dout = (torch.randn(B, N, D) for _ in range(4))
    gate, shift, scale = _mods("chunk", B, N, D, torch.float32, 3)
    w, b = torch.randn(D), torch.randn(D)
    h, _, mean, rstd = xadaln.fused_fwd(x, y, gate, shift, scale, w, b, 1e-6)
    r1 = xadaln.fused_bwd(dh, dout, h, y, gate, shift, scale, w, b, mean, rstd)
    r2 = xadaln.fused_bwd(dh, dout, h, y, gate, shift, scale, w, b, mean, rstd)
    assert all(torch.equal(a, c) for a, c in zip(r1, r2))


def test_adaln_bad_input_through_cpp():
    x = torch.randn(2, 4, 8)
    s = torch.randn(2, 8)
    with pytest.raises(ValueError, match="shift"):
        ops_adaln.modulate_layernorm(x, torch.randn(2, 3), s, backend="cpp")
    with pytest.raises(TypeError, match="scale"):
        ops_adaln.modulate_layernorm(x, s, s.half(), backend="cpp")
    with pytest.raises(ValueError, match="eps"):
        ops_adaln.modulate_layernorm(x, s, s, -1.0, backend="cpp")
    with pytest.raises(ValueError, match="gate"):
        ops_adaln.gated_residual(x, x, torch.randn(2, 16)[:, ::2], backend="cpp")
    with pytest.raises(ValueError, match="weight"):
        ops_adaln.gated_residual_modulate_layernorm(x, x, s, s, s, 1e-6, torch.randn(7), backend="cpp")
    with pytest.raises(TypeError, match="out"):
        xadaln.gated_residual_fwd(x, x, s, out=torch.empty(2, 4, 8, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# align
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("target", ["same", "float32"])
def test_cosine_loss(seed, dtype, D, target):
    B, N = 2, 6
    z_hat = torch.randn(B, N, D, dtype=dtype)
    z = torch.randn(B, N, D, dtype=dtype if target == "same" else torch.float32)
    z_hat[0, 1] = 0  # a zero row: norm clamped (at 2**-14 for fp16), cos 0, finite gradient
    e = ref_align.norm_clamp(1e-8, dtype)
    _compare(lambda zh: ops_align.cosine_alignment_loss(zh, z, backend="cpp"),
             lambda zh: ref_align.cosine_alignment_loss(zh, z),
             lambda zh: -(torch.nn.functional.normalize(zh, dim=-1, eps=e)
                          * torch.nn.functional.normalize(z.double(), dim=-1, eps=e)).sum(-1).mean(),
             [z_hat], dtype, ["z_hat"], seed, out_scale=cosine_loss_scale(z_hat, z))


def test_cosine_primitives(seed):
    zh, z = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    cos = xalign.cosine_fwd(zh, z, 1e-8, out=poison((3, 5), torch.float32))
    assert_close(cos, torch.nn.functional.cosine_similarity(zh, z, dim=-1), torch.float32)
    dcos = torch.tensor(0.25).expand(3, 5)  # what .mean()'s backward hands over: stride 0
    leaf = zh.clone().requires_grad_()
    ref_align.cosine_alignment_loss(leaf, z).neg().mul(0.25 * 15).backward()
    assert_close(xalign.cosine_bwd(dcos, zh, z, 1e-8), leaf.grad, torch.float32)


def test_align_bad_input_through_cpp():
    with pytest.raises(ValueError, match="z must have"):
        ops_align.cosine_alignment_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5), backend="cpp")
    with pytest.raises(ValueError, match="eps"):
        ops_align.cosine_alignment_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), 0.0, backend="cpp")
    with pytest.raises(ValueError, match="out"):
        xalign.cosine_fwd(torch.randn(2, 3, 4), torch.randn(2, 3, 4), 1e-8, out=torch.empty(3, 2))


# ---------------------------------------------------------------------------------------------
# opcheck on every effkernels_C op (schema, fake kernel, autograd registration, AOT dispatch)
# ---------------------------------------------------------------------------------------------

def _opcheck_cases():
    B, N, D, K = 2, 5, 12, 3
    # No input requires grad: the raw ops are primitives without autograd (effkernels.ops' registered
    # ops define every backward), so opcheck checks schema, fake kernels and AOT dispatch.
    r = torch.randn
    idx = torch.tensor([[4, 0, 2], [1, 3, 0]])
    ch = torch.randn(B, 6 * D).chunk(6, dim=-1)
    x, y, dout, dh = r(B, N, D), r(B, N, D), r(B, N, D), r(B, N, D)
    w, b = torch.randn(D), torch.randn(D)
    _, mean, rstd = C.ln_modulate_fwd(x, ch[0], ch[1], w, b, 1e-6)
    h, _, hm, hr = C.fused_fwd(x, y, ch[2], ch[0], ch[1], None, None, 1e-6)
    return {
        "gather": [(r(B, N, D), idx)],
        "gather_out": [(r(B, N, D), idx, torch.empty(B, K, D))],
        "scatter": [(r(B, N, D), r(B, K, D), idx, N), (None, r(B, K, D), idx, N)],
        "scatter_out": [(r(B, N, D), None, idx, torch.empty(B, N, D))],
        "ln_modulate_fwd": [(r(B, N, D), r(B, D), r(B, N, D), None, None, 1e-6),
                            (r(B, N, D), ch[0], ch[1], w, b, 1e-5)],
        "ln_modulate_fwd_out": [(x, ch[0], ch[1], None, None, 1e-6, torch.empty(B, N, D))],
        "ln_modulate_bwd": [(dout, x, ch[0], ch[1], w, b, mean, rstd), (dout, x, ch[0], ch[1], None, None, mean, rstd)],
        "gated_residual_fwd": [(r(B, N, D), r(B, N, D), r(B, D))],
        "gated_residual_fwd_out": [(x, y, ch[2], torch.empty(B, N, D))],
        "gated_residual_bwd": [(dout, y, ch[2]), (dout, y, r(B, N, D))],
        "fused_fwd": [(r(B, N, D), r(B, N, D), r(B, D), r(B, D),
                       r(B, N, D), None, None, 1e-6)],
        "fused_bwd": [(dh, dout, h, y, ch[2], ch[0], ch[1], None, None, hm, hr)],
        "cosine_fwd": [(r(B, N, D), r(B, N, D), 1e-8)],
        "cosine_fwd_out": [(r(B, N, D), r(B, N, D), 1e-8, torch.empty(B, N))],
        "cosine_bwd": [(torch.randn(B, N), r(B, N, D), r(B, N, D).bfloat16(), 1e-8)],
        # the fused projection: h (B, N, D), weight (K, D) (K = the target width here), z (B, N, K)
        "proj_cosine_fwd": [(x, r(K, D), r(K), r(B, N, K), 1e-8, 4), (x, r(K, D), None, r(B, N, K).half(), 1e-8, 64)],
        "proj_cosine_fwd_out": [(x, r(K, D), None, r(B, N, K), 1e-8, 4, torch.empty(B, N), torch.empty(B, N, 2))],
        "proj_cosine_bwd": [(torch.randn(B, N), x, r(K, D), r(K), r(B, N, K), *C.proj_cosine_fwd(x, r(K, D), None,
                             r(B, N, K), 1e-8, 4), 1e-8, 4),
                            (torch.randn(B, N), x, r(K, D), None, r(B, N, K), torch.randn(B, N), torch.rand(B, N, 2),
                             1e-8, 3)],
    }


def test_opcheck_covers_every_op():
    assert set(_opcheck_cases()) == set(_ext.OPS)


@pytest.mark.parametrize("name", _ext.OPS)
def test_opcheck(seed, name):
    for args in _opcheck_cases()[name]:
        torch.library.opcheck(getattr(C, name).default, args)


def test_raw_ops_have_no_autograd_of_their_own():
    """One place defines each backward: effkernels.ops' registered autograd, not the raw _C ops."""
    for name in _ext.OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"effkernels_C::{name}", "Autograd"), name


def test_compile_sees_through(seed):
    """fullgraph torch.compile over the raw ops (their fake registrations), and over the public ops on
    the cpp backend forward and backward (effkernels.ops' registered autograd)."""
    def raw(x, shift, scale, idx):
        out, _, _ = C.ln_modulate_fwd(x, shift, scale, None, None, 1e-6)
        return C.gather(out, idx)

    def public(x, shift, scale, idx):
        out = ops_adaln.modulate_layernorm(x, shift, scale, 1e-6, backend="cpp")
        return ops_routing.route_gather(out, idx, backend="cpp").sum()

    x = torch.randn(2, 6, 16, requires_grad=True)
    shift, scale = torch.randn(2, 16), torch.randn(2, 16)
    idx = torch.tensor([[0, 5], [3, 1]])
    want = ref_routing.route_gather(ref_adaln.modulate_layernorm(x.detach(), shift, scale), idx)
    got = torch.compile(raw, fullgraph=True, backend="aot_eager")(x.detach(), shift, scale, idx)
    assert_close(got, want, torch.float32)
    torch.compile(public, fullgraph=True, backend="aot_eager")(x, shift, scale, idx).backward()
    xr = x.detach().clone().requires_grad_()
    ref_routing.route_gather(ref_adaln.modulate_layernorm(xr, shift, scale), idx).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, reduce=True)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (only where a GPU is present): vector loads, warp reductions, the V=1 fallback
# ---------------------------------------------------------------------------------------------

_GPU = pytest.mark.skipif(not (torch.cuda.is_available() and backends.extension_has_cuda()),
                          reason="needs a GPU and an extension built with nvcc")


def _maybe_misaligned(shape, dtype, misalign, device):
    """A tensor whose rows start one element off 16-byte alignment: forces the scalar (V=1) path."""
    n = 1
    for s in shape:
        n *= s
    if not misalign:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randn(n + 1, dtype=dtype, device=device)[1:].view(shape)


CUDA_CASES = [(dtype, D, mod, misalign) for dtype in DTYPES for D in (1, 17, 384, 1000, 1152)
              for mod in ("token", "chunk") for misalign in (False, True)]


def check_cuda_kernels(seed, dtype, D, mod, misalign, device, backend):
    """The adaLN family, the cosine loss and routing through the CUDA kernels (on a GPU, or on the
    CUDA simulator: tests/test_cuda_sim.py) against the reference, forward and backward. N = 37 is
    not a multiple of the 4 rows per block and spans two 32-token chunks of the column kernels."""
    B, N, K = 3, 37, 18
    x = _maybe_misaligned((B, N, D), dtype, misalign, device)
    y = torch.randn(B, N, D, dtype=dtype, device=device)
    gate, shift, scale = (t.to(device) for t in _mods(mod, B, N, D, dtype, 3))
    w, b = (1 + 0.1 * torch.randn(D, device=device)).to(dtype), (0.1 * torch.randn(D, device=device)).to(dtype)
    _compare(lambda *a: ops_adaln.gated_residual_modulate_layernorm(*a[:5], 1e-6, *a[5:], backend=backend),
             lambda *a: ref_adaln.gated_residual_modulate_layernorm(*a[:5], 1e-6, *a[5:]),
             lambda *a: _fused64(*a[:5], 1e-6, *a[5:]),
             [x, y, gate, shift, scale, w, b], dtype, ["x", "y", "gate", "shift", "scale", "weight", "bias"], seed)
    _compare(lambda *a: ops_adaln.modulate_layernorm(*a, backend=backend), ref_adaln.modulate_layernorm,
             lambda *a: _ln64(*a, 1e-6), [x, shift, scale], dtype, ["x", "shift", "scale"], seed)
    _compare(lambda *a: ops_adaln.gated_residual(*a, backend=backend), ref_adaln.gated_residual, _gr64,
             [x, y, gate], dtype, ["x", "y", "gate"], seed)
    z = torch.randn(B, N, D, device=device)
    e = ref_align.norm_clamp(1e-8, dtype)
    if D > 1:
        _compare(lambda zh: ops_align.cosine_alignment_loss(zh, z, backend=backend),
                 lambda zh: ref_align.cosine_alignment_loss(zh, z),
                 lambda zh: -(torch.nn.functional.normalize(zh, dim=-1, eps=e)
                              * torch.nn.functional.normalize(z.double(), dim=-1, eps=e)).sum(-1).mean(),
                 [x], dtype, ["z_hat"], seed)
    else:  # one element: cos = sign(z_hat) sign(z), whose gradient is 0 up to the rounding of 1/|z_hat|
        zh = _leaf(x)
        loss = ops_align.cosine_alignment_loss(zh, z, backend=backend)
        loss.backward()
        assert loss.item() == pytest.approx(-(x.float().sign() * z.sign()).mean().item(), abs=1e-6)
        bound = 16 * torch.finfo(torch.float32).eps / x.float().abs() / (B * N)
        assert (zh.grad.float().abs() <= bound).all()
    idx = ref_routing.draw_route(B, N, K, device=device)
    xs = x.contiguous() if not misalign else x
    assert torch.equal(ops_routing.route_gather(xs, idx, backend=backend), ref_routing.route_gather(xs, idx))
    sub = torch.randn(B, K, D, dtype=dtype, device=device)
    assert torch.equal(ops_routing.route_scatter(xs, sub, idx, backend=backend),
                       ref_routing.route_scatter(xs, sub, idx))


@pytest.mark.gpu
@_GPU
@pytest.mark.parametrize("dtype,D,mod,misalign", CUDA_CASES)
def test_cuda_kernels_vs_reference(seed, dtype, D, mod, misalign):
    check_cuda_kernels(seed, dtype, D, mod, misalign, "cuda", "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["same", "float32"])
def test_cosine_zero_rows_finite_every_dtype(seed, dtype, target):
    """Zero projection rows through the C++ path: finite gradients of the closed-form values (fp16 was inf)."""
    from test_align import zero_row_case
    zero_row_case("cpp", dtype, dtype if target == "same" else torch.float32)
