// adaLN family: LayerNorm + modulate, gated residual, and the fused residual + LN + modulate,
// forward and backward, as C++ CPU loops and CUDA kernels; and the RMSNorm variants of the two norm
// ops (rmsnorm_host.h), which are the same loops and kernels with the template flag RMS: mean 0
// (neither computed nor stored), no bias, no sum(g) term in the backward.
//
// Both paths call the arithmetic in adaln_math.h. Row reductions (d(shift), d(scale), d(gate) when
// broadcast over tokens; d(weight), d(bias)) go through a float32 partial buffer (B, P, kSlots, D)
// summed in a fixed order afterwards: deterministic, no atomics.
#include "adaln_math.h"

namespace ek {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

// Everything a forward or backward launch needs, device-agnostic: raw pointers and row strides.
template <typename T> struct LnArgs {
  Rows<const T> x, y, gate, shift, scale, dh, dout;  // x is h in the fused backward
  const T* w = nullptr;
  const T* b = nullptr;
  Rows<T> h, out, dx, dy, dgate, dshift, dscale;
  T* dw = nullptr;
  T* db = nullptr;
  float* mean = nullptr;  // null for RMS
  float* rstd = nullptr;
  float* part = nullptr;  // (B, P, kSlots, D) partial sums
  int64_t B = 0, N = 0, D = 0, P = 0, chunk = 0;
  acc eps = 0;
  bool gate_tok = false, shift_tok = false, scale_tok = false;
};

template <typename T> Rows<const T> cr(const Tensor& t) { return t.defined() ? crows_of<T>(t) : Rows<const T>{nullptr, 0, 0}; }
template <typename T> Rows<T> wr(const Tensor& t) { return t.defined() ? rows_of<T>(t) : Rows<T>{nullptr, 0, 0}; }
template <typename T> const T* cp(const OptT& t) { return defined(t) ? static_cast<const T*>(t->const_data_ptr()) : nullptr; }

// ---------------------------------------------------------------------------------------------
// CPU loops: one row at a time, rows spread over threads with at::parallel_for.
// ---------------------------------------------------------------------------------------------

template <typename T, bool FUSED, bool RMS> void fwd_cpu(const LnArgs<T>& a) {
  at::parallel_for(0, a.B * a.N, row_grain(a.D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / a.N, n = r % a.N;
      const T* src = a.x.row(bi, n);
      if constexpr (FUSED) {
        const T *xr = a.x.row(bi, n), *yr = a.y.row(bi, n), *gr = a.gate.row(bi, n);
        T* hr = a.h.row(bi, n);
        // The LayerNorm reads h as stored (rounded to T), as the unfused pair would.
        for (int64_t d = 0; d < a.D; ++d) hr[d] = from_acc<T>(gated<acc>(to_acc<acc>(xr[d]), to_acc<acc>(gr[d]), to_acc<acc>(yr[d])));
        src = hr;
      }
      const acc mu = RMS ? acc(0) : ln_mean<acc>(lane_sum<acc>(a.D, [&](int64_t d) { return to_acc<acc>(src[d]); }), a.D);
      const acc rs = ln_rstd<acc>(lane_sum<acc>(a.D, [&](int64_t d) { acc t = to_acc<acc>(src[d]) - mu; return t * t; }), a.D, a.eps);
      if constexpr (!RMS) a.mean[r] = mu;
      a.rstd[r] = rs;
      const T *sh = a.shift.row(bi, n), *sc = a.scale.row(bi, n);
      T* o = a.out.row(bi, n);
      for (int64_t d = 0; d < a.D; ++d) {
        const acc w = a.w ? to_acc<acc>(a.w[d]) : acc(1), b = a.b ? to_acc<acc>(a.b[d]) : acc(0);
        o[d] = from_acc<T>(modulate<acc>((to_acc<acc>(src[d]) - mu) * rs, w, b, to_acc<acc>(sc[d]), to_acc<acc>(sh[d])));
      }
    }
  });
}

// Rows in fixed chunks of kCpuRowChunk tokens of one sample, chunks spread over threads; each
// chunk owns one slice of the partial buffer (null when nothing is broadcast): f(bi, n, part).
template <typename T, typename F> void for_each_chunk_row(const LnArgs<T>& a, F&& f) {
  const int64_t grain = std::max<int64_t>(1, row_grain(a.D) / kCpuRowChunk);  // chunks, not rows
  at::parallel_for(0, a.B * a.P, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bi = t / a.P, p = t % a.P;
      float* part = a.part ? a.part + t * kSlots * a.D : nullptr;
      for (int64_t n = p * a.chunk; n < std::min(a.N, (p + 1) * a.chunk); ++n) f(bi, n, part);
    }
  });
}

