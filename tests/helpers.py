"""Shared test utilities: relative error, tolerances from DESIGN.md, NaN-poisoned outputs."""
import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
TOL_REDUCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere gives inf (never passes)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def assert_close(out, ref, dtype, *, reduce=False, name="out", same_dtype_ref=None):
    """Kernel vs float32/64 reference within DESIGN.md's tolerance, or, for 16-bit inputs, within
    twice the error of the same computation done by PyTorch in that dtype (flash-attention's rule)."""
    tol = (TOL_REDUCE if reduce else TOL)[dtype]
    err = rel_err(out, ref)
    if same_dtype_ref is not None and dtype in (torch.float16, torch.bfloat16):
        tol = max(tol, 2 * rel_err(same_dtype_ref, ref))
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def poison(shape, dtype, device="cpu"):
    """An output buffer full of NaN, so a kernel that skips an element cannot pass."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
