"""The fused alignment-projection loss (ops.projected_cosine_loss): the Triton kernels (interpreter)
and the C++ path vs the reference, the reference vs plain float64 loops and gradcheck, validation,
NaN-poisoned outputs, opcheck / torch.compile capture, autocast, and AlignmentHead's fused path."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, cosine_loss_scale, poison

from effkernels import ops, use_backend
from effkernels._ext import align as xalign
from effkernels._triton import align as tri
from effkernels.nn import AlignmentHead
from effkernels.nn import align as nn_align
from effkernels.reference import align as ref

# (B, N, K, Z, chunk): K and Z past one 64-wide tile and a chunk smaller than B * N (several chunks,
# the last one partial), and an odd case inside one tile with the default chunk.
BIG = (2, 37, 100, 70, 32)
SMALL = (3, 5, 17, 9, None)
# Triton in the interpreter: fp32 and fp16 (its bf16 tl.dot is garbage there); C++: all three.
CASES = [("triton", torch.float32, BIG, True), ("triton", torch.float32, SMALL, False),
         ("triton", torch.float16, BIG, True), ("triton", torch.float16, SMALL, False),
         ("cpp", torch.float32, BIG, True), ("cpp", torch.float32, SMALL, False),
         ("cpp", torch.float16, BIG, False), ("cpp", torch.bfloat16, BIG, True),
         ("cpp", torch.bfloat16, SMALL, False)]


def _operands(B, N, K, Z, dtype, bias=True, target_dtype=torch.float32):
    h = torch.randn(B, N, K).to(dtype)
    w = (torch.randn(Z, K) / K ** 0.5).to(dtype)
    b = (0.3 * torch.randn(Z)).to(dtype) if bias else None
    z = torch.randn(B, N, Z).to(target_dtype)
    return h, w, b, z


def _run(fn, h, w, b, z, g=None):
    """fn(h, w, b, z) -> (B, N) or scalar; -> (out, dh, dw, db) for an upstream gradient g."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (h, w, b)]
    out = fn(*leaves, z)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], g)
    return (out, grads[0], grads[1], grads[2] if b is not None else None)


def _unfused(h, w, b, z):
    """What PyTorch computes in h's dtype without the fusion: the Linear, then the cosine loss."""
    return ref.per_token_cosine(F.linear(h, w, b), z)


@pytest.mark.parametrize("backend,dtype,shape,bias", CASES, ids=str)
def test_backends_match_reference(seed, backend, dtype, shape, bias):
    B, N, K, Z, chunk = shape
    h, w, b, z = _operands(B, N, K, Z, dtype, bias)
    g = torch.randn(B, N)  # a dense upstream gradient of the per-token cosine

    def kern(*a):
        return ops.projected_cosine(*a, chunk_tokens=chunk, backend=backend)
    got = _run(kern, h, w, b, z, g)
    want = _run(lambda *a: ops.projected_cosine(*a, backend="reference"), h, w, b, z, g)
    truth = _run(lambda hh, ww, bb, zz: ref.projected_cosine(hh, ww, bb, zz), h.double(), w.double(),
                 None if b is None else b.double(), z.double(), g.double())
    same = _run(_unfused, h, w, b, z, g)  # PyTorch's own error in this dtype
    assert got[0].dtype == torch.float32 and got[0].shape == (B, N)
    # y is float32 whatever the inputs, so the forward meets the float32 tolerance in every dtype.
    assert_close(got[0], want[0], torch.float32, reduce=True, name="cos")
    names = ("dh", "d weight", "d bias")
    for i, name in enumerate(names, 1):
        if got[i] is None:
            continue
        assert got[i].dtype == dtype and got[i].shape == want[i].shape, name
        assert_close(got[i], truth[i], dtype, reduce=True, name=name, same_dtype_ref=same[i])
    if backend == "triton" and shape == BIG:
        return  # the interpreter's time: the stride-0 gradient below runs on the small shape
    # The loss: its gradient reaches the backward as an expanded, stride-0 dcos.
    loss = _run(lambda *a: ops.projected_cosine_loss(*a, chunk_tokens=chunk, backend=backend), h, w, b, z)
    loss_ref = _run(lambda *a: ref.projected_cosine_loss(*a), h, w, b, z)
    scale = cosine_loss_scale(F.linear(h.float(), w.float(), None if b is None else b.float()), z)
    assert_close(loss[0], loss_ref[0], torch.float32, reduce=True, name="loss", scale=scale)
    for i, name in enumerate(names, 1):
        if loss[i] is not None:
            assert_close(loss[i], loss_ref[i], dtype, reduce=True, name=f"{name} (loss)")


