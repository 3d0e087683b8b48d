// Routing family: gather the rows a route keeps, scatter rows back (out of place), as C++ CPU loops
// and (under nvcc with WITH_CUDA) CUDA kernels.
//
// Every primitive is "copy row src_n of sample b to row dst_n" over a list of (b, k) pairs; which
// side the index applies to is the only difference, decided by route_rows() on both devices.
// Scatter is two passes on the same stream: copy x (or zeros) to out, then write the K routed rows;
// indices are distinct (the ops check), so no two writers ever share a row and no atomics are needed.
#include "common.h"

#include <torch/library.h>

namespace ek {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

enum RouteMode : int { kGather = 0, kScatter = 1, kCopy = 2 };

// Row numbers of the k-th copy of sample b; false when the index is out of range.
template <typename I> EK_HD bool route_rows(int mode, const I* idx, int64_t b, int64_t k, int64_t K, int64_t N,
                                            int64_t* src_n, int64_t* dst_n) {
  const int64_t j = mode == kCopy ? k : static_cast<int64_t>(gload(idx + b * K + k));
  *src_n = mode == kGather ? j : k;
  *dst_n = mode == kGather ? k : j;
  return j >= 0 && j < N;
}

// src.p null means zero rows. K rows per sample are copied; N bounds the indexed side.
template <typename T, typename I> struct RouteArgs {
  Rows<const T> src;
  Rows<T> dst;
  const I* idx;
  int64_t B, K, N, D;
  int mode;
};

template <typename T, typename I> void route_cpu(const RouteArgs<T, I>& a) {
  at::parallel_for(0, a.B * a.K, row_grain(a.D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / a.K, k = r % a.K;
      int64_t s, d;
      TORCH_CHECK(route_rows<I>(a.mode, a.idx, b, k, a.K, a.N, &s, &d), "idx value out of range [0, ", a.N, ")");
      T* dst = a.dst.row(b, d);
      if (a.src.p) std::copy(a.src.row(b, s), a.src.row(b, s) + a.D, dst);
      else std::fill(dst, dst + a.D, T(0));
    }
  });
}

#ifdef EK_CUDA
constexpr int kRowsPerBlock = 4;

template <typename T, typename I, int V> __global__ void route_kernel(RouteArgs<T, I> a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= a.B * a.K) return;
  const int64_t b = r / a.K, k = r % a.K;
  int64_t s, d;
  const bool ok = route_rows<I>(a.mode, a.idx, b, k, a.K, a.N, &s, &d);
  EK_KERNEL_ASSERT(ok && "idx value out of range");
  if (!ok) return;
  T* dst = a.dst.row(b, d & ~static_cast<int64_t>(EK_SIM_BREAK(4)));  // fault 4: rows d and d^1 onto one
  Vec<T, V> zero;
#pragma unroll
  for (int j = 0; j < V; ++j) zero.v[j] = T(0);
  for (int64_t c = threadIdx.x * V; c < a.D; c += kWarp * V)
    vstore<T, V>(dst + c, a.src.p ? vload<T, V>(a.src.row(b, s) + c) : zero);
}

template <typename T, typename I> void route_cuda(const RouteArgs<T, I>& a, bool vec) {
  dim3 grid(blocks_for(a.B * a.K, kRowsPerBlock)), block(kWarp, kRowsPerBlock);
  if (vec) EK_LAUNCH(grid, block, EK_STREAM(), route_kernel<T, I, 16 / sizeof(T)>)(a);
  else EK_LAUNCH(grid, block, EK_STREAM(), route_kernel<T, I, 1>)(a);
  EK_LAUNCH_CHECK();
}
#endif

void check_x(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be (B, N, D), got ", t.sizes());
  check_last_unit(t, name);
}

