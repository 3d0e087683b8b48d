"""SwiGLU, silu(a) * b: the kernel backends vs the reference (forward, both gradients, the gradient
of the projection whose halves a and b are), the reference vs a plain float64 loop and gradcheck,
the primitives with NaN-poisoned strided outputs, forward-mode AD, every validation error, opcheck
and torch.compile graph capture."""
import math

import pytest
import torch
from helpers import assert_close, poison, rel_err

import effkernels
from effkernels import ops
from effkernels._triton import swiglu as tk
from effkernels.reference import swiglu as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd and non-power-of-two; H = 1500 spans two column programs; (5, 3) is a 2-D (R, H) input and
# (2, 2, 3, 9) a 4-D one.
SHAPES = ((2, 7, 17), (1, 5, 384), (3, 3, 1500), (5, 3), (2, 2, 3, 9), (4, 1))
CPU = torch.device("cpu")


_EXT = effkernels.backends.available("cpp", CPU)[0]
if _EXT:
    from effkernels._ext import swiglu as xswiglu


def _backends():
    return ["triton", "cpp"] if _EXT else ["triton"]


def _sid(s):
    return "x".join(map(str, s))


def _proj(shape, dtype):
    """A (..., 2H) projection; a and b are its two halves (strided views, row stride 2H)."""
    return (torch.randn(*shape[:-1], 2 * shape[-1]) * 2).to(dtype)


def _run(fn, p, g):
    p = p.detach().clone().requires_grad_()
    a, b = p.chunk(2, -1)
    a.retain_grad()
    b.retain_grad()
    out = fn(a, b)
    (out.float() * g).sum().backward()
    return out.detach(), a.grad, b.grad, p.grad


@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", _backends())
def test_swiglu_matches_reference(seed, backend, dtype, shape):
    p = _proj(shape, dtype)
    g = torch.randn(shape)
    k = _run(lambda a, b: ops.swiglu(a, b, backend=backend), p, g)
    r = _run(ref.swiglu, p, g)
    s = _run(lambda a, b: torch.nn.functional.silu(a) * b, p, g) if dtype != torch.float32 else [None] * 4
    for name, kv, rv, sv in zip(("out", "da", "db", "dproj"), k, r, s):
        assert kv.dtype == dtype and kv.shape == rv.shape, name
        assert_close(kv, rv, dtype, name=name, same_dtype_ref=sv)
    assert k[0].is_contiguous()


def _loop(a, b):
    """Element by element in Python floats: a / (1 + exp(-a)) * b."""
    flat = [x / (1 + math.exp(-x)) * y for x, y in zip(a.double().flatten().tolist(), b.double().flatten().tolist())]
    return torch.tensor(flat, dtype=torch.float64).view(a.shape)


def test_reference_vs_float64_loop_and_gradcheck(seed):
    a, b = torch.randn(3, 5, 7, dtype=torch.float64) * 4, torch.randn(3, 5, 7, dtype=torch.float64)
    assert_close(ref.swiglu(a, b), _loop(a, b), torch.float64, name="swiglu")
    assert_close(ref.swiglu(a.float(), b.float()), _loop(a, b), torch.float32, name="swiglu float32")
    a, b = (t[:2, :2, :3].clone().requires_grad_() for t in (a, b))
    assert torch.autograd.gradcheck(ref.swiglu, (a, b))
    assert torch.autograd.gradgradcheck(ref.swiglu, (a, b))
    # The analytic tangent against torch's own forward AD of the reference.
    da, db = torch.randn_like(a), torch.randn_like(b)
    _, want = torch.func.jvp(ref.swiglu, (a.detach(), b.detach()), (da, db))
    assert_close(ref.swiglu_jvp(a.detach(), b.detach(), da, db), want, torch.float64, name="swiglu_jvp")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_primitives_write_every_output(seed, dtype):
    B, N, H = 2, 5, 33
    p = torch.randn(B, N, 2 * H, dtype=dtype)
    a, b = p[..., :H], p[..., H:]
    big = poison((B, N + 1, H + 3), dtype)
    out = big[:, 1:, 2:H + 2]
    res = tk.swiglu_fwd(a, b, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert_close(out, ref.swiglu(a, b), dtype, name="out")
    assert big[:, 0].isnan().all() and big[..., :2].isnan().all() and big[..., H + 2:].isnan().all()
    g = torch.randn(B, N, H, dtype=dtype)
    da, db = tk.swiglu_bwd(g, a, b)
    af, bf = a.float().requires_grad_(), b.float().requires_grad_()
    ref.swiglu(af, bf).backward(g.float())
    assert_close(da, af.grad, dtype, name="da")
    assert_close(db, bf.grad, dtype, name="db")
    empty = torch.randn(2, 0, 4, dtype=dtype)
    assert tk.swiglu_fwd(empty, empty).shape == (2, 0, 4)


@pytest.mark.parametrize("backend", ["reference"] + _backends())
def test_forward_ad(seed, backend):
    """torch.func.jvp and jacfwd through the op equal torch's forward AD of the reference."""
    p = torch.randn(2, 3, 2 * 6)
    a, b = p[..., :6], p[..., 6:]
    da, db = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    out, tan = torch.func.jvp(lambda x, y: ops.swiglu(x, y, backend=backend), (a, b), (da, db))
    r_out, r_tan = torch.func.jvp(ref.swiglu, (a, b), (da, db))
    assert rel_err(out, r_out) <= 1e-6 and rel_err(tan, r_tan) <= 1e-5
    jac = torch.func.jacfwd(lambda x: ops.swiglu(x, b[0, 0], backend=backend))(a[0, 0])
    assert_close(jac, torch.func.jacfwd(lambda x: ref.swiglu(x, b[0, 0]))(a[0, 0]), torch.float32, name="jacfwd")
    # Forward over reverse (a Hessian-vector product) goes through the rule's backward.
    hvp = torch.func.jvp(torch.func.grad(lambda x: ops.swiglu(x, b, backend=backend).sum()), (a,), (da,))[1]
    want = torch.func.jvp(torch.func.grad(lambda x: ref.swiglu(x, b).sum()), (a,), (da,))[1]
    assert_close(hvp, want, torch.float32, name="hvp")


_BAD = [
    ("a", lambda a, b: (a.tolist(), b), TypeError),
    ("a", lambda a, b: (a.to(torch.int32), b), TypeError),
    ("a", lambda a, b: (a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2)), ValueError),
    ("a", lambda a, b: (a[0, 0, 0], b[0, 0, 0]), ValueError),             # 0-d
    ("b", lambda a, b: (a, b[:, :2]), ValueError),                        # shape
    ("b", lambda a, b: (a, b.half()), TypeError),                         # dtype
    ("b", lambda a, b: (a, b.to("meta")), ValueError),                    # device
    ("b", lambda a, b: (a, torch.randn(2, 3, 8)[..., ::2]), ValueError),  # non-unit last stride
]


