"""Micro-benchmarks: token-routing gather/scatter (TREAD's, K = N/2 kept tokens); see _micro.py."""
from _micro import Case, cases_test, randn

from effkernels import ops


def _idx(s, g):
    return ops.draw_route(s.B, s.N, s.N // 2, generator=g)


def _make_gather(s, g):
    return [randn(g, s.B, s.N, s.D), _idx(s, g)]


def _make_scatter(s, g):
    return [randn(g, s.B, s.N, s.D), randn(g, s.B, s.N // 2, s.D), _idx(s, g)]


def _idx_bytes(s):
    return s.B * (s.N // 2) * 8  # int64 (B, K)


CASES = {
    # fwd: read the K kept rows, write them; bwd: read dout (K rows), write dx (all N rows, zeros elsewhere)
    "route_gather": Case("routing", "route_gather", _make_gather,
                         lambda i, b: ops.route_gather(i[0], i[1], backend=b, check_idx=False),
                         lambda s, es: 2 * s.B * (s.N // 2) * s.D * es + _idx_bytes(s),
                         lambda s, es: (s.B * (s.N // 2) * s.D + s.B * s.N * s.D) * es + _idx_bytes(s)),
    # fwd: read the N - K untouched rows of x and the K rows of x_sub, write N rows; bwd: read dout
    # (N rows), write dx (N rows, routed rows zero) and dx_sub (K rows)
    "route_scatter": Case("routing", "route_scatter", _make_scatter,
                          lambda i, b: ops.route_scatter(i[0], i[1], i[2], backend=b, check_idx=False),
                          lambda s, es: 2 * s.B * s.N * s.D * es + _idx_bytes(s),
                          lambda s, es: (2 * s.B * s.N * s.D + s.B * (s.N // 2) * s.D) * es + _idx_bytes(s),
                          grad_inputs=(0, 1)),
}

test_routing = cases_test(CASES)
