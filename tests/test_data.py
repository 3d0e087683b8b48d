"""Data sources: digits, image folders, latent arrays, and the errors bad data gives."""
import numpy as np
import pytest
import torch
from effkernels.models.train.batches import batch_indices
from effkernels.models.data.sources import DataError, load_dataset, load_digits


def test_digits_shape_range_classes():
    ds = load_digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    assert ds.num_classes == 10 and sorted(ds.y.unique().tolist()) == list(range(10))
    assert ds.value_range == (-1.0, 1.0)
    assert load_dataset("digits").fingerprint() == ds.fingerprint()  # stable: it keys the metric cache


def test_fingerprint_changes_with_data_and_split_is_disjoint(seed):
    ds = load_digits()
    other = load_digits()
    other.x[0, 0, 0, 0] += 0.5
    assert other.fingerprint() != ds.fingerprint()
    tr, ho = ds.split(0.2, seed)
    assert len(tr) + len(ho) == 1797 and len(set(tr.tolist()) & set(ho.tolist())) == 0
    assert abs(len(ho) - 359) <= 1


def _write_folder(root, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, n in (("cat", 3), ("ant", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            size = 12 if i % 2 else 16  # mixed sizes: the loader resizes to the first one's
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image, skipped")


def test_image_folder(tmp_path, seed):
    _write_folder(tmp_path / "imgs", seed)
    ds = load_dataset(str(tmp_path / "imgs"), image_size=8)
    assert ds.x.shape == (5, 3, 8, 8) and ds.num_classes == 2
    assert ds.y.tolist() == [0, 0, 1, 1, 1]  # sorted class names: ant=0, cat=1
    assert ds.x.min() >= -1 and ds.x.max() <= 1


def test_image_folder_errors_name_the_file(tmp_path, seed):
    _write_folder(tmp_path / "imgs", seed)
    bad = tmp_path / "imgs" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(str(tmp_path / "imgs"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(str(tmp_path / "empty"))


def test_npz_latents(tmp_path, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((7, 4, 4, 4)).astype(np.float32) * 3
    y = rng.integers(0, 5, 7)
    y[0] = 4
    np.savez(tmp_path / "lat.npz", latents=x, labels=y)
    ds = load_dataset(str(tmp_path / "lat.npz"))
    assert torch.equal(ds.x, torch.from_numpy(x)) and ds.y.tolist() == y.tolist()
    assert ds.num_classes == 5 and ds.value_range is None  # latents are not clamped by samplers


def test_npy_latents_with_and_without_labels(tmp_path, seed):
    x = np.random.default_rng(seed).standard_normal((3, 2, 4, 4))
    np.save(tmp_path / "a.npy", x)
    ds = load_dataset(str(tmp_path / "a.npy"))
    assert ds.y.tolist() == [0, 0, 0] and ds.num_classes == 1 and ds.x.dtype == torch.float32
    np.save(tmp_path / "a_labels.npy", np.array([2, 0, 1]))
    assert load_dataset(str(tmp_path / "a.npy")).y.tolist() == [2, 0, 1]


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("no_labels", "no label array"),
    ("three_dims", "N, C, H, W"),
    ("float_labels", "integer"),
    ("nan", "NaN"),
    ("garbage", "cannot be read"),
    ("wrong_ext", "neither .npz nor .npy"),
    ("label_count", "labels of shape"),
    ("not_square", "square"),
])
def test_bad_latent_files_name_the_file(tmp_path, case, match):
    p = tmp_path / f"{case}.npz"
    x = np.zeros((4, 2, 4, 4), np.float32)
    if case == "no_labels":
        np.savez(p, x=x)
    elif case == "three_dims":
        np.savez(p, x=x[:, 0], y=np.zeros(4, np.int64))
    elif case == "float_labels":
        np.savez(p, x=x, y=np.zeros(4))
    elif case == "nan":
        x[1, 0, 0, 0] = np.nan
        np.savez(p, x=x, y=np.zeros(4, np.int64))
    elif case == "garbage":
        p.write_bytes(b"this is not a zip file")
    elif case == "wrong_ext":
        p = tmp_path / "data.csv"
        p.write_text("1,2,3")
    elif case == "label_count":
        np.savez(p, x=x, y=np.zeros(3, np.int64))
    elif case == "not_square":
        np.savez(p, x=np.zeros((4, 2, 4, 5), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=match) as e:
        load_dataset(str(p))
    assert p.name in str(e.value)


def test_bad_spec():
    with pytest.raises(DataError, match="'digits' or a path"):
        load_dataset("")


def test_batch_indices_stateless(seed):
    a, b = batch_indices(100, 32, seed, 5), batch_indices(100, 32, seed, 5)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 100
    assert not torch.equal(a, batch_indices(100, 32, seed, 6))
    assert not torch.equal(a, batch_indices(100, 32, seed + 1, 5))
