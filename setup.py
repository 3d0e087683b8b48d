"""Build hook for effkernels: the Python packages, and the optional C++/CUDA extension effkernels._C.

The extension is built by csrc/build_ext.py's `extensions()` (see the README's backends section);
EFFKERNELS_BUILD_EXT=0 skips it. A failed optional build never breaks `import effkernels`.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

packages = [
    "effkernels", "effkernels.reference", "effkernels._triton", "effkernels.ops", "effkernels.nn",
    "effkernels._ext", "effkernels.models",
]
package_dir = {"effkernels.models": "python/models"}
for p in packages:
    if p != "effkernels.models":
        package_dir[p] = p.replace(".", "/")

kwargs = {}
if os.environ.get("EFFKERNELS_BUILD_EXT", "1") != "0" and os.path.exists("csrc/build_ext.py"):
    from csrc.build_ext import build_kwargs  # noqa: E402

    kwargs = build_kwargs()

setup(packages=packages, package_dir=package_dir, **kwargs)
