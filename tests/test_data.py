"""Data: real on-disk formats written by the tests, deterministic loaders, splits, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import qatlab.data as D
from qatlab.errors import ConfigError, DataError


def _write_cifar(root, name, per_file=12):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": b"labels" for i in range(1, 6)} | {"test_batch": b"labels"}
        classes = 10
    else:
        folder = root / "cifar-100-python"
        files = {"train": b"fine_labels", "test": b"fine_labels"}
        classes = 100
    folder.mkdir(parents=True)
    for fname, key in files.items():
        entry = {
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, per_file).tolist(),
        }
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f)
    return folder


@pytest.mark.parametrize("name,classes,train_n", [("cifar10", 10, 60), ("cifar100", 100, 12)])
def test_cifar_reads_real_pickle_format(tmp_path, name, classes, train_n):
    folder = _write_cifar(tmp_path, name)
    bundle = D.load(name, data_dir=tmp_path, val_fraction=0.25)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == classes
    assert len(bundle.train) + len(bundle.val) == train_n and len(bundle.test) == 12
    with open(folder / ("test_batch" if name == "cifar10" else "test"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    first = torch.tensor(raw[b"data"][0].reshape(3, 32, 32), dtype=torch.float32) / 255
    mean = torch.tensor(D.sources._CIFAR_MEAN[name]).view(3, 1, 1)
    std = torch.tensor(D.sources._CIFAR_STD[name]).view(3, 1, 1)
    assert torch.allclose(bundle.test.x[0], (first - mean) / std, atol=1e-5)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    assert bundle.test.y[0] == raw[label_key][0]
    # augmentation changes pixels, keeps shape; val/test are never augmented
    x, _ = next(iter(D.make_loader(bundle.train, 8, shuffle=False)))
    plain = bundle.train_eval.x[:8]
    assert x.shape == plain.shape and not torch.equal(x, plain)
    xv, _ = next(iter(D.make_loader(bundle.val, 4, shuffle=False)))
    assert torch.equal(xv, bundle.val.x[:4])


def test_cifar_missing_folder_names_expected_path(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py") as err:
        D.load("cifar10", data_dir=tmp_path)
    assert "\n" not in str(err.value) and "download" in str(err.value)


def test_imagefolder_reads_pngs(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for cls, color in (("cat", 200), ("dog", 30)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 12), (color, i * 10, 0)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    bundle = D.load("imagefolder", data_dir=tmp_path, image_size=16, val_fraction=0.25)
    assert bundle.num_classes == 2 and bundle.input_shape == (3, 16, 16)
    assert len(bundle.train) == 6 and len(bundle.val) == 2 and len(bundle.test) == 4
    x, y = bundle.test[0]
    assert x.shape == (3, 16, 16) and int(y) == 0
    assert float(bundle.test[0][0][0].mean()) > float(bundle.test[3][0][0].mean())  # cat brighter
    with pytest.raises(DataError, match="image folder not found"):
        D.load("imagefolder", data_dir=tmp_path / "nope")


def test_mnist1d_generated_cached_and_split(tmp_path, monkeypatch):
    bundle = D.load("mnist1d", num_samples=500, cache_dir=tmp_path)
    assert bundle.input_shape == (1, 40) and bundle.num_classes == 10
    assert len(bundle.train) + len(bundle.val) == 400 and len(bundle.test) == 100
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    import mnist1d.data

    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda *a, **k: 1 / 0)
    again = D.load("mnist1d", num_samples=500, cache_dir=tmp_path)  # from the cache
    assert torch.equal(again.train.x, bundle.train.x)
    other = D.load("mnist1d", num_samples=500, cache_dir=tmp_path, seed=1)
    assert not torch.equal(other.val.x, bundle.val.x)
    val_rows = {tuple(r.tolist()) for r in bundle.val.x.flatten(1)}
    assert not any(tuple(r.tolist()) in val_rows for r in bundle.train.x.flatten(1))


def test_digits_shapes():
    bundle = D.load("digits")
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="did you mean 'mnist1d'"):
        D.load("mnist")


def test_loader_deterministic_and_sharded():
    ds = D.ArrayDataset(torch.arange(50.0)[:, None], torch.arange(50))
    a = [y.tolist() for _, y in D.make_loader(ds, 8, shuffle=True, seed=3, epoch=2)]
    b = [y.tolist() for _, y in D.make_loader(ds, 8, shuffle=True, seed=3, epoch=2)]
    c = [y.tolist() for _, y in D.make_loader(ds, 8, shuffle=True, seed=3, epoch=3)]
    assert a == b and a != c and len(D.make_loader(ds, 8, shuffle=True)) == 7
    assert sorted(sum(a, [])) == list(range(50))
    shards = [
        sum((y.tolist() for _, y in D.make_loader(ds, 5, shuffle=True, rank=r, world_size=2)), [])
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 25
    assert set(shards[0]) | set(shards[1]) == set(range(50)) and not set(shards[0]) & set(shards[1])
