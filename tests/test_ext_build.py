"""The extension's build: skipped with EFFKERNELS_BUILD_EXT=0, CPU-only with EFFKERNELS_BUILD_CUDA=0,
and the nvcc build's ptxas report free of register spills.

CI runs the nvcc build (pip install -e . with CUDA_HOME set) right before the tests, so under
CI=true a missing ptxas log is a failure, not a skip.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from csrc.build_ext import PTXAS_LOG, gencode_flags, parse_archs  # noqa: E402


def _pip_target(tmp_path, **env):
    target = tmp_path / "site"
    e = {**os.environ, **env}
    e.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--target",
                        str(target), "."], cwd=ROOT, env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return target, r


# A development venv holds this repo as an editable install, whose import hook would still find
# the repo's effkernels/_C*.so for `effkernels._C`: drop it so only the installed copy is seen.
_ISOLATE = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]\n"


def _run_in(target, code):
    # cwd is the install folder so the repo's own effkernels/ cannot shadow the installed copy.
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", _ISOLATE + textwrap.dedent(code)], cwd=target, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


def test_build_ext_0_installs_without_extension(tmp_path):
    target, _ = _pip_target(tmp_path, EFFKERNELS_BUILD_EXT="0")
    assert not list((target / "effkernels").glob("_C*.so"))
    out = _run_in(target, f"""
        import effkernels, torch
        from effkernels import backends
        assert effkernels.__file__.startswith({str(target)!r}), effkernels.__file__
        ok, why = backends.extension_status()
        assert not ok and "_C" in why, why
        assert not backends.available("cpp", torch.device("cpu"))[0]
        import effkernels._ext as ext
        assert not ext.AVAILABLE
        try:
            import effkernels._ext.adaln
        except ImportError as e:
            assert "not built" in str(e)
        else:
            raise AssertionError("effkernels._ext.adaln imported without the extension")
        x = torch.randn(2, 3, 8)
        from effkernels.ops.adaln import modulate_layernorm
        modulate_layernorm(x, x[:, 0], x[:, 1])  # auto falls back to the reference
        print("absent:", why)
    """)
    assert "absent:" in out


def test_failed_build_still_installs(tmp_path):
    """A broken compiler makes the build fail: pip still succeeds, warns, and ships no (stale) _C."""
    target, r = _pip_target(tmp_path, EFFKERNELS_BUILD_CUDA="0", CXX="/bin/false")
    assert "building effkernels._C failed" in r.stdout + r.stderr
    assert not list((target / "effkernels").glob("_C*.so"))
    out = _run_in(target, """
        from effkernels import backends
        ok, why = backends.extension_status()
        assert not ok, why
        print(why)
    """)
    assert "not built" in out


@pytest.mark.slow
def test_cpu_only_build_smoke(tmp_path):
    """EFFKERNELS_BUILD_CUDA=0 builds the C++ CPU paths with g++ alone (nvcc is present here, so
    without this test that variant would never be built)."""
    target, r = _pip_target(tmp_path, EFFKERNELS_BUILD_CUDA="0", EFFKERNELS_BUILD_SIM="0",
                            MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    assert list((target / "effkernels").glob("_C*.so")), r.stdout[-3000:] + r.stderr[-3000:]
    _run_in(target, """
        import torch, effkernels._C as C
        from effkernels import backends
        from effkernels.ops import adaln, align, routing
        from effkernels.reference import adaln as radaln, align as ralign, routing as rrouting
        assert C.WITH_CUDA is False and C.CUDA_ARCHS == ""
        assert backends.extension_status()[0] and not backends.extension_has_cuda()
        torch.manual_seed(0)
        x, y = torch.randn(2, 7, 17), torch.randn(2, 7, 17)
        g, s, c = torch.randn(2, 6 * 17).chunk(6, -1)[:3]
        h, o = adaln.gated_residual_modulate_layernorm(x, y, g, s, c, backend="cpp")
        hr, orf = radaln.gated_residual_modulate_layernorm(x, y, g, s, c)
        assert torch.allclose(h, hr, atol=1e-6) and torch.allclose(o, orf, atol=1e-5)
        idx = torch.tensor([[6, 1, 3], [0, 2, 5]])
        assert torch.equal(routing.route_gather(x, idx, backend="cpp"), rrouting.route_gather(x, idx))
        l1 = align.cosine_alignment_loss(x, y, backend="cpp")
        assert torch.allclose(l1, ralign.cosine_alignment_loss(x, y), atol=1e-6)
    """)


# ---------------------------------------------------------------------------------------------
# ptxas report of the nvcc build
# ---------------------------------------------------------------------------------------------

_FUNC = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")


def parse_ptxas(text: str):
    """-> ({kernel: (spill_store_bytes, spill_load_bytes)} worst over archs, {arch: entry count})."""
    spills, archs, current = {}, {}, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            archs[m.group(2)] = archs.get(m.group(2), 0) + 1
        if m := _FUNC.search(line):
            current = m.group(1)
        elif (m := _SPILL.search(line)) and current:
            st, ld = int(m.group(1)), int(m.group(2))
            old = spills.get(current, (0, 0))
            spills[current] = (max(old[0], st), max(old[1], ld))
            current = None
    return spills, archs


def test_parse_ptxas_finds_spills():
    text = ("ptxas info    : Compiling entry function '_ZN2ek3fooEv' for 'sm_90'\n"
            "ptxas info    : Function properties for _ZN2ek3fooEv\n"
            "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Function properties for _ZN2ek3barEv\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    spills, archs = parse_ptxas(text)
    assert spills == {"_ZN2ek3fooEv": (8, 4), "_ZN2ek3barEv": (0, 0)} and archs == {"sm_90": 1}


def test_arch_parsing():
    assert gencode_flags(parse_archs("8.0;9.0+PTX")) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(ValueError, match="EFFKERNELS_CUDA_ARCHS"):
        parse_archs("sm_80")


def test_no_register_spills_in_shipped_kernels():
    if not os.path.exists(PTXAS_LOG):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PTXAS_LOG} missing: CI must run the nvcc build (pip install -e .) before the tests")
        pytest.skip(f"no nvcc build here ({PTXAS_LOG} missing)")
    spills, archs = parse_ptxas(open(PTXAS_LOG).read())
    ours = {k: v for k, v in spills.items() if "2ek" in k}  # kernels in namespace ek
    assert ours, f"no effkernels kernel in {PTXAS_LOG}"
    for name in ("ln_fwd_kernel", "ln_bwd_row_kernel", "col_kernel", "finalize_kernel", "gr_fwd_kernel",
                 "gr_bwd_row_kernel", "route_kernel", "cos_kernel"):
        assert any(name in k for k in ours), f"{name} missing from {PTXAS_LOG}"
    spec = open(PTXAS_LOG).readline()
    for sm, _ in parse_archs(spec.rsplit("archs", 1)[1].strip()):
        assert archs.get(f"sm_{sm}"), f"sm_{sm} was not compiled ({archs})"
    bad = {k: v for k, v in ours.items() if v != (0, 0)}
    assert not bad, f"register spills (store, load bytes): {bad}"
