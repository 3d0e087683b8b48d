// CUDA side of the adaLN family (included by adaln.cu when the CUDA kernels are compiled).
//
// RMS (a template flag): the RMSNorm variant of the same kernels. The mean is 0 (not computed, not
// stored), the statistic is the mean of squares, there is no bias, and the backward's sum(g) term
// drops out; everything else (modulation, gated residual, partial sums, finalize) is shared.
//
// Row kernels: one warp per row of D, V elements per load (16 bytes when every row start is
// aligned and D % V == 0, else V = 1, which also covers odd D with no tail loop), fp32 sums reduced
// with warp shuffles. Rows are re-read from global memory between passes (L1/L2 hits) rather than
// cached in registers, so any D works and register use stays low (the spill test checks).
// Column kernels: one thread per column over a fixed chunk of rows of one sample, writing the
// float32 partial buffer; a finalize kernel sums it in fixed order. No atomics.
#pragma once

namespace ek {
namespace {

constexpr int kRowsPerBlock = 4;    // warps per block in the row kernels
constexpr int kColThreads = 128;    // columns per block in the column kernels
constexpr int64_t kGpuRowChunk = 32;

template <typename T, int V> struct Ld {
  __device__ __forceinline__ static void get(const T* p, acc* o) {
    Vec<T, V> v = vload<T, V>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = to_acc<acc>(v.v[j]);
  }
  __device__ __forceinline__ static void put(T* p, const acc* o) {
    Vec<T, V> v;
#pragma unroll
    for (int j = 0; j < V; ++j) v.v[j] = from_acc<T>(o[j]);
    vstore<T, V>(p, v);
  }
};

template <typename T, int V, bool FUSED, bool RMS> __global__ void ln_fwd_kernel(LnArgs<T> a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= a.B * a.N + EK_SIM_BREAK(2)) return;
  const int64_t bi = r / a.N, n = r % a.N;
  const int lane = threadIdx.x;
  const T* src = a.x.row(bi, n);
  acc xs[V], ys[V], gs[V], ws[V], bs[V], shs[V], scs[V];
  acc s = 0;
  if constexpr (FUSED) {
    T* hr = a.h.row(bi, n);
    for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
      Ld<T, V>::get(a.x.row(bi, n) + d, xs);
      Ld<T, V>::get(a.y.row(bi, n) + d, ys);
      Ld<T, V>::get(a.gate.row(bi, n) + d, gs);
      Vec<T, V> hv;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        hv.v[j] = from_acc<T>(gated<acc>(xs[j], gs[j], ys[j]));
        s += to_acc<acc>(hv.v[j]);  // statistics of h as stored
      }
      vstore<T, V>(hr + d, hv);
    }
    src = hr;  // each lane re-reads only what it wrote itself: ordered without a barrier
  } else if constexpr (!RMS) {
    for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
      Ld<T, V>::get(src + d, xs);
#pragma unroll
      for (int j = 0; j < V; ++j) s += xs[j];
    }
  }
  const acc mu = RMS ? acc(0) : ln_mean<acc>(warp_sum(s), a.D);  // RMS: the pass below sums x^2
  acc q = 0;
  for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
    Ld<T, V>::get(src + d, xs);
#pragma unroll
    for (int j = 0; j < V; ++j) q += (xs[j] - mu) * (xs[j] - mu);
  }
  const acc rs = ln_rstd<acc>(warp_sum(q), a.D, a.eps);
  if (lane == 0) {
    if constexpr (!RMS) gstore(a.mean + r, mu);
    gstore(a.rstd + r, rs);
  }
  for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
    Ld<T, V>::get(src + d, xs);
    Ld<T, V>::get(a.shift.row(bi, n) + d, shs);
    Ld<T, V>::get(a.scale.row(bi, n) + d, scs);
#pragma unroll
    for (int j = 0; j < V; ++j) { ws[j] = acc(1); bs[j] = acc(0); }
    if (a.w) Ld<T, V>::get(a.w + d, ws);
    if (a.b) Ld<T, V>::get(a.b + d, bs);
