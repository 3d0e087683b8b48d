// The arithmetic of the SwiGLU kernels, per element, in __host__ __device__ functions: the CUDA
// kernels and the C++ CPU loops of swiglu.cu call these same functions, so the CPU tests exercise
// the formulas the GPU runs. Loops and vector loads live with each caller.
#pragma once

#include "common.h"

namespace ek {

EK_HD float ek_exp(float v) { return expf(v); }
EK_HD double ek_exp(double v) { return exp(v); }

template <typename A> EK_HD A sigmoid_of(A a) { return A(1) / (A(1) + ek_exp(-a)); }

// silu(a) * b = a * sigmoid(a) * b.
template <typename A> EK_HD A swiglu_fwd_elem(A a, A b) { return a * sigmoid_of(a) * b; }

// Given g = d(out): da = g * b * silu'(a) with silu'(a) = s * (1 + a * (1 - s)), db = g * silu(a).
template <typename A> EK_HD void swiglu_bwd_elem(A g, A a, A b, A& da, A& db) {
  const A s = sigmoid_of(a);
  da = g * b * s * (A(1) + a * (A(1) - s));
  db = g * a * s;
}

}  // namespace ek
