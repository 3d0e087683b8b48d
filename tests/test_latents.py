"""Latent folders as users prepare them (fast-DiT's features/ + labels/, REPA's vae-sd/ + images/):
what is read equals what was written, REPA's posterior draw and scale, the flip, per-epoch shuffling,
training through the CLI, workers = in-process batches, bounded reads, and exact resume."""
import json
import os

import numpy as np
import pytest
import torch
from effkernels.models.cli import train as train_mod
from effkernels.models.train.trainer import Trainer
from effkernels.models.checkpoint import load_checkpoint
from effkernels.models.data.sources import DataError, load_dataset
from effkernels.models.train.batches import epoch_batch_indices, make_loader, sample_seed, step_keys
from effkernels.models.data.latents import SD_VAE_SCALE, LatentFolder
from effkernels.models.methods import METHODS
from effkernels.models.methods.base import Method

SMALL = '{"depth": 2, "hidden_size": 32, "num_heads": 2}'


def write_fast_dit(root, n, *, c=4, s=8, ncls=3, seed=0, dirs=("features", "labels")):
    """fast-DiT's extract_features.py layout: one (1, C, s, s) latent and one (1,) label per file."""
    g = np.random.default_rng(seed)
    fd, ld = (os.path.join(root, d) for d in dirs)
    os.makedirs(fd), os.makedirs(ld)
    x = g.standard_normal((n, 1, c, s, s)).astype(np.float32)
    y = g.integers(0, ncls, (n, 1))
    y[0, 0] = ncls - 1  # the class count follows from the largest label
    for i in range(n):
        np.save(os.path.join(fd, f"{i}.npy"), x[i])
        np.save(os.path.join(ld, f"{i}.npy"), y[i])
    return x[:, 0], y[:, 0]


def write_repa(root, n, *, s=8, ncls=3, seed=0, images=True):
    """REPA's preprocessing layout: vae-sd/00000/img-mean-std-XXXXXXXX.npy (8, s, s) (mean, std) with
    vae-sd/dataset.json, and images/00000/imgXXXXXXXX.png (8s x 8s RGB) with images/dataset.json.
    Sample i's mean is i everywhere and its image's pixels are i, so a batch shows its pairing."""
    from PIL import Image

    g = np.random.default_rng(seed)
    mean = np.arange(n, dtype=np.float32)[:, None, None, None] + 0.1 * g.standard_normal((n, 4, s, s)).astype(np.float32)
    std = (0.05 + g.random((n, 4, s, s))).astype(np.float32)
    y = g.integers(0, ncls, n)
    y[0] = ncls - 1
    os.makedirs(os.path.join(root, "vae-sd", "00000"))
    labels, ilabels = [], []
    for i in range(n):
        name = f"00000/img-mean-std-{i:08d}.npy"
        np.save(os.path.join(root, "vae-sd", name), np.concatenate([mean[i], std[i]]))
        labels.append([name, int(y[i])])
        if images:
            os.makedirs(os.path.join(root, "images", "00000"), exist_ok=True)
            im = np.full((8 * s, 8 * s, 3), i % 256, np.uint8)
            im[:, : 4 * s, 0] = 255 - i % 256  # left half differs from the right: a flip shows
            iname = f"00000/img{i:08d}.png"
            Image.fromarray(im).save(os.path.join(root, "images", iname))
            ilabels.append([iname, int(y[i])])
    with open(os.path.join(root, "vae-sd", "dataset.json"), "w") as f:
        json.dump({"labels": labels}, f)
    if images:
        with open(os.path.join(root, "images", "dataset.json"), "w") as f:
            json.dump({"labels": ilabels}, f)
    return mean, std, y


# -----------------------------------------------------------------------------------------------
# Reading
# -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dirs", [("features", "labels"), ("imagenet256_features", "imagenet256_labels")])
def test_fast_dit_folder_reads_what_was_written(tmp_path, seed, dirs):
    x, y = write_fast_dit(str(tmp_path), 12, seed=seed, dirs=dirs)  # 12: 10.npy and 11.npy sort after 2.npy
    ds = load_dataset(str(tmp_path))
    assert isinstance(ds, LatentFolder) and ds.layout == "fast-dit"
    assert (len(ds), ds.channels, ds.size, ds.num_classes, ds.value_range, ds.extras) == (12, 4, 8, 3, None, ())
    for i in (0, 2, 10, 11):
        it = ds[i]
        assert torch.equal(it["x"], torch.from_numpy(x[i])) and int(it["y"]) == y[i]
    ds.hflip = True  # the flip mirrors the last axis for about half the seeds, and only then
    flips = [torch.equal(ds[(3, s)]["x"], torch.from_numpy(x[3]).flip(-1)) for s in range(40)]
    same = [torch.equal(ds[(3, s)]["x"], torch.from_numpy(x[3])) for s in range(40)]
    assert all(a != b for a, b in zip(flips, same)) and 8 < sum(flips) < 32


