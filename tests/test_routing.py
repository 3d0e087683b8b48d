"""Token routing: Triton kernels (interpreter) vs the reference, the reference vs plain float64 loops,
the index helpers, every validation error, opcheck and torch.compile graph capture."""
import pytest
import torch

import effkernels.ops as ops
from effkernels import use_backend
from effkernels._triton import routing as tri
from effkernels.reference import routing as ref
from helpers import poison, count_index_checks

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IDX_DTYPES = (torch.int32, torch.int64)
# (B, N, D): odd, non-power-of-two token counts; D covers one lane, a ragged block, a D-multi-block
# row (1152 = 3 x 512, DiT-XL's width) and the sizes the brief names.
SHAPES = ((2, 7, 1), (3, 9, 17), (2, 5, 384), (1, 11, 1000), (1, 3, 1152))


def _ks(n):
    return sorted({1, n // 2, n})


def _draw(b, n, k, idx_dtype, gen=None):
    # Unsorted, so the kernels cannot lean on ascending order.
    return ref.draw_route(b, n, k, sort=False, generator=gen).to(idx_dtype).contiguous()


def _randn(*shape, dtype):
    return torch.randn(*shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# Kernels vs reference: exact, since routing only moves data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_match_reference_fwd_bwd(seed, dtype, idx_dtype, shape):
    B, N, D = shape
    for K in _ks(N):
        idx = _draw(B, N, K, idx_dtype)
        x = _randn(B, N, D, dtype=dtype)
        x_sub = _randn(B, K, D, dtype=dtype)
        g_sub, g_full = _randn(B, K, D, dtype=dtype), _randn(B, N, D, dtype=dtype)

        outs = {}
        for backend in ("triton", "reference"):
            xa = x.clone().requires_grad_()
            sa = x_sub.clone().requires_grad_()
            ga = ops.route_gather(xa, idx, backend=backend)
            (dx_g,) = torch.autograd.grad(ga, xa, g_sub)
            sc = ops.route_scatter(xa, sa, idx, backend=backend)
            dx_s, ds_s = torch.autograd.grad(sc, (xa, sa), g_full)
            outs[backend] = (ga, dx_g, sc, dx_s, ds_s)
        for name, got, want in zip(("gather", "d_x(gather)", "scatter", "d_x(scatter)", "d_x_sub"),
                                   outs["triton"], outs["reference"]):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got, want), f"{name} differs (K={K})"
        # The gradient of scatter w.r.t. x is zero exactly on the routed rows.
        rows = idx.long()
        assert (outs["triton"][3].gather(1, rows[..., None].expand(-1, -1, D)) == 0).all()


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_primitives_write_every_element(seed, dtype, idx_dtype):
    B, N, D = 2, 9, 17
    for K in _ks(N):
        idx = _draw(B, N, K, idx_dtype)
        x, x_sub = _randn(B, N, D, dtype=dtype), _randn(B, K, D, dtype=dtype)
        out = tri.gather(x, idx, out=poison((B, K, D), dtype))
        assert torch.equal(out, ref.route_gather(x, idx))
        zeros = torch.zeros_like(x)
        cases = {(True, True): ref.route_scatter(x, x_sub, idx),
                 (True, False): ref.route_scatter(x, None, idx),
                 (False, True): ref.route_scatter(zeros, x_sub, idx)}
        for (has_x, has_sub), want in cases.items():
            got = tri.scatter(x if has_x else None, x_sub if has_sub else None, idx, N,
                              out=poison((B, N, D), dtype))
            assert torch.equal(got, want), f"scatter x={has_x} x_sub={has_sub} K={K}"


def test_bf16_bit_patterns_survive(seed):
    # Values whose fp32 round trip would still be exact but whose bits a careless upcast or
    # arithmetic path could flip (signed zero, subnormal, inf, max): the copy must be bitwise.
    special = torch.tensor([0.0, -0.0, 1e-40, -3.0e38, float("inf"), float("-inf"), 1.0 / 3],
                           dtype=torch.bfloat16)
    x = torch.stack([special, special.flip(0)]).reshape(2, 1, 7).expand(2, 3, 7).contiguous()
    idx = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)
    got = tri.gather(x, idx).view(torch.int16)
    assert torch.equal(got, ref.route_gather(x, idx).view(torch.int16))
    x_sub = torch.full((2, 2, 7), -0.0, dtype=torch.bfloat16)
    got = tri.scatter(x, x_sub, idx, 3).view(torch.int16)
    assert torch.equal(got, ref.route_scatter(x, x_sub, idx).view(torch.int16))


def test_inverse_map_kernel(seed):
    idx = _draw(3, 10, 4, torch.int64)
    inv = tri.inverse_map(idx, 10)
    assert inv.dtype == torch.int32
    assert torch.equal(inv.long(), ref.inverse(idx, 10))


def test_block_choice_covers_aot_specs():
    listed = {(c["BLOCK_D"], c["BLOCK_R"], o["num_warps"]) for fn, _, c, o in tri.aot_specs() if "BLOCK_D" in c}
    for d in (1, 17, 32, 33, 384, 1000, 1024, 1025, 1152, 4096, 5000):
        blk, rows, warps = tri._block_d(d)
        assert (blk, rows, warps) in listed
        assert blk & (blk - 1) == 0 and (blk >= d or blk >= 512)
    assert tri._block_d(1152)[0] == 512 and tri._block_d(2048)[0] == 1024


# ---------------------------------------------------------------------------------------------
# The reference vs independent float64 loops, and gradcheck
# ---------------------------------------------------------------------------------------------

def _loop_gather(x, idx):
    B, K = idx.shape
    out = torch.zeros(B, K, x.shape[2], dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            out[b, k] = x[b, int(idx[b, k])]
    return out


def _loop_scatter(x, x_sub, idx):
    out = x.double().clone()
    for b in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            out[b, int(idx[b, k])] = x_sub[b, k]
    return out


@pytest.mark.parametrize("shape", ((2, 7, 3), (3, 5, 1)), ids=str)
def test_reference_vs_float64_loops(seed, shape):
    B, N, D = shape
    for K in _ks(N):
        idx = _draw(B, N, K, torch.int64)
        x, x_sub = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, K, D, dtype=torch.float64)
        assert torch.equal(ref.route_gather(x, idx), _loop_gather(x, idx))
        assert torch.equal(ref.route_scatter(x, x_sub, idx), _loop_scatter(x, x_sub, idx))
        assert torch.equal(ref.route_scatter(x, None, idx), _loop_scatter(x, torch.zeros_like(x_sub), idx))


def test_reference_gradcheck(seed):
    B, N, D, K = 2, 5, 3, 3
    idx = _draw(B, N, K, torch.int64)
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    x_sub = torch.randn(B, K, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ref.route_gather(a, idx), (x,))
    assert torch.autograd.gradcheck(lambda a, s: ref.route_scatter(a, s, idx), (x, x_sub))
    assert torch.autograd.gradcheck(lambda a, s: ops.route_scatter(a, s, idx, backend="triton"),
                                    (x.detach().float().requires_grad_(), x_sub.detach().float().requires_grad_()),
                                    eps=1e-2, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# draw_route / complement / inverse
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,N,K", ((3, 13, 5), (2, 8, 8), (4, 1, 1), (2, 6, 0)))
def test_index_helpers(seed, B, N, K):
    g = torch.Generator().manual_seed(seed)
    idx = ops.draw_route(B, N, K, generator=g)
    assert idx.shape == (B, K) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < N)).all()
    assert (idx[:, 1:] > idx[:, :-1]).all(), "sorted ascending, hence distinct"
    if K == N:
        assert torch.equal(idx, torch.arange(N).expand(B, N))
    # Deterministic under a generator; the unsorted draw holds the same set.
    assert torch.equal(idx, ops.draw_route(B, N, K, generator=torch.Generator().manual_seed(seed)))
    raw = ops.draw_route(B, N, K, generator=torch.Generator().manual_seed(seed), sort=False)
    assert torch.equal(raw.sort(dim=1).values, idx)
    comp = ops.complement(idx, N)
    assert comp.shape == (B, N - K)
    assert (comp[:, 1:] > comp[:, :-1]).all()
    both = torch.cat([idx, comp], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(N).expand(B, N)), "idx and complement partition the tokens"
    inv = ops.inverse(raw, N)
    assert inv.shape == (B, N) and inv.dtype == torch.int64
    for b in range(B):
        for n in range(N):
            hits = (raw[b] == n).nonzero().flatten().tolist()
            assert inv[b, n].item() == (hits[0] if hits else -1)


