"""Build hook for effkernels: the Python packages, and the optional C++/CUDA extension effkernels._C.

Packages are discovered under both roots, so a regular (non-editable) wheel carries every
subpackage: effkernels/ as itself, python/models/ as effkernels.models (setuptools' package_dir).
The extension is built by csrc/build_ext.py's `extensions()` (see docs/kernels.md);
EFFKERNELS_BUILD_EXT=0 skips it. A failed optional build never breaks `import effkernels`.
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

packages = find_packages(include=["effkernels", "effkernels.*"])
models = ["effkernels.models"] + [f"effkernels.models.{p}" for p in find_packages("python/models")]
package_dir = {"effkernels.models": "python/models"}

kwargs = {}
if os.environ.get("EFFKERNELS_BUILD_EXT", "1") != "0" and os.path.exists("csrc/build_ext.py"):
    from csrc.build_ext import build_kwargs  # noqa: E402

    kwargs = build_kwargs()

setup(packages=packages + models, package_dir=package_dir, **kwargs)
