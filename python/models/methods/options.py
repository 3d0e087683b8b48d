"""A method's options, declared once: a dataclass whose field names are the argparse dests and whose
metadata carries the flag's help (and type, choices, action). From it come the argparse group
(`add_options`), the defaults, and the values a method reads from parsed arguments, a checkpoint's
options or a test's partial Namespace (`read_options`: a missing name takes the field's default).

    @dataclass
    class SRAOptions:
        sra_t_max: float = opt(0.2, "the teacher's t is t - t_max U(0, 1)")

    group.add_argument("--sra-t-max", type=float, default=0.2, help=...)   # what add_options does
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields


def opt(default, help: str, *, type=None, choices=None, action=None, metavar=None):
    """A field of an options dataclass: its default and its CLI flag's help. `type` is needed when
    the default is None (argparse cannot infer it); `action` "store_true" for a bool flag that is off
    by default, "append" for a repeatable flag (default None: not given)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("opt: a mutable default would be shared between instances; use None")
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "action": action,
                                            "metavar": metavar})


def flag_of(name: str) -> str:
    """The CLI flag of a dest: sra_t_max -> --sra-t-max."""
    return "--" + name.replace("_", "-")


def add_options(group, cls) -> None:
    """One argparse argument per field of `cls`, its default the field's."""
    for f in fields(cls):
        m = f.metadata
        kw = {"default": f.default, "help": m["help"], "dest": f.name}
        action = m["action"]
        if action == "store_true":
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a store_true flag defaults to False")
            kw["action"] = "store_true"
        else:
            if action:
                kw["action"] = action
            typ = m["type"] or (type(f.default) if f.default is not None else None)
            if typ is None:
                raise TypeError(f"{cls.__name__}.{f.name}: give type= for a None default")
            if typ is not str:
                kw["type"] = typ
            if m["choices"] is not None:
                kw["choices"] = m["choices"]
            if m["metavar"] is not None:
                kw["metavar"] = m["metavar"]
        group.add_argument(flag_of(f.name), **kw)


def read_options(cls, args: argparse.Namespace | None):
    """`cls` filled from `args` (parsed flags, a checkpoint's options, a test's partial Namespace, or
    None): each field from the attribute of its name, else its default."""
    vals = {}
    for f in fields(cls):
        if f.default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: every option needs a default")
        vals[f.name] = getattr(args, f.name, f.default) if args is not None else f.default
    return cls(**vals)