@pytest.mark.parametrize("backend", ("cpp", "triton"))
def test_mixed_target_dtype_zero_rows_and_determinism(seed, backend):
    """A 16-bit target against fp32 h, projections that are exactly zero (the norm floor: cos 0, no
    NaN), and a backward that is bitwise the same when run twice (no atomics)."""
    B, N, K, Z = 2, 6, 20, 12
    h, w, _, z = _operands(B, N, K, Z, torch.float32, bias=False, target_dtype=torch.float16)
    h[0, 2] = 0  # no bias: y = 0 on this token
    h[1, 5] = 0
    # A projection below the norm floor eps (its clamped norm is a constant: that term drops).
    eps = 0.5
    h[1, 1] *= 0.3 / F.linear(h[1, 1], w).norm()
    runs = [_run(lambda *a: ops.projected_cosine_loss(*a, eps, chunk_tokens=4, backend=backend), h, w, None, z)
            for _ in range(2)]
    want = _run(lambda *a: ref.projected_cosine_loss(*a, eps), h, w, None, z)
    for a, b_ in zip(runs[0][:3], runs[1][:3]):
        assert torch.equal(a, b_)
    assert torch.isfinite(runs[0][1]).all() and torch.isfinite(runs[0][2]).all()
    cos = ops.projected_cosine(h, w, None, z, eps, backend=backend)
    assert cos[0, 2] == 0 and cos[1, 5] == 0
    y, t = F.linear(h[1, 1], w), z[1, 1].float()
    assert abs(cos[1, 1] - (y @ t) / (eps * t.norm())) <= 1e-5
    assert_close(runs[0][0], want[0], torch.float32, reduce=True, name="loss", scale=1.0)
    assert_close(runs[0][1], want[1], torch.float32, reduce=True, name="dh")
    assert_close(runs[0][2], want[2], torch.float32, reduce=True, name="d weight")


# ---------------------------------------------------------------------------------------------
# The reference vs independent float64 loops, its written-out backward, gradcheck
# ---------------------------------------------------------------------------------------------

def _loop_loss(h, w, b, z, eps):
    """-(1/B) sum_b (1/N) sum_n cos(h W^T + b, z) with per-element torch scalar ops, float64."""
    B, N, K = h.shape
    Z = w.shape[0]
    per_sample = []
    for bi in range(B):
        cs = []
        for n in range(N):
            y = [sum(h[bi, n, k] * w[j, k] for k in range(K)) + (b[j] if b is not None else 0) for j in range(Z)]
            ny = torch.sqrt(sum(v * v for v in y))
            nz = torch.sqrt(sum(z[bi, n, j] * z[bi, n, j] for j in range(Z)))
            a = ny if ny >= eps else torch.tensor(eps, dtype=torch.float64)
            c = nz if nz >= eps else torch.tensor(eps, dtype=torch.float64)
            cs.append(sum(y[j] * z[bi, n, j] for j in range(Z)) / (a * c))
        per_sample.append(sum(cs) / N)
    return -sum(per_sample) / B