def test_draw_route_differs_across_generators(seed):
    a = ops.draw_route(4, 64, 16, generator=torch.Generator().manual_seed(seed))
    b = ops.draw_route(4, 64, 16, generator=torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) > 1, "each sample draws its own route"


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _bad_calls():
    x, idx, sub = torch.randn(2, 5, 3), torch.tensor([[0, 2], [4, 1]]), torch.randn(2, 2, 3)
    g = ops.route_gather
    s = ops.route_scatter
    return [
        (TypeError, "x", lambda: g(x.numpy(), idx)),
        (ValueError, "x", lambda: g(x[0], idx)),
        (TypeError, "x", lambda: g(x.long(), idx)),
        (ValueError, "idx", lambda: g(x, idx[0])),
        (TypeError, "idx", lambda: g(x, idx.float())),
        (ValueError, "idx has batch", lambda: g(x, idx[:1])),
        (ValueError, "idx selects K", lambda: g(x, torch.arange(6).expand(2, 6))),
        (ValueError, "idx is on meta", lambda: g(x, idx.to("meta"))),
        (ValueError, "idx values", lambda: g(x, torch.tensor([[0, 5], [1, 2]]))),
        (ValueError, "idx values", lambda: g(x, torch.tensor([[0, -1], [1, 2]]))),
        (ValueError, "idx has a duplicate", lambda: g(x, torch.tensor([[3, 3], [1, 2]]))),
        (ValueError, "x_sub", lambda: s(x, sub[:, :1], idx)),
        (ValueError, "x_sub", lambda: s(x, sub[0], idx)),
        (TypeError, "x_sub", lambda: s(x, sub.half(), idx)),
        (ValueError, "x_sub is on meta", lambda: s(x, sub.to("meta"), idx)),
        (ValueError, "idx values", lambda: s(x, sub, torch.tensor([[0, 7], [1, 2]], dtype=torch.int32))),
        (ValueError, "idx has a duplicate", lambda: s(x, sub, torch.tensor([[1, 2], [0, 0]]))),
        (ValueError, "backend", lambda: g(x, idx, backend="tpu")),
    ]


