"""Micro-benchmarks: attention over visible tokens, dense (B, H, N, Dh) and packed (T, H, Dh) with
cu_seqlens (TREAD-style: every sample keeps N/2 tokens); see _micro.py. The dense form is SDPA on
every backend and the packed form the reference op on the CPU (flash-attn on a GPU), so the rows
show what torch.compile adds around them. Attention is compute-bound: extra_info also has GFLOP/s."""
import torch
from _micro import Case, cases_test, randn

from effkernels import ops


def _qkv(s, g):
    dh = s.D // s.heads
    return [randn(g, s.B, s.heads, s.N, dh) for _ in range(3)]


def _packed(s, g):
    k, dh = s.N // 2, s.D // s.heads
    cu = torch.arange(s.B + 1, dtype=torch.int32) * k
    return [randn(g, s.B * k, s.heads, dh) for _ in range(3)] + [cu]


def _packed_call(i, b):
    k = int(i[3][1] - i[3][0])
    return ops.visible_attention(i[0], i[1], i[2], cu_seqlens=i[3], max_seqlen=k, backend=b)


def bnd(s, es, k, tokens=None):
    return k * s.B * (tokens or s.N) * s.D * es


CASES = {
    # fwd: read q, k, v, write o (a fused kernel's minimum; the N x N scores never reach memory);
    # bwd: read q, k, v, o, do, write dq, dk, dv
    "attention_dense": Case("attention", "attention_dense", _qkv,
                            lambda i, b: ops.visible_attention(i[0], i[1], i[2], backend=b),
                            lambda s, es: bnd(s, es, 4), lambda s, es: bnd(s, es, 8), grad_inputs=(0, 1, 2),
                            flops=lambda s: 4 * s.B * s.N * s.N * s.D),
    "attention_packed": Case("attention", "attention_packed", _packed, _packed_call,
                             lambda s, es: bnd(s, es, 4, s.N // 2) + (s.B + 1) * 4,
                             lambda s, es: bnd(s, es, 8, s.N // 2) + (s.B + 1) * 4, grad_inputs=(0, 1, 2),
                             flops=lambda s: 4 * s.B * (s.N // 2) ** 2 * s.D),
}

test_attention = cases_test(CASES)
