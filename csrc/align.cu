// Alignment family: the per-token cosine similarity of REPA/ERW/SRA, forward and backward, fused
// (norms, dot product and normalisation in one pass over each row), as C++ CPU loops and (under nvcc
// with WITH_CUDA) CUDA kernels sharing cos_row()/cos_bwd() from adaln_math.h.
//
// z_hat and z may differ in dtype (a bf16 projection against an fp32 target is normal): kernels are
// instantiated for (T, T) and (T, float); any other pair reads z converted to float32.
//
// The norm clamp is max(eps, smallest normal of z_hat's dtype), as in effkernels/reference/align.py:
// |d z_hat| <= |dcos| / clamp, and 1 / tiny is a quarter of the dtype's max in every IEEE format, so
// a zero (or sub-normal) fp16 row gets a finite gradient where eps = 1e-8 would overflow to inf.
#include "adaln_math.h"
#include "align_proj.h"  // the fused projection + cosine (CPU only; Triton is its GPU path)

#include <limits>

#include <torch/library.h>

namespace ek {
namespace {

using at::Tensor;

template <typename TA, typename TB> struct CosArgs {
  Rows<const TA> a;
  Rows<const TB> b;
  const float* dcos;  // backward: (B, N) with strides (may be an expanded, stride-0 view)
  int64_t dsb, dsn;
  float* cos;         // forward output (B*N)
  Rows<TA> da;        // backward output
  int64_t B, N, D;
  acc eps;
};

template <typename TA, typename TB> void cos_cpu(const CosArgs<TA, TB>& p, bool bwd) {
  at::parallel_for(0, p.B * p.N, row_grain(p.D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / p.N, n = r % p.N;
      const TA* a = p.a.row(bi, n);
      const TB* b = p.b.row(bi, n);
      auto A = [&](int64_t d) { return to_acc<acc>(a[d]); };
      auto Bv = [&](int64_t d) { return to_acc<acc>(b[d]); };
      const CosRow<acc> c = cos_row<acc>(lane_sum<acc>(p.D, [&](int64_t d) { return A(d) * Bv(d); }),
                                         lane_sum<acc>(p.D, [&](int64_t d) { return A(d) * A(d); }),
                                         lane_sum<acc>(p.D, [&](int64_t d) { return Bv(d) * Bv(d); }), p.eps);
      if (!bwd) { p.cos[r] = c.cos; continue; }
      const acc g = p.dcos[bi * p.dsb + n * p.dsn];
      TA* o = p.da.row(bi, n);
      for (int64_t d = 0; d < p.D; ++d) o[d] = from_acc<TA>(cos_bwd<acc>(g, A(d), Bv(d), c));
    }
  });
}

#ifdef EK_CUDA
constexpr int kRowsPerBlock = 4;

// One warp per row: one pass for the three sums (warp-reduced), a second pass for d(z_hat).
template <typename TA, typename TB, int V, bool BWD> __global__ void cos_kernel(CosArgs<TA, TB> p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= p.B * p.N) return;
  const int64_t bi = r / p.N, n = r % p.N;
  const TA* a = p.a.row(bi, n);
  const TB* b = p.b.row(bi, n);
  acc dot = 0, saa = 0, sbb = 0;
  for (int64_t d = threadIdx.x * V; d < p.D; d += kWarp * V) {
    const Vec<TA, V> va = vload<TA, V>(a + d);
    const Vec<TB, V> vb = vload<TB, V>(b + d);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc x = to_acc<acc>(va.v[j]), y = to_acc<acc>(vb.v[j]);
      dot += x * y; saa += x * x; sbb += y * y;
    }
  }
  const CosRow<acc> c = cos_row<acc>(warp_sum(dot), warp_sum(saa), warp_sum(sbb), p.eps);
  if constexpr (!BWD) {
    if (threadIdx.x == 0) gstore(p.cos + r, c.cos);
  } else {
    const acc g = gload(p.dcos + bi * p.dsb + n * p.dsn);
    TA* o = p.da.row(bi, n);
    for (int64_t d = threadIdx.x * V; d < p.D; d += kWarp * V) {
      const Vec<TA, V> va = vload<TA, V>(a + d);
      const Vec<TB, V> vb = vload<TB, V>(b + d);
      Vec<TA, V> vo;
#pragma unroll
      for (int j = 0; j < V; ++j) vo.v[j] = from_acc<TA>(cos_bwd<acc>(g, to_acc<acc>(va.v[j]), to_acc<acc>(vb.v[j]), c));
      vstore<TA, V>(o + d, vo);
    }
  }
}

