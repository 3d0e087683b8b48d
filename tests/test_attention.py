"""Visible-token attention: the reference vs float64 loops, the packed op vs the dense form, its
registered backward, validation, torch.compile, and flash-attn's varlen path where it exists."""
import math

import pytest
import torch

from effkernels import ops
from effkernels.ops.attention import _varlen_ref_bwd_op, _varlen_ref_op
from effkernels.reference import attention as ref
from helpers import assert_close, rel_err


def loop_attention64(q, k, v, scale):
    """Plain-loop float64 attention for one (L, Dh) head."""
    L, Dh = q.shape
    out = torch.zeros(L, Dh, dtype=torch.float64)
    for i in range(L):
        s = [sum(float(q[i, d]) * float(k[j, d]) for d in range(Dh)) * scale for j in range(L)]
        m = max(s)
        w = [math.exp(x - m) for x in s]
        z = sum(w)
        for j in range(L):
            out[i] += (w[j] / z) * v[j].double()
    return out


def test_dense_reference_vs_loop(seed):
    B, H, K, Dh = 2, 3, 5, 7
    q, k, v = (torch.randn(B, H, K, Dh, dtype=torch.float64) for _ in range(3))
    out = ref.dense_attention(q, k, v)
    for b in range(B):
        for h in range(H):
            want = loop_attention64(q[b, h], k[b, h], v[b, h], Dh ** -0.5)
            assert rel_err(out[b, h], want) < 1e-12


def test_dense_reference_gradcheck(seed):
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(ref.dense_attention, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_op_matches_reference(seed, dtype):
    q, k, v = (torch.randn(3, 2, 9, 17).to(dtype) for _ in range(3))
    want = ref.dense_attention(q.double(), k.double(), v.double())
    same = ref.dense_attention(q, k, v)
    assert_close(ops.visible_attention(q, k, v), want, dtype, same_dtype_ref=same)


def _packed(lengths, H=2, Dh=5, dtype=torch.float32):
    T = sum(lengths)
    qkv = [torch.randn(T, H, Dh, dtype=dtype, requires_grad=True) for _ in range(3)]
    cu = ref.lengths_to_cu_seqlens(torch.tensor(lengths))
    return qkv, cu


@pytest.mark.parametrize("lengths", [[1], [5, 3, 7], [4, 1, 1, 9]])
def test_varlen_equals_dense_per_segment(seed, lengths):
    (q, k, v), cu = _packed(lengths)
    out = ops.visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
    start = 0
    for L in lengths:
        seg = [t[start:start + L].detach().transpose(0, 1)[None] for t in (q, k, v)]
        want = ref.dense_attention(*seg)[0].transpose(0, 1)
        assert rel_err(out[start:start + L], want) < 1e-6
        start += L


def test_varlen_backward_matches_autograd(seed):
    (q, k, v), cu = _packed([3, 6, 2])
    out = ops.visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=6)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(ref.varlen_attention(qq, kk, vv, cu), (qq, kk, vv), g.double())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_varlen_opcheck(seed):
    (q, k, v), cu = _packed([3, 4])
    torch.library.opcheck(_varlen_ref_op, (q, k, v, cu, 4, 0.5))
    d = torch.randn(7, 2, 5)
    torch.library.opcheck(_varlen_ref_bwd_op, (d, q.detach(), k.detach(), v.detach(), cu, 4, 0.5))


def test_varlen_compiles_fullgraph(seed):
    (q, k, v), cu = _packed([2, 5])
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    f = lambda q, k, v, cu: ops.visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=5)  # noqa: E731
    out = torch.compile(f, fullgraph=True, backend=backend)(q, k, v, cu)
    assert rel_err(out, f(q, k, v, cu)) == 0
    assert "effkernels.varlen_attention" in str(graphs[0].graph)


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.randn(2, 3)), "q must have 3 dims"),
    (dict(k=torch.randn(6, 2, 4)), "q, k, v must share one shape"),
    (dict(cu_seqlens=torch.tensor([0.0, 7.0])), "cu_seqlens must be an int32 or int64"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), "cu_seqlens must hold at least 2"),
    (dict(max_seqlen=0), "max_seqlen must be a positive int"),
    (dict(max_seqlen=None), "max_seqlen must be a positive int"),
    (dict(v=torch.randn(7, 2, 5, dtype=torch.float64)), "v has dtype"),
])
def test_varlen_validation(bad, match):
    args = dict(q=torch.randn(7, 2, 5), k=torch.randn(7, 2, 5), v=torch.randn(7, 2, 5),
                cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=4)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.visible_attention(args["q"], args["k"], args["v"], cu_seqlens=args["cu_seqlens"],
                              max_seqlen=args["max_seqlen"])


def test_dense_validation():
    with pytest.raises(ValueError, match="q must have 4 dims"):
        ops.visible_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (cuda device) and flash_attn")
def test_flash_attn_varlen_matches_reference(seed):
    pytest.importorskip("flash_attn", reason="flash_attn not importable")
    (q, k, v), cu = _packed([5, 9, 2], dtype=torch.float16)
    q, k, v, cu = (t.detach().cuda() for t in (q, k, v, cu))
    out = ops.visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=9)
    want = ref.varlen_attention(q.double(), k.double(), v.double(), cu)
    same = ref.varlen_attention(q, k, v, cu)
    assert_close(out, want, torch.float16, same_dtype_ref=same)


@pytest.mark.parametrize("cu, max_seqlen, match", [
    ([1, 3, 7], 4, "cu_seqlens must start at 0, got 1"),
    ([0, 5, 3, 7], 5, "cu_seqlens must be non-decreasing"),
    ([0, 3, 6], 3, "cu_seqlens must end at the number of packed rows T=7, got 6"),   # row 6 was left zero
    ([0, 3, 9], 6, "cu_seqlens must end at the number of packed rows T=7, got 9"),
    ([0, 2, 7], 4, r"max_seqlen=4 is shorter than the longest segment in cu_seqlens \(5\)"),
])
@pytest.mark.parametrize("idx_dtype", (torch.int32, torch.int64), ids=str)
def test_varlen_cu_seqlens_values(cu, max_seqlen, match, idx_dtype):
    q = torch.randn(7, 2, 5)
    with pytest.raises(ValueError, match=match):
        ops.visible_attention(q, q, q, cu_seqlens=torch.tensor(cu, dtype=idx_dtype), max_seqlen=max_seqlen)


def test_varlen_cu_seqlens_edge_values_pass(seed):
    q = torch.randn(7, 2, 5)
    # An empty segment and a max_seqlen above the longest one are both fine (flash-attn's rules).
    out = ops.visible_attention(q, q, q, cu_seqlens=torch.tensor([0, 0, 3, 7]), max_seqlen=9)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("form", ("dense", "packed"))
def test_explicit_backend_that_cannot_run_is_an_error(monkeypatch, backend, form):
    """As for every other op: no silent fallback to the reference on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton on CPU tensors needs the interpreter
    if form == "dense":
        q = torch.randn(2, 2, 5, 4)
        call = lambda: ops.visible_attention(q, q, q, backend=backend)  # noqa: E731
    else:
        q = torch.randn(7, 2, 4)
        call = lambda: ops.visible_attention(q, q, q, cu_seqlens=torch.tensor([0, 3, 7]), max_seqlen=4,  # noqa: E731
                                             backend=backend)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run op visible_attention on cpu"):
        call()
    d = torch.randn(2, 2, 5, 4)
    with pytest.raises(ValueError, match="backend"):
        ops.visible_attention(d, d, d, backend="tpu")
    ops.visible_attention(d, d, d, backend="reference")
