// The cosine alignment loss with the projector's last Linear fused in (ops.projected_cosine), C++ CPU
// path: y = h W^T + bias is computed one chunk of tokens at a time with ATen's matmul (float32), so
// only a (chunk, Z) piece of the projection and of its gradient ever exists; the row statistics and
// d y use cos_row()/cos_bwd() from adaln_math.h, the arithmetic of the plain cosine kernels.
//
// forward:  cos (B, N) and norms (B, N, 2) = (|y|, |z|), float32; nothing else is kept.
// backward: per chunk, y again, dy = cos_bwd(dcos, y, z) in place, dh rows = dy W (written into dh),
//           d weight += dy^T h and d bias += sum dy in float32 buffers, chunk after chunk (a fixed
//           order, so the sums are deterministic), cast to the parameters' dtypes at the end.
// Any float dtype is accepted; every product and sum is float32 (the statistics contract). GPU
// tensors take the Triton path (effkernels/_triton/align_proj.py): there is no CUDA kernel here.
// Included by align.cu (host code only), so both the g++ and the nvcc builds register it for CPU.
#pragma once

#include "adaln_math.h"

#include <limits>
#include <tuple>

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

namespace ek {
namespace {

using at::Tensor;

void proj_check(const Tensor& h, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& z,
                int64_t chunk) {
  TORCH_CHECK(h.dim() == 3 && z.dim() == 3 && w.dim() == 2, "h, z must be (B, N, K), (B, N, Z); weight (Z, K)");
  TORCH_CHECK(w.size(0) == z.size(2) && w.size(1) == h.size(2) && z.size(0) == h.size(0) && z.size(1) == h.size(1),
              "weight must be (Z, K) for h (B, N, K) and z (B, N, Z)");
  TORCH_CHECK(w.size(0) > 0 && w.size(1) > 0, "weight must have at least one row and column");
  TORCH_CHECK(w.scalar_type() == h.scalar_type(), "weight must have h's dtype");
  TORCH_CHECK(w.device() == h.device() && z.device() == h.device(), "h, weight and z must share a device");
  if (defined(bias))
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == h.scalar_type() &&
                    bias->device() == h.device(), "bias must be (Z,) in h's dtype on h's device");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
}

float proj_clamp(const Tensor& h, double eps) {
  float tiny = std::numeric_limits<float>::min();
  if (h.scalar_type() == at::kHalf) tiny = static_cast<float>(std::numeric_limits<c10::Half>::min());
  if (h.scalar_type() == at::kBFloat16) tiny = static_cast<float>(std::numeric_limits<c10::BFloat16>::min());
  return std::max(static_cast<float>(eps), tiny);  // reference.align.norm_clamp(eps, h.dtype)
}

// The operands as float32 (T, .) matrices; a reshape is a view whenever h's layout allows one.
struct ProjOperands {
  Tensor h2, z2, w32, b32;
  int64_t T, K, Z;
  ProjOperands(const Tensor& h, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& z)
      : h2(h.reshape({-1, h.size(2)})), z2(z.reshape({-1, z.size(2)})), w32(w.to(at::kFloat)),
        T(h.size(0) * h.size(1)), K(h.size(2)), Z(w.size(0)) {
    if (defined(bias)) b32 = bias->to(at::kFloat);
  }
  // float32 rows r0..r0+n of h, and y = h W^T + bias for them (n, Z), contiguous.
  std::pair<Tensor, Tensor> chunk(int64_t r0, int64_t n) const {
    Tensor hc = h2.narrow(0, r0, n).to(at::kFloat);
    Tensor y = b32.defined() ? at::addmm(b32, hc, w32.t()) : at::mm(hc, w32.t());
    return {hc, y.contiguous()};
  }
  Tensor target(int64_t r0, int64_t n) const { return z2.narrow(0, r0, n).to(at::kFloat).contiguous(); }
};

void proj_cosine_fwd_out(const Tensor& h, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& z,
                         double eps, int64_t chunk, const Tensor& cos, const Tensor& norms) {
  proj_check(h, w, bias, z, chunk);
  check_out(cos, {h.size(0), h.size(1)}, at::kFloat, h.device(), "cos");
  check_out(norms, {h.size(0), h.size(1), 2}, at::kFloat, h.device(), "norms");
  const ProjOperands p(h, w, bias, z);
  const float clamp = proj_clamp(h, eps);
  float* pc = cos.data_ptr<float>();
  float* pn = norms.data_ptr<float>();
  for (int64_t r0 = 0; r0 < p.T; r0 += chunk) {
    const int64_t n = std::min(chunk, p.T - r0);
    const Tensor y = p.chunk(r0, n).second, t = p.target(r0, n);
    const float* py = y.const_data_ptr<float>();
    const float* pt = t.const_data_ptr<float>();
    const int64_t Z = p.Z;
    at::parallel_for(0, n, row_grain(Z), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float* a = py + i * Z;
        const float* b = pt + i * Z;
        const float saa = lane_sum<acc>(Z, [&](int64_t d) { return a[d] * a[d]; });
        const float sbb = lane_sum<acc>(Z, [&](int64_t d) { return b[d] * b[d]; });
        const CosRow<acc> c = cos_row<acc>(lane_sum<acc>(Z, [&](int64_t d) { return a[d] * b[d]; }), saa, sbb, clamp);
        pc[r0 + i] = c.cos;
        pn[2 * (r0 + i)] = ek_sqrt(saa);
        pn[2 * (r0 + i) + 1] = ek_sqrt(sbb);
      }
    });
  }
}

