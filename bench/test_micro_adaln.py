"""Micro-benchmarks: adaLN modulate_layernorm, gated_residual and the fused pair; see _micro.py.

shift/scale/gate are strided chunks of one (B, 6D) adaLN output, as in a DiT block."""
from _micro import Case, cases_test, randn

from effkernels import ops


def _x_mod(s, g):
    return [randn(g, s.B, s.N, s.D), randn(g, s.B, 6 * s.D)]


def _x_y_mod(s, g):
    return [randn(g, s.B, s.N, s.D), randn(g, s.B, s.N, s.D), randn(g, s.B, 6 * s.D)]


def bnd(s, es, k):
    return k * s.B * s.N * s.D * es


def bd(s, es, k):
    return k * s.B * s.D * es


CASES = {
    # fwd: read x, shift, scale; write out. bwd: read dout and x (statistics recomputed), write dx,
    # d(shift), d(scale)
    "modulate_layernorm": Case("adaln", "modulate_layernorm", _x_mod,
                               lambda i, b: ops.modulate_layernorm(i[0], *i[1].chunk(6, -1)[:2], backend=b),
                               lambda s, es: bnd(s, es, 2) + bd(s, es, 2),
                               lambda s, es: bnd(s, es, 3) + bd(s, es, 2), grad_inputs=(0, 1)),
    # fwd: read x, y, gate; write x + gate * y. bwd: read dout and y, write dx, dy, d(gate)
    "gated_residual": Case("adaln", "gated_residual", _x_y_mod,
                           lambda i, b: ops.gated_residual(i[0], i[1], i[2].chunk(6, -1)[2], backend=b),
                           lambda s, es: bnd(s, es, 3) + bd(s, es, 1),
                           lambda s, es: bnd(s, es, 4) + bd(s, es, 1), grad_inputs=(0, 1, 2)),
    # fwd: read x, y (and gate, shift, scale); write h and LN(h) modulated. bwd: read dh, dout, y, h;
    # write dx, dy and the three (B, D) gradients
    "gated_residual_modulate_layernorm": Case(
        "adaln", "gated_residual_modulate_layernorm", _x_y_mod,
        lambda i, b: ops.gated_residual_modulate_layernorm(i[0], i[1], *i[2].chunk(6, -1)[2:5], backend=b),
        lambda s, es: bnd(s, es, 4) + bd(s, es, 3),
        lambda s, es: bnd(s, es, 6) + bd(s, es, 3), grad_inputs=(0, 1, 2)),
}

test_adaln = cases_test(CASES)