#pragma unroll
    for (int j = 0; j < V; ++j) xs[j] = modulate<acc>((xs[j] - mu) * rs, ws[j], bs[j], scs[j], shs[j]);
    Ld<T, V>::put(a.out.row(bi, n) + d, xs);
  }
}

// dx (and, fused, dy and per-token dgate), per-token dshift/dscale; row sums saved for the column
// kernel in `rowsum` (B*N, 2) so it can recompute d(h) in float32 for a per-sample gate.
template <typename T, int V, bool FUSED, bool RMS> __global__ void ln_bwd_row_kernel(LnArgs<T> a, float* rowsum) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= a.B * a.N) return;
  const int64_t bi = r / a.N, n = r % a.N;
  const int lane = threadIdx.x;
  const acc mu = RMS ? acc(0) : gload(a.mean + r), rs = gload(a.rstd + r);
  acc xs[V], gos[V], scs[V], ws[V], bs[V], t[V];
  acc sg = 0, sgx = 0;
  for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
    Ld<T, V>::get(a.x.row(bi, n) + d, xs);
    Ld<T, V>::get(a.dout.row(bi, n) + d, gos);
    Ld<T, V>::get(a.scale.row(bi, n) + d, scs);
#pragma unroll
    for (int j = 0; j < V; ++j) ws[j] = acc(1);
    if (a.w) Ld<T, V>::get(a.w + d, ws);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc g = ln_bwd_g<acc>(gos[j], ws[j], scs[j]);
      if constexpr (!RMS) sg += g;
      sgx += g * (xs[j] - mu) * rs;
    }
  }
  if constexpr (!RMS) sg = warp_sum(sg);  // RMS: the sum(g) term of the LayerNorm backward is absent
  sgx = warp_sum(sgx);
  if (FUSED && rowsum && lane == 0) { gstore(rowsum + 2 * r, sg); gstore(rowsum + 2 * r + 1, sgx); }
  for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
    Ld<T, V>::get(a.x.row(bi, n) + d, xs);
    Ld<T, V>::get(a.dout.row(bi, n) + d, gos);
    Ld<T, V>::get(a.scale.row(bi, n) + d, scs);
#pragma unroll
    for (int j = 0; j < V; ++j) { ws[j] = acc(1); bs[j] = acc(0); xs[j] = (xs[j] - mu) * rs; }
    if (a.w) Ld<T, V>::get(a.w + d, ws);
    if (a.b) Ld<T, V>::get(a.b + d, bs);
    if (a.shift_tok) Ld<T, V>::put(a.dshift.row(bi, n) + d, gos);
    if (a.scale_tok) {
#pragma unroll
      for (int j = 0; j < V; ++j) t[j] = LnParamGrads::dscale<acc>(gos[j], xs[j], ws[j], bs[j]);
      Ld<T, V>::put(a.dscale.row(bi, n) + d, t);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) t[j] = ln_bwd_dx<acc>(ln_bwd_g<acc>(gos[j], ws[j], scs[j]), xs[j], rs, sg, sgx, a.D);
    if constexpr (FUSED) {
      Ld<T, V>::get(a.dh.row(bi, n) + d, gos);
#pragma unroll
      for (int j = 0; j < V; ++j) t[j] += gos[j];
      Ld<T, V>::get(a.gate.row(bi, n) + d, scs);
#pragma unroll
      for (int j = 0; j < V; ++j) scs[j] *= t[j];
      Ld<T, V>::put(a.dy.row(bi, n) + d, scs);
      if (a.gate_tok) {
        Ld<T, V>::get(a.y.row(bi, n) + d, scs);
#pragma unroll
        for (int j = 0; j < V; ++j) scs[j] *= t[j];
        Ld<T, V>::put(a.dgate.row(bi, n) + d, scs);
      }
    }
    Ld<T, V>::put(a.dx.row(bi, n) + d, t);
  }
}

