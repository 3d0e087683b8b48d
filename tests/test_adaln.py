"""adaLN family: Triton kernels vs the reference (forward and every input's gradient), the reference
vs plain float64 loops and gradcheck, the primitives with NaN-poisoned outputs, every validation
error, opcheck, torch.compile graph capture and deterministic backward reductions."""
import math

import pytest
import torch

from effkernels import ops
from effkernels._triton import adaln as tk
from effkernels.reference import adaln as ref
from helpers import assert_close, poison
from norm_cases import DTYPES, NAMES, SHAPES, bc as _bc, cases, check, check_compile_keeps_ops, leaves
from norm_cases import mods as _mods

EPS = 1e-5


def _leaves(B, N, D, dtype, per_token, affine):
    return leaves(B, N, D, dtype, per_token, affine, bias=True)


def _same_dtype_ln(x, shift, scale, eps, w=None, b=None):
    """The LayerNorm + modulate done by PyTorch in x's own (16-bit) dtype: the error yardstick."""
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    h = xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    if w is not None:
        h = h * w
    if b is not None:
        h = h + b
    return h * (1 + _bc(scale)) + _bc(shift)


def _impls(op, eps=EPS):
    """(kernel, reference, same-dtype) callables (t: tracked leaves) -> tuple of outputs."""
    def args(t):
        m = _mods(t)
        return m, t.get("w"), t.get("b")

    if op == "ln":
        def kern(t):
            m, w, b = args(t)
            return (ops.modulate_layernorm(t["x"], m["shift"], m["scale"], eps, w, b, backend="triton"),)

        def refer(t):
            m, w, b = args(t)
            return (ref.modulate_layernorm(t["x"], m["shift"], m["scale"], eps, w, b),)

        def same(t):
            m, w, b = args(t)
            return (_same_dtype_ln(t["x"], m["shift"], m["scale"], eps, w, b),)
    elif op == "gr":
        def kern(t):
            return (ops.gated_residual(t["x"], t["y"], _mods(t)["gate"], backend="triton"),)

        def refer(t):
            return (ref.gated_residual(t["x"], t["y"], _mods(t)["gate"]),)

        def same(t):
            return (t["x"] + _bc(_mods(t)["gate"]) * t["y"],)
    else:
        def kern(t):
            m, w, b = args(t)
            return ops.gated_residual_modulate_layernorm(t["x"], t["y"], m["gate"], m["shift"], m["scale"], eps,
                                                         w, b, backend="triton")

        def refer(t):
            m, w, b = args(t)
            return ref.gated_residual_modulate_layernorm(t["x"], t["y"], m["gate"], m["shift"], m["scale"], eps,
                                                         w, b)

        def same(t):
            m, w, b = args(t)
            h = t["x"] + _bc(m["gate"]) * t["y"]
            return h, _same_dtype_ln(h, m["shift"], m["scale"], eps, w, b)
    return kern, refer, same


_INPUTS = {"ln": ("x", "shift", "scale", "w", "b"), "gr": ("x", "y", "gate"),
           "fused": ("x", "y", "gate", "shift", "scale", "w", "b")}


def _used(op, lv):
    """The inputs op takes whose gradients are compared (w/b only when the case has them)."""
    return [k for k in _INPUTS[op] if k in lv or k in NAMES]


def _check_op(op, lv, dtype, per_token, eps=EPS):
    check(_impls(op, eps), op, lv, dtype, per_token, _used(op, lv), 2 if op == "fused" else 1)


# ---------------------------------------------------------------------------------------------
# Kernel vs reference through effkernels.ops (forward + every input's gradient)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_token,affine,dtype,shape", cases("affine"))
@pytest.mark.parametrize("op", ("ln", "fused"))
def test_ln_ops_match_reference(seed, op, affine, per_token, dtype, shape):
    # With D = 1 the normalised row is 0 and so is d(x); the reference's autograd gets that 0 as a
    # difference of rstd-scaled terms, float32 noise ~ rstd * ulp, which a larger eps keeps small.
    eps = 0.1 if shape[-1] == 1 else EPS
    _check_op(op, _leaves(*shape, dtype, per_token, affine), dtype, per_token, eps)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_token", (False, True), ids=("per_sample", "per_token"))
def test_gated_residual_matches_reference(seed, per_token, dtype, shape):
    _check_op("gr", _leaves(*shape, dtype, per_token, False), dtype, per_token)


