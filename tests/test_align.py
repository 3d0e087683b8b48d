"""Alignment losses: the Triton per-token cosine (interpreter) vs the reference, the reference vs plain
float64 loops, eps-clamp edge cases, every validation error, opcheck and torch.compile capture."""
import math

import pytest
import torch

import effkernels.ops as ops
from effkernels import use_backend
from effkernels._triton import align as tri
from effkernels.reference import align as ref
from helpers import TOL_REDUCE, assert_close, cosine_loss_scale, poison, rel_err

# (z_hat dtype, z dtype): same dtypes, and a 16-bit projection against an fp32 or fp16 target.
DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.float16, torch.float16),
               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
               (torch.bfloat16, torch.float16))
# (B, N, D): odd sizes; 2100 takes the multi-chunk path (three 1024-wide sweeps over D).
SHAPES = ((2, 7, 1), (3, 5, 17), (2, 3, 384), (1, 5, 1000), (1, 3, 2100))


def _ids(p):
    return "-".join(str(d).replace("torch.", "") for d in p)


def _strided(B, N, D, dtype, kind):
    """A (B, N, D) tensor with unit stride along D but unusual row strides."""
    if kind == "slice":  # tokens and features cut from a wider buffer
        return torch.randn(B, N + 2, D + 5)[:, 1:N + 1, 2:D + 2].to(dtype)
    if kind == "transposed":  # batch and token dims swapped in memory
        return torch.randn(N, B, D).to(dtype).transpose(0, 1)
    return torch.randn(B, N, D).to(dtype)


def _cos_and_grad(zh, z, g, backend, eps=1e-8):
    zh = zh.detach().clone().requires_grad_()
    cos = ops.per_token_cosine(zh, z, eps, backend=backend)
    (dzh,) = torch.autograd.grad(cos, zh, g)
    return cos, dzh


# ---------------------------------------------------------------------------------------------
# Kernel vs reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_ids)
def test_ops_match_reference(seed, dtypes, shape):
    th, tz = dtypes
    zh, z = _strided(*shape, th, "plain"), _strided(*shape, tz, "slice")
    g = torch.randn(shape[:2])
    cos, dzh = _cos_and_grad(zh, z, g, "triton")
    cos_ref, dzh_ref = _cos_and_grad(zh, z, g, "reference")
    assert cos.dtype == torch.float32 and dzh.dtype == th and dzh.shape == zh.shape
    # The math is float32 whatever the inputs, so the forward meets the fp32 tolerance.
    assert_close(cos, cos_ref, torch.float32, reduce=True, name="cos")
    # Same-dtype PyTorch baseline for 16-bit grads: the float64 gradient rounded to th.
    truth = _cos_and_grad(zh.double(), z.double(), g.double(), "reference")[1]
    if shape[2] == 1:
        # cos = +-1 for every nonzero row, so the exact gradient is 0 and both sides hold rounding
        # noise: bound it by a few float32 ulps of the gradient's scale g / |z_hat| instead.
        scale = (g.abs() / zh.float().abs().squeeze(-1).clamp_min(1e-8)).unsqueeze(-1)
        assert (dzh.float().abs() <= 1e-6 * scale).all() and (truth.abs() <= 1e-12 * scale).all()
    else:
        assert_close(dzh, dzh_ref, th, reduce=True, name="d z_hat", same_dtype_ref=truth.to(th))
    # The loss: its gradient reaches the kernel as an expanded stride-0 view.
    losses, grads = [], []
    for backend in ("triton", "reference"):
        zh_ = zh.detach().clone().requires_grad_()
        loss = ops.cosine_alignment_loss(zh_, z, backend=backend)
        loss.backward()
        losses.append(loss)
        grads.append(zh_.grad)
    assert_close(losses[0], losses[1], torch.float32, reduce=True, name="loss", scale=cosine_loss_scale(zh, z))
    if shape[2] > 1:
        assert_close(grads[0], grads[1], th, reduce=True, name="d z_hat (loss)")


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS[:3], ids=_ids)
def test_primitives_strided_inputs_poisoned_outputs(seed, dtypes):
    th, tz = dtypes
    B, N = 3, 5
    for D in (17, 1000):
        for kh, kz in (("transposed", "slice"), ("slice", "transposed")):
            zh, z = _strided(B, N, D, th, kh), _strided(B, N, D, tz, kz)
            want = (torch.nn.functional.normalize(zh.double(), dim=-1, eps=1e-6)
                    * torch.nn.functional.normalize(z.double(), dim=-1, eps=1e-6)).sum(-1)
            cos = tri.cosine_fwd(zh, z, 1e-6, out=poison((B, N), torch.float32))
            assert rel_err(cos, want) <= TOL_REDUCE[torch.float32]
            for dcos in (torch.tensor(0.7).expand(B, N),           # strides (0, 0): a mean's gradient
                         torch.randn(B, 1).expand(B, N),           # strides (1, 0)
                         torch.randn(N, B).t()):                   # transposed
                zr = zh.double().requires_grad_()
                (want_g,) = torch.autograd.grad(
                    (torch.nn.functional.normalize(zr, dim=-1, eps=1e-6)
                     * torch.nn.functional.normalize(z.double(), dim=-1, eps=1e-6)).sum(-1), zr, dcos.double())
                got = tri.cosine_bwd(dcos, zh, z, 1e-6, out=poison((B, N, D), th))
                assert_close(got, want_g, th, reduce=True, name=f"d z_hat {kh}/{kz}",
                             same_dtype_ref=want_g.to(th))
            # Without out=, d z_hat takes z_hat's layout, as the registered fake (empty_like) says.
            dflt = tri.cosine_bwd(torch.ones(B, N), zh, z, 1e-6)
            assert dflt.stride() == torch.empty_like(zh).stride()


