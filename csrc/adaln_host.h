// Tensor-level entry points of the adaLN family and their registration for CPU and CUDA
// (included at the end of adaln.cu). Schemas live in bindings.cpp. fwd_impl and bwd_impl serve the
// RMSNorm ops too (rmsnorm_host.h): `rms` picks the kernels' RMS variant, which has no mean and no bias.
#pragma once

#include <torch/library.h>

namespace ek {
namespace {

Tensor empty_like_rows(const Tensor& m) { return at::empty(m.sizes(), m.options().memory_format(at::MemoryFormat::Contiguous)); }
Tensor stats_like(const Tensor& x) { return at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat)); }

void check_common(const Tensor& x, std::initializer_list<const Tensor*> mods, const OptT& w, const OptT& b) {
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
  for (const OptT* p : {&w, &b})
    if (defined(*p)) TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == x.size(2) && (*p)->is_contiguous() &&
                                 (*p)->scalar_type() == x.scalar_type() && (*p)->device() == x.device(),
                                 "weight/bias must be contiguous (D,) tensors of x's dtype and device");
}

// 16-byte vectors when D divides and every row of every operand starts aligned.
int pick_vec(const Tensor& x, std::initializer_list<Tensor> ts) {
  const int V = static_cast<int>(16 / x.element_size());
#ifdef EK_CUDA
  if (x.size(2) % V != 0) return 1;
  for (const Tensor& t : ts)
    if (!vec_ok(t, V)) return 1;
  return V;
#else
  (void)ts;
  return V;
#endif
}

template <typename T> void fill_ln(LnArgs<T>& a, const Tensor& x, const Tensor& shift, const Tensor& scale,
                                   const OptT& w, const OptT& b, double eps) {
  a.x = cr<T>(x);
  a.shift = cr<T>(shift);
  a.scale = cr<T>(scale);
  a.w = cp<T>(w);
  a.b = cp<T>(b);
  a.B = x.size(0);
  a.N = x.size(1);
  a.D = x.size(2);
  a.eps = static_cast<acc>(eps);
  a.shift_tok = shift.dim() == 3;
  a.scale_tok = scale.dim() == 3;
}

Tensor opt_or_undef(const OptT& t) { return defined(t) ? *t : Tensor(); }

// f(std::bool_constant<FUSED>, std::bool_constant<RMS>) for the runtime pair: the kernels' flags.
template <typename F> void with_flags(bool fused, bool rms, F&& f) {
  if (fused) {
    if (rms) f(std::true_type{}, std::true_type{}); else f(std::true_type{}, std::false_type{});
  } else {
    if (rms) f(std::false_type{}, std::true_type{}); else f(std::false_type{}, std::false_type{});
  }
}

// ---- LayerNorm (RMSNorm) + modulate, and the fused variant -------------------------------------

// mean: undefined when rms.
void fwd_impl(const Tensor& x, const Tensor* y, const Tensor* gate, const Tensor& shift, const Tensor& scale,
              const OptT& w, const OptT& b, double eps, const Tensor* h, const Tensor& out, const Tensor& mean,
              const Tensor& rstd, bool rms) {
  if (x.numel() == 0) return;
  const int V = pick_vec(x, {x, shift, scale, opt_or_undef(w), opt_or_undef(b), out,
                             y ? *y : Tensor(), gate ? *gate : Tensor(), h ? *h : Tensor()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ln_modulate_fwd", [&] {
    LnArgs<scalar_t> a;
    fill_ln(a, x, shift, scale, w, b, eps);
    a.out = wr<scalar_t>(out);
    a.mean = rms ? nullptr : mean.data_ptr<float>();
    a.rstd = rstd.data_ptr<float>();
    if (y) { a.y = cr<scalar_t>(*y); a.gate = cr<scalar_t>(*gate); a.h = wr<scalar_t>(*h); }
    with_flags(y != nullptr, rms, [&](auto fused, auto rms_) {
      constexpr bool F = decltype(fused)::value, R = decltype(rms_)::value;
#ifdef EK_CUDA
      if (EK_ON_DEVICE(x)) {
        EK_DEVICE_GUARD(x);
        fwd_cuda<scalar_t, F, R>(a, V);
        return;
      }
#endif
      (void)V;
      fwd_cpu<scalar_t, F, R>(a);
    });
  });
}

