"""Python side of the compiled extension effkernels._C: fake (meta) kernels for its ops.

`import effkernels._C` loads the library and registers the ops torch.ops.effkernels_C.* (schemas in
csrc/bindings.cpp, CPU and CUDA kernels in csrc/<family>.cu). This package adds a fake kernel for
every op, for torch.library.opcheck and for tracing the raw ops; the modules routing.py, adaln.py
and align.py expose the kernel primitive contract of effkernels/ops/<family>.py over them (the
`cuda` and `cpp` backends).

The raw ops have no autograd of their own: they are primitives that effkernels.ops' registered ops
(torch.library.custom_op, with register_autograd) call inside their implementations, below the
autograd layer. That autograd is the one place the backward of every op family is defined.

If the extension was not built, importing this package still works (AVAILABLE is False, WHY says
why); importing one of the family modules then raises ImportError.
"""
from __future__ import annotations

import torch

try:
    from .. import _C  # noqa: F401  (registers the ops)
    AVAILABLE, WHY = True, ""
except ImportError as e:  # optional extension: never break `import effkernels`
    AVAILABLE, WHY = False, f"{type(e).__name__}: {e}"

OPS = ("gather", "gather_out", "scatter", "scatter_out", "ln_modulate_fwd", "ln_modulate_fwd_out",
       "ln_modulate_bwd", "gated_residual_fwd", "gated_residual_fwd_out", "gated_residual_bwd",
       "fused_fwd", "fused_bwd", "cosine_fwd", "cosine_fwd_out", "cosine_bwd",
       "proj_cosine_fwd", "proj_cosine_fwd_out", "proj_cosine_bwd")
# The RMSNorm family's raw ops (tests/test_rmsnorm.py opchecks them).
RMSNORM_OPS = ("rms_modulate_fwd", "rms_modulate_fwd_out", "rms_modulate_bwd", "rms_fused_fwd", "rms_fused_bwd")


def require() -> None:
    if not AVAILABLE:
        raise ImportError(f"effkernels._C is not built or does not import ({WHY}); "
                          "reinstall with a C++ compiler, or use backend='reference' / 'triton'")


def _stats(x):
    return x.new_empty(x.shape[:2], dtype=torch.float32)


def _like(t):
    return t.new_empty(t.shape)  # contiguous, like the kernels' outputs


def _affine_grad(p, x):
    return x.new_empty(0) if p is None else torch.empty_like(p)


def _register() -> None:
    lib = "effkernels_C::"
    fake = {
        "gather": lambda x, idx: x.new_empty(x.shape[0], idx.shape[1], x.shape[2]),
        "gather_out": lambda x, idx, out: None,
        "scatter": lambda x, x_sub, idx, num_tokens: (x if x is not None else x_sub).new_empty(
            idx.shape[0], num_tokens, (x if x is not None else x_sub).shape[2]),
        "scatter_out": lambda x, x_sub, idx, out: None,
        "ln_modulate_fwd": lambda x, shift, scale, w, b, eps: (_like(x), _stats(x), _stats(x)),
        "ln_modulate_fwd_out": lambda x, shift, scale, w, b, eps, out: (_stats(x), _stats(x)),
        "ln_modulate_bwd": lambda dout, x, shift, scale, w, b, mean, rstd: (
            _like(x), _like(shift), _like(scale), _affine_grad(w, x), _affine_grad(b, x)),
        "gated_residual_fwd": lambda x, y, gate: _like(x),
        "gated_residual_fwd_out": lambda x, y, gate, out: None,
        "gated_residual_bwd": lambda dout, y, gate: (_like(y), _like(gate)),
        "fused_fwd": lambda x, y, gate, shift, scale, w, b, eps: (_like(x), _like(x), _stats(x), _stats(x)),
        "fused_bwd": lambda dh, dout, h, y, gate, shift, scale, w, b, mean, rstd: (
            _like(h), _like(y), _like(gate), _like(shift), _like(scale), _affine_grad(w, h), _affine_grad(b, h)),
        "cosine_fwd": lambda z_hat, z, eps: _stats(z_hat),
        "cosine_fwd_out": lambda z_hat, z, eps, out: None,
        "cosine_bwd": lambda dcos, z_hat, z, eps: _like(z_hat),
        "proj_cosine_fwd": lambda h, w, b, z, eps, chunk: (
            _stats(h), h.new_empty(*h.shape[:2], 2, dtype=torch.float32)),
        "proj_cosine_fwd_out": lambda h, w, b, z, eps, chunk, cos, norms: None,
        "proj_cosine_bwd": lambda dcos, h, w, b, z, cos, norms, eps, chunk: (
            _like(h), _like(w), _like(b) if b is not None else h.new_empty(0, dtype=torch.float32)),
        "rms_modulate_fwd": lambda x, shift, scale, w, eps: (_like(x), _stats(x)),
        "rms_modulate_fwd_out": lambda x, shift, scale, w, eps, out: _stats(x),
        "rms_modulate_bwd": lambda dout, x, shift, scale, w, rstd: (
            _like(x), _like(shift), _like(scale), _affine_grad(w, x)),
        "rms_fused_fwd": lambda x, y, gate, shift, scale, w, eps: (_like(x), _like(x), _stats(x)),
        "rms_fused_bwd": lambda dh, dout, h, y, gate, shift, scale, w, rstd: (
            _like(h), _like(y), _like(gate), _like(shift), _like(scale), _affine_grad(w, h)),
        # swiglu (_ext/swiglu.py) and rope (_ext/rope.py): their RAW_OPS, opchecked in their test files
        "swiglu_fwd": lambda a, b: _like(a),
        "swiglu_fwd_out": lambda a, b, out: None,
        "swiglu_bwd": lambda dout, a, b: (_like(a), _like(a)),
        "rope2d": lambda q, k, pos, inv_freq, sin_sign, q_out, k_out: None,
    }
    for name, fn in fake.items():
        # The schema's python module is effkernels._ext: give the fakes this module's name.
        fn.__module__ = __name__
        torch.library.register_fake(lib + name, fn)


if AVAILABLE:
    _register()
