"""RMSNorm family: the kernels (Triton under the interpreter, the extension's C++ path) vs the reference
(forward and every input's gradient), the reference vs plain float64 loops and gradcheck, forward
mode (JVP) vs torch's own forward AD through the reference and finite differences, the primitives
with NaN-poisoned outputs, determinism of the backward reductions, every validation error, opcheck
and torch.compile graph capture."""
import math
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import assert_close, poison, rel_err
from norm_cases import DTYPES, bc as _bc, cases, check, check_compile_keeps_ops, leaves, mods as _mods

from effkernels import _ext, backends, ops
from effkernels._triton import rmsnorm as tk
from effkernels.reference import rmsnorm as ref

# The extension's backend under test: its C++ CPU path, or its CUDA kernels when the tests run on
# the GPU (EFFKERNELS_TEST_DEVICE=cuda, tests/conftest.py), where every test here runs them instead.
_ON_GPU = os.environ.get("EFFKERNELS_TEST_DEVICE", "") == "cuda"
EXT = "cuda" if _ON_GPU else "cpp"
_NO_EXT = pytest.mark.skipif(not backends.available(EXT, torch.device(EXT if _ON_GPU else "cpu"))[0],
                             reason=f"effkernels._C is not built (for {EXT})")
# The kernel backends that run here: Triton (the interpreter on the CPU) and the extension.
KERNELS = ("triton", pytest.param(EXT, marks=_NO_EXT))
EPS = 1e-6


def _leaves(B, N, D, dtype, per_token, affine):
    return leaves(B, N, D, dtype, per_token, affine, bias=False)


def _same_dtype_rms(x, shift, scale, eps, w=None):
    """RMSNorm + modulate done by PyTorch in x's own (16-bit) dtype: the error yardstick."""
    h = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    if w is not None:
        h = h * w
    return h * (1 + _bc(scale)) + _bc(shift)


def _impls(op, backend, eps):
    """(kernel, reference, same-dtype) callables: tracked leaves -> tuple of outputs."""
    if op == "rms":
        def kern(t):
            m = _mods(t)
            return (ops.rmsnorm_modulate(t["x"], m["shift"], m["scale"], eps, t.get("w"), backend=backend),)

        def refer(t):
            m = _mods(t)
            return (ref.rmsnorm_modulate(t["x"], m["shift"], m["scale"], eps, t.get("w")),)

        def same(t):
            m = _mods(t)
            return (_same_dtype_rms(t["x"], m["shift"], m["scale"], eps, t.get("w")),)
    else:
        def kern(t):
            m = _mods(t)
            return ops.gated_residual_rmsnorm_modulate(t["x"], t["y"], m["gate"], m["shift"], m["scale"], eps,
                                                       t.get("w"), backend=backend)

        def refer(t):
            m = _mods(t)
            return ref.gated_residual_rmsnorm_modulate(t["x"], t["y"], m["gate"], m["shift"], m["scale"], eps,
                                                       t.get("w"))

        def same(t):
            m = _mods(t)
            h = t["x"] + _bc(m["gate"]) * t["y"]
            return h, _same_dtype_rms(h, m["shift"], m["scale"], eps, t.get("w"))
    return kern, refer, same


def _check_op(op, backend, lv, dtype, per_token, eps=EPS):
    used = ("x", "shift", "scale", "w") if op == "rms" else ("x", "y", "gate", "shift", "scale", "w")
    check(_impls(op, backend, eps), op, lv, dtype, per_token, used, 2 if op == "fused" else 1)