std::tuple<Tensor, Tensor> ln_modulate_fwd_out(const Tensor& x, const Tensor& shift, const Tensor& scale,
                                               const OptT& w, const OptT& b, double eps, const Tensor& out) {
  check_common(x, {&shift, &scale}, w, b);
  check_out(out, x.sizes(), x.scalar_type(), x.device(), "out");
  Tensor mean = stats_like(x), rstd = stats_like(x);
  fwd_impl(x, nullptr, nullptr, shift, scale, w, b, eps, nullptr, out, mean, rstd, false);
  return {mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate_fwd(const Tensor& x, const Tensor& shift, const Tensor& scale,
                                                   const OptT& w, const OptT& b, double eps) {
  Tensor out = at::empty(x.sizes(), x.options());
  auto [mean, rstd] = ln_modulate_fwd_out(x, shift, scale, w, b, eps, out);
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_fwd(const Tensor& x, const Tensor& y, const Tensor& gate,
                                                     const Tensor& shift, const Tensor& scale, const OptT& w,
                                                     const OptT& b, double eps) {
  check_common(x, {&y, &gate, &shift, &scale}, w, b);
  TORCH_CHECK(y.sizes() == x.sizes(), "y must have x's shape");
  Tensor h = at::empty(x.sizes(), x.options()), out = at::empty(x.sizes(), x.options());
  Tensor mean = stats_like(x), rstd = stats_like(x);
  fwd_impl(x, &y, &gate, shift, scale, w, b, eps, &h, out, mean, rstd, false);
  return {h, out, mean, rstd};
}

// Backward of both: FUSED adds dh, and produces dy and dgate. mean: undefined when rms.
std::vector<Tensor> bwd_impl(const Tensor* dh, const Tensor& dout, const Tensor& x, const Tensor* y, const Tensor* gate,
                             const Tensor& shift, const Tensor& scale, const OptT& w, const OptT& b,
                             const Tensor& mean, const Tensor& rstd, bool rms) {
  std::vector<const Tensor*> mods = {&dout, &shift, &scale};
  if (dh) mods.insert(mods.end(), {dh, y, gate});
  for (const Tensor* m : mods) check_common(x, {m}, w, b);
  TORCH_CHECK(dout.dim() == 3 && (!dh || (dh->dim() == 3 && y->dim() == 3)), "dout, dh and y must have x's shape");
  for (const Tensor* s : {&mean, &rstd}) {
    if (rms && s == &mean) continue;
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == x.size(0) * x.size(1) &&
                s->device() == x.device(), rms ? "rstd" : "mean and rstd", " must be contiguous float32 (B, N) on x's device");
  }
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dy = dh ? at::empty(x.sizes(), x.options()) : Tensor();
  Tensor dgate = dh ? empty_like_rows(*gate) : Tensor();
  Tensor dshift = empty_like_rows(shift), dscale = empty_like_rows(scale);
  Tensor dw = defined(w) ? at::empty_like(*w) : at::empty({0}, x.options());
  Tensor db = defined(b) ? at::empty_like(*b) : at::empty({0}, x.options());
  const bool gate_tok = gate && gate->dim() == 3;
  const bool need_cols = shift.dim() == 2 || scale.dim() == 2 || defined(w) || defined(b) || (dh && !gate_tok);
  const bool cuda = EK_ON_DEVICE(x);
  const int64_t chunk = cuda ? 32 : kCpuRowChunk;
  const int64_t P = num_chunks(x.size(1), chunk);
  Tensor part = need_cols ? at::zeros({x.size(0), P, kSlots, x.size(2)}, x.options().dtype(at::kFloat)) : Tensor();
  if (x.numel() == 0) {
    for (Tensor* t : {&dshift, &dscale, &dgate, &dw, &db})
      if (t->defined()) t->zero_();
    return {dx, dy, dgate, dshift, dscale, dw, db};
  }
  const int V = pick_vec(x, {dout, x, shift, scale, opt_or_undef(w), opt_or_undef(b), dx, dshift, dscale,
                             dh ? *dh : Tensor(), y ? *y : Tensor(), gate ? *gate : Tensor(), dy, dgate});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ln_modulate_bwd", [&] {
    LnArgs<scalar_t> a;
    fill_ln(a, x, shift, scale, w, b, 1.0);
    a.dout = cr<scalar_t>(dout);
    a.mean = rms ? nullptr : const_cast<float*>(mean.const_data_ptr<float>());
    a.rstd = const_cast<float*>(rstd.const_data_ptr<float>());
    a.dx = wr<scalar_t>(dx);
    a.dshift = wr<scalar_t>(dshift);
    a.dscale = wr<scalar_t>(dscale);
    a.dw = defined(w) ? dw.data_ptr<scalar_t>() : nullptr;
    a.db = defined(b) ? db.data_ptr<scalar_t>() : nullptr;
    a.part = need_cols ? part.data_ptr<float>() : nullptr;
    a.P = P;
    a.chunk = chunk;
    if (dh) {
      a.dh = cr<scalar_t>(*dh); a.y = cr<scalar_t>(*y); a.gate = cr<scalar_t>(*gate);
      a.dy = wr<scalar_t>(dy); a.dgate = wr<scalar_t>(dgate); a.gate_tok = gate_tok;
    }
    with_flags(dh != nullptr, rms, [&](auto fused, auto rms_) {
      constexpr bool F = decltype(fused)::value, R = decltype(rms_)::value;
#ifdef EK_CUDA
      if (cuda) {
        EK_DEVICE_GUARD(x);
        // The row sums (sum g, sum g xhat) for the column kernel's recompute of d(h) under a per-sample gate.
        Tensor rowsum = (dh && !gate_tok) ? at::empty({x.size(0) * x.size(1), 2}, part.options()) : Tensor();
        float* rs = rowsum.defined() ? rowsum.data_ptr<float>() : nullptr;
        bwd_cuda<scalar_t, F, R>(a, V, rs, need_cols);
        return;
      }
#endif
      (void)V;
      bwd_cpu<scalar_t, F, R>(a);
      if (need_cols) finalize_cpu<scalar_t>(a, F);
    });
  });
  return {dx, dy, dgate, dshift, dscale, dw, db};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_modulate_bwd(const Tensor& dout, const Tensor& x, const Tensor& shift,
                                                                   const Tensor& scale, const OptT& w, const OptT& b,
                                                                   const Tensor& mean, const Tensor& rstd) {
  auto r = bwd_impl(nullptr, dout, x, nullptr, nullptr, shift, scale, w, b, mean, rstd, false);
  return {r[0], r[3], r[4], r[5], r[6]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_bwd(
    const Tensor& dh, const Tensor& dout, const Tensor& h, const Tensor& y, const Tensor& gate, const Tensor& shift,
    const Tensor& scale, const OptT& w, const OptT& b, const Tensor& mean, const Tensor& rstd) {
  auto r = bwd_impl(&dh, dout, h, &y, &gate, shift, scale, w, b, mean, rstd, false);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

// ---- gated residual ---------------------------------------------------------------------------

void gated_residual_fwd_out(const Tensor& x, const Tensor& y, const Tensor& gate, const Tensor& out) {
  check_common(x, {&y, &gate}, std::nullopt, std::nullopt);
  TORCH_CHECK(y.sizes() == x.sizes(), "y must have x's shape");
  check_out(out, x.sizes(), x.scalar_type(), x.device(), "out");
  if (x.numel() == 0) return;
  const int V = pick_vec(x, {x, y, gate, out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_residual_fwd", [&] {
    LnArgs<scalar_t> a;
    a.x = cr<scalar_t>(x); a.y = cr<scalar_t>(y); a.gate = cr<scalar_t>(gate); a.out = wr<scalar_t>(out);
    a.B = x.size(0); a.N = x.size(1); a.D = x.size(2);
#ifdef EK_CUDA
    if (EK_ON_DEVICE(x)) { EK_DEVICE_GUARD(x); gr_fwd_cuda<scalar_t>(a, V); return; }
#endif
    (void)V;
    gr_fwd_cpu<scalar_t>(a);
  });
}

Tensor gated_residual_fwd(const Tensor& x, const Tensor& y, const Tensor& gate) {
  Tensor out = at::empty(x.sizes(), x.options());
  gated_residual_fwd_out(x, y, gate, out);
  return out;
}

std::tuple<Tensor, Tensor> gated_residual_bwd(const Tensor& dout, const Tensor& y, const Tensor& gate) {
  check_common(y, {&dout, &gate}, std::nullopt, std::nullopt);
  TORCH_CHECK(dout.sizes() == y.sizes(), "dout must have y's shape");
  Tensor dy = at::empty(y.sizes(), y.options()), dgate = empty_like_rows(gate);
  const bool gate_tok = gate.dim() == 3;
  const bool cuda = EK_ON_DEVICE(y);
  const int64_t chunk = cuda ? 32 : kCpuRowChunk;
  const int64_t P = num_chunks(y.size(1), chunk);
  Tensor part = gate_tok ? Tensor() : at::zeros({y.size(0), P, kSlots, y.size(2)}, y.options().dtype(at::kFloat));
  if (y.numel() == 0) { dgate.zero_(); return {dy, dgate}; }
  const int V = pick_vec(y, {dout, y, gate, dy, dgate});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gated_residual_bwd", [&] {
    LnArgs<scalar_t> a;
    a.dout = cr<scalar_t>(dout); a.y = cr<scalar_t>(y); a.gate = cr<scalar_t>(gate);
    a.dy = wr<scalar_t>(dy); a.dgate = wr<scalar_t>(dgate);
    a.B = y.size(0); a.N = y.size(1); a.D = y.size(2); a.P = P; a.chunk = chunk; a.gate_tok = gate_tok;
    a.part = gate_tok ? nullptr : part.data_ptr<float>();
#ifdef EK_CUDA
    if (cuda) { EK_DEVICE_GUARD(y); gr_bwd_cuda<scalar_t>(a, V); return; }
#endif
    (void)V;
    gr_bwd_cpu<scalar_t>(a);
    if (!gate_tok) finalize_cpu<scalar_t>(a, true);
  });
  return {dy, dgate};
}

}  // namespace
}  // namespace ek

#define EK_ADALN_IMPLS(m)                                          \
  m.impl("ln_modulate_fwd", &ek::ln_modulate_fwd);                 \
  m.impl("ln_modulate_fwd_out", &ek::ln_modulate_fwd_out);         \
  m.impl("ln_modulate_bwd", &ek::ln_modulate_bwd);                 \
  m.impl("gated_residual_fwd", &ek::gated_residual_fwd);           \
  m.impl("gated_residual_fwd_out", &ek::gated_residual_fwd_out);   \
  m.impl("gated_residual_bwd", &ek::gated_residual_bwd);           \
  m.impl("fused_fwd", &ek::fused_fwd);                             \
  m.impl("fused_bwd", &ek::fused_bwd);

EK_TORCH_LIBRARY_IMPL(CPU, m) { EK_ADALN_IMPLS(m) }
#ifdef EK_NVCC
EK_TORCH_LIBRARY_IMPL(CUDA, m) { EK_ADALN_IMPLS(m) }
#endif
