// Tensor-level entry points of the RMSNorm family and their registration for CPU and CUDA
// (included at the end of rmsnorm.cu). Schemas live in bindings.cpp.
#pragma once

#include <torch/library.h>

namespace ek {
namespace {

Tensor rms_like_rows(const Tensor& m) { return at::empty(m.sizes(), m.options().memory_format(at::MemoryFormat::Contiguous)); }
Tensor rms_stats_like(const Tensor& x) { return at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat)); }

// The public ops validate everything with clear Python errors first; these checks guard direct
// calls of torch.ops.effkernels_C.* against memory-unsafe input.
void rms_check(const Tensor& x, std::initializer_list<const Tensor*> mods, const OptT& w) {
  TORCH_CHECK(x.dim() == 3, "x must be (B, N, D)");
  // Empty tensors have no memory to stride over (autograd hands in expanded ones, stride 0).
  if (x.numel() > 0) check_last_unit(x, "x");
  for (const Tensor* m : mods) {
    TORCH_CHECK(m->dim() == 2 || m->dim() == 3, "modulation tensors must be (B, D) or (B, N, D)");
    TORCH_CHECK(m->size(0) == x.size(0) && m->size(-1) == x.size(2) && (m->dim() == 2 || m->size(1) == x.size(1)),
                "modulation shape ", m->sizes(), " does not match x ", x.sizes());
    TORCH_CHECK(m->scalar_type() == x.scalar_type() && m->device() == x.device(), "dtype/device mismatch");
    if (m->numel() > 0) check_last_unit(*m, "modulation");
  }
  if (defined(w))
    TORCH_CHECK(w->dim() == 1 && w->size(0) == x.size(2) && w->is_contiguous() && w->scalar_type() == x.scalar_type() &&
                w->device() == x.device(), "weight must be a contiguous (D,) tensor of x's dtype and device");
}

void rms_check_rstd(const Tensor& rstd, const Tensor& x) {
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.dim() == 2 &&
              rstd.size(0) == x.size(0) && rstd.size(1) == x.size(1), "rstd must be a contiguous float32 (B, N) tensor");
  TORCH_CHECK(rstd.device() == x.device(), "rstd must be on x's device");
}

// 16-byte vectors when D divides and every row of every operand starts aligned (CUDA only).
int rms_pick_vec(const Tensor& x, std::initializer_list<Tensor> ts) {
#ifdef EK_CUDA
  const int V = static_cast<int>(16 / x.element_size());
  if (x.size(2) % V != 0) return 1;
  for (const Tensor& t : ts)
    if (!vec_ok(t, V)) return 1;
  return V;
#else
  (void)x;
  (void)ts;
  return 1;
#endif
}

template <typename T> void rms_fill(RmsArgs<T>& a, const Tensor& x, const Tensor& shift, const Tensor& scale,
                                    const OptT& w, double eps) {
  a.x = rcr<T>(x);
  a.shift = rcr<T>(shift);
  a.scale = rcr<T>(scale);
  a.w = defined(w) ? static_cast<const T*>(w->const_data_ptr()) : nullptr;
  a.B = x.size(0);
  a.N = x.size(1);
  a.D = x.size(2);
  a.eps = static_cast<acc>(eps);
  a.shift_tok = shift.dim() == 3;
  a.scale_tok = scale.dim() == 3;
}

Tensor rms_or_undef(const OptT& t) { return defined(t) ? *t : Tensor(); }

// ---- forward ------------------------------------------------------------------------------------