# ---------------------------------------------------------------------------------------------
# Kernels vs reference through effkernels.ops (forward + every input's gradient)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_token,affine,dtype,shape", cases("weight"))
@pytest.mark.parametrize("op", ("rms", "fused"))
@pytest.mark.parametrize("backend", KERNELS)
def test_ops_match_reference(seed, backend, op, affine, per_token, dtype, shape):
    # With D = 1, d(x) = rstd * g * eps / (x^2 + eps): a difference of nearly equal terms whose float32
    # noise (~rstd * ulp) would dominate with a tiny eps; a larger eps keeps the true value above it.
    eps = 0.1 if shape[-1] == 1 else EPS
    _check_op(op, backend, _leaves(*shape, dtype, per_token, affine), dtype, per_token, eps)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_mixed_modulation_and_strided_x(seed, backend, dtype):
    """shift per sample, scale and gate per token; x and y are non-contiguous row views."""
    B, N, D = 2, 5, 19
    xb, yb = torch.randn(B, N, 2 * D, dtype=dtype), torch.randn(B, N + 2, D, dtype=dtype)
    cs, ct = torch.randn(B, 6 * D, dtype=dtype), torch.randn(B, N, 6 * D, dtype=dtype)
    w = torch.randn(D, dtype=dtype)
    leaves = [xb, yb, cs, ct, w]
    upstream = [torch.randn(B, N, D), torch.randn(B, N, D)]
    results = []
    for fn in (ref.gated_residual_rmsnorm_modulate, ops.gated_residual_rmsnorm_modulate):
        t = [v.detach().clone().requires_grad_() for v in leaves]
        x, y = t[0][..., :D], t[1][:, 1:N + 1]
        kw = {} if fn is ref.gated_residual_rmsnorm_modulate else {"backend": backend}
        outs = fn(x, y, t[3].chunk(6, -1)[2], t[2].chunk(6, -1)[0], t[3].chunk(6, -1)[1], EPS, t[4], **kw)
        sum((o.float() * g).sum() for o, g in zip(outs, upstream)).backward()
        results.append(list(outs) + [v.grad for v in t])
    names = ("h", "out", "dx", "dy", "dshift", "dscale_dgate", "dw")
    for name, k, r in zip(names, results[1], results[0]):
        assert_close(k, r, dtype, reduce=name in ("dshift", "dw"), name=name)


# ---------------------------------------------------------------------------------------------
# The Triton primitives: NaN-poisoned out=, saved statistics, determinism, empty N
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_primitives_write_every_output(seed, dtype):
    B, N, D = 3, 5, 17
    x, y = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    shift, scale, gate = torch.randn(B, 6 * D, dtype=dtype).chunk(6, -1)[:3]
    w = torch.randn(D, dtype=dtype)
    big = poison((B, N + 1, D + 3), dtype)  # a poisoned output that is itself a strided row view
    out = big[:, 1:, 2:D + 2]
    res, rstd = tk.rms_modulate_fwd(x, shift, scale, w, EPS, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert_close(out, ref.rmsnorm_modulate(x, shift, scale, EPS, w), dtype, name="out")
    assert big[:, 0].isnan().all() and big[..., :2].isnan().all() and big[..., D + 2:].isnan().all()
    assert rstd.dtype == torch.float32 and rstd.shape == (B, N)
    assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + EPS), torch.float32, reduce=True, name="rstd")
    h, o, rstd = tk.rms_fused_fwd(x, y, gate, shift, scale, None, EPS, h_out=poison((B, N, D), dtype),
                                  out=poison((B, N, D), dtype))
    h_ref, o_ref = ref.gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, EPS)
    assert torch.equal(h, h_ref), "h must be bit-identical to the reference's rounded residual add"
    assert_close(o, o_ref, dtype, name="fused out")
    assert_close(rstd, torch.rsqrt(h_ref.float().pow(2).mean(-1) + EPS), torch.float32, reduce=True, name="rstd")


def test_backward_reductions_are_deterministic(seed):
    B, N, D = 2, 11, 37
    x, y, dout, dh = (torch.randn(B, N, D) for _ in range(4))
    shift, scale, gate = torch.randn(B, 6 * D).chunk(6, -1)[:3]
    w = torch.randn(D)
    _, rstd = tk.rms_modulate_fwd(x, shift, scale, w, EPS)
    first, second = (tk.rms_modulate_bwd(dout, x, shift, scale, w, rstd) for _ in range(2))
    for name, a, c in zip(("dx", "dshift", "dscale", "dweight"), first, second):
        assert torch.equal(a, c), name
    f1, f2 = (tk.rms_fused_bwd(dh, dout, x, y, gate, shift, scale, w, rstd) for _ in range(2))
    for name, a, c in zip(("dx", "dy", "dgate", "dshift", "dscale", "dweight"), f1, f2):
        assert torch.equal(a, c), name
    assert f1[5].shape == (D,) and f1[3].shape == (B, D) and f1[2].shape == (B, D)


