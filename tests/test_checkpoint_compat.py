"""Checkpoints written by an earlier layout of the model layer (tests/data/checkpoints_v0: effkernels-train,
2 steps of a depth-2 width-32 model on digits, seed 3; sit, tread+repa, maskdit) still rebuild into the same
generator and resume training: the model layer can move without stranding users' runs."""
import os
import shutil

import pytest
import effkernels
import torch
from effkernels.models.cli import train as train_mod
from effkernels.models.checkpoint import load_checkpoint
from effkernels.models.train.rebuild import generator_from_checkpoint

DATA = os.path.join(os.path.dirname(__file__), "data", "checkpoints_v0")
# the flags each was trained with (besides --model-kwargs SMALL --batch-size 8 --warmup 1 --seed 3)
FLAGS = {"sit": [], "maskdit": ["--method", "maskdit", "--decoder-depth", "1"],
         "tread_repa": ["--method", "tread+repa", "--route", "1:1", "--repa-depth", "1", "--repa-proj-dim", "32"]}
NAMES = tuple(FLAGS)
SMALL = '{"depth": 2, "hidden_size": 32, "num_heads": 2}'


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_samples_as_it_did(name):
    method, models, meta = generator_from_checkpoint(load_checkpoint(os.path.join(DATA, f"{name}.pt")))
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), effkernels.use_backend("reference"):
        got = method.sample(models, torch.arange(4), noise, sampler="euler", steps=3)
    want = torch.load(os.path.join(DATA, "expected_samples.pt"), weights_only=True)[name]
    # float rounding only (thread count, CPU kind: ~3e-5 measured); a weight that loads wrong moves O(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_resumes(tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(DATA, f"{name}.pt"), out / "last.pt")
    assert train_mod.main(["--out", str(out), "--resume", "auto", "--steps", "3", "--eval-every", "0", "--quiet",
                           "--data-workers", "0", "--batch-size", "8", "--warmup", "1", "--seed", "3",
                           "--model-kwargs", SMALL, *FLAGS[name]]) == 0
    assert load_checkpoint(str(out / "last.pt"))["step"] == 3
