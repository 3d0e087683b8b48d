"""Which backends exist here, which one each op uses, and why.

Backends:
  reference  pure PyTorch (effkernels.reference); always there, the specification.
  triton     effkernels._triton; CUDA tensors on a GPU, or CPU tensors under TRITON_INTERPRET=1.
  cuda       effkernels._C's CUDA kernels, CUDA tensors, when the extension was built with nvcc.
  cpp        effkernels._C's C++ CPU loops, CPU tensors, when the extension was built.

Choice, strongest first: the `backend=` argument of a call; `with use_backend(name):`;
the EFFKERNELS_BACKEND environment variable; "auto". Auto picks, per device:
  CUDA tensors: cuda if built, else triton if importable, else reference;
  CPU tensors:  cpp for the ops listed in CPP_FASTER_ON_CPU (measured faster than the reference),
                else reference; while torch.compile traces, cpp only for CPP_FASTER_COMPILED_ON_CPU
                (the compiled reference, which inductor fuses, measured faster for the others).
                Triton runs CPU tensors only when asked for by name and
                TRITON_INTERPRET=1 (that is how CI tests it): the interpreter is a test tool, far
                slower than the reference, so auto never picks it.

Every kernel backend module (effkernels._triton.<family>, effkernels._ext.<family>) exposes the
same primitive functions, so effkernels.ops can call either; see effkernels/ops/*.py.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "cpp")

# Ops whose C++ CPU path was measured faster than the reference at DiT-like sizes, forward and
# forward+backward, fp32 and bf16 (`python bench/bench_ops.py [--backward] [--dtype bfloat16]`;
# numbers in docs/results.md). At toy sizes (a few thousand elements) the custom-op dispatch costs more
# than it saves, but those calls take microseconds either way.
CPP_FASTER_ON_CPU: frozenset[str] = frozenset({
    "route_gather", "route_scatter", "modulate_layernorm", "gated_residual",
    "gated_residual_modulate_layernorm", "per_token_cosine", "rmsnorm_modulate",
    "gated_residual_rmsnorm_modulate", "rope2d"})

# Under torch.compile on CPU tensors auto chooses again: the reference is plain torch that inductor
# fuses with its neighbours, while our C++ ops are opaque custom ops it cannot fuse into. These are
# the ops whose compiled C++ path measured faster than the compiled reference at SiT-S/2 sizes
# (8 x 256 x 384, fp32, forward+backward: `python bench/bench_ops.py --backward --compile`; numbers in
# docs/kernels.md); every other op compiles from the reference.
CPP_FASTER_COMPILED_ON_CPU: frozenset[str] = frozenset({"route_gather", "per_token_cosine", "rope2d"})

# Ops the extension implements for CPU tensors only: on CUDA tensors their kernel path is Triton's
# (the fused projection + cosine is matmuls, which tl.dot tiles; a hand-written CUDA GEMM would not
# beat it), so auto skips `cuda` for them and asking for it by name is an error.
NO_CUDA_KERNEL: frozenset[str] = frozenset({"projected_cosine"})

_local = threading.local()


def _once(fn):
    """Memoise a no-argument probe, and let torch.compile call it instead of tracing it.

    A probe imports a module, which dynamo refuses to trace (a graph break; an error under
    fullgraph=True), so the first op of a fresh process inside a compiled region used to fail.
    assume_constant_result makes dynamo run the probe eagerly at trace time and bake its result
    in as a constant, which is safe because the memo never changes within a process.
    """
    memo: dict = {}

    def wrapper():
        if "v" not in memo:
            memo["v"] = fn()
        return memo["v"]

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return torch.compiler.assume_constant_result(wrapper)


def _check_name(name: str, arg: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside this block on `name` unless a call passes backend= itself."""
    _check_name(name, "use_backend(name)")
    prev = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = prev


def requested_backend(backend: str | None) -> str:
    """The backend asked for: argument, else context manager, else EFFKERNELS_BACKEND, else auto."""
    if backend is not None:
        return _check_name(backend, "backend")
    ctx = getattr(_local, "backend", None)
    if ctx is not None:
        return ctx
    return _check_name(os.environ.get("EFFKERNELS_BACKEND", "auto"), "EFFKERNELS_BACKEND")


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------

