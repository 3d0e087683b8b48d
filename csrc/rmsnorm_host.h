// Tensor-level entry points of the RMSNorm ops and their registration for CPU and CUDA (included at
// the end of adaln.cu, after adaln_host.h). They are the adaLN family's loops and kernels with the
// RMS flag: RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight, no bias, no mean statistic; so the
// gated residual, modulation, partial sums and finalize are one code for both norms. Schemas live in
// bindings.cpp.
#pragma once

#include <torch/library.h>

namespace ek {
namespace {

Tensor rms_modulate_fwd_out(const Tensor& x, const Tensor& shift, const Tensor& scale, const OptT& w, double eps,
                            const Tensor& out) {
  check_common(x, {&shift, &scale}, w, std::nullopt);
  check_out(out, x.sizes(), x.scalar_type(), x.device(), "out");
  Tensor rstd = stats_like(x);
  fwd_impl(x, nullptr, nullptr, shift, scale, w, std::nullopt, eps, nullptr, out, Tensor(), rstd, true);
  return rstd;
}

std::tuple<Tensor, Tensor> rms_modulate_fwd(const Tensor& x, const Tensor& shift, const Tensor& scale, const OptT& w,
                                            double eps) {
  Tensor out = at::empty(x.sizes(), x.options());
  Tensor rstd = rms_modulate_fwd_out(x, shift, scale, w, eps, out);
  return {out, rstd};
}

std::tuple<Tensor, Tensor, Tensor> rms_fused_fwd(const Tensor& x, const Tensor& y, const Tensor& gate,
                                                 const Tensor& shift, const Tensor& scale, const OptT& w, double eps) {
  check_common(x, {&y, &gate, &shift, &scale}, w, std::nullopt);
  TORCH_CHECK(y.sizes() == x.sizes(), "y must have x's shape");
  Tensor h = at::empty(x.sizes(), x.options()), out = at::empty(x.sizes(), x.options());
  Tensor rstd = stats_like(x);
  fwd_impl(x, &y, &gate, shift, scale, w, std::nullopt, eps, &h, out, Tensor(), rstd, true);
  return {h, out, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rms_modulate_bwd(const Tensor& dout, const Tensor& x, const Tensor& shift,
                                                            const Tensor& scale, const OptT& w, const Tensor& rstd) {
  auto r = bwd_impl(nullptr, dout, x, nullptr, nullptr, shift, scale, w, std::nullopt, Tensor(), rstd, true);
  return {r[0], r[3], r[4], r[5]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rms_fused_bwd(
    const Tensor& dh, const Tensor& dout, const Tensor& h, const Tensor& y, const Tensor& gate, const Tensor& shift,
    const Tensor& scale, const OptT& w, const Tensor& rstd) {
  auto r = bwd_impl(&dh, dout, h, &y, &gate, shift, scale, w, std::nullopt, Tensor(), rstd, true);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace
}  // namespace ek

#define EK_RMSNORM_IMPLS(m)                                       \
  m.impl("rms_modulate_fwd", &ek::rms_modulate_fwd);              \
  m.impl("rms_modulate_fwd_out", &ek::rms_modulate_fwd_out);      \
  m.impl("rms_modulate_bwd", &ek::rms_modulate_bwd);              \
  m.impl("rms_fused_fwd", &ek::rms_fused_fwd);                    \
  m.impl("rms_fused_bwd", &ek::rms_fused_bwd);

EK_TORCH_LIBRARY_IMPL(CPU, m) { EK_RMSNORM_IMPLS(m) }
#ifdef EK_NVCC
EK_TORCH_LIBRARY_IMPL(CUDA, m) { EK_RMSNORM_IMPLS(m) }
#endif
