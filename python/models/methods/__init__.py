"""Training methods: the registry (registry.py), the protocol (base.py) and one file per method.

    from effkernels.models.methods import METHODS, register_method, build_method, Method

`register_method(name)` decorates a factory `(model, args) -> Method` (usually the Method subclass
itself). `build_method("a+b", model, args)` builds one method, or a Composite of several. The
trainer imports this package, never the other way round, so `effkernels-train`,
`python -m effkernels.models.train` and `torchrun -m ...` all see one registry.
"""
from __future__ import annotations

from .base import AuxModule, Composite, ConfigError, Method, merge_options
from .registry import METHODS, add_method_args, args_from_json, build_method, parse_spec, register_method

# Built-in methods register themselves on import.
from . import act, ct, dit, erw, maskdit, repa, sit, sra, tread  # noqa: E402,F401

__all__ = ["METHODS", "register_method", "build_method", "parse_spec", "add_method_args", "args_from_json", "Method", "Composite", "AuxModule",
           "ConfigError", "merge_options"]