@pytest.mark.parametrize("which", ("w", "b"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("op", ("ln", "fused"))
def test_lone_weight_or_bias(seed, op, dtype, which):
    lv = _leaves(2, 5, 33, dtype, False, True)
    del lv["b" if which == "w" else "w"]
    _check_op(op, lv, dtype, False)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_mixed_modulation_and_strided_x(seed, dtype):
    """shift per sample, scale and gate per token; x and y are non-contiguous row views."""
    B, N, D = 2, 5, 19
    xb, yb = torch.randn(B, N, 2 * D, dtype=dtype), torch.randn(B, N + 2, D, dtype=dtype)
    cs, ct = torch.randn(B, 6 * D, dtype=dtype), torch.randn(B, N, 6 * D, dtype=dtype)
    w, b = torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype)
    leaves = [xb, yb, cs, ct, w, b]
    upstream = [torch.randn(B, N, D), torch.randn(B, N, D)]
    results = []
    for fn in (ref.gated_residual_modulate_layernorm, ops.gated_residual_modulate_layernorm):
        t = [v.detach().clone().requires_grad_() for v in leaves]
        x, y = t[0][..., :D], t[1][:, 1:N + 1]
        kw = {} if fn is ref.gated_residual_modulate_layernorm else {"backend": "triton"}
        outs = fn(x, y, t[3].chunk(6, -1)[2], t[2].chunk(6, -1)[0], t[3].chunk(6, -1)[1], EPS, t[4], t[5], **kw)
        sum((o.float() * g).sum() for o, g in zip(outs, upstream)).backward()
        results.append(list(outs) + [v.grad for v in t])
    names = ("h", "out", "dx", "dy", "dshift", "dscale_dgate", "dw", "db")
    for name, k, r in zip(names, results[1], results[0]):
        assert_close(k, r, dtype, reduce=name in ("dshift", "dw", "db"), name=name)


# ---------------------------------------------------------------------------------------------
# The primitives: NaN-poisoned out=, saved statistics, determinism
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ((3, 5, 17), (2, 3, 1000)), ids=lambda s: "x".join(map(str, s)))
def test_primitives_write_every_output(seed, shape, dtype):
    B, N, D = shape
    x, y = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    shift, scale, gate = torch.randn(B, 6 * D, dtype=dtype).chunk(6, -1)[:3]
    w, b = torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype)
    # A poisoned output that is itself a strided row view: the kernels must use its strides.
    big = poison((B, N + 1, D + 3), dtype)
    out = big[:, 1:, 2:D + 2]
    res, mean, rstd = tk.ln_modulate_fwd(x, shift, scale, w, b, EPS, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert_close(out, ref.modulate_layernorm(x, shift, scale, EPS, w, b), dtype, name="ln out")
    assert big[:, 0].isnan().all() and big[..., :2].isnan().all() and big[..., D + 2:].isnan().all()
    xf = x.float()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (B, N)
    assert_close(mean, xf.mean(-1), torch.float32, reduce=True, name="mean")
    assert_close(rstd, torch.rsqrt(xf.var(-1, unbiased=False) + EPS), torch.float32, reduce=True, name="rstd")

    o = tk.gated_residual_fwd(x, y, gate, out=poison((B, N, D), dtype))
    assert_close(o, ref.gated_residual(x, y, gate), dtype, name="gated_residual out")

    h, o, mean, rstd = tk.fused_fwd(x, y, gate, shift, scale, None, None, EPS, h_out=poison((B, N, D), dtype),
                                    out=poison((B, N, D), dtype))
    h_ref, o_ref = ref.gated_residual_modulate_layernorm(x, y, gate, shift, scale, EPS)
    assert torch.equal(h, h_ref), "h must be bit-identical to the reference's rounded residual add"
    assert_close(o, o_ref, dtype, name="fused out")
    assert_close(mean, h_ref.float().mean(-1), torch.float32, reduce=True, name="fused mean")


def test_backward_reductions_are_deterministic(seed):
    B, N, D = 2, 11, 37
    x, y, dout, dh = (torch.randn(B, N, D) for _ in range(4))
    shift, scale, gate = torch.randn(B, 6 * D).chunk(6, -1)[:3]
    w, b = torch.randn(D), torch.randn(D)
    _, mean, rstd = tk.ln_modulate_fwd(x, shift, scale, w, b, EPS)
    first = tk.ln_modulate_bwd(dout, x, shift, scale, w, b, mean, rstd)
    second = tk.ln_modulate_bwd(dout, x, shift, scale, w, b, mean, rstd)
    for name, a, c in zip(("dx", "dshift", "dscale", "dweight", "dbias"), first, second):
        assert torch.equal(a, c), name
    f1 = tk.fused_bwd(dh, dout, x, y, gate, shift, scale, w, b, mean, rstd)
    f2 = tk.fused_bwd(dh, dout, x, y, gate, shift, scale, w, b, mean, rstd)
    for name, a, c in zip(("dx", "dy", "dgate", "dshift", "dscale", "dweight", "dbias"), f1, f2):
        assert torch.equal(a, c), name
    g1, g2 = tk.gated_residual_bwd(dout, y, gate), tk.gated_residual_bwd(dout, y, gate)
    assert torch.equal(g1[1], g2[1])
    assert f1[5].shape == (D,) and f1[3].shape == (B, D) and first[3].dtype == torch.float32


def test_empty_token_dim(seed):
    x = torch.randn(2, 0, 8)
    shift, scale = torch.randn(2, 8), torch.randn(2, 8)
    out, mean, rstd = tk.ln_modulate_fwd(x, shift, scale, None, None, EPS)
    assert out.shape == x.shape and mean.shape == (2, 0)
    dx, dshift, dscale, dw, db = tk.ln_modulate_bwd(torch.randn(2, 0, 8), x, shift, scale, torch.ones(8), None,
                                                    mean, rstd)
    assert dx.shape == x.shape and torch.equal(dshift, torch.zeros(2, 8)) and torch.equal(dw, torch.zeros(8))
    assert db is None


# ---------------------------------------------------------------------------------------------
# The reference vs plain float64 loops, and gradcheck
# ---------------------------------------------------------------------------------------------

def _loop_fused(x, y, gate, shift, scale, eps, w, b, do_residual, do_ln):
    """Element-by-element float64 in Python floats: h = x + gate * y, then LN(h) * (1 + scale) + shift."""
    B, N, D = x.shape
    xs, ys = x.double().tolist(), y.double().tolist()

    def at(m, i, n, d):
        m = m.double()
        return float(m[i, d]) if m.dim() == 2 else float(m[i, n, d])

    h = [[[0.0] * D for _ in range(N)] for _ in range(B)]
    out = [[[0.0] * D for _ in range(N)] for _ in range(B)]
    for i in range(B):
        for n in range(N):
            row = [xs[i][n][d] + (at(gate, i, n, d) * ys[i][n][d] if do_residual else 0.0) for d in range(D)]
            h[i][n] = row
            if not do_ln:
                continue
            mu = sum(row) / D
            var = sum((v - mu) ** 2 for v in row) / D
            for d in range(D):
                z = (row[d] - mu) / math.sqrt(var + eps)
                z = z * (float(w[d]) if w is not None else 1.0) + (float(b[d]) if b is not None else 0.0)
                out[i][n][d] = z * (1 + at(scale, i, n, d)) + at(shift, i, n, d)
    return torch.tensor(h, dtype=torch.float64), torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("per_token", (False, True), ids=("per_sample", "per_token"))
@pytest.mark.parametrize("affine", (False, True), ids=("no_affine", "affine"))
def test_reference_vs_float64_loops(seed, affine, per_token):
    B, N, D = 2, 3, 7
    f64 = dict(dtype=torch.float64)
    x, y = torch.randn(B, N, D, **f64) * 3 + 1, torch.randn(B, N, D, **f64)
    shape = (B, N, D) if per_token else (B, D)
    gate, shift, scale = (torch.randn(shape, **f64) for _ in range(3))
    w, b = (torch.randn(D, **f64), torch.randn(D, **f64)) if affine else (None, None)
    _, want = _loop_fused(x, y, gate, shift, scale, EPS, w, b, False, True)
    assert_close(ref.modulate_layernorm(x, shift, scale, EPS, w, b), want, torch.float64, name="ln")
    want_h, _ = _loop_fused(x, y, gate, shift, scale, EPS, w, b, True, False)
    assert_close(ref.gated_residual(x, y, gate), want_h, torch.float64, name="gated_residual")
    want_h, want = _loop_fused(x, y, gate, shift, scale, EPS, w, b, True, True)
    h, out = ref.gated_residual_modulate_layernorm(x, y, gate, shift, scale, EPS, w, b)
    assert_close(h, want_h, torch.float64, name="fused h")
    assert_close(out, want, torch.float64, name="fused out")
    # float32 inputs: the reference's float32 statistics stay within float32's tolerance.
    out32 = ref.modulate_layernorm(x.float(), shift.float(), scale.float(), EPS,
                                   *(None if t is None else t.float() for t in (w, b)))
    _, want = _loop_fused(x, y, gate, shift, scale, EPS, w, b, False, True)
    assert_close(out32, want, torch.float32, reduce=True, name="ln float32")


def test_reference_gradcheck(seed):
    B, N, D = 2, 3, 4
    t = [torch.randn(s, dtype=torch.float64, requires_grad=True)
         for s in ((B, N, D), (B, N, D), (B, D), (B, N, D), (B, D), (D,), (D,))]
    x, y, gate, shift, scale, w, b = t
    assert torch.autograd.gradcheck(lambda *a: ref.modulate_layernorm(a[0], a[1], a[2], EPS, a[3], a[4]),
                                     (x, shift, scale, w, b))
    assert torch.autograd.gradcheck(ref.gated_residual, (x, y, gate))
    assert torch.autograd.gradcheck(
        lambda *a: ref.gated_residual_modulate_layernorm(*a[:5], EPS, a[5], a[6]), (x, y, gate, shift, scale, w, b))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _valid(dtype=torch.float32):
    B, N, D = 2, 3, 4
    return dict(x=torch.randn(B, N, D, dtype=dtype), y=torch.randn(B, N, D, dtype=dtype),
                gate=torch.randn(B, D, dtype=dtype), shift=torch.randn(B, D, dtype=dtype),
                scale=torch.randn(B, N, D, dtype=dtype), weight=torch.randn(D, dtype=dtype),
                bias=torch.randn(D, dtype=dtype))


def _call_all(a, eps=EPS):
    ops.modulate_layernorm(a["x"], a["shift"], a["scale"], eps, a["weight"], a["bias"], backend="triton")
    ops.gated_residual(a["x"], a["y"], a["gate"], backend="triton")
    ops.gated_residual_modulate_layernorm(a["x"], a["y"], a["gate"], a["shift"], a["scale"], eps, a["weight"],
                                          a["bias"], backend="triton")


_BAD = [
    ("x", lambda a: a["x"][0], ValueError),                                       # wrong rank
    ("x", lambda a: a["x"].tolist(), TypeError),                                  # not a tensor
    ("x", lambda a: a["x"].to(torch.int32), TypeError),                           # not floating
    ("x", lambda a: a["x"].transpose(1, 2), ValueError),                          # non-unit last stride
    ("shift", lambda a: a["shift"][:, :3], ValueError),                           # wrong D
    ("shift", lambda a: a["shift"][:1], ValueError),                              # wrong B
    ("shift", lambda a: a["shift"][None], ValueError),                            # wrong rank
    ("shift", lambda a: torch.randn(2, 4, 2)[..., 0], ValueError),                # non-unit last stride
    ("shift", lambda a: a["shift"].half(), TypeError),                            # dtype mismatch
    ("shift", lambda a: a["shift"].to("meta"), ValueError),                       # device mismatch
    ("scale", lambda a: torch.randn(2, 4, 3, 4)[:, :, 0], ValueError),            # per-token, wrong N
    ("scale", lambda a: torch.randn(2, 3, 8)[..., ::2], ValueError),              # per-token, strided D
    ("gate", lambda a: a["gate"][:, :2], ValueError),
    ("gate", lambda a: a["gate"].double(), TypeError),
    ("y", lambda a: a["y"][:, :2], ValueError),
    ("y", lambda a: a["y"].to("meta"), ValueError),
    ("weight", lambda a: a["weight"][:3], ValueError),                            # wrong size
    ("weight", lambda a: a["weight"][None], ValueError),                          # wrong rank
    ("weight", lambda a: a["weight"].half(), TypeError),
    ("bias", lambda a: torch.randn(5), ValueError),
]


@pytest.mark.parametrize("arg,bad,exc", _BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(_BAD)])
def test_validation_errors(arg, bad, exc):
    a = _valid()
    a[arg] = bad(_valid())
    calls = [lambda: ops.modulate_layernorm(a["x"], a["shift"], a["scale"], EPS, a["weight"], a["bias"],
                                            backend="triton"),
             lambda: ops.gated_residual(a["x"], a["y"], a["gate"], backend="triton"),
             lambda: ops.gated_residual_modulate_layernorm(a["x"], a["y"], a["gate"], a["shift"], a["scale"], EPS,
                                                           a["weight"], a["bias"], backend="triton")]
    used = {"x": (0, 1, 2), "y": (1, 2), "gate": (1, 2), "shift": (0, 2), "scale": (0, 2), "weight": (0, 2),
            "bias": (0, 2)}[arg]
    for i in used:
        with pytest.raises(exc, match=arg):
            calls[i]()


