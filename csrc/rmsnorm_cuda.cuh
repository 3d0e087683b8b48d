// CUDA side of the RMSNorm family (included by rmsnorm.cu when EK_CUDA: nvcc with WITH_CUDA, or
// the simulator build). Launches go through launch.h's EK_LAUNCH.
//
// Row kernels: one warp per row of D, V elements per load (16 bytes when every row start is aligned
// and D % V == 0, else V = 1, which also covers odd D with no tail loop), fp32 sums reduced with
// warp shuffles. Rows are re-read between passes (L1/L2 hits) rather than kept in registers, so any
// D works and register use stays low. Column kernel: one thread per column over a fixed chunk of
// rows of one sample, writing the float32 partial buffer; a finalize kernel sums it in fixed order.
// No atomics.
#pragma once

namespace ek {
namespace {

constexpr int kRmsRowsPerBlock = 4;  // warps per block in the row kernels
constexpr int kRmsColThreads = 128;  // columns per block in the column kernel

template <typename T, int V> struct RLd {
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

template <typename T, int V> __device__ __forceinline__ void rms_load_w(const T* w, int64_t d, acc* ws) {
  if (w) {
    RLd<T, V>::get(w + d, ws);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) ws[j] = acc(1);
  }
}

template <typename T, int V, bool FUSED> __global__ void rms_fwd_kernel(RmsArgs<T> a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRmsRowsPerBlock + threadIdx.y;
  if (r >= a.B * a.N) return;
  const int64_t bi = r / a.N, n = r % a.N;
  const int lane = threadIdx.x;
  const T* src = a.x.row(bi, n);
  acc xs[V], ys[V], gs[V], ws[V], shs[V], scs[V];
  acc q = 0;
  if constexpr (FUSED) {
    T* hr = a.h.row(bi, n);
    for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
      RLd<T, V>::get(src + d, xs);
      RLd<T, V>::get(a.y.row(bi, n) + d, ys);
      RLd<T, V>::get(a.gate.row(bi, n) + d, gs);
      Vec<T, V> hv;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        hv.v[j] = from_acc<T>(gated<acc>(xs[j], gs[j], ys[j]));
        const acc hj = to_acc<acc>(hv.v[j]);  // the statistic of h as stored
        q += hj * hj;
      }
      vstore<T, V>(hr + d, hv);
    }
    src = hr;  // each lane re-reads only what it wrote itself: ordered without a barrier
  } else {
    for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
      RLd<T, V>::get(src + d, xs);
#pragma unroll
      for (int j = 0; j < V; ++j) q += xs[j] * xs[j];
    }
  }
  const acc rs = rms_rstd<acc>(warp_sum(q), a.D, a.eps);
  if (lane == 0) gstore(a.rstd + r, rs);
  for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
    RLd<T, V>::get(src + d, xs);
    RLd<T, V>::get(a.shift.row(bi, n) + d, shs);
    RLd<T, V>::get(a.scale.row(bi, n) + d, scs);
    rms_load_w<T, V>(a.w, d, ws);
#pragma unroll
    for (int j = 0; j < V; ++j) xs[j] = rms_modulate<acc>(xs[j] * rs, ws[j], scs[j], shs[j]);
    RLd<T, V>::put(a.out.row(bi, n) + d, xs);
  }
}

// dx (and, fused, dy and per-token dgate), per-token dshift/dscale; sum(g * xhat) of each row saved
// in `rowsum` (B*N) when the column kernel must recompute d(h) for a per-sample gate.
template <typename T, int V, bool FUSED> __global__ void rms_bwd_row_kernel(RmsArgs<T> a, float* rowsum) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRmsRowsPerBlock + threadIdx.y;
  if (r >= a.B * a.N) return;
  const int64_t bi = r / a.N, n = r % a.N;
  const int lane = threadIdx.x;
  const acc rs = gload(a.rstd + r);
  acc xs[V], gos[V], scs[V], ws[V], t[V];
  acc sgx = 0;
  for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
    RLd<T, V>::get(a.x.row(bi, n) + d, xs);
    RLd<T, V>::get(a.dout.row(bi, n) + d, gos);
    RLd<T, V>::get(a.scale.row(bi, n) + d, scs);
    rms_load_w<T, V>(a.w, d, ws);
#pragma unroll
    for (int j = 0; j < V; ++j) sgx += rms_bwd_g<acc>(gos[j], ws[j], scs[j]) * xs[j] * rs;
  }
  sgx = warp_sum(sgx);
  if (FUSED && rowsum && lane == 0) gstore(rowsum + r, sgx);
  for (int64_t d = lane * V; d < a.D; d += kWarp * V) {
    RLd<T, V>::get(a.x.row(bi, n) + d, xs);
    RLd<T, V>::get(a.dout.row(bi, n) + d, gos);
    RLd<T, V>::get(a.scale.row(bi, n) + d, scs);
    rms_load_w<T, V>(a.w, d, ws);
#pragma unroll
    for (int j = 0; j < V; ++j) xs[j] *= rs;
    if (a.shift_tok) RLd<T, V>::put(a.dshift.row(bi, n) + d, gos);
    if (a.scale_tok) {
#pragma unroll
      for (int j = 0; j < V; ++j) t[j] = RmsParamGrads::dscale<acc>(gos[j], xs[j], ws[j]);
      RLd<T, V>::put(a.dscale.row(bi, n) + d, t);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) t[j] = rms_bwd_dx<acc>(rms_bwd_g<acc>(gos[j], ws[j], scs[j]), xs[j], rs, sgx, a.D);
    if constexpr (FUSED) {
      RLd<T, V>::get(a.dh.row(bi, n) + d, gos);
#pragma unroll
      for (int j = 0; j < V; ++j) t[j] += gos[j];
      RLd<T, V>::get(a.gate.row(bi, n) + d, scs);
#pragma unroll
      for (int j = 0; j < V; ++j) scs[j] *= t[j];
      RLd<T, V>::put(a.dy.row(bi, n) + d, scs);
      if (a.gate_tok) {
        RLd<T, V>::get(a.y.row(bi, n) + d, scs);
#pragma unroll
        for (int j = 0; j < V; ++j) scs[j] *= t[j];
        RLd<T, V>::put(a.dgate.row(bi, n) + d, scs);
      }
    }
    RLd<T, V>::put(a.dx.row(bi, n) + d, t);
  }
}