@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_zero_rows_and_eps_clamp(seed, backend):
    B, N, D, eps = 2, 4, 9, 0.5
    zh, z = torch.randn(B, N, D), torch.randn(B, N, D)
    zh[0, 0] = 0                                  # zero projection
    z[0, 1] = 0                                   # zero target
    zh[1, 0] = 0
    z[1, 0] = 0                                   # both zero
    zh[1, 1] *= 0.3 / zh[1, 1].norm()             # below eps: the clamp holds, its gradient is 0
    zh[1, 2] *= 0.7 / zh[1, 2].norm()             # above eps: normal normalisation
    z[1, 3] *= 0.2 / z[1, 3].norm()               # target below eps
    g = torch.randn(B, N)
    cos, dzh = _cos_and_grad(zh, z, g, backend, eps)
    assert torch.isfinite(cos).all() and torch.isfinite(dzh).all()
    assert cos[0, 0] == 0 and cos[0, 1] == 0 and cos[1, 0] == 0
    # Independent formulas: below the clamp cos = <zh, z> / (eps |z|), gradient g z / (eps |z|).
    assert math.isclose(cos[1, 1], (zh[1, 1] @ z[1, 1]) / (eps * z[1, 1].norm()), rel_tol=1e-5)
    torch.testing.assert_close(dzh[1, 1], g[1, 1] * z[1, 1] / (eps * z[1, 1].norm()), rtol=1e-5, atol=1e-6)
    assert math.isclose(cos[1, 3], (zh[1, 3] @ z[1, 3]) / (zh[1, 3].norm() * eps), rel_tol=1e-5)
    assert (dzh[0, 1] == 0).all() and (dzh[1, 0] == 0).all()
    truth = _cos_and_grad(zh.double(), z.double(), g.double(), "reference", eps)
    assert_close(cos, truth[0], torch.float32, reduce=True, name="cos")
    assert_close(dzh, truth[1], torch.float32, reduce=True, name="d z_hat")


def test_gradient_reaches_only_z_hat(seed):
    zh = torch.randn(2, 5, 17, requires_grad=True)
    z = torch.randn(2, 5, 17, requires_grad=True)
    ops.cosine_alignment_loss(zh, z, backend="triton").backward()
    assert z.grad is None and zh.grad is not None and torch.isfinite(zh.grad).all()


