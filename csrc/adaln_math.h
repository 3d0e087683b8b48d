// The arithmetic of the adaLN and alignment kernels, per element and per row, in __host__ __device__
// functions: the CUDA kernels and the C++ CPU loops call these same functions, so the CPU tests
// exercise the formulas the GPU runs. Loops, vector loads and reductions live with each caller.
#pragma once

#include "common.h"

namespace ek {

// ---- LayerNorm statistics (two-pass: mean first, then the centred sum of squares) -------------

template <typename A> EK_HD A ln_mean(A sum, int64_t D) { return sum / static_cast<A>(D); }

// 1/sqrt(var + eps) with the biased variance, as torch's LayerNorm and the reference do.
template <typename A> EK_HD A ln_rstd(A centred_sq, int64_t D, A eps) {
  return A(1) / ek_sqrt(centred_sq / static_cast<A>(D) + eps);
}

// ---- forward elements ---------------------------------------------------------------------------

// (xhat * w + b) * (1 + scale) + shift; w = 1, b = 0 when the LayerNorm has no affine.
template <typename A> EK_HD A modulate(A xhat, A w, A b, A scale, A shift) {
  return (xhat * w + b) * (A(1) + scale) + shift;
}

template <typename A> EK_HD A gated(A x, A gate, A y) { return x + gate * y; }

// ---- backward elements --------------------------------------------------------------------------

// d(LN output) -> d(xhat): through the modulation and the affine weight.
template <typename A> EK_HD A ln_bwd_g(A dout, A w, A scale) { return dout * (A(1) + scale) * w; }

// dx of a LayerNorm given g = d(xhat) and the row sums sum(g), sum(g * xhat).
template <typename A> EK_HD A ln_bwd_dx(A g, A xhat, A rstd, A sum_g, A sum_gx, int64_t D) {
  const A inv_d = A(1) / static_cast<A>(D);
  return rstd * (g - (sum_g + xhat * sum_gx) * inv_d);
}

// The per-element contributions to the parameter gradients (summed over rows where broadcast).
struct LnParamGrads {
  template <typename A> EK_HD static A dscale(A dout, A xhat, A w, A b) { return dout * (xhat * w + b); }
  template <typename A> EK_HD static A dweight(A dout, A xhat, A scale) { return dout * (A(1) + scale) * xhat; }
  template <typename A> EK_HD static A dbias(A dout, A scale) { return dout * (A(1) + scale); }
};

// Slots of the fp32 partial-sum buffer (B, P, kSlots, D) for row reductions; unused slots stay 0.
enum Slot : int { kShift = 0, kScale = 1, kGate = 2, kWeight = 3, kBias = 4, kSlots = 5 };

// ---- cosine similarity (F.normalize's rule: norms clamped below at eps) ------------------------

template <typename A> struct CosRow {
  A na, nb, cos;
  bool a_clamped;
};

template <typename A> EK_HD CosRow<A> cos_row(A dot, A saa, A sbb, A eps) {
  A ra = ek_sqrt(saa), rb = ek_sqrt(sbb);
  CosRow<A> r;
  r.a_clamped = !(ra > eps);
  r.na = r.a_clamped ? eps : ra;
  r.nb = rb > eps ? rb : eps;
  r.cos = dot / (r.na * r.nb);
  return r;
}

// d cos / d a_i = b_i / (na nb) - cos a_i / na^2; the second term vanishes when na is the clamp eps
// (a constant then), which is what autograd through F.normalize gives.
template <typename A> EK_HD A cos_bwd(A dcos, A a, A b, const CosRow<A>& r) {
  A ca = dcos / (r.na * r.nb);
  A cb = r.a_clamped ? A(0) : dcos * r.cos / (r.na * r.na);
  return ca * b - cb * a;
}

}  // namespace ek
