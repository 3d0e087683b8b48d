"""The trainer's and the methods' options are declared once (options.py): the CLI's defaults are the dataclasses', a
partial Namespace reads the rest from them, and no source file repeats a default in a getattr."""
import argparse
import dataclasses
import os
import re

import pytest

from effkernels.models.cli import train as train_mod
from effkernels.models.methods import act, ct, erw, maskdit, repa, sra, tread
from effkernels.models.options import TrainOptions, add_options, opt, read_options

OPTIONS = [act.ACTOptions, ct.CTOptions, erw.ERWOptions, maskdit.MaskDiTOptions, repa.REPAOptions, sra.SRAOptions,
           tread.TREADOptions, TrainOptions]
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "models")


def test_the_cli_defaults_are_the_dataclasses():
    parsed = vars(train_mod.build_parser().parse_args([]))
    for cls in OPTIONS:
        for f in dataclasses.fields(cls):
            assert parsed[f.name] == f.default, (cls.__name__, f.name)


def test_read_options_fills_what_a_namespace_lacks():
    o = read_options(sra.SRAOptions, argparse.Namespace(sra_t_max=0.1))
    assert o.sra_t_max == 0.1 and o.sra_loss == "cosine" and o.sra_decay_every == 1000.0
    assert read_options(sra.SRAOptions, None) == sra.SRAOptions()


def test_no_source_file_repeats_an_options_default():
    names = {f.name for cls in OPTIONS for f in dataclasses.fields(cls)}
    found = []
    for dirpath, _, files in os.walk(MODELS):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                for m in re.finditer(r'getattr\((?:self\.)?args, "(\w+)"', open(path).read()):
                    if m.group(1) in names:
                        found.append(f"{os.path.relpath(path, MODELS)}: {m.group(1)}")
    assert found == []


def test_bad_declarations_are_errors():
    with pytest.raises(TypeError, match="mutable"):
        opt([], "a list")

    @dataclasses.dataclass
    class NoType:
        x_thing: int | None = opt(None, "no type for a None default")

    with pytest.raises(TypeError, match="type="):
        add_options(argparse.ArgumentParser().add_argument_group("g"), NoType)


def test_every_train_flag_is_declared_in_a_dataclass():
    parsed = vars(train_mod.build_parser().parse_args([]))
    declared = {f.name for cls in OPTIONS for f in dataclasses.fields(cls)}
    assert set(parsed) - declared == {"preset", "list_methods"}
