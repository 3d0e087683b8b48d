"""The Triton varlen flash-attention kernel (effkernels._triton.attention) under the interpreter:
forward, log-sum-exp and dq/dk/dv vs the reference on odd segment lengths, strided views, the
op's dispatch, its registration (opcheck, torch.compile), bad input, and AOT coverage."""
import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from effkernels import ops
from effkernels._triton import attention as tri
from effkernels.ops import attention as opsatt
from effkernels.reference import attention as ref
from helpers import assert_close, poison, rel_err

# One packed batch with an empty segment, a single token, lengths on both sides of the 64-row
# block and one that needs two blocks with a ragged tail.
LENGTHS = [0, 1, 7, 33, 100]


def _packed(lengths, H, Dh, dtype, gen):
    T = sum(lengths)
    q, k, v, dout = (torch.randn(T, H, Dh, generator=gen).to(dtype) for _ in range(4))
    return q, k, v, dout, ref.lengths_to_cu_seqlens(torch.tensor(lengths))


def _lse64(q, k, cu, scale):
    """Per-row log-sum-exp of the scaled scores, float64, (H, T): an independent spec of lse."""
    T, H, _ = q.shape
    out = torch.zeros(H, T, dtype=torch.float64)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = torch.einsum("qhd,khd->hqk", q[a:b].double(), k[a:b].double()) * scale
        out[:, a:b] = torch.logsumexp(s, -1)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("Dh", [32, 64, 72])
def test_kernel_matches_reference(seed, dtype, Dh):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout, cu = _packed(LENGTHS, 1, Dh, dtype, gen)
    T, scale, ms = q.shape[0], Dh ** -0.5, max(LENGTHS)
    out, lse = tri.varlen_fwd(q, k, v, cu, ms, scale, out=poison(q.shape, dtype),
                              lse=poison((1, T), torch.float32))
    q64, k64, v64, d64 = (t.double() for t in (q, k, v, dout))
    assert_close(out, ref.varlen_attention(q64, k64, v64, cu, scale=scale), dtype,
                 same_dtype_ref=ref.varlen_attention(q, k, v, cu, scale=scale))
    # lse in float32 whatever the input dtype: its error is the fp32 accumulation's, not dtype's.
    assert rel_err(lse, _lse64(q, k, cu, scale)) < 1e-6
    grads = tri.varlen_bwd(dout, q, k, v, out, lse, cu, ms, scale,
                           *(poison(q.shape, dtype) for _ in range(3)))
    want = ref.varlen_attention_backward(d64, q64, k64, v64, cu, scale)
    same = ref.varlen_attention_backward(dout, q, k, v, cu, scale)
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want, same):
        assert_close(g, w, dtype, reduce=True, name=name, same_dtype_ref=s)