@pytest.mark.parametrize("backend", KERNELS)
def test_empty_token_dim(backend):
    x = torch.randn(2, 0, 8, requires_grad=True)
    c = torch.randn(2, 6 * 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    shift, scale, gate = c.chunk(6, -1)[:3]
    h, out = ops.gated_residual_rmsnorm_modulate(x, x, gate, shift, scale, EPS, w, backend=backend)
    assert h.shape == out.shape == x.shape
    (h.sum() + out.sum()).backward()
    assert torch.equal(c.grad, torch.zeros_like(c)) and torch.equal(w.grad, torch.zeros(8))


# ---------------------------------------------------------------------------------------------
# The reference vs plain float64 loops, and gradcheck
# ---------------------------------------------------------------------------------------------

def _loop(x, y, gate, shift, scale, eps, w, do_residual):
    """Element by element in Python floats: h = x (+ gate * y), out = h / sqrt(mean(h^2) + eps) * w
    * (1 + scale) + shift."""
    B, N, D = x.shape

    def at(m, i, n, d):
        return float(m[i, d]) if m.dim() == 2 else float(m[i, n, d])

    h = [[[0.0] * D for _ in range(N)] for _ in range(B)]
    out = [[[0.0] * D for _ in range(N)] for _ in range(B)]
    for i in range(B):
        for n in range(N):
            row = [float(x[i, n, d]) + (at(gate, i, n, d) * float(y[i, n, d]) if do_residual else 0.0)
                   for d in range(D)]
            h[i][n] = row
            rms = math.sqrt(sum(v * v for v in row) / D + eps)
            for d in range(D):
                z = row[d] / rms * (float(w[d]) if w is not None else 1.0)
                out[i][n][d] = z * (1 + at(scale, i, n, d)) + at(shift, i, n, d)
    return torch.tensor(h, dtype=torch.float64), torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("per_token", (False, True), ids=("per_sample", "per_token"))
@pytest.mark.parametrize("affine", (False, True), ids=("no_weight", "weight"))
def test_reference_vs_float64_loops(seed, affine, per_token):
    B, N, D = 2, 3, 7
    f64 = {"dtype": torch.float64}
    x, y = torch.randn(B, N, D, **f64) * 3 + 1, torch.randn(B, N, D, **f64)
    shape = (B, N, D) if per_token else (B, D)
    gate, shift, scale = (torch.randn(shape, **f64) for _ in range(3))
    w = torch.randn(D, **f64) if affine else None
    _, want = _loop(x, y, gate, shift, scale, EPS, w, False)
    assert_close(ref.rmsnorm_modulate(x, shift, scale, EPS, w), want, torch.float64, name="rms")
    want_h, want = _loop(x, y, gate, shift, scale, EPS, w, True)
    h, out = ref.gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, EPS, w)
    assert_close(h, want_h, torch.float64, name="fused h")
    assert_close(out, want, torch.float64, name="fused out")
    # float32 inputs: the reference's float32 statistic stays within float32's tolerance.
    _, want = _loop(x, y, gate, shift, scale, EPS, w, False)
    out32 = ref.rmsnorm_modulate(x.float(), shift.float(), scale.float(), EPS, None if w is None else w.float())
    assert_close(out32, want, torch.float32, reduce=True, name="rms float32")


def test_reference_gradcheck(seed):
    B, N, D = 2, 3, 4
    x, y, gate, shift, scale, w = (torch.randn(s, dtype=torch.float64, requires_grad=True)
                                   for s in ((B, N, D), (B, N, D), (B, D), (B, N, D), (B, D), (D,)))
    assert torch.autograd.gradcheck(lambda *a: ref.rmsnorm_modulate(a[0], a[1], a[2], EPS, a[3]),
                                     (x, shift, scale, w))
    assert torch.autograd.gradcheck(lambda *a: ref.gated_residual_rmsnorm_modulate(*a[:5], EPS, a[5]),
                                     (x, y, gate, shift, scale, w))


# ---------------------------------------------------------------------------------------------
# Forward mode (JVP)
# ---------------------------------------------------------------------------------------------