# ---------------------------------------------------------------------------------------------
# The reference vs independent float64 loops, and gradcheck
# ---------------------------------------------------------------------------------------------

def _loop_cos(zh, z, eps):
    """(B, N) float64 via per-token torch scalar ops: the clamp written out, autograd-able."""
    rows = []
    for b in range(zh.shape[0]):
        for n in range(zh.shape[1]):
            h, t = zh[b, n].double(), z[b, n].double()
            nh = torch.sqrt(sum(h[i] * h[i] for i in range(h.shape[0])))
            nt = torch.sqrt(sum(t[i] * t[i] for i in range(t.shape[0])))
            dot = sum(h[i] * t[i] for i in range(h.shape[0]))
            a = nh if nh >= eps else torch.tensor(eps, dtype=torch.float64)
            c = nt if nt >= eps else torch.tensor(eps, dtype=torch.float64)
            rows.append(dot / (a * c))
    return torch.stack(rows).view(zh.shape[0], zh.shape[1])


def test_reference_vs_float64_loops(seed):
    B, N, D, eps = 2, 3, 5, 1e-8
    zh, z = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, N, D, dtype=torch.float64)
    zh[1, 2] = 0
    zr = zh.clone().requires_grad_()
    loss = ref.cosine_alignment_loss(zr, z, eps)
    loss.backward()
    zl = zh.clone().requires_grad_()
    want = -_loop_cos(zl, z, eps).mean()
    want.backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want.item()) <= 1e-12
    assert rel_err(zr.grad, zl.grad) <= 1e-12
    # 16/32-bit inputs: the math is float32, within float32 rounding of the float64 loops.
    zr32 = zh.float().requires_grad_()
    loss32 = ref.cosine_alignment_loss(zr32, z.half(), eps)
    loss32.backward()
    zl.grad = None
    want = -_loop_cos(zl, z.half(), eps).mean()
    want.backward()
    assert loss32.dtype == torch.float32 and abs(loss32.item() - want.item()) <= 1e-6
    assert rel_err(zr32.grad, zl.grad) <= TOL_REDUCE[torch.float32]
    beta = 0.3
    sl1 = mse = 0.0
    for b in range(B):
        for n in range(N):
            for d in range(D):
                e = abs(zh[b, n, d].item() - z[b, n, d].item())
                sl1 += 0.5 * e * e / beta if e < beta else e - 0.5 * beta
                mse += e * e
    # the mean over all B * N * D elements (F.smooth_l1_loss / F.mse_loss's default), not a sum over D
    assert math.isclose(ref.smooth_l1_alignment_loss(zh, z, beta).item(), sl1 / (B * N * D), rel_tol=1e-5)
    assert math.isclose(ref.mse_alignment_loss(zh, z).item(), mse / (B * N * D), rel_tol=1e-5)


@pytest.mark.parametrize("shape", ((2, 7, 1), (3, 5, 17), (1, 4, 384)), ids=_ids)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=lambda d: str(d)[6:])
def test_smooth_l1_and_mse_are_means_over_all_elements(seed, shape, dtype):
    """SRA's release: F.smooth_l1_loss(z_hat, z, beta=0.05) and F.mse_loss(z_hat, z), both with the
    default mean over every element; ours match them (math in float32), values and gradients, for
    every backend choice."""
    print(f"seed={seed} shape={shape} dtype={dtype}")
    zh = (torch.randn(shape) * 0.1).to(dtype)  # |error| straddles beta = 0.05: both branches of the Huber
    z = (torch.randn(shape) * 0.1).to(dtype)
    F = torch.nn.functional
    for name, ours, theirs in (
            ("smooth_l1", lambda a: ops.smooth_l1_alignment_loss(a, z, 0.05),
             lambda a: F.smooth_l1_loss(a, z.float(), beta=0.05)),
            ("mse", lambda a: ops.mse_alignment_loss(a, z), lambda a: F.mse_loss(a, z.float()))):
        a = zh.clone().requires_grad_()
        got = ours(a)
        got.backward()
        b = zh.float().clone().requires_grad_()
        want = theirs(b)
        want.backward()
        assert got.dtype == torch.float32, name
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-9), name
        assert rel_err(a.grad.float(), b.grad) <= TOL_REDUCE[dtype], name
        for backend in ("reference", "auto"):
            with use_backend(backend):
                assert ours(zh).item() == pytest.approx(want.item(), rel=1e-5, abs=1e-9), (name, backend)


