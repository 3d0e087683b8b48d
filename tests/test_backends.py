"""Backend selection: argument > context manager > EFFKERNELS_BACKEND > auto, clear errors, and
the `python -m effkernels` table."""
import os
import subprocess
import sys

import pytest
import torch

import effkernels
from effkernels import backends, ops

CPU = torch.device("cpu")


def test_auto_on_cpu_is_reference_or_measured_cpp(monkeypatch):
    monkeypatch.delenv("EFFKERNELS_BACKEND", raising=False)
    for op in ("route_gather", "modulate_layernorm", "per_token_cosine"):
        want = "cpp" if op in backends.CPP_FASTER_ON_CPU and backends.available("cpp", CPU)[0] else "reference"
        assert backends.resolve(op, CPU) == want


def test_precedence(monkeypatch):
    monkeypatch.setenv("EFFKERNELS_BACKEND", "reference")
    assert backends.requested_backend(None) == "reference"
    with effkernels.use_backend("triton"):
        assert backends.requested_backend(None) == "triton"
        assert backends.requested_backend("reference") == "reference"
        with effkernels.use_backend("auto"):
            assert backends.requested_backend(None) == "auto"
        assert backends.requested_backend(None) == "triton"
    assert backends.requested_backend(None) == "reference"


def test_use_backend_restores_on_error():
    with pytest.raises(KeyError):
        with effkernels.use_backend("reference"):
            raise KeyError
    assert getattr(backends._local, "backend", None) is None


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


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 3, 2)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run op modulate_layernorm"):
        ops.modulate_layernorm(x, torch.zeros(1, 2), torch.zeros(1, 2), backend="triton")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        ops.route_gather(x, torch.tensor([[1]]), backend="cuda")


def test_triton_on_cpu_under_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest
    ok, why = backends.available("triton", CPU)
    assert ok, why


def test_main_prints_table():
    env = dict(os.environ, EFFKERNELS_BACKEND="auto")
    out = subprocess.run([sys.executable, "-m", "effkernels"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "torch " + torch.__version__ in out
    for op in ("route_gather", "route_scatter", "modulate_layernorm", "gated_residual",
               "gated_residual_modulate_layernorm", "per_token_cosine"):
        assert op in out
    assert "auto picks" in out and "extension" in out