// Per-sample/affine reductions: thread per column, rows [p*chunk, (p+1)*chunk) of sample b.
// MODE 0: LayerNorm (RMS: RMSNorm) backward, 1: fused backward, 2: gated-residual backward (gate only).
// Grid (B * P, ceil(D / kColThreads)): the (sample, chunk) pairs on x, whose limit is 2^31 - 1
// (y and z stop at 65535, which B or P alone can pass).
template <typename T, int MODE, bool RMS> __global__ void col_kernel(LnArgs<T> a, const float* rowsum) {
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x;
  if (d >= a.D) return;
  const int64_t bi = blockIdx.x / a.P, p = blockIdx.x % a.P;
  const acc w = a.w ? to_acc<acc>(gload(a.w + d)) : acc(1), bb = a.b ? to_acc<acc>(gload(a.b + d)) : acc(0);
  acc s_shift = 0, s_scale = 0, s_gate = 0, s_w = 0, s_b = 0;
  const int64_t n1 = (p + 1) * a.chunk < a.N ? (p + 1) * a.chunk : a.N;
  for (int64_t n = p * a.chunk; n < n1; ++n) {
    const acc go = to_acc<acc>(gload(a.dout.row(bi, n) + d));
    if constexpr (MODE == 2) {
      s_gate += go * to_acc<acc>(gload(a.y.row(bi, n) + d));
      continue;
    } else {
      const int64_t r = bi * a.N + n;
      const acc rs = gload(a.rstd + r);
      const acc xh = (to_acc<acc>(gload(a.x.row(bi, n) + d)) - (RMS ? acc(0) : gload(a.mean + r))) * rs;
      const acc sc = to_acc<acc>(gload(a.scale.row(bi, n) + d));
      s_shift += go;
      s_scale += LnParamGrads::dscale<acc>(go, xh, w, bb);
      s_w += LnParamGrads::dweight<acc>(go, xh, sc);
      s_b += LnParamGrads::dbias<acc>(go, sc);
      if (MODE == 1 && !a.gate_tok) {
        acc dt = ln_bwd_dx<acc>(ln_bwd_g<acc>(go, w, sc), xh, rs, gload(rowsum + 2 * r), gload(rowsum + 2 * r + 1), a.D);
        dt += to_acc<acc>(gload(a.dh.row(bi, n) + d));
        s_gate += dt * to_acc<acc>(gload(a.y.row(bi, n) + d));
      }
    }
  }
  float* part = a.part + (bi * a.P + p) * kSlots * a.D + d;
  gstore(part + kShift * a.D, s_shift);
  gstore(part + kScale * a.D, s_scale);
  gstore(part + kGate * a.D, s_gate);
  gstore(part + kWeight * a.D, s_w);
  gstore(part + kBias * a.D, s_b);
}

template <typename T> __global__ void finalize_kernel(LnArgs<T> a, bool gate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < a.B * a.D) {
    const int64_t bi = i / a.D, d = i % a.D;
    if (a.dshift.p && !a.shift_tok) finalize_one<T>(a.part, a.B, a.P, a.D, kShift, bi, d, a.dshift.row(bi, 0) + d);
    if (a.dscale.p && !a.scale_tok) finalize_one<T>(a.part, a.B, a.P, a.D, kScale, bi, d, a.dscale.row(bi, 0) + d);
    if (gate && !a.gate_tok) finalize_one<T>(a.part, a.B, a.P, a.D, kGate, bi, d, a.dgate.row(bi, 0) + d);
  }
  if (i < a.D) {
    if (a.w) finalize_one<T>(a.part, a.B, a.P, a.D, kWeight, -1, i, a.dw + i);
    if (a.b) finalize_one<T>(a.part, a.B, a.P, a.D, kBias, -1, i, a.db + i);
  }
}

template <typename T, int V> __global__ void gr_fwd_kernel(LnArgs<T> a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= a.B * a.N) return;
  const int64_t bi = r / a.N, n = r % a.N;
  acc xs[V], ys[V], gs[V];
  for (int64_t d = threadIdx.x * V; d < a.D; d += kWarp * V) {
    Ld<T, V>::get(a.x.row(bi, n) + d, xs);
    Ld<T, V>::get(a.y.row(bi, n) + d, ys);
    Ld<T, V>::get(a.gate.row(bi, n) + d, gs);
#pragma unroll
    for (int j = 0; j < V; ++j) xs[j] = gated<acc>(xs[j], gs[j], ys[j]);
    Ld<T, V>::put(a.out.row(bi, n) + d, xs);
  }
}

