// Shared plumbing of effkernels._C: host/device qualifiers, accumulation types, strided row views,
// argument checks, and (under nvcc only) vector loads and warp reductions.
//
// Only light headers: ATen/core/Tensor.h and friends, never torch/extension.h (which costs ~2.5 min
// per translation unit to parse; see DEVELOPERS.md).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launch.h"  // EK_CUDA, EK_LAUNCH and the rest of the launch layer (nvcc or the simulator)

// C10_HOST_DEVICE is `__host__ __device__` under nvcc and empty under g++, so everything marked
// EK_HD compiles in both builds and is the one copy of the arithmetic both paths run.
#define EK_HD C10_HOST_DEVICE inline

namespace ek {

// Every dtype accumulates in float32: the statistics contract, and what the reference does (it
// computes in x.float() even for float64 input), so float64 matches it rather than beating it.
using acc = float;

template <typename A, typename T> EK_HD A to_acc(T v) { return static_cast<A>(v); }
template <typename T, typename A> EK_HD T from_acc(A v) { return static_cast<T>(v); }

EK_HD float ek_sqrt(float v) { return sqrtf(v); }
EK_HD double ek_sqrt(double v) { return sqrt(v); }

// A (B, N, D) tensor, or a per-sample (B, D) one broadcast over N (token stride 0), addressed by
// row. Unit stride along D is the ops' contract; row strides are whatever the caller's view has,
// so adaLN chunks (row stride 6D) are read in place.
template <typename T> struct Rows {
  T* p = nullptr;  // null: operand absent (launch code tests it)
  int64_t sb = 0, sn = 0;
  EK_HD T* row(int64_t b, int64_t n) const { return p + b * sb + n * sn; }
};

template <typename T> Rows<T> rows_of(const at::Tensor& t) {
  T* p = static_cast<T*>(t.data_ptr());
  if (t.dim() == 2) return Rows<T>{p, t.stride(0), 0};
  return Rows<T>{p, t.stride(0), t.stride(1)};
}

template <typename T> Rows<const T> crows_of(const at::Tensor& t) {
  const T* p = static_cast<const T*>(t.const_data_ptr());
  if (t.dim() == 2) return Rows<const T>{p, t.stride(0), 0};
  return Rows<const T>{p, t.stride(0), t.stride(1)};
}

// The public ops validate everything with clear Python errors before reaching here; these checks
// only guard direct calls of torch.ops.effkernels_C.* against memory-unsafe input.
inline void check_last_unit(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have unit stride in its last dim");
}

inline void check_out(const at::Tensor& out, at::IntArrayRef shape, c10::ScalarType dtype,
                      const at::Device& dev, const char* name) {
  TORCH_CHECK(out.sizes() == shape, name, " must have shape ", shape, ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == dev, name, " must be on ", dev, ", got ", out.device());
  TORCH_CHECK(out.is_contiguous(), name, " must be contiguous");
}

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Rows per parallel_for chunk: at least ~32K elements, so that small problems run on one thread
// instead of paying a parallel region's wake-up (measured ~8 ms per region here on a busy core).
inline int64_t row_grain(int64_t D) { return std::max<int64_t>(16, 32768 / std::max<int64_t>(D, 1)); }

// Fixed chunking of rows for deterministic partial reductions: the chunk a row falls in depends
// only on its index, never on the thread count, so sums are bitwise reproducible.
constexpr int64_t kCpuRowChunk = 32;
inline int64_t num_chunks(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

// Scalar global-memory accesses of the code CUDA kernels run (vector ones are vload/vstore below):
// the simulator checks them like any device access (alignment, bounds, one writer per element);
// in every other build they are a plain load and store.
template <typename T> EK_HD T gload(const T* p) {
  EK_SIM_ACCESS(p, sizeof(T), false);
  return *p;
}
template <typename T> EK_HD void gstore(T* p, T v) {
  EK_SIM_ACCESS(p, sizeof(T), true);
  *p = v;
}

// Sum of P partials spaced `stride` apart, in index order (deterministic).
template <typename A> EK_HD A sum_partials(const A* part, int64_t count, int64_t stride) {
  A s = A(0);
  for (int64_t i = 0; i < count; ++i) s += gload(part + i * stride);
  return s;
}

// CPU row sum with independent lanes so g++ can vectorise without -ffast-math reassociation.
template <typename A, typename F> inline A lane_sum(int64_t D, F&& f) {
  constexpr int L = 8;
  A acc[L] = {};
  int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int l = 0; l < L; ++l) acc[l] += f(d + l);
  A s = A(0);
  for (int l = 0; l < L; ++l) s += acc[l];
  for (; d < D; ++d) s += f(d);
  return s;
}

#ifdef EK_CUDA
constexpr int kWarp = 32;

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  // fault 1 (simulator self-test only): offset 1 becomes 0, so odd and even lanes are never summed
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o & ~EK_SIM_BREAK(1));
  return v;
}

// 16 bytes (or V elements) moved by one instruction; only used when every row start is aligned.
template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

template <typename T, int V> __device__ __forceinline__ Vec<T, V> vload(const T* p) {
  EK_SIM_ACCESS(p, sizeof(Vec<T, V>), false);
  return *reinterpret_cast<const Vec<T, V>*>(p);
}
template <typename T, int V> __device__ __forceinline__ void vstore(T* p, const Vec<T, V>& v) {
  EK_SIM_ACCESS(p, sizeof(Vec<T, V>), true);
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// Can rows of this tensor be read V elements at a time: aligned base, row strides multiples of V.
inline bool vec_ok(const at::Tensor& t, int V) {
  if (!t.defined()) return true;
  if (EK_SIM_BREAK(3)) return true;  // the simulator's self-test: a vector path on misaligned rows
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (t.element_size() * V) != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && t.stride(i) % V != 0) return false;
  return true;
}

inline int blocks_for(int64_t n, int per_block) { return static_cast<int>((n + per_block - 1) / per_block); }
#endif

}  // namespace ek
