// RMSNorm family: RMSNorm + modulate and the fused gated residual + RMSNorm + modulate, forward and
// backward, as C++ CPU loops and (under nvcc with WITH_CUDA) CUDA kernels.
//
// Both paths call the arithmetic in rmsnorm_math.h. Row reductions (d(shift), d(scale), d(gate) when
// broadcast over tokens; d(weight)) go through a float32 partial buffer (B, P, kRmsSlots, D) summed
// in a fixed order afterwards: deterministic, no atomics.
#include "rmsnorm_math.h"

namespace ek {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

// Everything a forward or backward launch needs, device-agnostic: raw pointers and row strides.
template <typename T> struct RmsArgs {
  Rows<const T> x, y, gate, shift, scale, dh, dout;  // x is h in the fused backward
  const T* w = nullptr;
  Rows<T> h, out, dx, dy, dgate, dshift, dscale;
  T* dw = nullptr;
  float* rstd = nullptr;
  float* part = nullptr;  // (B, P, kRmsSlots, D) partial sums
  int64_t B = 0, N = 0, D = 0, P = 0, chunk = 0;
  acc eps = 0;
  bool gate_tok = false, shift_tok = false, scale_tok = false;
};

template <typename T> Rows<const T> rcr(const Tensor& t) { return t.defined() ? crows_of<T>(t) : Rows<const T>{nullptr, 0, 0}; }
template <typename T> Rows<T> rwr(const Tensor& t) { return t.defined() ? rows_of<T>(t) : Rows<T>{nullptr, 0, 0}; }

// Sum the partials in (b, p) order into one broadcast gradient element; same function on both
// devices. bi >= 0: per-sample (over that sample's P chunks), bi < 0: over every chunk (the weight).
template <typename T> EK_HD void rms_finalize_one(const float* part, int64_t B, int64_t P, int64_t D, int slot,
                                                  int64_t bi, int64_t d, T* dst) {
  if (bi >= 0) gstore(dst, from_acc<T>(sum_partials<float>(part + (bi * P * kRmsSlots + slot) * D + d, P, kRmsSlots * D)));
  else gstore(dst, from_acc<T>(sum_partials<float>(part + slot * D + d, B * P, kRmsSlots * D)));
}

// ---------------------------------------------------------------------------------------------
// CPU loops: one row at a time, rows spread over threads with at::parallel_for.
// ---------------------------------------------------------------------------------------------

template <typename T, bool FUSED> void rms_fwd_cpu(const RmsArgs<T>& a) {
  at::parallel_for(0, a.B * a.N, row_grain(a.D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / a.N, n = r % a.N;
      const T* src = a.x.row(bi, n);
      if constexpr (FUSED) {
        const T *xr = a.x.row(bi, n), *yr = a.y.row(bi, n), *gr = a.gate.row(bi, n);
        T* hr = a.h.row(bi, n);
        // The RMSNorm reads h as stored (rounded to T), as the unfused pair would.
        for (int64_t d = 0; d < a.D; ++d) hr[d] = from_acc<T>(gated<acc>(to_acc<acc>(xr[d]), to_acc<acc>(gr[d]), to_acc<acc>(yr[d])));
        src = hr;
      }
      const acc rs = rms_rstd<acc>(lane_sum<acc>(a.D, [&](int64_t d) { acc t = to_acc<acc>(src[d]); return t * t; }), a.D, a.eps);
      a.rstd[r] = rs;
      const T *sh = a.shift.row(bi, n), *sc = a.scale.row(bi, n);
      T* o = a.out.row(bi, n);
      for (int64_t d = 0; d < a.D; ++d) {
        const acc w = a.w ? to_acc<acc>(a.w[d]) : acc(1);
        o[d] = from_acc<T>(rms_modulate<acc>(to_acc<acc>(src[d]) * rs, w, to_acc<acc>(sc[d]), to_acc<acc>(sh[d])));
      }
    }
  });
}