def test_reference_gradcheck(seed):
    zh = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 4, dtype=torch.float64)
    z[0, 1] = 0
    assert torch.autograd.gradcheck(lambda a: ref.per_token_cosine(a, z), (zh,))
    assert torch.autograd.gradcheck(lambda a: ref.cosine_alignment_loss(a, z), (zh,))
    assert torch.autograd.gradcheck(lambda a: ref.smooth_l1_alignment_loss(a, z, 0.3), (zh,))
    assert torch.autograd.gradcheck(lambda a: ref.mse_alignment_loss(a, z), (zh,))
    # The kernel is float32 only: finite differences need a large step and loose tolerances there.
    zf = zh.detach().float().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ops.per_token_cosine(a, z.float(), backend="triton"), (zf,),
                                    eps=1e-3, atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _bad_calls():
    zh, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    wide = torch.randn(2, 3, 8)
    c = ops.per_token_cosine
    calls = [
        (TypeError, "z_hat", lambda: c(zh.numpy(), z)),
        (TypeError, "z must be a torch.Tensor", lambda: c(zh, [1.0])),
        (ValueError, "z_hat", lambda: c(zh[0], z)),
        (ValueError, "z must have 3", lambda: c(zh, z[0])),
        (TypeError, "z_hat", lambda: c(zh.int(), z)),
        (TypeError, "z must be float", lambda: c(zh, z.long())),
        (ValueError, "z must have z_hat's shape", lambda: c(zh, z[:, :2])),
        (ValueError, "z must have z_hat's shape", lambda: c(zh, torch.randn(2, 3, 5))),
        (ValueError, "z is on meta", lambda: c(zh, z.to("meta"))),
        (ValueError, "z_hat must have unit stride", lambda: c(wide[..., ::2], z)),
        (ValueError, "z must have unit stride", lambda: c(zh, wide[..., ::2])),
        (ValueError, "backend", lambda: c(zh, z, backend="gpu")),
        (ValueError, "beta", lambda: ops.smooth_l1_alignment_loss(zh, z, beta=0.0)),
        (ValueError, "beta", lambda: ops.smooth_l1_alignment_loss(zh, z, beta=-1)),
        (ValueError, "z must have z_hat's shape", lambda: ops.smooth_l1_alignment_loss(zh, z[:1])),
        (ValueError, "z must have z_hat's shape", lambda: ops.mse_alignment_loss(zh, z[..., :3])),
        (TypeError, "z_hat", lambda: ops.mse_alignment_loss(zh.bool(), z)),
    ]
    for eps in (float("nan"), float("inf"), -1e-8, 0.0, True, "1e-8", None):
        calls.append((ValueError, "eps", lambda eps=eps: c(zh, z, eps)))
        calls.append((ValueError, "eps", lambda eps=eps: ops.cosine_alignment_loss(zh, z, eps)))
    return calls


@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_validation_errors(backend):
    for exc, match, call in _bad_calls():
        with use_backend(backend), pytest.raises(exc, match=match):
            call()