@pytest.mark.parametrize("eps", (0.0, -1e-5, float("inf"), float("nan"), True, "1e-5", None))
def test_validation_eps(eps):
    for fn in (lambda a: ops.modulate_layernorm(a["x"], a["shift"], a["scale"], eps, backend="triton"),
               lambda a: ops.gated_residual_modulate_layernorm(a["x"], a["y"], a["gate"], a["shift"], a["scale"],
                                                               eps, backend="triton")):
        with pytest.raises(ValueError, match="eps"):
            fn(_valid())


def test_triton_primitive_errors():
    a = _valid(torch.float64)
    with pytest.raises(TypeError, match="x"):
        ops.modulate_layernorm(a["x"], a["shift"], a["scale"], backend="triton")
    with pytest.raises(ValueError, match="8192"):
        tk.gated_residual_fwd(torch.randn(1, 1, 8193), torch.randn(1, 1, 8193), torch.randn(1, 8193))
    a = _valid()
    with pytest.raises(ValueError, match="out"):
        tk.ln_modulate_fwd(a["x"], a["shift"], a["scale"], None, None, EPS, out=torch.empty(2, 3, 5))
    with pytest.raises(ValueError, match="out"):
        tk.gated_residual_fwd(a["x"], a["y"], a["gate"], out=torch.empty(2, 3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="h_out"):
        tk.fused_fwd(a["x"], a["y"], a["gate"], a["shift"], a["scale"], None, None, EPS,
                     h_out=torch.empty(4, 3, 2).transpose(0, 2))
    _, mean, rstd = tk.ln_modulate_fwd(a["x"], a["shift"], a["scale"], None, None, EPS)
    with pytest.raises(ValueError, match="mean"):
        tk.ln_modulate_bwd(a["x"], a["x"], a["shift"], a["scale"], None, None, mean.double(), rstd)
    with pytest.raises(ValueError, match="dout"):
        tk.ln_modulate_bwd(a["x"][:, :2], a["x"], a["shift"], a["scale"], None, None, mean, rstd)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------

def test_opcheck(seed):
    B, N, D = 2, 3, 5
    x, y = torch.randn(B, N, D, requires_grad=True), torch.randn(B, N, D, requires_grad=True)
    c = torch.randn(B, 6 * D, requires_grad=True)
    shift, scale, gate = c.chunk(6, -1)[:3]
    ct = torch.randn(B, N, 3 * D)
    w, b = torch.randn(D, requires_grad=True), torch.randn(D, requires_grad=True)
    lib = torch.ops.effkernels
    torch.library.opcheck(lib.modulate_layernorm.default, (x, ct.chunk(3, -1)[0], scale, w, b, EPS, "triton"))
    _, mean, rstd = tk.ln_modulate_fwd(x.detach(), shift.detach(), scale.detach(), w.detach(), b.detach(), EPS)
    dout = torch.randn(B, N, D)
    torch.library.opcheck(lib.modulate_layernorm_backward.default,
                          (dout, x.detach(), shift.detach(), scale.detach(), w.detach(), None, mean, rstd, "triton"))
    torch.library.opcheck(lib.gated_residual.default, (x, y, gate, "triton"))
    torch.library.opcheck(lib.gated_residual_backward.default, (dout, y.detach(), ct.chunk(3, -1)[2], "triton"))
    torch.library.opcheck(lib.gated_residual_modulate_layernorm.default,
                          (x, y, gate, shift, scale, None, b, EPS, "triton"))
    h, _, mean, rstd = tk.fused_fwd(x.detach(), y.detach(), gate.detach(), shift.detach(), scale.detach(), None,
                                    None, EPS)
    torch.library.opcheck(lib.gated_residual_modulate_layernorm_backward.default,
                          (torch.randn(B, N, D), dout, h, y.detach(), gate.detach(), *ct.chunk(3, -1)[:2], None,
                           None, mean, rstd, "triton"))


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_compile_fullgraph_keeps_ops(seed):
    B, N, D = 2, 3, 6

    def step(x, y, c, w):
        shift, scale, gate = c.chunk(6, -1)[:3]
        h = ops.gated_residual(x, y, gate, backend="triton")
        out = ops.modulate_layernorm(h, shift, scale, EPS, w, None, backend="triton")
        h2, out2 = ops.gated_residual_modulate_layernorm(h, out, gate, shift, scale, EPS, backend="triton")
        return (h2.sum() + (out2 * out2).sum())

    names = ("gated_residual", "modulate_layernorm", "gated_residual_modulate_layernorm")
    check_compile_keeps_ops(step, (torch.randn(B, N, D), torch.randn(B, N, D), torch.randn(B, 6 * D), torch.randn(D)),
                            names, [f"{n}_backward" for n in names])
