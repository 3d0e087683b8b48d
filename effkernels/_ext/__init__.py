"""Python side of the compiled extension effkernels._C: fake (meta) kernels and autograd for its ops.

`import effkernels._C` loads the library and registers the ops torch.ops.effkernels_C.* (schemas in
csrc/bindings.cpp, CPU and CUDA kernels in csrc/<family>.cu). This package adds, for torch.compile
and torch.library.opcheck, a fake kernel for every op and autograd for the functional forward ops;
the modules routing.py, adaln.py and align.py expose the kernel primitive contract of
effkernels/ops/<family>.py over them (the `cuda` and `cpp` backends).

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
       "fused_fwd", "fused_bwd", "cosine_fwd", "cosine_fwd_out", "cosine_bwd")


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
    }
    for name, fn in fake.items():
        # The schema's python module is effkernels._ext: give the fakes this module's name.
        fn.__module__ = __name__
        torch.library.register_fake(lib + name, fn)

    C = torch.ops.effkernels_C

    # ---- routing ----
    def gather_setup(ctx, inputs, output):
        x, idx = inputs
        ctx.save_for_backward(idx)
        ctx.n = x.shape[1]

    def gather_bwd(ctx, grad):
        (idx,) = ctx.saved_tensors
        return C.scatter(None, grad.contiguous(), idx, ctx.n), None

    def scatter_setup(ctx, inputs, output):
        x, x_sub, idx, num_tokens = inputs
        ctx.save_for_backward(idx)
        ctx.has_x, ctx.has_sub, ctx.n = x is not None, x_sub is not None, num_tokens

    def scatter_bwd(ctx, grad):
        (idx,) = ctx.saved_tensors
        grad = grad.contiguous()
        dx = C.scatter(grad, None, idx, ctx.n) if ctx.has_x else None
        dsub = C.gather(grad, idx) if ctx.has_sub else None
        return dx, dsub, None, None

    # ---- adaln ----
    def ln_setup(ctx, inputs, output):
        x, shift, scale, w, b, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, shift, scale, w, b, mean, rstd)

    def ln_bwd(ctx, dout, _dmean, _drstd):
        x, shift, scale, w, b, mean, rstd = ctx.saved_tensors
        # Incoming gradients may be expanded (stride 0 along D); the kernels need unit stride there.
        dout = torch.zeros_like(x) if dout is None else dout.contiguous()
        dx, dsh, dsc, dw, db = C.ln_modulate_bwd(dout, x, shift, scale, w, b, mean, rstd)
        return dx, dsh, dsc, dw if w is not None else None, db if b is not None else None, None

    def gr_setup(ctx, inputs, output):
        x, y, gate = inputs
        ctx.save_for_backward(y, gate)

    def gr_bwd(ctx, dout):
        y, gate = ctx.saved_tensors
        dy, dgate = C.gated_residual_bwd(dout.contiguous(), y, gate)
        return dout, dy, dgate

    def fused_setup(ctx, inputs, output):
        x, y, gate, shift, scale, w, b, eps = inputs
        h, _, mean, rstd = output
        ctx.save_for_backward(h, y, gate, shift, scale, w, b, mean, rstd)

    def fused_bwd(ctx, dh, dout, _dmean, _drstd):
        h, y, gate, shift, scale, w, b, mean, rstd = ctx.saved_tensors
        dh = torch.zeros_like(h) if dh is None else dh.contiguous()
        dout = torch.zeros_like(h) if dout is None else dout.contiguous()
        dx, dy, dg, dsh, dsc, dw, db = C.fused_bwd(dh, dout, h, y, gate, shift, scale, w, b, mean, rstd)
        return dx, dy, dg, dsh, dsc, dw if w is not None else None, db if b is not None else None, None

    # ---- align ----
    def cos_setup(ctx, inputs, output):
        z_hat, z, eps = inputs
        ctx.save_for_backward(z_hat, z)
        ctx.eps = eps

    def cos_bwd(ctx, dcos):
        z_hat, z = ctx.saved_tensors
        return C.cosine_bwd(dcos.float(), z_hat, z, ctx.eps), None, None

    for name, bwd, setup in (("gather", gather_bwd, gather_setup), ("scatter", scatter_bwd, scatter_setup),
                             ("ln_modulate_fwd", ln_bwd, ln_setup), ("gated_residual_fwd", gr_bwd, gr_setup),
                             ("fused_fwd", fused_bwd, fused_setup), ("cosine_fwd", cos_bwd, cos_setup)):
        torch.library.register_autograd(lib + name, bwd, setup_context=setup)


if AVAILABLE:
    _register()
