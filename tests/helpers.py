"""Shared test utilities: relative error, the project's tolerances, NaN-poisoned outputs, and the
tests' device (EFFKERNELS_TEST_DEVICE, see TestDevice)."""
import torch
from torch.utils._device import DeviceContext

# Tolerances: fp32 1e-5, or 1e-4 where the kernel reduces in another order than the reference;
# fp16 2e-3, bf16 1e-2 (and, for 16-bit inputs, at most 2x PyTorch's own error in that dtype).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
TOL_REDUCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere gives inf (never passes).

    `scale`: for a reduction's result, the same norm of the sum of |terms| (sum |x_i| for sum x_i).
    A sum's rounding error is bounded by eps * sum |x_i| (Higham, Accuracy and Stability, 4.2),
    so relative to ||ref|| alone it has no bound when the terms cancel (a mean of cosines near 0);
    the denominator is then max(||ref||, scale).
    """
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    if scale is not None:
        den = max(den, float(scale))
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def assert_close(out, ref, dtype, *, reduce=False, name="out", same_dtype_ref=None, scale=None):
    """Kernel vs float32/64 reference within the project's tolerance, or, for 16-bit inputs, within
    twice the error of the same computation done by PyTorch in that dtype (flash-attention's rule).
    `scale`: see rel_err (for results of a sum whose terms may cancel)."""
    tol = (TOL_REDUCE if reduce else TOL)[dtype]
    err = rel_err(out, ref, scale)
    if same_dtype_ref is not None and dtype in (torch.float16, torch.bfloat16):
        tol = max(tol, 2 * rel_err(same_dtype_ref, ref, scale))
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def cosine_loss_scale(z_hat: torch.Tensor, z: torch.Tensor, eps: float = 1e-8) -> float:
    """sum |terms| of the mean cosine loss (1/T) sum_t sum_d zh_td z_td / (|zh_t| |z_t|), in float64:
    the denominator (rel_err's scale) for that loss, whose terms cancel to ~1/sqrt(T D)."""
    a = torch.nn.functional.normalize(z_hat.detach().double(), dim=-1, eps=eps)
    b = torch.nn.functional.normalize(z.detach().double(), dim=-1, eps=eps)
    return (a * b).abs().sum(-1).mean().item()


def poison(shape, dtype, device=None):
    """An output buffer full of NaN, so a kernel that skips an element cannot pass (device None: the
    tests' default device, CPU unless EFFKERNELS_TEST_DEVICE says otherwise)."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def count_index_checks(monkeypatch):
    """Record the `name` of every routing index-value check (the host-syncing one) from now on."""
    from effkernels import ops

    calls = []
    real = ops.routing.check_index_values

    def counting(idx, num_tokens, name="idx"):
        calls.append(name)
        return real(idx, num_tokens, name)
    monkeypatch.setattr(ops.routing, "check_index_values", counting)
    return calls


class TestDevice(DeviceContext):
    """torch's default-device mode (`with torch.device(d):`) for running the CPU-written tests on
    another device (conftest enters it per test when EFFKERNELS_TEST_DEVICE is set, e.g. `cuda`):
    a factory call without `device=` (torch.randn, zeros, tensor, arange, ...) makes its tensor there.

    One addition: a call that draws from a CPU `torch.Generator` (the tests' seeded generators)
    draws on the CPU with it, then moves the result, so the values (and the seeds' replay) are the
    same on every device. Tensors placed on the CPU explicitly (`device="cpu"`, `.cpu()`) stay there.
    """
    __test__ = False  # not a test class, whatever its name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if (gen is not None and kwargs.get("device") is None and gen.device != self.device
                and func in torch.utils._device._device_constructors()):
            grad = kwargs.pop("requires_grad", False)
            out = func(*args, **kwargs, device=gen.device).to(self.device)
            return out.requires_grad_(grad) if grad else out
        return super().__torch_function__(func, types, args, kwargs)


def digits_like_batch(seed: int, b: int) -> dict:
    """A method test's batch on the digits layout (B, 1, 8, 8) in [-1, 1], 10 classes, with its t, noise
    and step generator fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(b, 1, 8, 8, generator=g) * 2 - 1, "y": torch.randint(0, 10, (b,), generator=g),
            "t": torch.rand(b, generator=g), "noise": torch.randn(b, 1, 8, 8, generator=g),
            "generator": torch.Generator().manual_seed(seed)}