@pytest.mark.parametrize("bias", (True, False))
def test_reference_vs_float64_loops(seed, bias):
    B, N, K, Z, eps = 2, 3, 4, 5, 1e-8
    h, w, b, z = (t.double() if t is not None else None for t in _operands(B, N, K, Z, torch.float32, bias))
    if not bias:
        h[1, 2] = 0  # a zero projection: the clamped branch
    got = _run(lambda *a: ref.projected_cosine_loss(*a, eps), h, w, b, z)
    want = _run(lambda *a: _loop_loss(*a, eps), h, w, b, z)
    assert got[0].dtype == torch.float64 and abs(got[0].item() - want[0].item()) <= 1e-12
    for x, y in zip(got[1:], want[1:]):
        if x is not None:
            assert_close(x, y, torch.float64, name="grad")
    # The written-out backward (the spec of the kernels' backward) against autograd of the forward.
    g = torch.randn(B, N, dtype=torch.float64)
    auto = _run(lambda *a: ref.projected_cosine(*a, eps), h, w, b, z, g)
    for x, y in zip(ref.projected_cosine_backward(g, h, w, b, z, eps), auto[1:]):
        if y is not None:
            assert_close(x, y, torch.float64, name="written-out backward")


def test_reference_gradcheck(seed):
    h, w, b, z = (t.double() for t in _operands(2, 3, 4, 5, torch.float32))
    z[0, 1] = 0
    args = [t.clone().requires_grad_() for t in (h, w, b)]
    assert torch.autograd.gradcheck(lambda *a: ref.projected_cosine(*a, z), args)
    assert torch.autograd.gradcheck(lambda *a: ref.projected_cosine_loss(*a, z), args)
    # The C++ path is float32: finite differences need a large step and loose tolerances there.
    args32 = [t.detach().float().requires_grad_() for t in args]
    assert torch.autograd.gradcheck(lambda *a: ops.projected_cosine(*a, z.float(), chunk_tokens=4, backend="cpp"),
                                    args32, eps=1e-3, atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Validation and poisoned outputs
# ---------------------------------------------------------------------------------------------

def _bad_calls():
    h, w, b, z = _operands(2, 3, 4, 5, torch.float32)
    f = ops.projected_cosine_loss
    wide = torch.randn(2, 3, 8)
    return [
        (TypeError, "h must be a torch.Tensor", lambda: f(h.numpy(), w, b, z)),
        (TypeError, "weight must be a torch.Tensor", lambda: f(h, [1.0], b, z)),
        (TypeError, "bias must be a torch.Tensor", lambda: f(h, w, 1.0, z)),
        (TypeError, "z must be a torch.Tensor", lambda: f(h, w, b, None)),
        (ValueError, "h must have 3", lambda: f(h[0], w, b, z)),
        (ValueError, "weight must have 2", lambda: f(h, w[0], b, z)),
        (ValueError, "bias must have 1", lambda: f(h, w, b[None], z)),
        (TypeError, "h must be float", lambda: f(h.int(), w, b, z)),
        (TypeError, "z must be float", lambda: f(h, w, b, z.long())),
        (ValueError, "weight must be \\(Z, K\\)", lambda: f(h, w[:, :3], b, z)),
        (ValueError, "weight must be \\(Z, K\\)", lambda: f(h, w[:0], b[:0], z[..., :0])),
        (ValueError, "bias must be \\(Z,\\)", lambda: f(h, w, b[:4], z)),
        (ValueError, "z must be \\(B, N, Z\\)", lambda: f(h, w, b, z[:, :2])),
        (ValueError, "z must be \\(B, N, Z\\)", lambda: f(h, w, b, z[..., :4])),
        (TypeError, "weight has dtype", lambda: f(h, w.half(), b, z)),
        (TypeError, "bias has dtype", lambda: f(h, w, b.double(), z)),
        (ValueError, "z is on meta", lambda: f(h, w, b, z.to("meta"))),
        (ValueError, "h must have unit stride", lambda: f(wide[..., ::2], w, b, z)),
        (ValueError, "weight must have unit stride", lambda: f(h, torch.randn(4, 5).t(), b, z)),
        (ValueError, "z must have unit stride", lambda: f(h, w, b, torch.randn(2, 3, 10)[..., ::2])),
        (ValueError, "chunk_tokens", lambda: f(h, w, b, z, chunk_tokens=0)),
        (ValueError, "chunk_tokens", lambda: f(h, w, b, z, chunk_tokens=2.0)),
        (ValueError, "eps", lambda: f(h, w, b, z, 0.0)),
        (ValueError, "eps", lambda: f(h, w, b, z, float("nan"))),
        (ValueError, "backend", lambda: f(h, w, b, z, backend="gpu")),
    ]


@pytest.mark.parametrize("backend", ("triton", "cpp", "reference"))
def test_validation_errors(backend):
    for exc, match, call in _bad_calls():
        with use_backend(backend), pytest.raises(exc, match=match):
            call()


def test_no_cuda_kernel_is_an_error_not_a_fallback():
    from effkernels import backends
    with pytest.raises(RuntimeError, match="cannot run op projected_cosine"):
        backends.resolve("projected_cosine", torch.device("cpu"), "cuda")
    assert "projected_cosine" in backends.NO_CUDA_KERNEL


def test_primitives_poisoned_outputs_and_errors(seed):
    B, N, K, Z = 2, 5, 20, 12
    h, w, b, z = _operands(B, N, K, Z, torch.float32)
    g = torch.randn(B, 1).expand(B, N)  # strides (1, 0)
    want_cos = ref.projected_cosine(h, w, b, z, 1e-6)
    want = ref.projected_cosine_backward(g, h, w, b, z, 1e-6)
    for mod in (tri, xalign):
        cos, nrm = mod.proj_cosine_fwd(h, w, b, z, 1e-6, 4,
                                       out=(poison((B, N), torch.float32), poison((B, N, 2), torch.float32)))
        assert_close(cos, want_cos, torch.float32, reduce=True, name=f"{mod.__name__} cos")
        y = F.linear(h, w, b)
        assert_close(nrm, torch.stack([y.norm(dim=-1), z.norm(dim=-1)], -1), torch.float32, reduce=True)
        got = mod.proj_cosine_bwd(g, h, w, b, z, cos, nrm, 1e-6, 4)
        for x, y_, name in zip(got, want, ("dh", "dw", "db")):
            assert_close(x, y_, torch.float32, reduce=True, name=f"{mod.__name__} {name}")
        assert mod.proj_cosine_bwd(g, h, w, None, z, cos, nrm, 1e-6, 4)[2] is None
    dh = tri.proj_cosine_bwd(g, h, w, b, z, cos, nrm, 1e-6, 4, out=poison((B, N, K), torch.float32))[0]
    assert_close(dh, want[0], torch.float32, reduce=True, name="dh into a poisoned out")
    with pytest.raises(TypeError, match="bias must have h's dtype|weight and bias must have h's dtype"):
        tri.proj_cosine_fwd(h, w, b.half(), z, 1e-8)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tri.proj_cosine_fwd(h.double(), w.double(), None, z, 1e-8)
    with pytest.raises(ValueError, match="out\\[0\\]"):
        tri.proj_cosine_fwd(h, w, b, z, 1e-8, out=(torch.empty(B, N, dtype=torch.float16), nrm))
    with pytest.raises(ValueError, match="out\\[1\\]"):
        xalign.proj_cosine_fwd(h, w, b, z, 1e-8, 4, out=(cos, torch.empty(B, N, 3)))
    with pytest.raises(ValueError, match="chunk"):
        tri.proj_cosine_bwd(g, h, w, b, z, cos, nrm, 1e-8, 0)
    with pytest.raises(TypeError, match="dcos must be a float32"):
        tri.proj_cosine_bwd(g.half(), h, w, b, z, cos, nrm, 1e-8, 4)
    with pytest.raises(ValueError, match="out must be"):
        tri.proj_cosine_bwd(g, h, w, b, z, cos, nrm, 1e-8, 4, out=torch.empty(B, N, K + 1))
    with pytest.raises(RuntimeError, match="chunk must be positive"):
        torch.ops.effkernels_C.proj_cosine_fwd(h, w, b, z, 1e-8, 0)


# ---------------------------------------------------------------------------------------------
# torch.library, torch.compile, autocast
# ---------------------------------------------------------------------------------------------

def test_opcheck(seed):
    h, w, b, z = _operands(2, 5, 17, 9, torch.float32)
    # The registration (schema, fakes, autograd) takes the backend as an argument only: the C++ path
    # is the fast one to check it through; Triton's outputs have the same layouts (tested above).
    torch.library.opcheck(torch.ops.effkernels.projected_cosine.default,
                          (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), z.half(), 1e-8, 4, "cpp"))
    h, w, b = h.detach(), w.detach(), b.detach()
    cos, nrm = xalign.proj_cosine_fwd(h, w, None, z, 1e-8, 4)
    torch.library.opcheck(torch.ops.effkernels.projected_cosine_backward.default,
                          (torch.tensor(0.5).expand(2, 5), h, w, None, z, cos, nrm, 1e-8, 4, "cpp"))