template <typename T, int V> __global__ void gr_bwd_row_kernel(LnArgs<T> a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= a.B * a.N) return;
  const int64_t bi = r / a.N, n = r % a.N;
  acc gos[V], gs[V], ys[V];
  for (int64_t d = threadIdx.x * V; d < a.D; d += kWarp * V) {
    Ld<T, V>::get(a.dout.row(bi, n) + d, gos);
    Ld<T, V>::get(a.gate.row(bi, n) + d, gs);
#pragma unroll
    for (int j = 0; j < V; ++j) gs[j] *= gos[j];
    Ld<T, V>::put(a.dy.row(bi, n) + d, gs);
    if (a.gate_tok) {
      Ld<T, V>::get(a.y.row(bi, n) + d, ys);
#pragma unroll
      for (int j = 0; j < V; ++j) ys[j] *= gos[j];
      Ld<T, V>::put(a.dgate.row(bi, n) + d, ys);
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------

inline dim3 row_grid(int64_t rows) { return dim3(blocks_for(rows, kRowsPerBlock)); }
inline dim3 row_block() { return dim3(kWarp, kRowsPerBlock); }

// V is 16 / sizeof(T) when every row is aligned for it, else 1 (chosen by the host code).
#define EK_VEC_SWITCH(T, V, ...)                                        \
  if ((V) > 1) { constexpr int VV = 16 / sizeof(T); __VA_ARGS__; }     \
  else { constexpr int VV = 1; __VA_ARGS__; }

template <typename T, bool FUSED, bool RMS> void fwd_cuda(const LnArgs<T>& a, int V) {
  EK_VEC_SWITCH(T, V, EK_LAUNCH(row_grid(a.B * a.N), row_block(), EK_STREAM(), ln_fwd_kernel<T, VV, FUSED, RMS>)(a));
  EK_LAUNCH_CHECK();
}

template <typename T> void gr_fwd_cuda(const LnArgs<T>& a, int V) {
  EK_VEC_SWITCH(T, V, EK_LAUNCH(row_grid(a.B * a.N), row_block(), EK_STREAM(), gr_fwd_kernel<T, VV>)(a));
  EK_LAUNCH_CHECK();
}

template <typename T> void finalize_cuda(const LnArgs<T>& a, bool gate) {
  EK_LAUNCH(blocks_for(a.B * a.D, 256), 256, EK_STREAM(), finalize_kernel<T>)(a, gate);
  EK_LAUNCH_CHECK();
}

template <typename T, int MODE, bool RMS> void col_cuda(const LnArgs<T>& a, const float* rowsum) {
  dim3 grid(static_cast<unsigned>(a.B * a.P), blocks_for(a.D, kColThreads));
  EK_LAUNCH(grid, kColThreads, EK_STREAM(), col_kernel<T, MODE, RMS>)(a, rowsum);
  EK_LAUNCH_CHECK();
}

template <typename T, bool FUSED, bool RMS> void bwd_cuda(const LnArgs<T>& a, int V, float* rowsum, bool need_cols) {
  EK_VEC_SWITCH(T, V, EK_LAUNCH(row_grid(a.B * a.N), row_block(), EK_STREAM(),
                                ln_bwd_row_kernel<T, VV, FUSED, RMS>)(a, rowsum));
  EK_LAUNCH_CHECK();
  if (!need_cols) return;
  col_cuda<T, FUSED ? 1 : 0, RMS>(a, rowsum);
  finalize_cuda<T>(a, FUSED);
}

template <typename T> void gr_bwd_cuda(const LnArgs<T>& a, int V) {
  EK_VEC_SWITCH(T, V, EK_LAUNCH(row_grid(a.B * a.N), row_block(), EK_STREAM(), gr_bwd_row_kernel<T, VV>)(a));
  EK_LAUNCH_CHECK();
  if (a.gate_tok) return;
  col_cuda<T, 2, false>(a, nullptr);
  finalize_cuda<T>(a, true);
}

}  // namespace
}  // namespace ek