@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_validation_errors(backend):
    for exc, match, call in _bad_calls():
        with use_backend(backend), pytest.raises(exc, match=match):
            call()


def test_primitive_validation_errors():
    x, idx = torch.randn(2, 5, 3), torch.tensor([[0, 2], [4, 1]])
    with pytest.raises(ValueError, match="x or x_sub"):
        tri.scatter(None, None, idx, 5)
    with pytest.raises(TypeError, match="x must be float32"):
        tri.gather(x.double(), idx)
    with pytest.raises(ValueError, match="x must be contiguous"):
        tri.gather(x.transpose(0, 1).contiguous().transpose(0, 1), idx)
    with pytest.raises(ValueError, match="idx must be a contiguous"):
        tri.gather(x, idx.t().contiguous().t())
    with pytest.raises(ValueError, match="out must be"):
        tri.gather(x, idx, out=torch.empty(2, 2, 4))
    with pytest.raises(ValueError, match="num_tokens"):
        tri.scatter(x, None, idx, 1)
    with pytest.raises(ValueError, match="x must have shape"):
        tri.scatter(x, None, idx, 6)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------

def test_opcheck(seed):
    x = torch.randn(2, 7, 17, requires_grad=True)
    sub = torch.randn(2, 3, 17, requires_grad=True)
    idx = _draw(2, 7, 3, torch.int32)
    torch.library.opcheck(torch.ops.effkernels.route_gather.default, (x, idx, "triton"))
    torch.library.opcheck(torch.ops.effkernels.route_scatter.default, (x, sub, idx, 7, "triton"))
    for args in ((None, sub), (x, None)):  # the forms the backward passes use, without grad
        torch.library.opcheck(torch.ops.effkernels.route_scatter.default,
                              (*(a if a is None else a.detach() for a in args), idx, 7, "triton"))