// Rows in fixed chunks of a.chunk tokens of one sample, chunks spread over threads; each chunk owns
// one slice of the partial buffer (null when nothing is broadcast).
template <typename T, bool FUSED> void rms_bwd_cpu(const RmsArgs<T>& a) {
  const int64_t grain = std::max<int64_t>(1, row_grain(a.D) / a.chunk);  // chunks, not rows
  at::parallel_for(0, a.B * a.P, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bi = t / a.P, p = t % a.P;
      float* part = a.part ? a.part + t * kRmsSlots * a.D : nullptr;
      for (int64_t n = p * a.chunk; n < std::min(a.N, (p + 1) * a.chunk); ++n) {
        const acc rs = a.rstd[bi * a.N + n];
        const T *xr = a.x.row(bi, n), *go = a.dout.row(bi, n), *sc = a.scale.row(bi, n);
        auto W = [&](int64_t d) { return a.w ? to_acc<acc>(a.w[d]) : acc(1); };
        auto XH = [&](int64_t d) { return to_acc<acc>(xr[d]) * rs; };
        const acc sgx = lane_sum<acc>(a.D, [&](int64_t d) {
          return rms_bwd_g<acc>(to_acc<acc>(go[d]), W(d), to_acc<acc>(sc[d])) * XH(d); });
        for (int64_t d = 0; d < a.D; ++d) {
          const acc xh = XH(d), dout = to_acc<acc>(go[d]), s = to_acc<acc>(sc[d]), w = W(d);
          acc dt = rms_bwd_dx<acc>(rms_bwd_g<acc>(dout, w, s), xh, rs, sgx, a.D);
          if constexpr (FUSED) {
            dt += to_acc<acc>(a.dh.row(bi, n)[d]);
            a.dy.row(bi, n)[d] = from_acc<T>(dt * to_acc<acc>(a.gate.row(bi, n)[d]));
            const acc gy = dt * to_acc<acc>(a.y.row(bi, n)[d]);
            if (a.gate_tok) a.dgate.row(bi, n)[d] = from_acc<T>(gy); else part[kRmsGate * a.D + d] += gy;
          }
          a.dx.row(bi, n)[d] = from_acc<T>(dt);
          const acc dsc = RmsParamGrads::dscale<acc>(dout, xh, w);
          if (a.shift_tok) a.dshift.row(bi, n)[d] = from_acc<T>(dout); else part[kRmsShift * a.D + d] += dout;
          if (a.scale_tok) a.dscale.row(bi, n)[d] = from_acc<T>(dsc); else part[kRmsScale * a.D + d] += dsc;
          if (a.w) part[kRmsWeight * a.D + d] += RmsParamGrads::dweight<acc>(dout, xh, s);
        }
      }
    }
  });
}

template <typename T> void rms_finalize_cpu(const RmsArgs<T>& a, bool gate) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.D * a.P, 1));  // samples
  at::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi)
      for (int64_t d = 0; d < a.D; ++d) {
        if (!a.shift_tok) rms_finalize_one<T>(a.part, a.B, a.P, a.D, kRmsShift, bi, d, a.dshift.row(bi, 0) + d);
        if (!a.scale_tok) rms_finalize_one<T>(a.part, a.B, a.P, a.D, kRmsScale, bi, d, a.dscale.row(bi, 0) + d);
        if (gate && !a.gate_tok) rms_finalize_one<T>(a.part, a.B, a.P, a.D, kRmsGate, bi, d, a.dgate.row(bi, 0) + d);
      }
  });
  if (a.w)
    for (int64_t d = 0; d < a.D; ++d) rms_finalize_one<T>(a.part, a.B, a.P, a.D, kRmsWeight, -1, d, a.dw + d);
}

}  // namespace
}  // namespace ek

#ifdef EK_CUDA
#include "rmsnorm_cuda.cuh"
#endif

#include "rmsnorm_host.h"