void rms_fwd_impl(const Tensor& x, const Tensor* y, const Tensor* gate, const Tensor& shift, const Tensor& scale,
                  const OptT& w, double eps, const Tensor* h, const Tensor& out, const Tensor& rstd) {
  if (x.numel() == 0) return;
  const int V = rms_pick_vec(x, {x, shift, scale, rms_or_undef(w), out, y ? *y : Tensor(), gate ? *gate : Tensor(),
                                 h ? *h : Tensor()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_modulate_fwd", [&] {
    RmsArgs<scalar_t> a;
    rms_fill(a, x, shift, scale, w, eps);
    a.out = rwr<scalar_t>(out);
    a.rstd = rstd.data_ptr<float>();
    if (y) { a.y = rcr<scalar_t>(*y); a.gate = rcr<scalar_t>(*gate); a.h = rwr<scalar_t>(*h); }
#ifdef EK_CUDA
    if (EK_ON_DEVICE(x)) {
      EK_DEVICE_GUARD(x);
      if (y) rms_fwd_cuda<scalar_t, true>(a, V); else rms_fwd_cuda<scalar_t, false>(a, V);
      return;
    }
#endif
    (void)V;
    if (y) rms_fwd_cpu<scalar_t, true>(a); else rms_fwd_cpu<scalar_t, false>(a);
  });
}

Tensor rms_modulate_fwd_out(const Tensor& x, const Tensor& shift, const Tensor& scale, const OptT& w, double eps,
                            const Tensor& out) {
  rms_check(x, {&shift, &scale}, w);
  check_out(out, x.sizes(), x.scalar_type(), x.device(), "out");
  Tensor rstd = rms_stats_like(x);
  rms_fwd_impl(x, nullptr, nullptr, shift, scale, w, eps, nullptr, out, rstd);
  return rstd;
}

std::tuple<Tensor, Tensor> rms_modulate_fwd(const Tensor& x, const Tensor& shift, const Tensor& scale, const OptT& w,
                                            double eps) {
  Tensor out = at::empty(x.sizes(), x.options());
  Tensor rstd = rms_modulate_fwd_out(x, shift, scale, w, eps, out);
  return {out, rstd};
}

std::tuple<Tensor, Tensor, Tensor> rms_fused_fwd(const Tensor& x, const Tensor& y, const Tensor& gate,
                                                 const Tensor& shift, const Tensor& scale, const OptT& w, double eps) {
  rms_check(x, {&y, &gate, &shift, &scale}, w);
  TORCH_CHECK(y.sizes() == x.sizes(), "y must have x's shape");
  Tensor h = at::empty(x.sizes(), x.options()), out = at::empty(x.sizes(), x.options());
  Tensor rstd = rms_stats_like(x);
  rms_fwd_impl(x, &y, &gate, shift, scale, w, eps, &h, out, rstd);
  return {h, out, rstd};
}

// ---- backward: FUSED adds dh, and produces dy and dgate -------------------------------------------

