// 2-D axial rotary embedding of q and k (one pass over both): forward and, with the sine negated,
// backward, as a C++ CPU loop and (under nvcc with WITH_CUDA) a CUDA kernel. Both call rope_math.h.
//
// q, k, q_out, k_out: (B, H, N, Dh) views with any strides and unit stride along Dh; pos: (B, N, 2)
// int32/int64 view (stride 0 over B for positions shared by every sample); inv_freq: (Dh / 2,)
// float32. Pair k of the head dim, (x[2k], x[2k + 1]), turns by pos[.., 0] * inv_freq[k] for the
// first ceil(Dh / 4) pairs and by pos[.., 1] * inv_freq[k] for the rest. Angles and products in
// float32. Elementwise per token: deterministic.
//
// CPU: tokens spread over threads; each token's cos/sin computed once, then every head of q and k.
// CUDA: one thread per (token, pair), computing its cos/sin once and rotating that pair in every
// head of q and k; consecutive threads take consecutive pairs, so a warp's loads are contiguous.
#include "rope_math.h"

#include <vector>

#include <torch/library.h>

namespace ek {
namespace {

using at::Tensor;

template <typename T, typename I> struct RopeArgs {
  const T* q = nullptr;
  const T* k = nullptr;
  T* qo = nullptr;
  T* ko = nullptr;
  const I* pos = nullptr;
  const float* inv = nullptr;
  int64_t B = 0, H = 0, N = 0, P = 0, PR = 0;
  int64_t sq[3] = {}, sk[3] = {}, sqo[3] = {}, sko[3] = {}, sp[3] = {};  // strides of dims 0..2
  float sin_sign = 1.f;
};

EK_HD int64_t off3(const int64_t* s, int64_t b, int64_t h, int64_t n) {
  return b * s[0] + h * s[1] + n * s[2];
}

template <typename T, typename I> EK_HD void rope_pair(const RopeArgs<T, I>& a, int64_t b, int64_t n, int64_t kk,
                                                       float c, float s) {
  for (int64_t h = 0; h < a.H; ++h) {
    const T* x = a.q + off3(a.sq, b, h, n) + 2 * kk;
    T* o = a.qo + off3(a.sqo, b, h, n) + 2 * kk;
    acc o0, o1;
    rope_rotate<acc>(to_acc<acc>(gload(x)), to_acc<acc>(gload(x + 1)), c, s, o0, o1);
    gstore(o, from_acc<T>(o0));
    gstore(o + 1, from_acc<T>(o1));
    const T* y = a.k + off3(a.sk, b, h, n) + 2 * kk;
    T* p = a.ko + off3(a.sko, b, h, n) + 2 * kk;
    rope_rotate<acc>(to_acc<acc>(gload(y)), to_acc<acc>(gload(y + 1)), c, s, o0, o1);
    gstore(p, from_acc<T>(o0));
    gstore(p + 1, from_acc<T>(o1));
  }
}

// ---------------------------------------------------------------------------------------------
// CPU loop
// ---------------------------------------------------------------------------------------------

template <typename T, typename I> void rope_cpu(const RopeArgs<T, I>& a) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(2 * a.H * 2 * a.P, 1));  // tokens
  at::parallel_for(0, a.B * a.N, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> cs(2 * a.P);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / a.N, n = t % a.N;
      const I* pp = a.pos + b * a.sp[0] + n * a.sp[1];
      for (int64_t kk = 0; kk < a.P; ++kk) {
        float s, c;
        rope_sincos(rope_angle<I>(gload(pp), gload(pp + a.sp[2]), kk, a.PR, gload(a.inv + kk)), s, c);
        cs[2 * kk] = c;
        cs[2 * kk + 1] = s * a.sin_sign;
      }
      // Heads outermost within the token, pairs innermost: each head's row is read once, in order.
      for (int64_t h = 0; h < a.H; ++h) {
        const T* x = a.q + off3(a.sq, b, h, n);
        const T* y = a.k + off3(a.sk, b, h, n);
        T* xo = a.qo + off3(a.sqo, b, h, n);
        T* yo = a.ko + off3(a.sko, b, h, n);
        for (int64_t kk = 0; kk < a.P; ++kk) {
          acc o0, o1;
          rope_rotate<acc>(to_acc<acc>(x[2 * kk]), to_acc<acc>(x[2 * kk + 1]), cs[2 * kk], cs[2 * kk + 1], o0, o1);
          xo[2 * kk] = from_acc<T>(o0);
          xo[2 * kk + 1] = from_acc<T>(o1);
          rope_rotate<acc>(to_acc<acc>(y[2 * kk]), to_acc<acc>(y[2 * kk + 1]), cs[2 * kk], cs[2 * kk + 1], o0, o1);
          yo[2 * kk] = from_acc<T>(o0);
          yo[2 * kk + 1] = from_acc<T>(o1);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// CUDA kernel
// ---------------------------------------------------------------------------------------------

#ifdef EK_CUDA
template <typename T, typename I> __global__ void rope_kernel(RopeArgs<T, I> a) {
  const int64_t total = a.B * a.N * a.P;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / a.P, kk = i - t * a.P;
    const int64_t b = t / a.N, n = t - b * a.N;
    const I* pp = a.pos + b * a.sp[0] + n * a.sp[1];
    float s, c;
    rope_sincos(rope_angle<I>(gload(pp), gload(pp + a.sp[2]), kk, a.PR, gload(a.inv + kk)), s, c);
    rope_pair<T, I>(a, b, n, kk, c, s * a.sin_sign);
  }
}

constexpr int kRopeThreads = 256;
constexpr int64_t kRopeMaxBlocks = 65535;  // the grid-stride loop covers the rest

template <typename T, typename I> void rope_cuda(const RopeArgs<T, I>& a) {
  const int64_t total = a.B * a.N * a.P;
  const int grid = static_cast<int>(std::min<int64_t>((total + kRopeThreads - 1) / kRopeThreads, kRopeMaxBlocks));
  EK_LAUNCH(grid, kRopeThreads, EK_STREAM(), rope_kernel<T, I>)(a);
  EK_LAUNCH_CHECK();
}
#endif

// ---------------------------------------------------------------------------------------------
// Tensor-level entry point
// ---------------------------------------------------------------------------------------------

void check_qk(const Tensor& t, const Tensor& q, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.sizes() == q.sizes(), name, " must be a (B, H, N, Dh) tensor of q's shape ",
              q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type() && t.device() == q.device(), name, ": dtype/device mismatch with q");
  TORCH_CHECK(t.stride(3) == 1, name, " must have unit stride in its last dim");
}

template <typename T, typename I> void fill(RopeArgs<T, I>& a, const Tensor& q, const Tensor& k, const Tensor& pos,
                                            const Tensor& inv, double sin_sign, const Tensor& qo, const Tensor& ko) {
  a.q = static_cast<const T*>(q.const_data_ptr());
  a.k = static_cast<const T*>(k.const_data_ptr());
  a.qo = static_cast<T*>(qo.data_ptr());
  a.ko = static_cast<T*>(ko.data_ptr());
  a.pos = static_cast<const I*>(pos.const_data_ptr());
  a.inv = inv.const_data_ptr<float>();
  a.B = q.size(0);
  a.H = q.size(1);
  a.N = q.size(2);
  a.P = q.size(3) / 2;
  a.PR = a.P - a.P / 2;
  for (int d = 0; d < 3; ++d) {
    a.sq[d] = q.stride(d);
    a.sk[d] = k.stride(d);
    a.sqo[d] = qo.stride(d);
    a.sko[d] = ko.stride(d);
    a.sp[d] = pos.stride(d);
  }
  a.sin_sign = static_cast<float>(sin_sign);
}

void rope2d(const Tensor& q, const Tensor& k, const Tensor& pos, const Tensor& inv_freq, double sin_sign,
            const Tensor& q_out, const Tensor& k_out) {
  check_qk(q, q, "q");
  check_qk(k, q, "k");
  check_qk(q_out, q, "q_out");
  check_qk(k_out, q, "k_out");
  TORCH_CHECK(q.size(3) % 2 == 0, "q's head dim must be even, got ", q.size(3));
  TORCH_CHECK(pos.dim() == 3 && pos.size(0) == q.size(0) && pos.size(1) == q.size(2) && pos.size(2) == 2 &&
                  (pos.scalar_type() == at::kInt || pos.scalar_type() == at::kLong) && pos.device() == q.device(),
              "pos must be an int32/int64 (B, N, 2) tensor on q's device, got ", pos.sizes());
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == q.size(3) / 2 && inv_freq.scalar_type() == at::kFloat &&
                  inv_freq.is_contiguous() && inv_freq.device() == q.device(),
              "inv_freq must be a contiguous float32 (Dh / 2,) tensor on q's device");
  if (q.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope2d", [&] {
    auto run = [&](auto idx_tag) {
      using I = decltype(idx_tag);
      RopeArgs<scalar_t, I> a;
      fill(a, q, k, pos, inv_freq, sin_sign, q_out, k_out);
#ifdef EK_CUDA
      if (EK_ON_DEVICE(q)) {
        EK_DEVICE_GUARD(q);
        rope_cuda<scalar_t, I>(a);
        return;
      }
#endif
      rope_cpu<scalar_t, I>(a);
    };
    if (pos.scalar_type() == at::kInt) run(int32_t{}); else run(int64_t{});
  });
}

}  // namespace
}  // namespace ek

EK_TORCH_LIBRARY_IMPL(CPU, m) { m.impl("rope2d", &ek::rope2d); }
#ifdef EK_NVCC
EK_TORCH_LIBRARY_IMPL(CUDA, m) { m.impl("rope2d", &ek::rope2d); }
#endif
