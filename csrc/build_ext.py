"""How setup.py builds the optional extensions (called as `build_kwargs()`): effkernels._C (the C++
CPU paths and, with nvcc, the CUDA kernels) and effkernels._C_sim (the same CUDA kernels compiled by
g++ for the CUDA execution simulator in csrc/sim/, for the tests; see docs/cuda-simulator.md).

Environment:
  EFFKERNELS_BUILD_EXT=0      no extension at all (setup.py checks this before importing us)
  EFFKERNELS_BUILD_CUDA=0     C++ CPU paths only, with g++, even where nvcc exists
  EFFKERNELS_BUILD_SIM=0      no simulator build
  EFFKERNELS_CUDA_ARCHS       e.g. "8.0;9.0" (the default), "9.0a", "8.0;9.0+PTX"
  CUDA_HOME                   defaults to /usr/local/cuda when unset and that folder exists
  MAX_JOBS                    parallel compiles (ninja -j), read by torch's BuildExtension

With nvcc, kernels get -lineinfo and -Xptxas -v; the ptxas report (registers, spills per kernel)
is kept in build/effkernels_ptxas.log (PTXAS_LOG), which tests/test_ext_build.py checks for spills.
A failed build never fails the install: it prints a warning, leaves that extension out, and
effkernels.backends reports it missing (each extension on its own: a failed simulator build keeps _C).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
PTXAS_LOG = os.path.join(ROOT, "build", "effkernels_ptxas.log")
FAMILIES = ("routing", "adaln", "align", "swiglu", "rope")  # adaln.cu holds the RMSNorm ops too
DEFAULT_ARCHS = "8.0;9.0"
_ARCH = re.compile(r"^(\d+)\.(\d+)(a?)(\+PTX)?$")


def cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    # nvcc on the PATH may be a wrapper outside the toolkit (/usr/local/bin/nvcc here), so prefer
    # the conventional toolkit folder: torch would otherwise guess the wrong home and fail to link.
    if os.path.isdir("/usr/local/cuda"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def want_cuda() -> tuple[bool, str]:
    """(build with nvcc?, why)."""
    if os.environ.get("EFFKERNELS_BUILD_CUDA", "1") == "0":
        return False, "EFFKERNELS_BUILD_CUDA=0"
    home = cuda_home()
    if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return False, "no nvcc found (set CUDA_HOME)"
    import torch

    if torch.version.cuda is None:
        return False, "this torch build has no CUDA"
    return True, f"nvcc in {home}"


def parse_archs(spec: str) -> list[tuple[str, bool]]:
    """"8.0;9.0+PTX" -> [("80", False), ("90", True)]; a bad entry is a ValueError naming the variable."""
    out = []
    for item in filter(None, (s.strip() for s in re.split(r"[;, ]", spec))):
        m = _ARCH.match(item)
        if not m:
            raise ValueError(f"EFFKERNELS_CUDA_ARCHS: bad entry {item!r} in {spec!r}; "
                             "want e.g. '8.0;9.0' or '9.0a+PTX'")
        out.append((m.group(1) + m.group(2) + m.group(3), bool(m.group(4))))
    if not out:
        raise ValueError(f"EFFKERNELS_CUDA_ARCHS is empty: {spec!r}")
    return out


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for sm, ptx in archs:
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return flags


def _archs_macro(spec: str) -> str:
    # Passed as a preprocessor number (no quotes or ';' to survive ninja and the shell).
    items = [s.strip() for s in re.split(r"[;, ]", spec) if s.strip()]
    return "_".join(items).replace("+PTX", "pPTX")


def _sources(*names: str) -> list[str]:
    # setuptools wants paths relative to setup.py's folder.
    return [os.path.relpath(os.path.join(CSRC, n), ROOT) for n in names]


def build_kwargs() -> dict:
    """ext_modules and cmdclass for setup(); CUDA_HOME is fixed up before torch's helpers read it."""
    cuda, why = want_cuda()
    if cuda and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home()  # torch.utils.cpp_extension reads it at import time
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp", "-DNDEBUG"]  # -fopenmp: at::parallel_for is inline OpenMP
    if cuda:
        spec = os.environ.get("EFFKERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
        archs = parse_archs(spec)
        macros = ["-DWITH_CUDA", f"-DEFFK_CUDA_ARCHS={_archs_macro(spec)}"]
        nvcc = ["-O3", "-lineinfo", "-Xptxas", "-v", "-Xcompiler", "-fopenmp", "-DNDEBUG",
                *macros, *gencode_flags(archs)]
        ext = CUDAExtension(
            "effkernels._C",
            sources=_sources("bindings.cpp", *(f"{x}.cu" for x in FAMILIES)),
            extra_compile_args={"cxx": cxx + macros, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "effkernels._C",
            sources=_sources("bindings.cpp", *(f"cpu/{x}.cpp" for x in FAMILIES)),
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    print(f"effkernels: building effkernels._C ({'CUDA + C++' if cuda else 'C++ CPU only'}: {why})")
    exts = [ext]
    if os.environ.get("EFFKERNELS_BUILD_SIM", "1") != "0":
        # The family sources once more, under g++ with EFFK_SIM: the launch layer (csrc/launch.h) then
        # runs every kernel on csrc/sim/runtime.cpp. -O2, not -O3: it builds faster and the simulated
        # kernels are not what is timed.
        exts.append(CppExtension(
            "effkernels._C_sim",
            sources=_sources(*(f"sim/{x}.cpp" for x in ("bindings", *FAMILIES, "runtime", "module"))),
            extra_compile_args={"cxx": ["-O2", "-fopenmp", "-DNDEBUG", "-DEFFK_SIM"]},
            extra_link_args=["-fopenmp"],
        ))
        print("effkernels: building effkernels._C_sim (the CUDA kernels on the CPU execution simulator)")

    class OptionalBuildExt(BuildExtension):
        """torch's BuildExtension (ninja), with a variant-specific build folder, the ptxas log, and
        a failure that warns instead of failing the install."""

        def finalize_options(self):
            super().finalize_options()
            # The CPU-only and CUDA variants must not share objects.
            self.build_temp = os.path.join(self.build_temp, "cuda" if cuda else "cpu")

        def build_extension(self, ext_):
            try:
                super().build_extension(ext_)
            except Exception:  # a missing compiler, a compile error, a link error
                traceback.print_exc()
                self._warn_failed(ext_)

        def _warn_failed(self, ext_):
            if ext_ not in self._failed:
                msg = (f"effkernels: WARNING: building {ext_.name} failed; installing "
                       "without it. The reference and Triton backends still work; see `python -m effkernels`. "
                       "EFFKERNELS_BUILD_EXT=0 skips this build, EFFKERNELS_BUILD_CUDA=0 builds the CPU part "
                       "only, EFFKERNELS_BUILD_SIM=0 skips the simulator.")
                print(msg, file=sys.stderr)
                self._failed.append(ext_)
            # A library left in build/lib by an earlier build would otherwise ship as if new.
            stale = self.get_ext_fullpath(ext_.name)
            if os.path.exists(stale):
                os.remove(stale)

        def build_extensions(self):
            orig_nvcc = os.environ.get("PYTORCH_NVCC")
            if cuda:
                os.makedirs(os.path.dirname(PTXAS_LOG), exist_ok=True)
                with open(PTXAS_LOG, "w") as f:
                    archs = os.environ.get("EFFKERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
                    f.write(f"# ptxas -v of effkernels._C, archs {archs}\n")
                real = orig_nvcc or shlex.quote(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
                os.environ["EFFKERNELS_REAL_NVCC"] = real
                os.environ["EFFKERNELS_PTXAS_LOG"] = PTXAS_LOG
                os.environ["PYTORCH_NVCC"] = "sh " + shlex.quote(os.path.join(CSRC, "nvcc_log.sh"))
                # ninja rebuilds nothing when sources are unchanged, which would leave the log
                # empty; a fresh object folder keeps the log complete for every build.
                shutil.rmtree(self.build_temp, ignore_errors=True)
            self._failed = []
            try:
                super().build_extensions()
            except Exception:  # before any extension (torch's compiler check): all of them failed
                traceback.print_exc()
                for ext_ in self.extensions:
                    self._warn_failed(ext_)
            finally:
                # nothing to copy in place or list as an output for a failed one
                self.extensions = [e for e in self.extensions if e not in self._failed]
                if orig_nvcc is None:
                    os.environ.pop("PYTORCH_NVCC", None)
                else:
                    os.environ["PYTORCH_NVCC"] = orig_nvcc

    return {"ext_modules": exts, "cmdclass": {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}}