def test_repa_folder_draws_the_posterior_each_use_at_sd_scale(tmp_path, seed):
    mean, std, y = write_repa(str(tmp_path), 6, seed=seed)
    ds = load_dataset(str(tmp_path))
    assert ds.layout == "repa" and (len(ds), ds.channels, ds.size, ds.extras) == (6, 4, 8, ("image",))
    assert [int(ds[i]["y"]) for i in range(6)] == y.tolist()
    # no seed: the posterior mean, scaled; a seed: 0.18215 (mean + std eps) with that seed's eps
    torch.testing.assert_close(ds[4]["x"], SD_VAE_SCALE * torch.from_numpy(mean[4]), rtol=0, atol=0)
    s = sample_seed(seed, 7, 2)
    eps = torch.randn(mean[4].shape, generator=torch.Generator().manual_seed(s))
    want = SD_VAE_SCALE * (torch.from_numpy(mean[4]) + torch.from_numpy(std[4]) * eps)
    torch.testing.assert_close(ds[(4, s)]["x"], want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ds[(4, s)]["x"], ds[(4, s + 1)]["x"])  # another use, another draw
    # the raw image rides along (uint8, CHW as REPA's loader) only when asked for, flipped with its latent
    assert "image" not in ds[4]
    ds.with_image, ds.hflip = True, True
    for k in range(12):
        it = ds[(4, sample_seed(seed, k, 0))]
        im, flipped = it["image"], it["image"][0, 0, 0] == 4  # unflipped: the left half is 255 - 4
        assert im.dtype == torch.uint8 and im.shape == (3, 64, 64) and int(im[1, 0, 0]) == 4
        g = torch.Generator().manual_seed(sample_seed(seed, k, 0))
        z = SD_VAE_SCALE * (torch.from_numpy(mean[4]) + torch.from_numpy(std[4]) * torch.randn(mean[4].shape, generator=g))
        torch.testing.assert_close(it["x"], z.flip(-1) if flipped else z, rtol=1e-6, atol=1e-7)


def test_bad_folders_are_errors_naming_the_problem(tmp_path):
    write_fast_dit(str(tmp_path / "a"), 4)
    os.unlink(tmp_path / "a" / "labels" / "3.npy")
    with pytest.raises(DataError, match="4 feature files but 3 label files"):
        load_dataset(str(tmp_path / "a"))
    write_repa(str(tmp_path / "b"), 3, images=False)
    with open(tmp_path / "b" / "vae-sd" / "dataset.json", "w") as f:
        json.dump({"labels": [["00000/img-mean-std-00000000.npy", 1]]}, f)
    with pytest.raises(DataError, match="has no label for"):
        load_dataset(str(tmp_path / "b"))
    os.unlink(tmp_path / "b" / "vae-sd" / "dataset.json")
    with pytest.raises(DataError, match="no dataset.json"):
        load_dataset(str(tmp_path / "b"))
    write_fast_dit(str(tmp_path / "c"), 3)
    with pytest.raises(DataError, match="streamed from disk"):
        _ = load_dataset(str(tmp_path / "c")).x


# -----------------------------------------------------------------------------------------------
# Batches
# -----------------------------------------------------------------------------------------------

def test_epoch_shuffling_is_one_permutation_per_epoch_and_stateless():
    n, b = 11, 3  # 3 batches an epoch, 2 samples dropped (drop_last)
    epochs = [torch.cat([epoch_batch_indices(n, b, 5, s) for s in range(e * 3, e * 3 + 3)]) for e in range(3)]
    for e in epochs:
        assert len(e) == 9 and len(set(e.tolist())) == 9  # no sample twice in an epoch
    assert not torch.equal(epochs[0], epochs[1])  # a fresh permutation each epoch
    assert torch.equal(epoch_batch_indices(n, b, 5, 4), epochs[1][3:6])  # a function of the step alone
    with pytest.raises(DataError, match="at least one full batch"):
        epoch_batch_indices(2, 3, 0, 0)