def _fns(backend, per_token):
    """(kernel op, reference) pairs over (x, y, mod, w) with mod = adaLN(c) sliced into strided chunks."""
    def rms(f, **kw):
        return lambda x, y, mod, w: f(x, *mod.chunk(6, -1)[:2], EPS, w, **kw)

    def fused(f, **kw):
        return lambda x, y, mod, w: f(x, y, *mod.chunk(6, -1)[2:5], EPS, w, **kw)

    return [("rmsnorm_modulate", rms(ops.rmsnorm_modulate, backend=backend), rms(ref.rmsnorm_modulate)),
            ("gated_residual_rmsnorm_modulate", fused(ops.gated_residual_rmsnorm_modulate, backend=backend),
             fused(ref.gated_residual_rmsnorm_modulate))]


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


@pytest.mark.parametrize("per_token", (False, True), ids=("per_sample", "per_token"))
@pytest.mark.parametrize("backend", ("reference", *KERNELS))
def test_jvp(seed, backend, per_token):
    """torch.func.jvp and dual tensors through the op equal torch's forward AD through the reference
    (1e-5; measured <= 7e-8 in float32) and central differences (fp32 step 1e-2; measured <= 1.5e-4)."""
    B, N, D = 2, 5, 19
    primals = (torch.randn(B, N, D), torch.randn(B, N, D),
               torch.randn((B, N, 6 * D) if per_token else (B, 6 * D)), 1 + 0.3 * torch.randn(D))
    tangents = tuple(torch.randn_like(p) for p in primals)
    for name, f, f_ref in _fns(backend, per_token):
        _, tan = torch.func.jvp(f, primals, tangents)
        _, ref_tan = torch.func.jvp(f_ref, primals, tangents)
        with fwAD.dual_level():
            duals = _tuple(f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]))
            dual_tan = tuple(fwAD.unpack_dual(o).tangent for o in duals)
        h = 1e-2
        hi = _tuple(f(*[p + h * t for p, t in zip(primals, tangents)]))
        lo = _tuple(f(*[p - h * t for p, t in zip(primals, tangents)]))
        for i, (t, r, d, a, b) in enumerate(zip(_tuple(tan), _tuple(ref_tan), dual_tan, hi, lo)):
            assert r.abs().max() > 0 and t.shape == r.shape and t.dtype == r.dtype
            fd = (a.double() - b.double()) / (2 * h)
            errs = rel_err(t, r), rel_err(d, r), rel_err(t, fd)
            print(f"{name}[{i}] {backend}: vs reference {errs[0]:.1e}, dual {errs[1]:.1e}, vs FD {errs[2]:.1e}")
            assert errs[0] <= 1e-5 and errs[1] <= 1e-5, (name, i, errs)
            assert errs[2] <= 1e-3, (name, i, errs)


def test_reference_jvp_formulas_float64(seed):
    """The analytic tangents (what the kernel backends' forward-mode rules return) equal torch's
    forward AD through the reference in float64, weight with and without tangent."""
    B, N, D = 2, 3, 6
    f64 = {"dtype": torch.float64}
    x, y, dx, dy = (torch.randn(B, N, D, **f64) for _ in range(4))
    gate, shift, scale, dg, dsh, dsc = (torch.randn(B, N, D, **f64) for _ in range(6))
    w, dw = torch.randn(D, **f64), torch.randn(D, **f64)
    _, want = torch.func.jvp(lambda *a: ref.rmsnorm_modulate(a[0], a[1], a[2], EPS, a[3]),
                             (x, shift, scale, w), (dx, dsh, dsc, dw))
    assert_close(ref.rmsnorm_modulate_jvp(x, shift, scale, EPS, w, dx, dsh, dsc, dw), want, torch.float64)
    _, want = torch.func.jvp(lambda *a: ref.rmsnorm_modulate(*a, EPS), (x, shift, scale), (dx, dsh, dsc))
    assert_close(ref.rmsnorm_modulate_jvp(x, shift, scale, EPS, None, dx, dsh, dsc), want, torch.float64)
    _, want = torch.func.jvp(lambda *a: ref.gated_residual_rmsnorm_modulate(*a[:5], EPS, a[5]),
                             (x, y, gate[:, 0], shift, scale, w), (dx, dy, dg[:, 0], dsh, dsc, dw))
    got = ref.gated_residual_rmsnorm_modulate_jvp(x, y, gate[:, 0], shift, scale, EPS, w, dx, dy, dg[:, 0], dsh,
                                                  dsc, dw)
    for g, r in zip(got, want):
        assert_close(g, r, torch.float64)