def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@_once
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"triton does not import ({type(e).__name__}: {e})"
    return True, f"triton {triton.__version__}"


@_once
def _extension_probe() -> tuple[bool, bool, str]:
    """(built, built with CUDA, why), one import per process. The extension is optional: a failed or
    skipped build is reported, never raised."""
    try:
        ext = importlib.import_module("effkernels._C")
    except Exception as e:
        return False, False, f"effkernels._C not built or not importable ({type(e).__name__}: {e})"
    cuda = bool(getattr(ext, "WITH_CUDA", False))
    return True, cuda, f"effkernels._C built (cuda={cuda}, archs={getattr(ext, 'CUDA_ARCHS', '')})"


# Both questions read the one memoised probe, so the CUDA-tensor path (cuda backend) resolves
# availability exactly as the CPU-tensor path (cpp) does, which the CPU tests exercise.
def extension_status() -> tuple[bool, str]:
    """(built, why)."""
    built, _, why = _extension_probe()
    return built, why


def extension_has_cuda() -> bool:
    """Whether effkernels._C was built with its CUDA kernels."""
    built, cuda, _ = _extension_probe()
    return built and cuda


@_once
def simulator_status() -> tuple[bool, str]:
    """(built, why) for effkernels._C_sim, the CUDA execution simulator build of the extension's CUDA
    kernels (docs/cuda-simulator.md). It is for tests: no backend uses it."""
    try:
        importlib.import_module("effkernels._C_sim")
    except Exception as e:
        return False, f"effkernels._C_sim not built or not importable ({type(e).__name__}: {e})"
    return True, "effkernels._C_sim built (CUDA kernels on the CPU simulator, torch.ops.effkernels_sim)"


@_once
def flash_attn_status() -> tuple[bool, str]:
    try:
        import flash_attn  # noqa: F401
    except Exception as e:
        return False, f"flash_attn does not import ({type(e).__name__})"
    return True, f"flash_attn {flash_attn.__version__}"


def available(backend: str, device: torch.device) -> tuple[bool, str]:
    """Can `backend` run on tensors of `device` here, and why (not)."""
    cuda = device.type == "cuda"
    if backend == "reference":
        return True, "pure PyTorch"
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if cuda or interpreter_on():
            return True, why + (" (interpreter)" if not cuda else "")
        return False, "Triton on CPU tensors needs TRITON_INTERPRET=1"
    if backend in ("cuda", "cpp"):
        ok, why = extension_status()
        if not ok:
            return False, why
        if backend == "cuda" and not (cuda and extension_has_cuda()):
            return False, "the cuda backend needs CUDA tensors and an extension built with nvcc"
        if backend == "cpp" and cuda:
            return False, "the cpp backend runs on CPU tensors only"
        return True, why
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(op: str, device: torch.device, backend: str | None = None) -> str:
    """The concrete backend `op` will run on for tensors on `device`.

    An explicit backend that cannot run here is an error (never a silent fallback); auto falls
    back along the order in the module docstring.
    """
    name = requested_backend(backend)
    if name != "auto":
        ok, why = available(name, device)
        if not ok:
            raise RuntimeError(f"backend {name!r} cannot run op {op} on {device.type} tensors here: {why}")
        if name == "cuda" and op in NO_CUDA_KERNEL:
            raise RuntimeError(f"backend 'cuda' cannot run op {op} on {device.type} tensors here: the extension "
                               "has no CUDA kernel for it (its GPU path is triton)")
        return name
    return auto_choice(op, device)[0]


def auto_choice(op: str, device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        if available("cuda", device)[0] and op not in NO_CUDA_KERNEL:
            return "cuda", "extension built with CUDA"
        if available("triton", device)[0]:
            return "triton", "triton on a GPU"
        return "reference", "no kernel backend for CUDA here"
    if torch.compiler.is_compiling():
        if op in CPP_FASTER_COMPILED_ON_CPU and available("cpp", device)[0]:
            return "cpp", "under torch.compile: the C++ op measured faster than the compiled reference"
        return "reference", "under torch.compile: the compiled reference measured faster (inductor fuses it)"
    if op in CPP_FASTER_ON_CPU and available("cpp", device)[0]:
        return "cpp", "C++ CPU path measured faster than the reference"
    return "reference", "no kernel path measured faster on CPU tensors"