def test_primitive_validation_errors():
    zh, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="z_hat must be float32, float16 or bfloat16"):
        tri.cosine_fwd(zh.double(), z, 1e-8)
    with pytest.raises(ValueError, match="eps"):
        tri.cosine_fwd(zh, z, float("nan"))
    with pytest.raises(ValueError, match="out must be"):
        tri.cosine_fwd(zh, z, 1e-8, out=torch.empty(2, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="dcos must be a float32"):
        tri.cosine_bwd(torch.ones(2, 3, dtype=torch.float16), zh, z, 1e-8)
    with pytest.raises(ValueError, match="dcos must have shape"):
        tri.cosine_bwd(torch.ones(3, 2), zh, z, 1e-8)
    with pytest.raises(ValueError, match="out must be"):
        tri.cosine_bwd(torch.ones(2, 3), zh, z, 1e-8, out=torch.empty(2, 3, 8)[..., ::2])


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------

def test_opcheck(seed):
    zh = torch.randn(2, 5, 17, requires_grad=True)
    z = torch.randn(2, 5, 17)
    zh_t = torch.randn(5, 2, 17).half().transpose(0, 1)  # permuted layout, mixed dtypes
    torch.library.opcheck(torch.ops.effkernels.per_token_cosine.default, (zh, z, 1e-8, "triton"))
    torch.library.opcheck(torch.ops.effkernels.per_token_cosine.default, (zh_t, z, 1e-6, "triton"))
    bwd = torch.ops.effkernels.per_token_cosine_backward.default
    torch.library.opcheck(bwd, (torch.randn(2, 5), zh.detach(), z, 1e-8, "triton"))
    torch.library.opcheck(bwd, (torch.tensor(0.5).expand(2, 5), zh_t, z, 1e-6, "triton"))


def test_compile_fullgraph_keeps_ops(seed):
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    rec = AotEagerAndRecordGraphs()

    def loss_fn(zh, z):
        return ops.cosine_alignment_loss(zh, z, backend="triton") + 0.1 * ops.per_token_cosine(
            zh, z * 2, backend="triton").square().sum()

    zh, z = torch.randn(2, 7, 17).half(), torch.randn(2, 7, 17)
    torch._dynamo.reset()
    results = []
    for backend in (rec, "aot_eager", None):
        fn = loss_fn if backend is None else torch.compile(loss_fn, fullgraph=True, backend=backend)
        zh_ = zh.clone().requires_grad_()
        loss = fn(zh_, z)
        loss.backward()
        results.append((loss, zh_.grad))
    for loss, grad in results[:2]:
        assert torch.equal(loss, results[2][0]) and torch.equal(grad, results[2][1])

    def targets(kind):
        gms = rec.fw_graphs if kind == "fw" else rec.bw_graphs
        return {str(n.target) for gm in gms for n in gm.graph.nodes if n.op == "call_function"}
    assert "effkernels.per_token_cosine.default" in targets("fw"), targets("fw")
    assert "effkernels.per_token_cosine_backward.default" in targets("bw"), targets("bw")


# ---------------------------------------------------------------------------------------------
# Zero projection rows in every dtype: the norm floor keeps the gradient finite
# ---------------------------------------------------------------------------------------------

def zero_row_case(backend, dtype, target_dtype, B=2, N=3, D=40):
    """The loss and d z_hat for a projection with zero rows, checked against closed forms.

    Below the floor e = max(eps, finfo(dtype).tiny) the gradient of the mean loss is -z / (B N e |z|):
    with eps = 1e-8 that is ~1e7 per element, past float16's max, so fp16 used to give inf."""
    zh, z = torch.randn(B, N, D).to(dtype), torch.randn(B, N, D).to(target_dtype)
    zh[0, 1] = 0
    zh[1, 2] = 0
    leaf = zh.clone().requires_grad_()
    loss = ops.cosine_alignment_loss(leaf, z, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all(), (backend, dtype)
    e = max(1e-8, torch.finfo(dtype).tiny)
    assert e == ref.norm_clamp(1e-8, dtype)
    z64, zh64 = z.double(), zh.double()
    for b, n in ((0, 1), (1, 2)):
        want = -z64[b, n] / (B * N * e * z64[b, n].norm())
        assert_close(leaf.grad[b, n], want, dtype, name=f"d z_hat[{b}, {n}]")
    # Every other row: the usual cosine gradient; the loss counts the zero rows as cos 0.
    zr = zh64.clone().requires_grad_()
    want_loss = -(torch.nn.functional.normalize(zr, dim=-1, eps=e)
                  * torch.nn.functional.normalize(z64, dim=-1, eps=e)).sum(-1).mean()
    want_loss.backward()
    assert_close(loss, want_loss, torch.float32, reduce=True, name="loss", scale=cosine_loss_scale(zh, z))
    assert_close(leaf.grad, zr.grad, dtype, reduce=True, name="d z_hat", same_dtype_ref=zr.grad.to(dtype))


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), ("reference", torch.float16),
                                           ("reference", torch.bfloat16), ("triton", torch.float32),
                                           ("triton", torch.float16)], ids=str)
