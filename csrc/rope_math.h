// The arithmetic of the 2-D axial rotary embedding kernels, per pair, in __host__ __device__
// functions: the CUDA kernel and the C++ CPU loop of rope.cu call these same functions, so the CPU
// tests exercise the formulas the GPU runs. Loops and loads live with each caller.
#pragma once

#include "common.h"

namespace ek {

// The angle of pair k of a token at grid (row, col): the first `row_pairs` pairs turn by the row,
// the rest by the column; inv_freq[k] is reference.rope.rope2d_inv_freq (float32).
template <typename I> EK_HD float rope_angle(I row, I col, int64_t k, int64_t row_pairs, float inv_freq) {
  return static_cast<float>(k < row_pairs ? row : col) * inv_freq;
}

EK_HD void rope_sincos(float ang, float& s, float& c) {
#ifdef __CUDA_ARCH__
  sincosf(ang, &s, &c);  // the accurate (not __sinf) versions
#else
  s = std::sin(ang);
  c = std::cos(ang);
#endif
}

// (x0, x1) -> (x0 c - x1 s, x1 c + x0 s); the backward passes s negated (the inverse rotation).
template <typename A> EK_HD void rope_rotate(A x0, A x1, A c, A s, A& o0, A& o1) {
  o0 = x0 * c - x1 * s;
  o1 = x1 * c + x0 * s;
}

}  // namespace ek