std::tuple<Tensor, Tensor> proj_cosine_fwd(const Tensor& h, const Tensor& w, const std::optional<Tensor>& bias,
                                           const Tensor& z, double eps, int64_t chunk) {
  Tensor cos = at::empty({h.size(0), h.size(1)}, h.options().dtype(at::kFloat));
  Tensor norms = at::empty({h.size(0), h.size(1), 2}, h.options().dtype(at::kFloat));
  proj_cosine_fwd_out(h, w, bias, z, eps, chunk, cos, norms);
  return {cos, norms};
}

std::tuple<Tensor, Tensor, Tensor> proj_cosine_bwd(const Tensor& dcos, const Tensor& h, const Tensor& w,
                                                   const std::optional<Tensor>& bias, const Tensor& z,
                                                   const Tensor& cos, const Tensor& norms, double eps,
                                                   int64_t chunk) {
  proj_check(h, w, bias, z, chunk);
  TORCH_CHECK(dcos.scalar_type() == at::kFloat && dcos.dim() == 2 && dcos.size(0) == h.size(0) &&
              dcos.size(1) == h.size(1) && dcos.device() == h.device(), "dcos must be float32 (B, N)");
  check_out(cos, {h.size(0), h.size(1)}, at::kFloat, h.device(), "cos");
  check_out(norms, {h.size(0), h.size(1), 2}, at::kFloat, h.device(), "norms");
  const ProjOperands p(h, w, bias, z);
  const float clamp = proj_clamp(h, eps);
  Tensor dh = at::empty(h.sizes(), h.options());  // contiguous, as the registered fake says
  Tensor dh2 = dh.view({p.T, p.K});
  Tensor dw = at::zeros({p.Z, p.K}, h.options().dtype(at::kFloat));
  Tensor db = at::zeros({defined(bias) ? p.Z : 0}, h.options().dtype(at::kFloat));
  const float* pc = cos.const_data_ptr<float>();
  const float* pn = norms.const_data_ptr<float>();
  const float* pg = dcos.const_data_ptr<float>();
  const int64_t N = h.size(1), sdb = dcos.stride(0), sdn = dcos.stride(1);
  for (int64_t r0 = 0; r0 < p.T; r0 += chunk) {
    const int64_t n = std::min(chunk, p.T - r0);
    auto [hc, y] = p.chunk(r0, n);
    const Tensor t = p.target(r0, n);
    float* py = y.data_ptr<float>();
    const float* pt = t.const_data_ptr<float>();
    const int64_t Z = p.Z;
    at::parallel_for(0, n, row_grain(Z), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = r0 + i;
        // The forward's statistics, put back into the form cos_row() gives.
        CosRow<acc> c;
        const float na = pn[2 * r], nb = pn[2 * r + 1];
        c.a_clamped = !(na > clamp);
        c.na = c.a_clamped ? clamp : na;
        c.nb = nb > clamp ? nb : clamp;
        c.cos = pc[r];
        const float g = pg[(r / N) * sdb + (r % N) * sdn];
        float* a = py + i * Z;
        const float* b = pt + i * Z;
        for (int64_t d = 0; d < Z; ++d) a[d] = cos_bwd<acc>(g, a[d], b[d], c);  // y becomes dy
      }
    });
    Tensor rows = dh2.narrow(0, r0, n);
    if (dh.scalar_type() == at::kFloat) at::mm_out(rows, y, p.w32);
    else rows.copy_(at::mm(y, p.w32));
    dw.addmm_(y.t(), hc);
    if (defined(bias)) db.add_(y.sum(0));
  }
  return {dh, dw.to(w.scalar_type()), defined(bias) ? db.to(bias->scalar_type()) : db};
}

}  // namespace
}  // namespace ek
