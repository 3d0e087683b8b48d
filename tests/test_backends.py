"""Backend selection: argument > context manager > EFFKERNELS_BACKEND > auto, clear errors, and
the `python -m effkernels` table.

The expected backends are written out as tables (from the README's "Backends and how to pick
one"), never recomputed with the library's own logic, so a change in the selection rules fails here.
"""
import os
import subprocess
import sys
import threading

import pytest
import torch

import effkernels
from effkernels import backends, ops
from effkernels.backends import CPP_FASTER_COMPILED_ON_CPU, CPP_FASTER_ON_CPU

CPU = torch.device("cpu")
OPS = ("route_gather", "route_scatter", "modulate_layernorm", "gated_residual",
       "gated_residual_modulate_layernorm", "per_token_cosine")

# README: on CPU tensors auto picks cpp for the ops measured faster than the reference (all six),
# else the reference; Triton only when asked for by name (the interpreter is a test tool).
AUTO_CPU_WITH_EXTENSION = {
    "route_gather": "cpp", "route_scatter": "cpp", "modulate_layernorm": "cpp", "gated_residual": "cpp",
    "gated_residual_modulate_layernorm": "cpp", "per_token_cosine": "cpp",
    "visible_attention": "reference",  # attention has no C++ path
}
AUTO_CPU_WITHOUT_EXTENSION = {op: "reference" for op in AUTO_CPU_WITH_EXTENSION}


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("EFFKERNELS_BACKEND", raising=False)
    return monkeypatch


@pytest.fixture
def with_extension():
    ok, why = backends.available("cpp", CPU)
    if not ok:
        pytest.skip(f"extension not built: {why}")  # CI fails this skip (conftest)


@pytest.fixture
def without_extension(clean_env):
    """Simulate a build without effkernels._C, and check through the public API that it took."""
    clean_env.setattr(backends, "extension_status", lambda: (False, "simulated: no extension"))
    ok, why = backends.available("cpp", CPU)
    assert not ok and "simulated" in why, "could not simulate a missing extension"
    return clean_env


@pytest.mark.parametrize("op", sorted(AUTO_CPU_WITH_EXTENSION))
def test_auto_on_cpu_with_extension(clean_env, with_extension, op):
    assert backends.resolve(op, CPU) == AUTO_CPU_WITH_EXTENSION[op]
    assert backends.resolve(op, CPU, "auto") == AUTO_CPU_WITH_EXTENSION[op]