@pytest.mark.parametrize("target", ("same", "float32"))
def test_zero_rows_finite_gradient_every_dtype(seed, backend, dtype, target):
    zero_row_case(backend, dtype, dtype if target == "same" else torch.float32)


def test_norm_floor_is_eps_except_float16():
    assert ref.norm_clamp(1e-8, torch.float32) == 1e-8 == ref.norm_clamp(1e-8, torch.bfloat16)
    assert ref.norm_clamp(1e-8, torch.float16) == 2.0 ** -14
    assert ref.norm_clamp(1e-3, torch.float16) == 1e-3
    # Why tiny: 1 / tiny is a quarter of the max in every IEEE format, so a mean loss's gradient
    # (|dcos| <= 1, divided by the clamped norm) stays finite; zero_row_case checks it on real rows.


# ---------------------------------------------------------------------------------------------
# token_weight: a weighted sum of the per-token losses (per-sample token budgets)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_token_weighted_losses_are_the_weighted_sums(seed, backend):
    """loss(token_weight=w) = sum w * (per-token loss) against plain float64 loops, for every loss
    and the fused projection (smooth-L1 and MSE per token: the mean over D); uniform 1/(B N)
    weights give the unweighted mean."""
    B, N, D, K = 2, 5, 7, 3
    zh, z, w = torch.randn(B, N, D), torch.randn(B, N, D), torch.rand(B, N)
    h, W, b = torch.randn(B, N, K), torch.randn(D, K), torch.randn(D)
    zd, zhd = z.double(), zh.double()
    cos = [[(zhd[i, n] @ zd[i, n] / (zhd[i, n].norm() * zd[i, n].norm())).item() for n in range(N)] for i in range(B)]
    hub = torch.nn.functional.smooth_l1_loss(zhd, zd, beta=0.05, reduction="none").mean(-1)
    y = h.double() @ W.double().T + b.double()
    pcos = torch.nn.functional.cosine_similarity(y, zd, dim=-1)
    with use_backend(backend):
        cases = [
            (ops.cosine_alignment_loss(zh, z, token_weight=w), -(torch.tensor(cos) * w.double()).sum()),
            (ops.smooth_l1_alignment_loss(zh, z, 0.05, token_weight=w), (hub * w.double()).sum()),
            (ops.mse_alignment_loss(zh, z, token_weight=w), ((zhd - zd).pow(2).mean(-1) * w.double()).sum()),
            (ops.projected_cosine_loss(h, W, b, z, token_weight=w), -(pcos * w.double()).sum()),
        ]
        u = torch.full((B, N), 1.0 / (B * N))
        for loss in (ops.cosine_alignment_loss, ops.smooth_l1_alignment_loss, ops.mse_alignment_loss):
            assert loss(zh, z, token_weight=u).item() == pytest.approx(loss(zh, z).item(), rel=1e-5, abs=1e-6)
    for got, want in cases:
        assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_token_weight_validation():
    zh, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for w, match in ((torch.rand(3, 2), r"token_weight must be \(B, N\)"), (torch.rand(2, 3, 1), "token_weight"),
                     (torch.ones(2, 3, dtype=torch.int64), "token_weight")):
        for call in (lambda: ops.cosine_alignment_loss(zh, z, token_weight=w),
                     lambda: ops.smooth_l1_alignment_loss(zh, z, token_weight=w),
                     lambda: ops.mse_alignment_loss(zh, z, token_weight=w),
                     lambda: ops.projected_cosine_loss(zh, torch.randn(4, 4), None, z, token_weight=w)):
            with pytest.raises((TypeError, ValueError), match=match):
                call()