def test_kernel_bf16_under_interpreter(seed):
    """bf16 runs its tl.dot in fp32 and rounds its stores by hand here (the interpreter's bf16 dot
    and casts are wrong): this checks that path, not the GPU's bf16 tensor-core one."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout, cu = _packed([3, 70], 1, 16, torch.bfloat16, gen)
    out, lse = tri.varlen_fwd(q, k, v, cu, 70, 0.25)
    q64, k64, v64, d64 = (t.double() for t in (q, k, v, dout))
    assert_close(out, ref.varlen_attention(q64, k64, v64, cu, scale=0.25), torch.bfloat16,
                 same_dtype_ref=ref.varlen_attention(q, k, v, cu, scale=0.25))
    grads = tri.varlen_bwd(dout, q, k, v, out, lse, cu, 70, 0.25)
    want = ref.varlen_attention_backward(d64, q64, k64, v64, cu, 0.25)
    same = ref.varlen_attention_backward(dout, q, k, v, cu, 0.25)
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want, same):
        assert_close(g, w, torch.bfloat16, name=name, same_dtype_ref=s)


def test_kernel_strided_views_and_heads(seed):
    """q, k, v as the attention layer makes them (views of one (T, 3, H, Dh) buffer, row stride
    3 H Dh), several heads, a non-contiguous dout and a max_seqlen above the longest segment:
    bit-identical to the same kernel on contiguous copies, and right against the reference."""
    gen = torch.Generator().manual_seed(seed)
    lengths, H, Dh = [5, 0, 66], 2, 24
    T = sum(lengths)
    q, k, v = torch.randn(T, 3, H, Dh, generator=gen).unbind(1)
    dout = torch.randn(T, 2 * H, Dh, generator=gen)[:, ::2]  # head stride 2 Dh
    cu = ref.lengths_to_cu_seqlens(torch.tensor(lengths)).long()
    out, lse = tri.varlen_fwd(q, k, v, cu, 80, 0.3)
    out_c, lse_c = tri.varlen_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu, 80, 0.3)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    assert_close(out, ref.varlen_attention(q.double(), k.double(), v.double(), cu, scale=0.3), torch.float32)
    grads = tri.varlen_bwd(dout, q, k, v, out, lse, cu, 80, 0.3)
    grads_c = tri.varlen_bwd(dout.contiguous(), *(t.contiguous() for t in (q, k, v)), out, lse, cu, 80, 0.3)
    want = ref.varlen_attention_backward(dout.double(), q.double(), k.double(), v.double(), cu, 0.3)
    for g, gc, w in zip(grads, grads_c, want):
        assert torch.equal(g, gc)
        assert_close(g, w, torch.float32, reduce=True)


# ---------------------------------------------------------------------------------------------
# The public op on the triton backend: dispatch, autograd, registration
# ---------------------------------------------------------------------------------------------

def test_op_triton_backend_forward_backward(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout, cu = _packed([4, 9, 1], 2, 8, torch.float32, gen)
    qkv = [t.requires_grad_() for t in (q, k, v)]
    out = ops.visible_attention(*qkv, cu_seqlens=cu, max_seqlen=9, backend="triton")
    got = torch.autograd.grad(out, qkv, dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = ref.varlen_attention(q64, k64, v64, cu)
    want = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    assert_close(out, out64, torch.float32)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32, reduce=True)


def test_dispatch(monkeypatch):
    """Which path runs the packed form, per requested backend, device and dtype. CUDA tensors are
    faked as meta tensors with is_cuda patched: _packed_path reads only device, dtype and shape."""
    from effkernels import backends

    class FakeCuda:
        def __init__(self, dtype, dh=64):
            self.dtype, self.shape, self.is_cuda, self.device = dtype, (5, 2, dh), True, torch.device("cuda")

    cpu = torch.empty(5, 2, 64)
    assert opsatt._packed_path("auto", cpu) == "reference"  # the interpreter is a test tool
    assert opsatt._packed_path("triton", cpu) == "triton"
    assert opsatt._packed_path("reference", cpu) == "reference"
    for fa in (True, False):
        monkeypatch.setattr(backends, "flash_attn_status", lambda fa=fa: (fa, "faked"))
        monkeypatch.setattr(backends, "available", lambda b, d: (b == "triton", "faked"))
        for dt in (torch.float16, torch.bfloat16):
            assert opsatt._packed_path("auto", FakeCuda(dt)) == ("flash_attn" if fa else "triton")
        assert opsatt._packed_path("auto", FakeCuda(torch.float32)) == "triton"
        assert opsatt._packed_path("auto", FakeCuda(torch.float64)) == "reference"
        assert opsatt._packed_path("auto", FakeCuda(torch.float16, dh=256)) == ("flash_attn" if fa else "reference")
        assert opsatt._packed_path("triton", FakeCuda(torch.float16)) == "triton"
        if fa:
            assert opsatt._packed_path("cuda", FakeCuda(torch.bfloat16)) == "flash_attn"
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run visible_attention's packed form"):
            opsatt._packed_path("cuda", FakeCuda(torch.float32))
    with pytest.raises(TypeError, match="q: the triton backend's packed attention takes float32"):
        opsatt._packed_path("triton", FakeCuda(torch.float64))
    with pytest.raises(ValueError, match="head dims up to 128, got Dh=160"):
        opsatt._packed_path("triton", FakeCuda(torch.float32, dh=160))
    assert opsatt._TRITON_MAX_HEAD_DIM == tri._MAX_HEAD_DIM


def test_op_opcheck(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout, cu = _packed([3, 2], 1, 16, torch.float32, gen)
    qkv = [t.requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(opsatt._varlen_tri_op, (*qkv, cu, 3, 0.25))
    out, lse = opsatt._varlen_tri_op(q.detach(), k.detach(), v.detach(), cu, 3, 0.25)
    torch.library.opcheck(opsatt._varlen_tri_bwd_op, (dout, q.detach(), k.detach(), v.detach(), out, lse, cu, 3, 0.25))


def test_op_compiles_fullgraph(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout, cu = _packed([2, 5], 1, 16, torch.float32, gen)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, inputs)  # AOTAutograd traces the registered backward

    f = lambda q, k, v, cu: ops.visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=5, backend="triton")  # noqa: E731
    qkv = [t.requires_grad_() for t in (q, k, v)]
    out = torch.compile(f, fullgraph=True, backend=backend)(*qkv, cu)
    got = torch.autograd.grad(out, qkv, dout)
    eager = f(*qkv, cu)
    assert torch.equal(out, eager)
    for g, w in zip(got, torch.autograd.grad(eager, qkv, dout)):
        assert torch.equal(g, w)
    assert "effkernels.varlen_attention_triton" in str(graphs[0].graph)


# ---------------------------------------------------------------------------------------------
# Bad input, AOT coverage
# ---------------------------------------------------------------------------------------------

def _good():
    q = torch.randn(7, 2, 8)
    return dict(q=q, k=q.clone(), v=q.clone(), cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32),
                max_seqlen=4, scale=0.5)


@pytest.mark.parametrize("bad, err, match", [
    (dict(q=torch.randn(7, 2, 8, dtype=torch.float64)), TypeError, "q: the triton backend supports"),
    (dict(k=torch.randn(7, 2, 9)), ValueError, r"k must have shape \(7, 2, 8\)"),
    (dict(v=torch.randn(7, 2, 8).half()), TypeError, "v must be torch.float32"),
    (dict(q=torch.randn(7, 8, 2).transpose(1, 2)), ValueError, "q must have unit stride in its last dim"),
    (dict(q=torch.randn(7, 2, 300), k=torch.randn(7, 2, 300), v=torch.randn(7, 2, 300)), ValueError,
     "head dim Dh=300 is outside"),
    (dict(cu_seqlens=torch.tensor([0.0, 7.0])), ValueError, "cu_seqlens must be a 1-D int32/int64"),
    (dict(max_seqlen=0), ValueError, "max_seqlen must be a positive int"),
    (dict(scale=None), TypeError, "scale must be a float"),
])
def test_kernel_bad_input(bad, err, match):
    args = _good()
    args.update(bad)
    with pytest.raises(err, match=match):
        tri.varlen_fwd(**args)


def test_kernel_bad_out_buffers():
    a = _good()
    with pytest.raises(TypeError, match="out must be torch.float32"):
        tri.varlen_fwd(**a, out=torch.empty(7, 2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"lse must be a contiguous float32 \(2, 7\)"):
        tri.varlen_fwd(**a, lse=torch.empty(7, 2))
    out, lse = tri.varlen_fwd(**a)
    args = (a["q"], a["k"], a["v"], out, lse, a["cu_seqlens"], 4, 0.5)
    with pytest.raises(ValueError, match=r"dout must have shape \(7, 2, 8\)"):
        tri.varlen_bwd(torch.randn(7, 8), *args)
    with pytest.raises(ValueError, match=r"dk must have shape"):
        tri.varlen_bwd(out, *args, dk=torch.empty(7, 2, 4))


def test_op_triton_bad_dtype_before_launch():
    q = torch.randn(7, 2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="triton backend's packed attention takes float32"):
        ops.visible_attention(q, q, q, cu_seqlens=torch.tensor([0, 3, 7]), max_seqlen=4, backend="triton")


def test_tile_choice_covers_aot_specs():
    listed = {(fn.__name__, sig["Q" if "Q" in sig else "O"], c["BLOCK_D"], c.get("BLOCK_M"), c.get("BLOCK_N"),
               o["num_warps"], o.get("num_stages")) for fn, sig, c, o in tri.aot_specs()}
    for dtype, name in tri._DTYPES.items():
        for dh in range(1, tri._MAX_HEAD_DIM + 1):
            blk, bm, bn, warps, stages = tri._tiles(dh, dtype)
            assert blk >= max(dh, 16) and blk & (blk - 1) == 0 and blk < 2 * max(dh, 16)
            for fn in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
                assert (fn, f"*{name}", blk, bm, bn, warps, stages) in listed
            assert ("_delta_kernel", f"*{name}", blk, None, None, 4, None) in listed
    assert tri._tiles(72, torch.float16)[0] == 128
