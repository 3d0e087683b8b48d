"""Micro-benchmarks: the fused per-token negative-cosine alignment loss (REPA/SRA); see _micro.py."""
from _micro import Case, cases_test, randn

from effkernels import ops

CASES = {
    # fwd: read z_hat and z, write a scalar; bwd: read both again, write d(z_hat) (z is a frozen target)
    "cosine_alignment_loss": Case(
        "align", "cosine_alignment_loss", lambda s, g: [randn(g, s.B, s.N, s.D), randn(g, s.B, s.N, s.D)],
        lambda i, b: ops.cosine_alignment_loss(i[0], i[1], backend=b),
        lambda s, es: 2 * s.B * s.N * s.D * es, lambda s, es: 3 * s.B * s.N * s.D * es),
}

test_align = cases_test(CASES)
