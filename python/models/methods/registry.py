"""The method registry: names -> factories, building a method (or a composition) from `--method`,
the methods' CLI options, and the options a checkpoint was trained with."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from .base import Composite, ConfigError, Method

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