def test_scatter_with_none_input_backward_and_double_backward(seed):
    # route_gather's backward is route_scatter(None, grad, idx): double backward goes through here.
    x = torch.randn(2, 5, 3, dtype=torch.float32, requires_grad=True)
    idx = _draw(2, 5, 2, torch.int64)
    (gx,) = torch.autograd.grad(ops.route_gather(x, idx, backend="triton").square().sum(), x,
                                create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    assert torch.equal(ggx, ref.route_scatter(torch.zeros_like(x), torch.full((2, 2, 3), 2.0), idx))
    sub = torch.randn(2, 2, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.effkernels.route_scatter.default, (None, sub, idx, 5, "triton"))


def test_compile_fullgraph_keeps_ops(seed):
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    rec = AotEagerAndRecordGraphs()

    def step(x, x_sub, idx):
        kept = ops.route_gather(x, idx, backend="triton")
        return ops.route_scatter(x * 2, kept * x_sub, idx, backend="triton")

    x = torch.randn(2, 9, 17)
    x_sub = torch.randn(2, 4, 17)
    idx = _draw(2, 9, 4, torch.int64)
    torch._dynamo.reset()
    results = []
    for backend in (rec, "aot_eager", None):
        fn = step if backend is None else torch.compile(step, fullgraph=True, backend=backend)
        xa, sa = x.clone().requires_grad_(), x_sub.clone().requires_grad_()
        out = fn(xa, sa, idx)
        out.backward(torch.ones_like(out))
        results.append((out, xa.grad, sa.grad))
    for res in results[:2]:
        for got, want in zip(res, results[2]):
            assert torch.equal(got, want)

    def targets(kind):
        gms = rec.fw_graphs if kind == "fw" else rec.bw_graphs
        return {str(n.target) for gm in gms for n in gm.graph.nodes if n.op == "call_function"}
    for kind in ("fw", "bw"):  # the backward of each op is built from the same two ops
        assert {"effkernels.route_gather.default", "effkernels.route_scatter.default"} <= targets(kind), kind


# ---------------------------------------------------------------------------------------------
# draw_route's arguments, and where index values are checked (once, never inside the ops)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,exc,match", [
    ((2, 17, 18), ValueError, r"keep must be an int in \[0, 17\], got 18"),
    ((2, 17, -1), ValueError, "keep"),
    ((2, 17, 2.5), TypeError, "keep must be an int, got float"),
    ((2, 17, True), TypeError, "keep"),
    ((-1, 17, 2), ValueError, "batch"),
    ((2.0, 17, 2), TypeError, "batch"),
    ((2, -3, 0), ValueError, "num_tokens"),
    ((2, "17", 2), TypeError, "num_tokens"),
])
def test_draw_route_validates_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        ops.draw_route(*args)


def test_draw_route_edges():
    import numpy as np
    assert ops.draw_route(2, 17, 0).shape == (2, 0)
    assert torch.equal(ops.draw_route(2, 17, 17), torch.arange(17).expand(2, 17))
    assert ops.draw_route(np.int64(3), 5, torch.tensor(2)).shape == (3, 2)




@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_index_checked_once_in_the_public_call_never_in_backward(seed, monkeypatch, backend):
    calls = count_index_checks(monkeypatch)
    x = torch.randn(2, 9, 5, requires_grad=True)
    sub = torch.randn(2, 4, 5, requires_grad=True)
    idx = _draw(2, 9, 4, torch.int64)
    g = ops.route_gather(x, idx, backend=backend)
    s = ops.route_scatter(x, sub, idx, backend=backend)
    assert calls == ["idx", "idx"]  # one per public call, in Python, before the op
    (g.sum() + s.square().sum()).backward()
    assert len(calls) == 2, "the ops' backward must not check (nor sync with the host)"
    ops.route_gather(x, idx, backend=backend, check_idx=False)
    ops.route_scatter(x, sub, idx, backend=backend, check_idx=False)
    # Called directly, the registered ops trust their index.
    torch.ops.effkernels.route_gather(x, idx, "triton")
    assert len(calls) == 2
    monkeypatch.setenv("EFFKERNELS_CHECK_INDICES", "0")
    ops.route_gather(x, idx, backend=backend)
    assert len(calls) == 2


def test_check_route_index_is_public_and_names_its_argument():
    assert ops.check_route_index is ops.routing.check_route_index
    ops.check_route_index(torch.tensor([[0, 4], [3, 1]]), 5, batch=2)
    ops.check_route_index(torch.zeros(2, 0, dtype=torch.long), 5)
    cases = [
        (TypeError, "keep_idx must be a torch.Tensor", [[0, 1]], {}),
        (TypeError, "keep_idx must be an int32 or int64", torch.zeros(2, 2), {}),
        (ValueError, "keep_idx must have 2 dims", torch.zeros(2, dtype=torch.long), {}),
        (ValueError, "keep_idx has batch 2 but x has batch 3", torch.zeros(2, 1, dtype=torch.long), {"batch": 3}),
        (ValueError, "keep_idx selects K=6", torch.arange(6).expand(2, 6), {}),
        (ValueError, r"keep_idx values must lie in \[0, 5\), got range \[0, 5\]", torch.tensor([[0, 5]]), {}),
        (ValueError, r"keep_idx values .* \[-2, 1\]", torch.tensor([[-2, 1]]), {}),
        (ValueError, "keep_idx has a duplicate", torch.tensor([[1, 3], [2, 2]], dtype=torch.int32), {}),
    ]
    for exc, match, idx, kw in cases:
        with pytest.raises(exc, match=match):
            ops.check_route_index(idx, 5, name="keep_idx", **kw)


def test_check_route_index_syncs_once(seed, monkeypatch):
    """The value check reads the index on the host once (one bool), however many rows it has."""
    idx = _draw(4, 50, 20, torch.int64)
    syncs = []
    real = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: syncs.append(1) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: (_ for _ in ()).throw(AssertionError("item()")))
    ops.check_route_index(idx, 50)
    assert len(syncs) == 1