template <typename TA, typename TB, bool BWD> void cos_cuda(const CosArgs<TA, TB>& p, bool vec) {
  // Both operands advance V elements per step; V makes the wider of the two a 16-byte load.
  constexpr int V = 16 / (sizeof(TA) > sizeof(TB) ? sizeof(TA) : sizeof(TB));
  dim3 grid(blocks_for(p.B * p.N, kRowsPerBlock)), block(kWarp, kRowsPerBlock);
  if (vec) EK_LAUNCH(grid, block, EK_STREAM(), cos_kernel<TA, TB, V, BWD>)(p);
  else EK_LAUNCH(grid, block, EK_STREAM(), cos_kernel<TA, TB, 1, BWD>)(p);
  EK_LAUNCH_CHECK();
}
#endif

void check_pair(const Tensor& zh, const Tensor& z) {
  TORCH_CHECK(zh.dim() == 3 && z.sizes() == zh.sizes(), "z_hat and z must be (B, N, D) of one shape");
  TORCH_CHECK(z.device() == zh.device(), "z must be on z_hat's device");
  check_last_unit(zh, "z_hat");
  check_last_unit(z, "z");
}

// Runs the forward (cos given) or backward (dcos and da given) for any dtype pair.
void cos_run(const Tensor& zh, const Tensor& z_in, double eps, const Tensor* dcos, const Tensor& out) {
  if (zh.numel() == 0) return;
  const bool same = z_in.scalar_type() == zh.scalar_type();
  const Tensor z = (same || z_in.scalar_type() == at::kFloat) ? z_in : z_in.to(at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zh.scalar_type(), "cosine", [&] {
    using TA = scalar_t;
    auto go = [&](auto tb_tag) {
      using TB = decltype(tb_tag);
      const acc clamp = std::max(static_cast<acc>(eps), static_cast<acc>(std::numeric_limits<TA>::min()));
      CosArgs<TA, TB> p{crows_of<TA>(zh), crows_of<TB>(z), nullptr, 0, 0, nullptr, Rows<TA>{nullptr, 0, 0},
                        zh.size(0), zh.size(1), zh.size(2), clamp};
      if (dcos) {
        p.dcos = dcos->const_data_ptr<float>();
        p.dsb = dcos->stride(0);
        p.dsn = dcos->stride(1);
        p.da = rows_of<TA>(out);
      } else {
        p.cos = out.data_ptr<float>();
      }
#ifdef EK_CUDA
      if (EK_ON_DEVICE(zh)) {
        EK_DEVICE_GUARD(zh);
        constexpr int V = 16 / (sizeof(TA) > sizeof(TB) ? sizeof(TA) : sizeof(TB));
        const bool vec = zh.size(2) % V == 0 && vec_ok(zh, V) && vec_ok(z, V) && (!dcos || vec_ok(out, V));
        if (dcos) cos_cuda<TA, TB, true>(p, vec); else cos_cuda<TA, TB, false>(p, vec);
        return;
      }
#endif
      cos_cpu<TA, TB>(p, dcos != nullptr);
    };
    if (z.scalar_type() == zh.scalar_type()) go(TA{}); else go(float{});
  });
}

void cosine_fwd_out(const Tensor& zh, const Tensor& z, double eps, const Tensor& out) {
  check_pair(zh, z);
  check_out(out, {zh.size(0), zh.size(1)}, at::kFloat, zh.device(), "out");
  cos_run(zh, z, eps, nullptr, out);
}

Tensor cosine_fwd(const Tensor& zh, const Tensor& z, double eps) {
  check_pair(zh, z);
  Tensor out = at::empty({zh.size(0), zh.size(1)}, zh.options().dtype(at::kFloat));
  cosine_fwd_out(zh, z, eps, out);
  return out;
}

Tensor cosine_bwd(const Tensor& dcos, const Tensor& zh, const Tensor& z, double eps) {
  check_pair(zh, z);
  TORCH_CHECK(dcos.scalar_type() == at::kFloat && dcos.dim() == 2 && dcos.size(0) == zh.size(0) &&
              dcos.size(1) == zh.size(1) && dcos.device() == zh.device(), "dcos must be float32 (B, N)");
  Tensor da = at::empty(zh.sizes(), zh.options());
  cos_run(zh, z, eps, &dcos, da);
  return da;
}

}  // namespace
}  // namespace ek

#define EK_ALIGN_IMPLS(m)                            \
  m.impl("cosine_fwd", &ek::cosine_fwd);             \
  m.impl("cosine_fwd_out", &ek::cosine_fwd_out);     \
  m.impl("cosine_bwd", &ek::cosine_bwd);

EK_TORCH_LIBRARY_IMPL(CPU, m) {
  EK_ALIGN_IMPLS(m)
  m.impl("proj_cosine_fwd", &ek::proj_cosine_fwd);
  m.impl("proj_cosine_fwd_out", &ek::proj_cosine_fwd_out);
  m.impl("proj_cosine_bwd", &ek::proj_cosine_bwd);
}
#ifdef EK_NVCC
EK_TORCH_LIBRARY_IMPL(CUDA, m) { EK_ALIGN_IMPLS(m) }
#endif