template <typename T, bool FUSED, bool RMS> void bwd_cpu(const LnArgs<T>& a) {
  for_each_chunk_row(a, [&](int64_t bi, int64_t n, float* part) {
    const int64_t r = bi * a.N + n;
    const acc mu = RMS ? acc(0) : a.mean[r], rs = a.rstd[r];
    const T *xr = a.x.row(bi, n), *go = a.dout.row(bi, n), *sc = a.scale.row(bi, n);
    auto W = [&](int64_t d) { return a.w ? to_acc<acc>(a.w[d]) : acc(1); };
    auto G = [&](int64_t d) { return ln_bwd_g<acc>(to_acc<acc>(go[d]), W(d), to_acc<acc>(sc[d])); };
    auto XH = [&](int64_t d) { return (to_acc<acc>(xr[d]) - mu) * rs; };
    const acc sg = RMS ? acc(0) : lane_sum<acc>(a.D, G);
    const acc sgx = lane_sum<acc>(a.D, [&](int64_t d) { return G(d) * XH(d); });
    for (int64_t d = 0; d < a.D; ++d) {
      const acc xh = XH(d), dout = to_acc<acc>(go[d]), s = to_acc<acc>(sc[d]);
      const acc bb = a.b ? to_acc<acc>(a.b[d]) : acc(0);
      acc dt = ln_bwd_dx<acc>(G(d), xh, rs, sg, sgx, a.D);
      if constexpr (FUSED) {
        dt += to_acc<acc>(a.dh.row(bi, n)[d]);
        a.dy.row(bi, n)[d] = from_acc<T>(dt * to_acc<acc>(a.gate.row(bi, n)[d]));
        const acc gy = dt * to_acc<acc>(a.y.row(bi, n)[d]);
        if (a.gate_tok) a.dgate.row(bi, n)[d] = from_acc<T>(gy); else part[kGate * a.D + d] += gy;
      }
      a.dx.row(bi, n)[d] = from_acc<T>(dt);
      const acc dsc = LnParamGrads::dscale<acc>(dout, xh, W(d), bb);
      if (a.shift_tok) a.dshift.row(bi, n)[d] = from_acc<T>(dout); else part[kShift * a.D + d] += dout;
      if (a.scale_tok) a.dscale.row(bi, n)[d] = from_acc<T>(dsc); else part[kScale * a.D + d] += dsc;
      if (a.w) part[kWeight * a.D + d] += LnParamGrads::dweight<acc>(dout, xh, s);
      if (a.b) part[kBias * a.D + d] += LnParamGrads::dbias<acc>(dout, s);
    }
  });
}

// d(gate) of x + gate * y: per token directly, per sample through the partials' kGate slot.
template <typename T> void gr_bwd_cpu(const LnArgs<T>& a) {
  for_each_chunk_row(a, [&](int64_t bi, int64_t n, float* part) {
    const T *go = a.dout.row(bi, n), *yr = a.y.row(bi, n), *gr = a.gate.row(bi, n);
    for (int64_t d = 0; d < a.D; ++d) {
      const acc g = to_acc<acc>(go[d]);
      a.dy.row(bi, n)[d] = from_acc<T>(g * to_acc<acc>(gr[d]));
      const acc gy = g * to_acc<acc>(yr[d]);
      if (a.gate_tok) a.dgate.row(bi, n)[d] = from_acc<T>(gy); else part[kGate * a.D + d] += gy;
    }
  });
}

template <typename T> void gr_fwd_cpu(const LnArgs<T>& a) {
  at::parallel_for(0, a.B * a.N, row_grain(a.D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / a.N, n = r % a.N;
      const T *xr = a.x.row(bi, n), *yr = a.y.row(bi, n), *gr = a.gate.row(bi, n);
      T* o = a.out.row(bi, n);
      for (int64_t d = 0; d < a.D; ++d) o[d] = from_acc<T>(gated<acc>(to_acc<acc>(xr[d]), to_acc<acc>(gr[d]), to_acc<acc>(yr[d])));
    }
  });
}

// Sum the partials in (b, p) order into the broadcast gradients; same function on both devices.
template <typename T> EK_HD void finalize_one(const float* part, int64_t B, int64_t P, int64_t D, int slot,
                                              int64_t bi, int64_t d, T* dst) {
  if (bi >= 0) gstore(dst, from_acc<T>(sum_partials<float>(part + (bi * P * kSlots + slot) * D + d, P, kSlots * D)));
  else gstore(dst, from_acc<T>(sum_partials<float>(part + slot * D + d, B * P, kSlots * D)));
}

template <typename T> void finalize_cpu(const LnArgs<T>& a, bool gate) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.D * a.P, 1));  // samples
  at::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi)
      for (int64_t d = 0; d < a.D; ++d) {
        if (a.dshift.p && !a.shift_tok) finalize_one<T>(a.part, a.B, a.P, a.D, kShift, bi, d, a.dshift.row(bi, 0) + d);
        if (a.dscale.p && !a.scale_tok) finalize_one<T>(a.part, a.B, a.P, a.D, kScale, bi, d, a.dscale.row(bi, 0) + d);
        if (gate && !a.gate_tok) finalize_one<T>(a.part, a.B, a.P, a.D, kGate, bi, d, a.dgate.row(bi, 0) + d);
      }
  });
  for (int64_t d = 0; d < a.D; ++d) {
    if (a.w) finalize_one<T>(a.part, a.B, a.P, a.D, kWeight, -1, d, a.dw + d);
    if (a.b) finalize_one<T>(a.part, a.B, a.P, a.D, kBias, -1, d, a.db + d);
  }
}

}  // namespace
}  // namespace ek

#ifdef EK_CUDA
#include "adaln_cuda.cuh"
#endif

#include "adaln_host.h"
#include "rmsnorm_host.h"