def test_compile_fullgraph_keeps_ops(seed):
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    rec = AotEagerAndRecordGraphs()
    h, w, b, z = _operands(2, 7, 17, 9, torch.float32)

    def loss_fn(h, w, b):
        return ops.projected_cosine_loss(h, w, b, z, chunk_tokens=4, backend="cpp")

    torch._dynamo.reset()
    results = []
    for backend in (rec, None):
        fn = loss_fn if backend is None else torch.compile(loss_fn, fullgraph=True, backend=backend)
        args = [t.clone().requires_grad_() for t in (h, w, b)]
        loss = fn(*args)
        loss.backward()
        results.append((loss, *[a.grad for a in args]))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)

    def targets(gms):
        return {str(n.target) for gm in gms for n in gm.graph.nodes if n.op == "call_function"}
    assert "effkernels.projected_cosine.default" in targets(rec.fw_graphs)
    assert "effkernels.projected_cosine_backward.default" in targets(rec.bw_graphs)


def test_autocast_casts_like_linear(seed):
    """Under autocast the op casts h and the fp32 parameters to the autocast dtype, as F.linear
    does, runs its float32 math with autocast off, and the gradients reach the fp32 parameters."""
    h, w, b, z = _operands(2, 6, 20, 12, torch.float32)
    w.requires_grad_()
    b.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.projected_cosine_loss(h, w, b, z, backend="cpp")
    loss.backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    want = _run(lambda *a: ref.projected_cosine_loss(*a), h.bfloat16(), w.detach().bfloat16(),
                b.detach().bfloat16(), z)
    assert abs(loss.item() - want[0].item()) <= 1e-6
    assert_close(w.grad, want[2].float(), torch.bfloat16, reduce=True, name="d weight")