def test_worker_pool_gives_the_in_process_batches(tmp_path, seed):
    write_repa(str(tmp_path), 20, images=True)
    ds = load_dataset(str(tmp_path))
    ds.with_image, ds.hflip = True, True
    loader = make_loader(ds, 6, seed, 3, 7, shuffle="epoch", rank=1, world=2, workers=2)
    assert loader.num_workers == 2 and loader.prefetch_factor == 2  # at most 4 batches read ahead
    got = list(loader)
    assert len(got) == 4
    for step, b in zip(range(3, 7), got):
        keys = step_keys(20, 6, seed, step, shuffle="epoch", rank=1, world=2)
        assert b["x"].shape == (3, 4, 8, 8) and b["image"].shape == (3, 3, 64, 64)
        for row, k in enumerate(keys):
            assert torch.equal(b["x"][row], ds[k]["x"]) and torch.equal(b["image"][row], ds[k]["image"])


# -----------------------------------------------------------------------------------------------
# Training through the CLI
# -----------------------------------------------------------------------------------------------

def _args(out, data, *extra):
    return ["--out", str(out), "--data", str(data), "--model-kwargs", SMALL, "--batch-size", "8", "--eval-every", "0",
            "--quiet", "--warmup", "0", "--log-every", "1", *extra]


def test_fast_dit_trains_and_reads_a_bounded_number_of_samples(tmp_path, seed):
    """The same 3 steps on a data set 10x larger read exactly as many samples: the batches, never the set."""
    reads = []
    for n in (40, 400):  # both larger than batch x steps = 24
        root = tmp_path / f"d{n}"
        write_fast_dit(str(root), n, seed=seed)
        a = train_mod.parse_args(_args(tmp_path / f"o{n}", root, "--steps", "3", "--data-workers", "0",
                                       "--shuffle", "epoch"))
        tr = Trainer(a)
        assert isinstance(tr.ds, LatentFolder) and tr.model.in_channels == 4 and tr.model.num_classes == 3
        before = tr.ds.reads
        res = tr.run()
        assert res["step"] == 3
        reads.append(tr.ds.reads - before)
    assert reads == [24, 24]  # (the CLI with a worker pool: the resume test below)


class ToyImage(Method):
    """Sees the raw image beside its latent (as REPA's encoder does)."""
    batch_keys = ("image",)
    seen: list = []  # noqa: RUF012 - shared on purpose: the test reads what the trainer's instance saw

    def extra_losses(self, out, model, batch, step):
        ToyImage.seen.append((batch["x"].clone(), batch["image"].clone()))
        return {}


def test_repa_folder_trains_with_the_image_beside_its_latent(tmp_path, seed, monkeypatch):
    monkeypatch.setitem(METHODS, "toy_image", ToyImage)
    write_repa(str(tmp_path / "d"), 12, seed=seed)
    ToyImage.seen.clear()
    assert train_mod.main(_args(tmp_path / "o", tmp_path / "d", "--steps", "2", "--method", "toy_image",
                                "--data-workers", "0", "--hflip")) == 0
    assert len(ToyImage.seen) == 2
    for x, im in ToyImage.seen:
        assert im.shape == (8, 3, 64, 64) and im.dtype == torch.uint8
        # sample i has mean ~ i (scaled) and image pixels i: every row's image belongs to its latent
        idx = im[:, 1, 0, 0].long()
        torch.testing.assert_close(x.mean((1, 2, 3)) / SD_VAE_SCALE, idx.float(), rtol=0, atol=0.5)
    # a method without images never reads them
    a = train_mod.parse_args(_args(tmp_path / "o2", tmp_path / "d", "--steps", "1", "--data-workers", "0"))
    tr = Trainer(a)
    assert "image" not in tr.make_batch(0) and tr.ds.with_image is False


def test_resume_with_epoch_shuffle_and_workers_equals_uninterrupted(tmp_path, seed):
    write_repa(str(tmp_path / "d"), 20, seed=seed, images=False)  # 2.5 epochs of batch 8 in 6 steps
    base = ("--seed", str(seed % 1000), "--shuffle", "epoch", "--hflip", "--data-workers", "2")
    assert train_mod.main(_args(tmp_path / "a", tmp_path / "d", "--steps", "6", *base)) == 0
    assert train_mod.main(_args(tmp_path / "b", tmp_path / "d", "--steps", "4", *base)) == 0
    assert train_mod.main(_args(tmp_path / "b", tmp_path / "d", "--steps", "6", "--resume", "auto", *base)) == 0
    a, b = load_checkpoint(str(tmp_path / "a" / "last.pt")), load_checkpoint(str(tmp_path / "b" / "last.pt"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    # and the comparison can fail: another seed's batches give other weights
    assert train_mod.main(_args(tmp_path / "c", tmp_path / "d", "--steps", "6", *base[2:], "--seed",
                                str(seed % 1000 + 1))) == 0
    c = load_checkpoint(str(tmp_path / "c" / "last.pt"))
    assert max((a["model"][k] - c["model"][k]).abs().max().item() for k in a["model"]) > 1e-4