@pytest.mark.parametrize("arg,bad,exc", _BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(_BAD)])
def test_validation_errors(arg, bad, exc):
    a, b = bad(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    for backend in ("reference", "triton"):
        with pytest.raises(exc, match=arg):
            ops.swiglu(a, b, backend=backend)


def test_triton_primitive_errors():
    with pytest.raises(TypeError, match="a"):
        ops.swiglu(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), backend="triton")
    a = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="out"):
        tk.swiglu_fwd(a, a, out=torch.empty(2, 3, 5))
    with pytest.raises(ValueError, match="dout"):
        tk.swiglu_bwd(a[:, :2], a, a)


def test_opcheck(seed):
    p = torch.randn(2, 3, 10, requires_grad=True)
    a, b = p.chunk(2, -1)
    lib = torch.ops.effkernels
    torch.library.opcheck(lib.swiglu.default, (a, b, "triton"))
    torch.library.opcheck(lib.swiglu_backward.default, (torch.randn(2, 3, 5), a.detach(), b.detach(), "triton"))


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_compile_fullgraph_keeps_ops(seed):
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    fc1, fc2 = torch.nn.Linear(6, 2 * 10), torch.nn.Linear(10, 6)
    x = torch.randn(2, 3, 6)

    def mlp(x):
        a, b = fc1(x).chunk(2, -1)
        return fc2(ops.swiglu(a, b, backend="triton")).square().sum()

    rec = AotEagerAndRecordGraphs()
    compiled = torch.compile(mlp, fullgraph=True, backend=rec)
    grads = []
    for fn in (compiled, mlp):
        fc1.zero_grad()
        loss = fn(x)
        loss.backward()
        grads.append((loss.detach(), fc1.weight.grad.clone()))
    assert_close(grads[0][0], grads[1][0], torch.float32, name="loss")
    assert_close(grads[0][1], grads[1][1], torch.float32, name="dW1")
    assert "effkernels.swiglu." in "\n".join(str(g.graph) for g in rec.graphs)
    assert "swiglu_backward" in "\n".join(str(g.graph) for g in rec.bw_graphs)


@pytest.mark.skipif(not _EXT, reason="effkernels._C is not built (CI builds it, where a skip fails)")
def test_raw_ops_opcheck_and_no_autograd(seed):
    """The extension's raw ops (fakes in effkernels/_ext/__init__.py), on strided halves; one place
    (effkernels.ops) defines their backward."""
    p = torch.randn(2, 3, 10)
    a, b = p.chunk(2, -1)
    C = torch.ops.effkernels_C
    cases = {"swiglu_fwd": (a, b), "swiglu_fwd_out": (a, b, torch.empty(2, 3, 5)),
             "swiglu_bwd": (torch.randn(2, 3, 5), a, b)}
    assert set(cases) == set(xswiglu.RAW_OPS)
    for name, args in cases.items():
        torch.library.opcheck(getattr(C, name).default, args)
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"effkernels_C::{name}", "Autograd"), name