def test_jacfwd_through_kernel(seed):
    """jacfwd (forward mode under vmap) through the Triton op equals the reference's Jacobian."""
    B, N, D = 1, 2, 5
    x, c, w = torch.randn(B, N, D), torch.randn(B, 6 * D), torch.randn(D)
    f = lambda x, op, **kw: op(x, *c.chunk(6, -1)[:2], EPS, w, **kw)
    jac = torch.func.jacfwd(lambda x: f(x, ops.rmsnorm_modulate, backend="triton"))(x)
    want = torch.func.jacfwd(lambda x: f(x, ref.rmsnorm_modulate))(x)
    assert_close(jac, want, torch.float32, reduce=True, name="jacobian")


# ---------------------------------------------------------------------------------------------
# The extension's C++ CPU path: its primitives and raw ops
# ---------------------------------------------------------------------------------------------

@_NO_EXT
@pytest.mark.parametrize("per_token", (False, True), ids=("per_sample", "per_token"))
def test_ext_matches_triton_and_float64(seed, per_token):
    """The extension's primitives (C++ loops on the CPU, the CUDA kernels on a GPU: one shared
    arithmetic) vs the Triton kernels, backward included, and float64 input through the extension
    (it accumulates in float32: fp32's tolerance)."""
    from effkernels._ext import rmsnorm as xk

    B, N, D = 2, 37, 19  # 37 tokens: two row chunks of 32 per sample in the partial sums
    x, y, dout, dh = (torch.randn(B, N, D) for _ in range(4))
    shift, scale, gate = torch.randn((B, N, 6 * D) if per_token else (B, 6 * D)).chunk(6, -1)[:3]
    w = torch.randn(D)
    out, rstd = xk.rms_modulate_fwd(x, shift, scale, w, EPS, out=poison((B, N, D), torch.float32))
    t_out, t_rstd = tk.rms_modulate_fwd(x, shift, scale, w, EPS)
    assert_close(out, t_out, torch.float32, name="out")
    assert_close(rstd, t_rstd, torch.float32, name="rstd")
    for name, a, b in zip(("dx", "dshift", "dscale", "dweight"), xk.rms_modulate_bwd(dout, x, shift, scale, w, rstd),
                          tk.rms_modulate_bwd(dout, x, shift, scale, w, rstd)):
        assert_close(a, b, torch.float32, reduce=True, name=name)
    h, out, rstd = xk.rms_fused_fwd(x, y, gate, shift, scale, None, EPS)
    th, t_out, _ = tk.rms_fused_fwd(x, y, gate, shift, scale, None, EPS)
    assert torch.equal(h, th)
    assert_close(out, t_out, torch.float32, name="fused out")
    got = xk.rms_fused_bwd(dh, dout, h, y, gate, shift, scale, None, rstd)
    want = tk.rms_fused_bwd(dh, dout, h, y, gate, shift, scale, None, rstd)
    assert got[5] is None and want[5] is None
    for name, a, b in zip(("dx", "dy", "dgate", "dshift", "dscale"), got, want):
        assert_close(a, b, torch.float32, reduce=True, name=f"fused {name}")
    again = xk.rms_fused_bwd(dh, dout, h, y, gate, shift, scale, None, rstd)
    assert all(torch.equal(a, b) for a, b in zip(got[:5], again[:5])), "the extension's backward must be deterministic"
    x64, s64, c64, w64 = x.double(), shift.double(), scale.double(), w.double()
    got = ops.rmsnorm_modulate(x64, s64, c64, EPS, w64, backend=EXT)
    assert got.dtype == torch.float64
    assert_close(got, ref.rmsnorm_modulate(x64, s64, c64, EPS, w64), torch.float32, name="float64 via the extension")


