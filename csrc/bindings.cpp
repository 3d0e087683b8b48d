// effkernels._C: the operator schemas (torch.ops.effkernels_C.*) and a minimal Python module.
//
// Kernels register per device in routing.cu, adaln.cu, align.cu, swiglu.cu and rope.cu
// (TORCH_LIBRARY_IMPL); fake (meta) kernels and autograd are registered from Python in
// effkernels/_ext/__init__.py. The module
// itself needs no pybind11: importing it loads this library, whose static initialisers register the
// ops, and it exposes WITH_CUDA and CUDA_ARCHS for effkernels.backends.
#include <Python.h>

#include <torch/library.h>

#include "launch.h"  // EK_LIB: effkernels_C, or effkernels_sim in the simulator build (effkernels._C_sim)

EK_TORCH_LIBRARY(m) {
#ifndef EFFK_SIM
  // Fake kernels live in that module; torch imports it when it needs them.
  m.set_python_module("effkernels._ext");
#endif
  // routing: x (B, N, D), idx (B, K) int32/int64
  m.def("gather(Tensor x, Tensor idx) -> Tensor");
  m.def("gather_out(Tensor x, Tensor idx, Tensor(a!) out) -> ()");
  m.def("scatter(Tensor? x, Tensor? x_sub, Tensor idx, int num_tokens) -> Tensor");
  m.def("scatter_out(Tensor? x, Tensor? x_sub, Tensor idx, Tensor(a!) out) -> ()");
  // adaln: shift/scale/gate (B, D) or (B, N, D) with any row strides; statistics float32 (B, N)
  m.def("ln_modulate_fwd(Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("ln_modulate_fwd_out(Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias, float eps,"
        " Tensor(a!) out) -> (Tensor, Tensor)");
  m.def("ln_modulate_bwd(Tensor dout, Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias,"
        " Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_fwd(Tensor x, Tensor y, Tensor gate) -> Tensor");
  m.def("gated_residual_fwd_out(Tensor x, Tensor y, Tensor gate, Tensor(a!) out) -> ()");
  m.def("gated_residual_bwd(Tensor dout, Tensor y, Tensor gate) -> (Tensor, Tensor)");
  m.def("fused_fwd(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, Tensor? weight,"
        " Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_bwd(Tensor dh, Tensor dout, Tensor h, Tensor y, Tensor gate, Tensor shift, Tensor scale,"
        " Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // align: z_hat, z (B, N, D), dtypes may differ; cos (B, N) float32
  m.def("cosine_fwd(Tensor z_hat, Tensor z, float eps) -> Tensor");
  m.def("cosine_fwd_out(Tensor z_hat, Tensor z, float eps, Tensor(a!) out) -> ()");
  m.def("cosine_bwd(Tensor dcos, Tensor z_hat, Tensor z, float eps) -> Tensor");
  // align, the projector's last Linear fused in (CPU only): h (B, N, K), weight (Z, K), z (B, N, Z);
  // cos (B, N) and norms (B, N, 2) = (|y|, |z|) float32; chunk: tokens per matmul
  m.def("proj_cosine_fwd(Tensor h, Tensor weight, Tensor? bias, Tensor z, float eps, int chunk) -> (Tensor, Tensor)");
  m.def("proj_cosine_fwd_out(Tensor h, Tensor weight, Tensor? bias, Tensor z, float eps, int chunk,"
        " Tensor(a!) cos, Tensor(b!) norms) -> ()");
  m.def("proj_cosine_bwd(Tensor dcos, Tensor h, Tensor weight, Tensor? bias, Tensor z, Tensor cos, Tensor norms,"
        " float eps, int chunk) -> (Tensor, Tensor, Tensor)");
  // rmsnorm: shift/scale/gate (B, D) or (B, N, D) with any row strides; rstd float32 (B, N)
  m.def("rms_modulate_fwd(Tensor x, Tensor shift, Tensor scale, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_modulate_fwd_out(Tensor x, Tensor shift, Tensor scale, Tensor? weight, float eps, Tensor(a!) out)"
        " -> Tensor");
  m.def("rms_modulate_bwd(Tensor dout, Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rms_fused_fwd(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, Tensor? weight, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("rms_fused_bwd(Tensor dh, Tensor dout, Tensor h, Tensor y, Tensor gate, Tensor shift, Tensor scale,"
        " Tensor? weight, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // swiglu: a, b (B, N, H) row views (the halves of one projection: row stride 2H); results contiguous
  m.def("swiglu_fwd(Tensor a, Tensor b) -> Tensor");
  m.def("swiglu_fwd_out(Tensor a, Tensor b, Tensor(a!) out) -> ()");
  m.def("swiglu_bwd(Tensor dout, Tensor a, Tensor b) -> (Tensor, Tensor)");
  // rope: q, k, q_out, k_out (B, H, N, Dh) views, pos (B, N, 2) int32/int64, inv_freq (Dh / 2,) float32;
  // sin_sign -1 is the backward (the inverse rotation)
  m.def("rope2d(Tensor q, Tensor k, Tensor pos, Tensor inv_freq, float sin_sign, Tensor(a!) q_out,"
        " Tensor(b!) k_out) -> ()");
}

// -DEFFK_CUDA_ARCHS=8.0_9.0 (a preprocessor number: '_' stands for ';' and 'p' for '+').
#define EK_STR2(...) #__VA_ARGS__
#define EK_STR(x) EK_STR2(x)

#ifndef EFFK_SIM  // the simulator's module is csrc/sim/module.cpp
static PyModuleDef ek_module = {PyModuleDef_HEAD_INIT, "_C",
                                "effkernels' compiled ops; see torch.ops.effkernels_C and effkernels._ext.", -1,
                                nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&ek_module);
  if (!mod) return nullptr;
#if defined(WITH_CUDA)
  const bool with_cuda = true;
#ifdef EFFK_CUDA_ARCHS
  char archs[] = EK_STR(EFFK_CUDA_ARCHS);
  for (char* c = archs; *c; ++c) *c = *c == '_' ? ';' : (*c == 'p' ? '+' : *c);
#else
  char archs[] = "";
#endif
#else
  const bool with_cuda = false;
  char archs[] = "";
#endif
  if (PyModule_AddObject(mod, "WITH_CUDA", PyBool_FromLong(with_cuda)) < 0 ||
      PyModule_AddStringConstant(mod, "CUDA_ARCHS", archs) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
#endif
