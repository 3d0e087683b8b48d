// The arithmetic of the RMSNorm kernels, per element and per row, in __host__ __device__ functions:
// the CUDA kernels (rmsnorm_cuda.cuh) and the C++ CPU loops (rmsnorm.cu) call these same functions,
// so the CPU tests exercise the formulas the GPU runs. Loops, vector loads and reductions live with
// each caller. The gated residual add is adaln_math.h's `gated`.
//
// Forward, per row of D:  r = 1 / sqrt(sum(x^2) / D + eps),  xhat = x r,
//                         out = xhat w (1 + scale) + shift     (w = 1 without a weight).
// Backward, per row:      g = dout (1 + scale) w  (= d xhat),  dx = r (g - xhat sum(g xhat) / D).
#pragma once

#include "adaln_math.h"

namespace ek {

template <typename A> EK_HD A rms_rstd(A sum_sq, int64_t D, A eps) {
  return A(1) / ek_sqrt(sum_sq / static_cast<A>(D) + eps);
}

template <typename A> EK_HD A rms_modulate(A xhat, A w, A scale, A shift) { return xhat * w * (A(1) + scale) + shift; }

// d(out) -> d(xhat): through the modulation and the weight.
template <typename A> EK_HD A rms_bwd_g(A dout, A w, A scale) { return dout * (A(1) + scale) * w; }

// dx of an RMSNorm given g = d(xhat) and the row sum sum(g * xhat).
template <typename A> EK_HD A rms_bwd_dx(A g, A xhat, A rstd, A sum_gx, int64_t D) {
  return rstd * (g - xhat * sum_gx / static_cast<A>(D));
}

// Per-element contributions to the parameter gradients (summed over rows where broadcast).
struct RmsParamGrads {
  template <typename A> EK_HD static A dscale(A dout, A xhat, A w) { return dout * xhat * w; }
  template <typename A> EK_HD static A dweight(A dout, A xhat, A scale) { return dout * (A(1) + scale) * xhat; }
};

// Slots of the fp32 partial-sum buffer (B, P, kRmsSlots, D) for row reductions; unused slots stay 0.
enum RmsSlot : int { kRmsShift = 0, kRmsScale = 1, kRmsGate = 2, kRmsWeight = 3, kRmsSlots = 4 };

}  // namespace ek