def _raw_cases():
    B, N, D = 2, 5, 12
    r = torch.randn
    ch = r(B, 6 * D).chunk(6, dim=-1)
    x, y, dout, dh, w = r(B, N, D), r(B, N, D), r(B, N, D), r(B, N, D), r(D)
    C = torch.ops.effkernels_C
    _, rstd = C.rms_modulate_fwd(x, ch[0], ch[1], w, EPS)
    h, _, hr = C.rms_fused_fwd(x, y, ch[2], ch[0], ch[1], None, EPS)
    return {
        "rms_modulate_fwd": [(x, r(B, D), r(B, N, D), None, EPS), (x, ch[0], ch[1], w, 1e-5)],
        "rms_modulate_fwd_out": [(x, ch[0], ch[1], None, EPS, torch.empty(B, N, D))],
        "rms_modulate_bwd": [(dout, x, ch[0], ch[1], w, rstd), (dout, x, ch[0], r(B, N, D), None, rstd)],
        "rms_fused_fwd": [(x, y, r(B, D), r(B, D), r(B, N, D), w, EPS)],
        "rms_fused_bwd": [(dh, dout, h, y, ch[2], ch[0], ch[1], None, hr), (dh, dout, h, y, r(B, N, D), ch[0], ch[1], w, hr)],
    }


@_NO_EXT
def test_raw_ops_opcheck(seed):
    """Schema, fake kernel and dispatch of every raw effkernels_C rms op; none has autograd of its own."""
    cases = _raw_cases()
    assert set(cases) == set(_ext.RMSNORM_OPS)
    for name, arg_sets in cases.items():
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"effkernels_C::{name}", "Autograd"), name
        for args in arg_sets:
            torch.library.opcheck(getattr(torch.ops.effkernels_C, name).default, args)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _valid(dtype=torch.float32):
    B, N, D = 2, 3, 4
    return {"x": torch.randn(B, N, D, dtype=dtype), "y": torch.randn(B, N, D, dtype=dtype),
            "gate": torch.randn(B, D, dtype=dtype), "shift": torch.randn(B, D, dtype=dtype),
            "scale": torch.randn(B, N, D, dtype=dtype), "weight": torch.randn(D, dtype=dtype)}


_BAD = [
    ("x", lambda a: a["x"][0], ValueError),                                       # wrong rank
    ("x", lambda a: a["x"].tolist(), TypeError),                                  # not a tensor
    ("x", lambda a: a["x"].to(torch.int32), TypeError),                           # not floating
    ("x", lambda a: a["x"].transpose(1, 2), ValueError),                          # non-unit last stride
    ("shift", lambda a: a["shift"][:, :3], ValueError),                           # wrong D
    ("shift", lambda a: a["shift"][:1], ValueError),                              # wrong B
    ("shift", lambda a: torch.randn(2, 4, 2)[..., 0], ValueError),                # non-unit last stride
    ("shift", lambda a: a["shift"].half(), TypeError),                            # dtype mismatch
    ("shift", lambda a: a["shift"].to("meta"), ValueError),                       # device mismatch
    ("scale", lambda a: torch.randn(2, 4, 3, 4)[:, :, 0], ValueError),            # per-token, wrong N
    ("gate", lambda a: a["gate"][:, :2], ValueError),
    ("gate", lambda a: a["gate"].double(), TypeError),
    ("y", lambda a: a["y"][:, :2], ValueError),
    ("weight", lambda a: a["weight"][:3], ValueError),                            # wrong size
    ("weight", lambda a: a["weight"][None], ValueError),                          # wrong rank
    ("weight", lambda a: a["weight"].half(), TypeError),
]


@pytest.mark.parametrize("arg,bad,exc", _BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(_BAD)])
def test_validation_errors(arg, bad, exc):
    a = _valid()
    a[arg] = bad(_valid())
    calls = [lambda: ops.rmsnorm_modulate(a["x"], a["shift"], a["scale"], EPS, a["weight"], backend="triton"),
             lambda: ops.gated_residual_rmsnorm_modulate(a["x"], a["y"], a["gate"], a["shift"], a["scale"], EPS,
                                                         a["weight"], backend="triton")]
    for i in ((1,) if arg in ("y", "gate") else (0, 1)):
        with pytest.raises(exc, match=arg):
            calls[i]()