def test_compiled_ops_skip_the_value_check(seed, monkeypatch):
    calls = count_index_checks(monkeypatch)
    idx = _draw(2, 9, 4, torch.int64)
    torch._dynamo.reset()
    f = torch.compile(lambda x: ops.route_gather(x, idx, backend="triton").sum(), fullgraph=True,
                      backend="aot_eager")
    x = torch.randn(2, 9, 5, requires_grad=True)
    f(x).backward()
    assert calls == [] and torch.equal(x.grad, ref.route_scatter(torch.zeros_like(x), torch.ones(2, 4, 5), idx))


# ---------------------------------------------------------------------------------------------
# segment_expand: per-sample rows broadcast to packed rows, with a fixed-order segment-sum backward
# ---------------------------------------------------------------------------------------------

def _segments(lengths, device="cpu"):
    from effkernels.nn.routing import TokenPack

    n = max(lengths) + 1
    return TokenPack.from_indices([torch.arange(k) for k in lengths], n) if all(lengths) else None


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_segment_expand_matches_index_select_fwd_bwd(seed, dtype):
    """Forward: row t = v[seg[t]] exactly. Backward: each segment's gradient rows summed, against a
    plain float64 loop; within 16-bit rounding of the float32 sum, and repeatable to the bit."""
    from helpers import assert_close

    lengths = [1, 7, 33, 2, 100]
    pack = _segments(lengths)
    S, C = len(lengths), 2 * 9 + 1
    v = _randn(S, C, dtype=dtype).requires_grad_()
    out = ops.segment_expand(v, pack.seg, pack.cu_seqlens, pack.max_seqlen)
    assert out.dtype == dtype and torch.equal(out, v.detach().index_select(0, pack.seg))
    g = _randn(pack.total, C, dtype=dtype)
    (dv,) = torch.autograd.grad(out, v, g)
    want = torch.zeros(S, C, dtype=torch.float64)
    for t, s in enumerate(pack.seg.tolist()):
        want[s] += g[t].double()
    assert_close(dv, want, dtype, reduce=True, name="dv", scale=None)
    (again,) = torch.autograd.grad(ops.segment_expand(v, pack.seg, pack.cu_seqlens, pack.max_seqlen), v, g)
    assert torch.equal(dv, again)


def test_segment_sum_with_empty_segments_and_slack(seed):
    """A segment of length 0 gets a zero gradient; max_seqlen above the longest segment only pads."""
    cu = torch.tensor([0, 3, 3, 4], dtype=torch.int32)
    rows = torch.randn(4, 5, dtype=torch.float64)
    for m in (3, 10):
        got = ref.segment_sum(rows, cu, m)
        want = torch.stack([rows[:3].sum(0), torch.zeros(5, dtype=torch.float64), rows[3]])
        assert torch.allclose(got, want, rtol=1e-15, atol=0)


def test_segment_expand_gradcheck(seed):
    pack = _segments([3, 1, 4])
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.segment_expand(v, pack.seg, pack.cu_seqlens, pack.max_seqlen), (v,))


def test_segment_expand_validation_errors():
    pack = _segments([2, 3])
    v = torch.randn(2, 4)
    cases = [
        ((torch.randn(2, 4, 1), pack.seg, pack.cu_seqlens, 3), ValueError, "v"),
        ((v.long(), pack.seg, pack.cu_seqlens, 3), (TypeError, ValueError), "v"),
        ((v, pack.seg.float(), pack.cu_seqlens, 3), ValueError, "segment_ids"),
        ((v, pack.seg, pack.cu_seqlens[:-1], 3), ValueError, "cu_seqlens"),
        ((v, pack.seg, pack.cu_seqlens, 0), ValueError, "max_seqlen"),
        ((v, pack.seg, pack.cu_seqlens, 2.5), TypeError, "max_seqlen"),
    ]
    for args, exc, name in cases:
        with pytest.raises(exc, match=name):
            ops.segment_expand(*args)


def test_segment_expand_compiles_fullgraph(seed):
    pack = _segments([2, 5, 1])
    v = torch.randn(3, 6, requires_grad=True)
    f = torch.compile(lambda v: ops.segment_expand(v, pack.seg, pack.cu_seqlens, pack.max_seqlen).square().sum(),
                      fullgraph=True, backend="aot_eager")
    (got,) = torch.autograd.grad(f(v), v)
    (want,) = torch.autograd.grad(v.index_select(0, pack.seg).square().sum(), v)
    torch.testing.assert_close(got, want)