# ---------------------------------------------------------------------------------------------
# AlignmentHead's fused path
# ---------------------------------------------------------------------------------------------

def test_alignment_head_fused_equals_unfused(seed, monkeypatch):
    head = AlignmentHead(16, 10, hidden=32)
    h, z = torch.randn(2, 7, 16), torch.randn(2, 7, 10)
    out = {}
    for fused in (False, True):
        head.zero_grad()
        loss = head(h, z, fused=fused)
        loss.backward()
        out[fused] = (loss.detach(), [p.grad.clone() for p in head.parameters()])
    assert_close(out[True][0], out[False][0], torch.float32, reduce=True, name="loss", scale=1.0)
    for a, b in zip(out[True][1], out[False][1]):
        assert_close(a, b, torch.float32, reduce=True, name="grad")
    # fused=None follows FUSED_DEFAULT for h's device; the module's own choice beats it.
    calls = []
    real = ops.projected_cosine_loss
    monkeypatch.setattr(ops, "projected_cosine_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    for default in (False, True):
        monkeypatch.setitem(nn_align.FUSED_DEFAULT, "cpu", default)
        calls.clear()
        head(h, z)
        assert len(calls) == int(default)
    calls.clear()
    AlignmentHead(16, 10, hidden=32, fused=False)(h, z)
    assert not calls
    with pytest.raises(ValueError, match="fused"):
        AlignmentHead(16, 10, fused="yes")
    with pytest.raises(ValueError, match="fused"):
        head(h, z, fused=1)
    # Other losses never take the fused path.
    calls.clear()
    AlignmentHead(16, 10, hidden=32, loss="mse", fused=True)(h, z)
    assert not calls