std::vector<Tensor> rms_bwd_impl(const Tensor* dh, const Tensor& dout, const Tensor& x, const Tensor* y,
                                 const Tensor* gate, const Tensor& shift, const Tensor& scale, const OptT& w,
                                 const Tensor& rstd) {
  rms_check(x, {&dout, &shift, &scale}, w);
  TORCH_CHECK(dout.dim() == 3, "dout must have x's shape");
  if (dh) {
    rms_check(x, {dh, y, gate}, w);
    TORCH_CHECK(dh->dim() == 3 && y->dim() == 3, "dh and y must have x's shape");
  }
  rms_check_rstd(rstd, x);
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dy = dh ? at::empty(x.sizes(), x.options()) : Tensor();
  Tensor dgate = dh ? rms_like_rows(*gate) : Tensor();
  Tensor dshift = rms_like_rows(shift), dscale = rms_like_rows(scale);
  Tensor dw = defined(w) ? at::empty_like(*w) : at::empty({0}, x.options());
  const bool gate_tok = gate && gate->dim() == 3;
  const bool need_cols = shift.dim() == 2 || scale.dim() == 2 || defined(w) || (dh && !gate_tok);
#ifdef EK_CUDA
  const bool cuda = EK_ON_DEVICE(x);
#else
  const bool cuda = false;
#endif
  const int64_t chunk = kCpuRowChunk;
  const int64_t P = num_chunks(x.size(1), chunk);
  Tensor part = need_cols ? at::zeros({x.size(0), P, kRmsSlots, x.size(2)}, x.options().dtype(at::kFloat)) : Tensor();
  if (x.numel() == 0) {
    for (Tensor* t : {&dshift, &dscale, &dgate, &dw})
      if (t->defined()) t->zero_();
    return {dx, dy, dgate, dshift, dscale, dw};
  }
  const int V = rms_pick_vec(x, {dout, x, shift, scale, rms_or_undef(w), dx, dshift, dscale, dh ? *dh : Tensor(),
                                 y ? *y : Tensor(), gate ? *gate : Tensor(), dy, dgate});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_modulate_bwd", [&] {
    RmsArgs<scalar_t> a;
    rms_fill(a, x, shift, scale, w, 1.0);
    a.dout = rcr<scalar_t>(dout);
    a.rstd = const_cast<float*>(rstd.const_data_ptr<float>());
    a.dx = rwr<scalar_t>(dx);
    a.dshift = rwr<scalar_t>(dshift);
    a.dscale = rwr<scalar_t>(dscale);
    a.dw = defined(w) ? dw.data_ptr<scalar_t>() : nullptr;
    a.part = need_cols ? part.data_ptr<float>() : nullptr;
    a.P = P;
    a.chunk = chunk;
    if (dh) {
      a.dh = rcr<scalar_t>(*dh); a.y = rcr<scalar_t>(*y); a.gate = rcr<scalar_t>(*gate);
      a.dy = rwr<scalar_t>(dy); a.dgate = rwr<scalar_t>(dgate); a.gate_tok = gate_tok;
    }
#ifdef EK_CUDA
    if (cuda) {
      EK_DEVICE_GUARD(x);
      // sum(g * xhat) per row, for the column kernel's recompute of d(h) under a per-sample gate.
      Tensor rowsum = (dh && !gate_tok) ? at::empty({x.size(0) * x.size(1)}, part.options()) : Tensor();
      float* rs = rowsum.defined() ? rowsum.data_ptr<float>() : nullptr;
      if (dh) rms_bwd_cuda<scalar_t, true>(a, V, rs, need_cols); else rms_bwd_cuda<scalar_t, false>(a, V, rs, need_cols);
      return;
    }
#endif
    (void)V;
    (void)cuda;
    if (dh) rms_bwd_cpu<scalar_t, true>(a); else rms_bwd_cpu<scalar_t, false>(a);
    if (need_cols) rms_finalize_cpu<scalar_t>(a, dh != nullptr);
  });
  return {dx, dy, dgate, dshift, dscale, dw};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rms_modulate_bwd(const Tensor& dout, const Tensor& x, const Tensor& shift,
                                                            const Tensor& scale, const OptT& w, const Tensor& rstd) {
  auto r = rms_bwd_impl(nullptr, dout, x, nullptr, nullptr, shift, scale, w, rstd);
  return {r[0], r[3], r[4], r[5]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rms_fused_bwd(
    const Tensor& dh, const Tensor& dout, const Tensor& h, const Tensor& y, const Tensor& gate, const Tensor& shift,
    const Tensor& scale, const OptT& w, const Tensor& rstd) {
  auto r = rms_bwd_impl(&dh, dout, h, &y, &gate, shift, scale, w, rstd);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace
}  // namespace ek

#define EK_RMSNORM_IMPLS(m)                                       \
  m.impl("rms_modulate_fwd", &ek::rms_modulate_fwd);              \
  m.impl("rms_modulate_fwd_out", &ek::rms_modulate_fwd_out);      \
  m.impl("rms_modulate_bwd", &ek::rms_modulate_bwd);              \
  m.impl("rms_fused_fwd", &ek::rms_fused_fwd);                    \
  m.impl("rms_fused_bwd", &ek::rms_fused_bwd);

EK_TORCH_LIBRARY_IMPL(CPU, m) { EK_RMSNORM_IMPLS(m) }
#ifdef EK_NVCC
EK_TORCH_LIBRARY_IMPL(CUDA, m) { EK_RMSNORM_IMPLS(m) }
#endif
