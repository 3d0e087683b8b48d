"""The trainer: resume equals an uninterrupted run, atomic checkpoints, data parallel = big batch,
clear CLI errors, the sample CLI, and (slow) the README's digits job reaching its quality bar."""
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from effkernels.models import checkpoint as ckpt_mod
from effkernels.models.cli import sample as sample_mod
from effkernels.models.cli import train as train_mod
from effkernels.models.train.runlog import MetricsLog
from effkernels.models.train.trainer import Trainer
from effkernels.models.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from effkernels.models.data.sources import ArrayDataset, load_digits

SMALL = '{"depth": 2, "hidden_size": 32, "num_heads": 2}'
NO_DROPOUT = '{"depth": 2, "hidden_size": 32, "num_heads": 2, "class_dropout_prob": 0.0}'


def small_args(out, *extra):
    return ["--out", str(out), "--model-kwargs", SMALL, "--batch-size", "16", "--eval-every", "0", "--quiet",
            "--warmup", "2", *extra]


def _state(path):
    return load_checkpoint(path)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_resume_equals_uninterrupted_run(tmp_path, seed):
    s = str(seed % 1000)
    assert train_mod.main(small_args(tmp_path / "a", "--steps", "6", "--seed", s)) == 0
    assert train_mod.main(small_args(tmp_path / "b", "--steps", "3", "--seed", s)) == 0
    assert _state(tmp_path / "b" / "last.pt")["step"] == 3
    assert train_mod.main(small_args(tmp_path / "b", "--steps", "6", "--seed", s, "--resume", "auto")) == 0
    a, b = _state(tmp_path / "a" / "last.pt"), _state(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 6
    assert _max_diff(a["model"], b["model"]) <= 1e-6
    assert _max_diff(a["ema"], b["ema"]) <= 1e-6
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert max(_max_diff(sa[k], sb[k]) for k in sa) <= 1e-6
    # the global RNG (label dropout) continued where it stopped
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    # the log has each step once, in order, across the two runs
    steps = [r["step"] for r in MetricsLog.read(str(tmp_path / "b" / "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    # and a different seed really gives different weights (the comparison above can fail)
    assert train_mod.main(small_args(tmp_path / "c", "--steps", "6", "--seed", str(seed % 1000 + 1))) == 0
    assert _max_diff(a["model"], _state(tmp_path / "c" / "last.pt")["model"]) > 1e-4


def test_checkpoint_write_killed_midway_keeps_previous(tmp_path, monkeypatch, seed):
    path = str(tmp_path / "ck" / "last.pt")
    old = {"step": 1, "model": {"w": torch.randn(50)}}
    save_checkpoint(old, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")  # part of the new file reaches the disk ...
        raise KeyboardInterrupt("killed")  # ... then the process is interrupted

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "model": {"w": torch.zeros(50)}}, path)
    monkeypatch.undo()
    back = load_checkpoint(path)
    assert back["step"] == 1 and torch.equal(back["model"]["w"], old["model"]["w"])
    assert os.listdir(tmp_path / "ck") == ["last.pt"]  # no temp file left behind


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    p = tmp_path / "bad.pt"
    save_checkpoint({"step": 1, "model": {"w": torch.zeros(1000)}}, str(p))
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(str(p))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "none.pt"))


def test_rng_capture_restore_roundtrip(seed):
    state = capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert all(torch.is_tensor(v) for v in state.values())  # loadable with weights_only=True


def test_grad_checkpointing_gives_same_step(tmp_path, seed):
    s = str(seed % 1000)
    assert train_mod.main(small_args(tmp_path / "a", "--steps", "2", "--seed", s)) == 0
    assert train_mod.main(small_args(tmp_path / "b", "--steps", "2", "--seed", s, "--grad-ckpt")) == 0
    assert _max_diff(_state(tmp_path / "a" / "last.pt")["model"], _state(tmp_path / "b" / "last.pt")["model"]) <= 1e-6


# -----------------------------------------------------------------------------------------------
# Data parallel: 2 gloo processes on half batches == 1 process on the whole batch
# -----------------------------------------------------------------------------------------------

def _fixed_problem(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (32,), generator=g)
    ds = ArrayDataset(x, y, 10, "rand")
    t, noise = torch.rand(8, generator=g), torch.randn(8, 1, 8, 8, generator=g)
    batch = {"x": ds.x[:8], "y": ds.y[:8], "t": t, "noise": noise}
    return ds, batch


def _make_trainer(out, seed, ds):
    # no label dropout: it draws from each process's own RNG, which a 1-process run cannot mirror
    args = train_mod.parse_args(["--out", out, "--batch-size", "8", "--seed", str(seed), "--lr", "1e-2",
                                 "--model-kwargs", NO_DROPOUT, "--warmup", "0"])
    return Trainer(args, ds)


def _ddp_worker(rank, world, init_file, out, seed):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ds, batch = _fixed_problem(seed)
    tr = _make_trainer(out, seed, ds)
    half = {k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()}
    tr.train_step(half)
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
    if rank == 0:
        torch.save({"params": tr.model.state_dict(), "grads": grads}, os.path.join(out, "ddp.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_gloo_equals_one_process_on_combined_batch(tmp_path, seed):
    s = seed % 1000
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), s), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    ds, batch = _fixed_problem(s)
    tr = _make_trainer(str(tmp_path / "one"), s, ds)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.train_step(batch)
    for n, p in tr.model.named_parameters():
        assert torch.allclose(got["grads"][n], p.grad, rtol=1e-4, atol=1e-7), n
    assert _max_diff(got["params"], tr.model.state_dict()) <= 1e-6
    assert _max_diff(before, tr.model.state_dict()) > 1e-3  # the step did move the weights


# -----------------------------------------------------------------------------------------------
# CLI errors and the sample CLI
# -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--method", "nope"], "--method 'nope' is not registered"),
    (["--model", "huge/3"], "--model 'huge/3' is unknown"),
    (["--lr", "-1"], "--lr must be a positive"),
    (["--ema", "1.5"], "--ema must lie"),
    (["--backend", "gpu"], "invalid choice"),
    (["--backend", "cuda", "--device", "cpu"], "--backend cuda cannot run on cpu"),
    (["--batch-size", "x"], "invalid int"),
    (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
    (["--resume", "/no/such.pt"], "/no/such.pt"),
    (["--model-kwargs", '{"depthh": 3}'], "--model-kwargs: unknown backbone option(s) ['depthh']"),
    (["--out", __file__], "is an existing file, not a folder"),
])
def test_bad_cli_args_are_argparse_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        train_mod.main(argv + ["--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_batch_not_divisible_by_world(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        train_mod.main(["--batch-size", "16"])
    assert "not divisible by WORLD_SIZE=3" in capsys.readouterr().err


def test_bad_data_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "lat.npz"
    np.savez(bad, x=np.zeros((4, 1, 8, 8), np.float32))
    for data, match in ((str(tmp_path / "missing"), "does not exist"), (str(bad), "no label array")):
        assert train_mod.main(small_args(tmp_path / "o", "--data", data, "--steps", "1")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("effkernels-train: error:") and match in err and "\n" not in err


def test_sample_cli_from_checkpoint(tmp_path, seed, capsys):
    from PIL import Image

    assert train_mod.main(small_args(tmp_path / "run", "--steps", "2", "--seed", str(seed % 1000))) == 0
    out = str(tmp_path / "s" / "grid")
    assert sample_mod.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--out", out, "--num", "12",
                            "--steps", "3", "--cfg-scale", "2", "--guidance-high", "0.7"]) == 0
    z = np.load(out + ".npz")
    assert z["images"].shape == (12, 1, 8, 8) and z["labels"].tolist() == [i % 10 for i in range(12)]
    assert np.abs(z["images"]).max() <= 1.0
    assert Image.open(out + ".png").size[0] >= 32
    assert sample_mod.main(["--ckpt", str(tmp_path / "nope.pt"), "--out", out]) == 2
    assert "nope.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_mod.main(["--ckpt", "x", "--out", out, "--steps", "0"])


# -----------------------------------------------------------------------------------------------
# The README's main job (slow): defaults on digits reach the quality bar
# -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_digits_job_quality(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EFFKERNELS_CACHE", str(tmp_path / "cache"))  # train the feature classifier afresh
    assert train_mod.main(["--out", str(tmp_path / "digits")]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("final: "))
    print(final)
    assert final["classifier_acc"] >= 0.95
    assert final["acc"] >= 0.80, final
    assert final["fd"] <= 0.2 * final["fd_init"], final
    for f in ("curves.png", "metrics.csv", "metrics.jsonl", "last.pt", "samples_001000.png"):
        assert (tmp_path / "digits" / f).exists(), f
    assert load_digits().fingerprint()  # the classifier was keyed by this data's hash