@pytest.mark.parametrize("eps", (0.0, -1e-5, float("nan"), True, "1e-5", None))
def test_validation_eps(eps):
    a = _valid()
    with pytest.raises(ValueError, match="eps"):
        ops.rmsnorm_modulate(a["x"], a["shift"], a["scale"], eps, backend="triton")
    with pytest.raises(ValueError, match="eps"):
        ops.gated_residual_rmsnorm_modulate(a["x"], a["y"], a["gate"], a["shift"], a["scale"], eps, backend="triton")


def test_triton_primitive_errors():
    a = _valid(torch.float64)
    with pytest.raises(TypeError, match="x"):
        ops.rmsnorm_modulate(a["x"], a["shift"], a["scale"], backend="triton")
    with pytest.raises(ValueError, match="8192"):
        tk.rms_modulate_fwd(torch.randn(1, 1, 8193), torch.randn(1, 8193), torch.randn(1, 8193), None, EPS)
    a = _valid()
    with pytest.raises(ValueError, match="out"):
        tk.rms_modulate_fwd(a["x"], a["shift"], a["scale"], None, EPS, out=torch.empty(2, 3, 5))
    with pytest.raises(ValueError, match="h_out"):
        tk.rms_fused_fwd(a["x"], a["y"], a["gate"], a["shift"], a["scale"], None, EPS,
                         h_out=torch.empty(4, 3, 2).transpose(0, 2))
    _, rstd = tk.rms_modulate_fwd(a["x"], a["shift"], a["scale"], None, EPS)
    with pytest.raises(ValueError, match="rstd"):
        tk.rms_modulate_bwd(a["x"], a["x"], a["shift"], a["scale"], None, rstd.double())
    with pytest.raises(ValueError, match="dout"):
        tk.rms_modulate_bwd(a["x"][:, :2], a["x"], a["shift"], a["scale"], None, rstd)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(seed, backend):
    B, N, D = 2, 3, 5
    x, y = torch.randn(B, N, D, requires_grad=True), torch.randn(B, N, D, requires_grad=True)
    c = torch.randn(B, 6 * D, requires_grad=True)
    shift, scale, gate = c.chunk(6, -1)[:3]
    ct = torch.randn(B, N, 3 * D)
    w = torch.randn(D, requires_grad=True)
    lib = torch.ops.effkernels
    torch.library.opcheck(lib.rmsnorm_modulate.default, (x, ct.chunk(3, -1)[0], scale, w, EPS, backend))
    _, rstd = tk.rms_modulate_fwd(x.detach(), shift.detach(), scale.detach(), w.detach(), EPS)
    dout = torch.randn(B, N, D)
    torch.library.opcheck(lib.rmsnorm_modulate_backward.default,
                          (dout, x.detach(), shift.detach(), scale.detach(), w.detach(), rstd, backend))
    torch.library.opcheck(lib.gated_residual_rmsnorm_modulate.default, (x, y, gate, shift, scale, None, EPS, backend))
    h, _, rstd = tk.rms_fused_fwd(x.detach(), y.detach(), gate.detach(), shift.detach(), scale.detach(), None, EPS)
    torch.library.opcheck(lib.gated_residual_rmsnorm_modulate_backward.default,
                          (torch.randn(B, N, D), dout, h, y.detach(), gate.detach(), *ct.chunk(3, -1)[:2], None,
                           rstd, backend))


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_compile_fullgraph_keeps_ops(seed):
    B, N, D = 2, 3, 6

    def step(x, y, c, w):
        shift, scale, gate = c.chunk(6, -1)[:3]
        out = ops.rmsnorm_modulate(x, shift, scale, EPS, w, backend="triton")
        h, out2 = ops.gated_residual_rmsnorm_modulate(out, y, gate, shift, scale, EPS, backend="triton")
        return h.sum() + (out2 * out2).sum()

    names = ("rmsnorm_modulate", "gated_residual_rmsnorm_modulate")
    check_compile_keeps_ops(step, (torch.randn(B, N, D), torch.randn(B, N, D), torch.randn(B, 6 * D), torch.randn(D)),
                            names, [f"{n}_backward" for n in names])
