// SwiGLU, silu(a) * b: forward and backward as C++ CPU loops and (under nvcc with WITH_CUDA) CUDA
// kernels. Both paths call swiglu_math.h. a and b are (B, N, H) row views with any row strides and
// unit stride along H (the halves of one (B, N, 2H) projection: row stride 2H). Elementwise, no
// reductions: deterministic. Arithmetic in float32 (every dtype accumulates in `acc`).
//
// CUDA: a grid-stride loop over (row, V-element chunk) with V = 16 bytes of elements when H % V == 0
// and every row start is aligned, else V = 1; the CPU tests do not exercise the vector loads.
#include "swiglu_math.h"

#include <torch/library.h>

namespace ek {
namespace {

using at::Tensor;

template <typename T> struct SwiArgs {
  Rows<const T> a, b, dout;
  Rows<T> out, da, db;
  int64_t B = 0, N = 0, H = 0;
};

// ---------------------------------------------------------------------------------------------
// CPU loops: one row at a time, rows spread over threads with at::parallel_for.
// ---------------------------------------------------------------------------------------------

template <typename T, bool BWD> void swiglu_cpu(const SwiArgs<T>& p) {
  at::parallel_for(0, p.B * p.N, row_grain(p.H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / p.N, n = r % p.N;
      const T *ar = p.a.row(bi, n), *br = p.b.row(bi, n);
      if constexpr (BWD) {
        const T* g = p.dout.row(bi, n);
        T *da = p.da.row(bi, n), *db = p.db.row(bi, n);
        for (int64_t c = 0; c < p.H; ++c) {
          acc x, y;
          swiglu_bwd_elem<acc>(to_acc<acc>(g[c]), to_acc<acc>(ar[c]), to_acc<acc>(br[c]), x, y);
          da[c] = from_acc<T>(x);
          db[c] = from_acc<T>(y);
        }
      } else {
        T* o = p.out.row(bi, n);
        for (int64_t c = 0; c < p.H; ++c) o[c] = from_acc<T>(swiglu_fwd_elem<acc>(to_acc<acc>(ar[c]), to_acc<acc>(br[c])));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// CUDA kernels
// ---------------------------------------------------------------------------------------------

#ifdef EK_CUDA
template <typename T, int V> __device__ __forceinline__ void sw_load(const T* p, acc* o) {
  const Vec<T, V> v = vload<T, V>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) o[j] = to_acc<acc>(v.v[j]);
}

template <typename T, int V> __device__ __forceinline__ void sw_store(T* p, const acc* o) {
  Vec<T, V> v;
#pragma unroll
  for (int j = 0; j < V; ++j) v.v[j] = from_acc<T>(o[j]);
  vstore<T, V>(p, v);
}

template <typename T, int V, bool BWD> __global__ void swiglu_kernel(SwiArgs<T> p) {
  const int64_t hv = p.H / V;  // V divides H (launcher)
  const int64_t total = p.B * p.N * hv;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / hv, c = (i - r * hv) * V;
    const int64_t bi = r / p.N, n = r - bi * p.N;
    acc av[V], bv[V];
    sw_load<T, V>(p.a.row(bi, n) + c, av);
    sw_load<T, V>(p.b.row(bi, n) + c, bv);
    if constexpr (BWD) {
      acc gv[V], x[V], y[V];
      sw_load<T, V>(p.dout.row(bi, n) + c, gv);
#pragma unroll
      for (int j = 0; j < V; ++j) swiglu_bwd_elem<acc>(gv[j], av[j], bv[j], x[j], y[j]);
      sw_store<T, V>(p.da.row(bi, n) + c, x);
      sw_store<T, V>(p.db.row(bi, n) + c, y);
    } else {
      acc o[V];
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = swiglu_fwd_elem<acc>(av[j], bv[j]);
      sw_store<T, V>(p.out.row(bi, n) + c, o);
    }
  }
}

constexpr int kSwiThreads = 256;
constexpr int64_t kSwiMaxBlocks = 65535;  // the grid-stride loop covers the rest

template <typename T, bool BWD> void swiglu_cuda(const SwiArgs<T>& p, int V) {
  constexpr int VV = static_cast<int>(16 / sizeof(T));
  const int64_t total = p.B * p.N * (p.H / V);
  const int grid = static_cast<int>(std::min<int64_t>((total + kSwiThreads - 1) / kSwiThreads, kSwiMaxBlocks));
  if (V == VV) EK_LAUNCH(grid, kSwiThreads, EK_STREAM(), swiglu_kernel<T, VV, BWD>)(p);
  else EK_LAUNCH(grid, kSwiThreads, EK_STREAM(), swiglu_kernel<T, 1, BWD>)(p);
  EK_LAUNCH_CHECK();
}
#endif

// ---------------------------------------------------------------------------------------------
// Tensor-level entry points
// ---------------------------------------------------------------------------------------------

void check_rows(const Tensor& t, const Tensor& a, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.sizes() == a.sizes(), name, " must be a (B, N, H) tensor of a's shape ", a.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == a.scalar_type() && t.device() == a.device(), name, ": dtype/device mismatch with a");
  check_last_unit(t, name);
}

// 16-byte vectors when H divides and every row of every operand starts aligned (CUDA only).
int swiglu_vec(const Tensor& a, std::initializer_list<Tensor> ts) {
#ifdef EK_CUDA
  const int V = static_cast<int>(16 / a.element_size());
  if (a.size(2) % V != 0) return 1;
  for (const Tensor& t : ts)
    if (!vec_ok(t, V)) return 1;
  return V;
#else
  (void)a;
  (void)ts;
  return 1;
#endif
}

void swiglu_impl(const Tensor* dout, const Tensor& a, const Tensor& b, const Tensor& out, const Tensor& da,
                 const Tensor& db) {
  if (a.numel() == 0) return;
  const int V = dout ? swiglu_vec(a, {*dout, a, b, da, db}) : swiglu_vec(a, {a, b, out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "swiglu", [&] {
    SwiArgs<scalar_t> p;
    p.a = crows_of<scalar_t>(a);
    p.b = crows_of<scalar_t>(b);
    if (dout) {
      p.dout = crows_of<scalar_t>(*dout);
      p.da = rows_of<scalar_t>(da);
      p.db = rows_of<scalar_t>(db);
    } else {
      p.out = rows_of<scalar_t>(out);
    }
    p.B = a.size(0);
    p.N = a.size(1);
    p.H = a.size(2);
#ifdef EK_CUDA
    if (EK_ON_DEVICE(a)) {
      EK_DEVICE_GUARD(a);
      if (dout) swiglu_cuda<scalar_t, true>(p, V); else swiglu_cuda<scalar_t, false>(p, V);
      return;
    }
#endif
    (void)V;
    if (dout) swiglu_cpu<scalar_t, true>(p); else swiglu_cpu<scalar_t, false>(p);
  });
}

void swiglu_fwd_out(const Tensor& a, const Tensor& b, const Tensor& out) {
  check_rows(a, a, "a");
  check_rows(b, a, "b");
  check_out(out, a.sizes(), a.scalar_type(), a.device(), "out");
  swiglu_impl(nullptr, a, b, out, Tensor(), Tensor());
}

Tensor swiglu_fwd(const Tensor& a, const Tensor& b) {
  Tensor out = at::empty(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
  swiglu_fwd_out(a, b, out);
  return out;
}

std::tuple<Tensor, Tensor> swiglu_bwd(const Tensor& dout, const Tensor& a, const Tensor& b) {
  check_rows(a, a, "a");
  check_rows(b, a, "b");
  check_rows(dout, a, "dout");
  auto opts = a.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor da = at::empty(a.sizes(), opts), db = at::empty(a.sizes(), opts);
  swiglu_impl(&dout, a, b, Tensor(), da, db);
  return {da, db};
}

}  // namespace
}  // namespace ek

#define EK_SWIGLU_IMPLS(m)                             \
  m.impl("swiglu_fwd", &ek::swiglu_fwd);               \
  m.impl("swiglu_fwd_out", &ek::swiglu_fwd_out);       \
  m.impl("swiglu_bwd", &ek::swiglu_bwd);

EK_TORCH_LIBRARY_IMPL(CPU, m) { EK_SWIGLU_IMPLS(m) }
#ifdef EK_NVCC
EK_TORCH_LIBRARY_IMPL(CUDA, m) { EK_SWIGLU_IMPLS(m) }
#endif