// Per-sample and weight reductions: thread per column, rows [p*chunk, (p+1)*chunk) of sample b.
// Grid (B * P, ceil(D / kRmsColThreads)): (sample, chunk) pairs on x, as the adaLN column kernel.
template <typename T, bool FUSED> __global__ void rms_col_kernel(RmsArgs<T> a, const float* rowsum) {
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kRmsColThreads + threadIdx.x;
  if (d >= a.D) return;
  const int64_t bi = blockIdx.x / a.P, p = blockIdx.x % a.P;
  const acc w = a.w ? to_acc<acc>(gload(a.w + d)) : acc(1);
  acc s_shift = 0, s_scale = 0, s_gate = 0, s_w = 0;
  const int64_t n1 = (p + 1) * a.chunk < a.N ? (p + 1) * a.chunk : a.N;
  for (int64_t n = p * a.chunk; n < n1; ++n) {
    const int64_t r = bi * a.N + n;
    const acc go = to_acc<acc>(gload(a.dout.row(bi, n) + d));
    const acc rs = gload(a.rstd + r);
    const acc xh = to_acc<acc>(gload(a.x.row(bi, n) + d)) * rs;
    const acc sc = to_acc<acc>(gload(a.scale.row(bi, n) + d));
    s_shift += go;
    s_scale += RmsParamGrads::dscale<acc>(go, xh, w);
    s_w += RmsParamGrads::dweight<acc>(go, xh, sc);
    if (FUSED && !a.gate_tok) {
      acc dt = rms_bwd_dx<acc>(rms_bwd_g<acc>(go, w, sc), xh, rs, gload(rowsum + r), a.D);
      dt += to_acc<acc>(gload(a.dh.row(bi, n) + d));
      s_gate += dt * to_acc<acc>(gload(a.y.row(bi, n) + d));
    }
  }
  float* part = a.part + (bi * a.P + p) * kRmsSlots * a.D + d;
  gstore(part + kRmsShift * a.D, s_shift);
  gstore(part + kRmsScale * a.D, s_scale);
  gstore(part + kRmsGate * a.D, s_gate);
  gstore(part + kRmsWeight * a.D, s_w);
}

template <typename T> __global__ void rms_finalize_kernel(RmsArgs<T> a, bool gate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < a.B * a.D) {
    const int64_t bi = i / a.D, d = i % a.D;
    if (!a.shift_tok) rms_finalize_one<T>(a.part, a.B, a.P, a.D, kRmsShift, bi, d, a.dshift.row(bi, 0) + d);
    if (!a.scale_tok) rms_finalize_one<T>(a.part, a.B, a.P, a.D, kRmsScale, bi, d, a.dscale.row(bi, 0) + d);
    if (gate && !a.gate_tok) rms_finalize_one<T>(a.part, a.B, a.P, a.D, kRmsGate, bi, d, a.dgate.row(bi, 0) + d);
  }
  if (i < a.D && a.w) rms_finalize_one<T>(a.part, a.B, a.P, a.D, kRmsWeight, -1, i, a.dw + i);
}

// ---- launchers ----------------------------------------------------------------------------------

inline dim3 rms_row_grid(int64_t rows) { return dim3(blocks_for(rows, kRmsRowsPerBlock)); }
inline dim3 rms_row_block() { return dim3(kWarp, kRmsRowsPerBlock); }

template <typename T, bool FUSED> void rms_fwd_cuda(const RmsArgs<T>& a, int V) {
  constexpr int VV = 16 / sizeof(T);
  if (V > 1) EK_LAUNCH(rms_row_grid(a.B * a.N), rms_row_block(), EK_STREAM(), rms_fwd_kernel<T, VV, FUSED>)(a);
  else EK_LAUNCH(rms_row_grid(a.B * a.N), rms_row_block(), EK_STREAM(), rms_fwd_kernel<T, 1, FUSED>)(a);
  EK_LAUNCH_CHECK();
}

template <typename T, bool FUSED> void rms_bwd_cuda(const RmsArgs<T>& a, int V, float* rowsum, bool need_cols) {
  constexpr int VV = 16 / sizeof(T);
  if (V > 1) EK_LAUNCH(rms_row_grid(a.B * a.N), rms_row_block(), EK_STREAM(), rms_bwd_row_kernel<T, VV, FUSED>)(a, rowsum);
  else EK_LAUNCH(rms_row_grid(a.B * a.N), rms_row_block(), EK_STREAM(), rms_bwd_row_kernel<T, 1, FUSED>)(a, rowsum);
  EK_LAUNCH_CHECK();
  if (!need_cols) return;
  dim3 grid(static_cast<unsigned>(a.B * a.P), blocks_for(a.D, kRmsColThreads));
  EK_LAUNCH(grid, kRmsColThreads, EK_STREAM(), rms_col_kernel<T, FUSED>)(a, rowsum);
  EK_LAUNCH_CHECK();
  EK_LAUNCH(blocks_for(a.B * a.D, 256), 256, EK_STREAM(), rms_finalize_kernel<T>)(a, FUSED);
  EK_LAUNCH_CHECK();
}

}  // namespace
}  // namespace ek
