"""Training methods: the registry, the protocol (see base.py) and one file per method.

    from effkernels.models.methods import METHODS, register_method, build_method, Method

`register_method(name)` decorates a factory `(model, args) -> Method` (usually the Method subclass
itself). `build_method("a+b", model, args)` builds one method, or a Composite of several. The
trainer imports this package, never the other way round, so `effkernels-train`,
`python -m effkernels.models.train` and `torchrun -m ...` all see one registry.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from .base import AuxModule, Composite, ConfigError, Method, merge_options

METHODS: dict[str, Callable] = {}


def register_method(name: str):
    """Decorator: METHODS[name] = factory(model, args) -> Method. Names may not contain '+'."""
    if not isinstance(name, str) or not name or "+" in name:
        raise ValueError(f"register_method: name must be a non-empty string without '+', got {name!r}")

    def deco(factory):
        METHODS[name] = factory
        return factory
    return deco


def parse_spec(spec: str) -> list[str]:
    """'tread+repa' -> ['tread', 'repa'], each checked against the registry."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"method must be a name like 'sit' or 'tread+repa', got {spec!r}")
    names = spec.split("+")
    for n in names:
        if n not in METHODS:
            raise ConfigError(f"method {n!r} is not registered; known: {', '.join(sorted(METHODS))}")
    return names


def build_method(spec: str, model=None, args=None) -> Composite:
    """The method (a Composite, also for one name) that `--method spec` trains."""
    parts = []
    for n in parse_spec(spec):
        m = METHODS[n](model, args)
        if not isinstance(m, Method):
            raise ConfigError(f"method {n!r}: its factory returned a {type(m).__name__}, not a Method subclass")
        parts.append((n, m))
    return Composite(parts)


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Every registered method's options, one argument group each (a factory's static add_args)."""
    for name, factory in sorted(METHODS.items()):
        add = getattr(factory, "add_args", None)
        if add is not None:
            add(parser.add_argument_group(f"method {name}"))


def args_from_json(args_json: str | None) -> argparse.Namespace:
    """The options a checkpoint was trained with (meta["args_json"]), over the methods' defaults, so a
    method can be rebuilt for sampling without the trainer."""
    p = argparse.ArgumentParser(add_help=False)
    add_method_args(p)
    ns = p.parse_args([])
    vars(ns).update(json.loads(args_json) if args_json else {})
    return ns


# Built-in methods register themselves on import.
from . import act, ct, dit, erw, maskdit, repa, sit, sra, tread  # noqa: E402,F401

__all__ = ["METHODS", "register_method", "build_method", "parse_spec", "add_method_args", "args_from_json", "Method", "Composite", "AuxModule",
           "ConfigError", "merge_options"]