def test_auto_under_torch_compile_on_cpu_picks_what_compiles_faster(clean_env, with_extension):
    """While dynamo traces, auto on CPU tensors takes the reference (inductor fuses it) except for
    CPP_FASTER_COMPILED_ON_CPU; eager auto is unchanged. Read from the captured graph's ops."""
    x, c = torch.randn(2, 16, 32), torch.randn(2, 6 * 32)
    q, k = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    pos = ops.grid_positions(4, 4)

    def f(x, c, q, k):
        shift, scale = c.chunk(6, -1)[:2]
        qr, kr = ops.rope2d(q, k, pos)
        return ops.modulate_layernorm(x, shift, scale).sum() + qr.sum() + kr.sum()

    traced = []

    def record(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(f, backend=record, fullgraph=True)(x, c, q, k)
    ours = {t for t in traced if t.startswith("effkernels.")}
    assert "effkernels.rope2d.default" in ours  # in CPP_FASTER_COMPILED_ON_CPU
    assert not any("layernorm" in t for t in ours), ours  # compiled from the reference
    assert "modulate_layernorm" in CPP_FASTER_ON_CPU and "modulate_layernorm" not in CPP_FASTER_COMPILED_ON_CPU
    assert backends.resolve("modulate_layernorm", CPU) == "cpp"  # eager: the C++ path
    torch.testing.assert_close(got, f(x, c, q, k), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op", sorted(AUTO_CPU_WITHOUT_EXTENSION))
def test_auto_on_cpu_without_extension_is_the_reference(without_extension, op):
    assert backends.resolve(op, CPU) == AUTO_CPU_WITHOUT_EXTENSION[op]


def test_ops_run_without_extension(without_extension):
    x, idx = torch.randn(2, 5, 3), torch.tensor([[4, 0], [1, 3]])
    want = torch.stack([x[0, [4, 0]], x[1, [1, 3]]])
    assert torch.equal(ops.route_gather(x, idx), want)  # auto falls back, silently and correctly
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run op route_gather"):
        ops.route_gather(x, idx, backend="cpp")  # an explicit backend never does


# (argument, use_backend, EFFKERNELS_BACKEND) -> the backend an op runs on, for CPU tensors with the
# extension built and TRITON_INTERPRET=1; None means "not given".
PRECEDENCE = [
    ((None, None, None), "cpp"),                  # auto
    ((None, None, "reference"), "reference"),     # env over auto
    ((None, None, "triton"), "triton"),
    ((None, "triton", "reference"), "triton"),    # context over env
    ((None, "auto", "reference"), "cpp"),         # an explicit auto context still beats env
    (("reference", "triton", "cpp"), "reference"),  # argument over everything
    (("cpp", None, "reference"), "cpp"),
    (("auto", "reference", "triton"), "cpp"),     # backend="auto" on the call is auto
]


@pytest.mark.parametrize("case,want", PRECEDENCE, ids=[str(c) for c, _ in PRECEDENCE])
def test_precedence(clean_env, with_extension, case, want):
    arg, ctx, env = case
    if env is not None:
        clean_env.setenv("EFFKERNELS_BACKEND", env)
    if ctx is None:
        assert backends.resolve("modulate_layernorm", CPU, arg) == want
    else:
        with effkernels.use_backend(ctx):
            assert backends.resolve("modulate_layernorm", CPU, arg) == want


def test_nested_contexts_restore(clean_env, with_extension):
    clean_env.setenv("EFFKERNELS_BACKEND", "reference")
    got = []
    with effkernels.use_backend("triton"):
        got.append(backends.resolve("route_gather", CPU))
        with effkernels.use_backend("cpp"):
            got.append(backends.resolve("route_gather", CPU))
        got.append(backends.resolve("route_gather", CPU))
    got.append(backends.resolve("route_gather", CPU))
    assert got == ["triton", "cpp", "triton", "reference"]


def test_use_backend_restores_on_error(clean_env, with_extension):
    with pytest.raises(KeyError):
        with effkernels.use_backend("reference"):
            assert backends.resolve("route_gather", CPU) == "reference"
            raise KeyError
    assert backends.resolve("route_gather", CPU) == "cpp"


def test_use_backend_is_per_thread(clean_env, with_extension):
    seen = []
    with effkernels.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(backends.resolve("route_gather", CPU)))
        t.start()
        t.join()
        assert backends.resolve("route_gather", CPU) == "reference"
    assert seen == ["cpp"]


@pytest.mark.parametrize("where", ["arg", "ctx", "env"])
def test_bad_backend_name_is_a_clear_error(monkeypatch, where):
    x, idx = torch.randn(1, 3, 2), torch.tensor([[0, 2]])
    if where == "arg":
        with pytest.raises(ValueError, match="backend must be one of"):
            ops.route_gather(x, idx, backend="tpu")
    elif where == "ctx":
        with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of"):
            with effkernels.use_backend("tpu"):
                pass
    else:
        monkeypatch.setenv("EFFKERNELS_BACKEND", "tpu")
        with pytest.raises(ValueError, match="EFFKERNELS_BACKEND must be one of"):
            ops.route_gather(x, idx)


@pytest.mark.parametrize("op", OPS)
def test_explicit_backend_that_cannot_run_is_an_error(clean_env, op):
    with pytest.raises(RuntimeError, match=f"backend 'cuda' cannot run op {op} on cpu tensors"):
        backends.resolve(op, CPU, "cuda")  # CPU tensors
    clean_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=f"backend 'triton' cannot run op {op} on cpu tensors"):
        backends.resolve(op, CPU, "triton")  # no GPU, no interpreter
    clean_env.setattr(backends, "extension_status", lambda: (False, "simulated: no extension"))
    with pytest.raises(RuntimeError, match=f"backend 'cpp' cannot run op {op} on cpu tensors.*simulated"):
        backends.resolve(op, CPU, "cpp")
    clean_env.setenv("EFFKERNELS_BACKEND", "cpp")  # the same through env and context
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run"):
        backends.resolve(op, CPU)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        with effkernels.use_backend("triton"):
            backends.resolve(op, CPU)


def test_unavailable_backend_through_the_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 3, 2)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run op modulate_layernorm"):
        ops.modulate_layernorm(x, torch.zeros(1, 2), torch.zeros(1, 2), backend="triton")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        ops.route_gather(x, torch.tensor([[1]]), backend="cuda")


def test_triton_on_cpu_under_interpreter(monkeypatch):
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest
    ok, why = backends.available("triton", CPU)
    assert ok, why
    assert backends.available("reference", CPU)[0]
    assert not backends.available("cuda", CPU)[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backends.available("triton", CPU)[0]


def test_main_prints_table(with_extension):
    env = dict(os.environ, EFFKERNELS_BACKEND="auto")
    out = subprocess.run([sys.executable, "-m", "effkernels"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "torch " + torch.__version__ in out
    assert "auto picks" in out and "extension" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for op in OPS:
        # columns: op, reference, triton, cuda, cpp, auto picks, why
        assert op in rows, out
        assert rows[op][5] == AUTO_CPU_WITH_EXTENSION[op], rows[op]