// One pass of row copies: src rows (or zeros) -> dst rows.
void run(int mode, const Tensor* src, const Tensor& dst, const Tensor& idx, int64_t K, int64_t N) {
  const int64_t B = dst.size(0), D = dst.size(2);
  if (B * K * D == 0) return;
  Tensor ix = idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "route", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(ix.scalar_type(), "route_idx", [&] {
      RouteArgs<T, index_t> a{src ? crows_of<T>(*src) : Rows<const T>{nullptr, 0, 0}, rows_of<T>(dst),
                              mode == kCopy ? nullptr : ix.const_data_ptr<index_t>(), B, K, N, D, mode};
#ifdef EK_CUDA
      if (EK_ON_DEVICE(dst)) {
        EK_DEVICE_GUARD(dst);
        const int V = static_cast<int>(16 / sizeof(T));
        route_cuda<T, index_t>(a, D % V == 0 && vec_ok(dst, V) && (!src || vec_ok(*src, V)));
        return;
      }
#endif
      route_cpu<T, index_t>(a);
    });
  });
}

void check_idx(const Tensor& idx, const Tensor& like) {
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == like.size(0), "idx must be (B, K)");
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, "idx must be int32 or int64");
  TORCH_CHECK(idx.device() == like.device(), "idx must be on ", like.device());
}

void gather_out(const Tensor& x, const Tensor& idx, const Tensor& out) {
  check_x(x, "x");
  check_idx(idx, x);
  check_out(out, {x.size(0), idx.size(1), x.size(2)}, x.scalar_type(), x.device(), "out");
  run(kGather, &x, out, idx, idx.size(1), x.size(1));
}

Tensor gather(const Tensor& x, const Tensor& idx) {
  check_x(x, "x");
  Tensor out = at::empty({x.size(0), idx.size(1), x.size(2)}, x.options());
  gather_out(x, idx, out);
  return out;
}

void scatter_out(const OptT& x, const OptT& x_sub, const Tensor& idx, const Tensor& out) {
  check_x(out, "out");
  check_idx(idx, out);
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  const int64_t N = out.size(1), K = idx.size(1);
  TORCH_CHECK(K <= N, "idx selects more rows than num_tokens");
  for (const OptT* t : {&x, &x_sub}) {
    if (!defined(*t)) continue;
    check_x(**t, "x/x_sub");
    TORCH_CHECK((*t)->scalar_type() == out.scalar_type() && (*t)->device() == out.device(), "dtype/device mismatch");
  }
  if (defined(x)) TORCH_CHECK(x->sizes() == out.sizes(), "x must have shape ", out.sizes());
  if (defined(x_sub)) TORCH_CHECK(x_sub->size(0) == out.size(0) && x_sub->size(1) == K && x_sub->size(2) == out.size(2),
                                  "x_sub must be (B, K, D)");
  run(kCopy, defined(x) ? &*x : nullptr, out, idx, N, N);
  run(kScatter, defined(x_sub) ? &*x_sub : nullptr, out, idx, K, N);
}

Tensor scatter(const OptT& x, const OptT& x_sub, const Tensor& idx, int64_t num_tokens) {
  TORCH_CHECK(defined(x) || defined(x_sub), "x and x_sub cannot both be None");
  const Tensor& like = defined(x) ? *x : *x_sub;
  check_x(like, "x");
  Tensor out = at::empty({like.size(0), num_tokens, like.size(2)}, like.options());
  scatter_out(x, x_sub, idx, out);
  return out;
}

}  // namespace
}  // namespace ek

#define EK_ROUTING_IMPLS(m)                      \
  m.impl("gather", &ek::gather);                 \
  m.impl("gather_out", &ek::gather_out);         \
  m.impl("scatter", &ek::scatter);               \
  m.impl("scatter_out", &ek::scatter_out);

EK_TORCH_LIBRARY_IMPL(CPU, m) { EK_ROUTING_IMPLS(m) }
#ifdef EK_NVCC
EK_TORCH_LIBRARY_IMPL(CUDA, m) { EK_ROUTING_IMPLS(m) }
#endif
