"""Data: real on-disk formats written by the tests, deterministic loaders, splits, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import qatlab.data as D
from qatlab.data import cifar, mnist1d
from qatlab.errors import ConfigError, DataError


# ----------------------------------------------------------------------------- CIFAR
def _write_cifar(root, name, per_file=12):
    """A CIFAR folder in the real pickle format with ``per_file`` random images per file."""
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
            b"batch_label": b"testing batch",
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, per_file).tolist(),
        }
        if key == b"fine_labels":
            entry[b"coarse_labels"] = [c // 5 for c in entry[key]]
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f)
    return folder


def _is_crop_flip(aug: torch.Tensor, orig: torch.Tensor, pad: int = 4) -> bool:
    """Whether ``aug`` is a (possibly flipped) crop of ``orig`` zero-padded by ``pad``."""
    h, w = orig.shape[-2:]
    padded = torch.nn.functional.pad(orig, (pad,) * 4)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            if torch.equal(aug, crop) or torch.equal(aug, crop.flip(-1)):
                return True
    return False


@pytest.mark.parametrize("name,classes,train_n", [("cifar10", 10, 60), ("cifar100", 100, 12)])
def test_cifar_reads_real_pickle_format(tmp_path, name, classes, train_n):
    folder = _write_cifar(tmp_path, name)
    bundle = D.load(name, data_dir=tmp_path, val_fraction=0.25)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == classes
    assert len(bundle.train) + len(bundle.val) == train_n and len(bundle.test) == 12
    assert len(bundle.val) == round(train_n * 0.25)
    assert bundle.test.x.dtype == torch.float32 and bundle.test.y.dtype == torch.int64
    # pixel values and labels are the file's, in order, normalised per channel
    with open(folder / ("test_batch" if name == "cifar10" else "test"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    pixels = torch.tensor(raw[b"data"].reshape(-1, 3, 32, 32), dtype=torch.float32) / 255
    mean = torch.tensor(cifar.MEAN[name]).view(1, 3, 1, 1)
    std = torch.tensor(cifar.STD[name]).view(1, 3, 1, 1)
    assert torch.allclose(bundle.test.x, (pixels - mean) / std, atol=1e-5)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    assert bundle.test.y.tolist() == raw[label_key]
    # data_dir may also be the extracted folder itself
    direct = D.load(name, data_dir=folder, val_fraction=0.25)
    assert torch.equal(direct.test.x, bundle.test.x) and torch.equal(direct.train.y, bundle.train.y)


def test_cifar_augmentation_is_crop_flip_and_deterministic(tmp_path):
    _write_cifar(tmp_path, "cifar10")
    bundle = D.load("cifar10", data_dir=tmp_path, val_fraction=0.25, num_samples=40)
    assert len(bundle.train) + len(bundle.val) == 40
    x, y = next(iter(D.make_loader(bundle.train, 8, shuffle=False)))
    plain = bundle.train_eval.x[:8]
    assert x.shape == plain.shape == (8, 3, 32, 32) and torch.equal(y, bundle.train_eval.y[:8])
    assert not torch.equal(x, plain)  # augmentation changed pixels ...
    assert all(_is_crop_flip(a, o) for a, o in zip(x, plain, strict=True))  # ... by crop/flip
    again = [b[0] for b in D.make_loader(bundle.train, 8, shuffle=True, seed=1, epoch=4)]
    same = [b[0] for b in D.make_loader(bundle.train, 8, shuffle=True, seed=1, epoch=4)]
    other = [b[0] for b in D.make_loader(bundle.train, 8, shuffle=True, seed=1, epoch=5)]
    assert all(torch.equal(a, b) for a, b in zip(again, same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(again, other, strict=True))
    # val, test and train_eval are never augmented
    xv, _ = next(iter(D.make_loader(bundle.val, 4, shuffle=False)))
    assert torch.equal(xv, bundle.val.x[:4])
    no_aug = D.load("cifar10", data_dir=tmp_path, val_fraction=0.25, augment=False)
    assert no_aug.train.augment is None


def test_cifar_missing_or_broken_folder_is_a_one_line_data_error(tmp_path):
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        with pytest.raises(DataError) as err:
            D.load(name, data_dir=tmp_path)
        msg = str(err.value)
        assert str(tmp_path / folder) in msg and "download" in msg and "\n" not in msg
    folder = _write_cifar(tmp_path, "cifar10", per_file=2)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        D.load("cifar10", data_dir=tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        D.load("cifar10", data_dir=tmp_path)


# ----------------------------------------------------------------------------- ImageFolder
def _write_tree(root, n_train=4, n_val=2, classes=(("dog", 30), ("cat", 200))):
    for split, n in (("train", n_train), ("val", n_val)):
        for cls, red in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                ext = "png" if i % 2 == 0 else "jpg"
                Image.new("RGB", (10, 12), (red, 20 * i, 0)).save(root / split / cls / f"{i}.{ext}")


def test_imagefolder_reads_images(tmp_path):
    _write_tree(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    bundle = D.load("imagefolder", data_dir=tmp_path, image_size=16, val_fraction=0.25)
    assert bundle.num_classes == 2 and bundle.input_shape == (3, 16, 16)
    assert len(bundle.train) == 6 and len(bundle.val) == 2 and len(bundle.test) == 4
    assert bundle.test.targets == [0, 0, 1, 1]  # classes sorted: cat=0, dog=1
    x, y = bundle.test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    # red channel of a cat (red 200) vs a dog (red 30), after normalisation
    red = lambda v: (v / 255 - 0.485) / 0.229  # noqa: E731
    assert torch.allclose(bundle.test[0][0][0], torch.full((16, 16), red(200)), atol=1e-5)
    assert torch.allclose(bundle.test[2][0][0], torch.full((16, 16), red(30)), atol=1e-5)
    # train/val are disjoint and cover the training tree
    names = {f.name + f.parent.name for f, _ in bundle.train.files}
    assert len(names) == 6 and not names & {f.name + f.parent.name for f, _ in bundle.val.files}
    # the DataLoader path: augmentation seeded from (seed, epoch), eval splits plain
    runs = [
        [b[0] for b in D.make_loader(bundle.train, 4, shuffle=True, seed=0, epoch=e)]
        for e in (3, 3, 4)
    ]
    assert [b.shape for b in runs[0]] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not torch.equal(torch.cat(runs[0]), torch.cat(runs[2]))
    xs, ys = next(iter(D.make_loader(bundle.train_eval, 6, shuffle=False)))
    assert torch.equal(xs[0], bundle.train_eval[0][0]) and ys.tolist() == bundle.train.targets


def test_imagefolder_missing_or_empty_tree(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        D.load("imagefolder", data_dir=tmp_path / "nope")
    with pytest.raises(DataError, match="needs data_dir"):
        D.load("imagefolder")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        D.load("imagefolder", data_dir=tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "cat" / "a.png")
    with pytest.raises(DataError, match=r"image folder not found: expected .*val"):
        D.load("imagefolder", data_dir=tmp_path)
    (tmp_path / "val" / "bird").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "bird" / "b.png")
    with pytest.raises(DataError, match="bird"):  # a class the training set lacks
        D.load("imagefolder", data_dir=tmp_path)


# ----------------------------------------------------------------------------- MNIST-1D
def test_mnist1d_generated_cached_and_split(tmp_path, monkeypatch):
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    bundle = D.load("mnist1d", num_samples=500, cache_dir=tmp_path)
    assert np.random.rand() == expected_draw  # the generator's reseeding was undone
    assert bundle.input_shape == (1, 40) and bundle.num_classes == 10
    assert len(bundle.train) == 360 and len(bundle.val) == 40 and len(bundle.test) == 100
    assert bundle.train.x.dtype == torch.float32 and bundle.train.y.dtype == torch.int64
    assert sorted(torch.cat([bundle.train.y, bundle.test.y]).unique().tolist()) == list(range(10))
    assert abs(float(torch.cat([bundle.train.x, bundle.val.x, bundle.test.x]).mean())) < 0.05
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob(".*tmp*"))

    import mnist1d.data

    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda *a, **k: 1 / 0)
    again = D.load("mnist1d", num_samples=500, cache_dir=tmp_path)  # from the cache
    assert torch.equal(again.train.x, bundle.train.x) and torch.equal(again.val.y, bundle.val.y)
    other = D.load("mnist1d", num_samples=500, cache_dir=tmp_path, seed=1)
    assert not torch.equal(other.val.x, bundle.val.x)
    rows = lambda x: {tuple(r.tolist()) for r in x.flatten(1)}  # noqa: E731
    train_rows, val_rows = rows(bundle.train.x), rows(bundle.val.x)
    assert len(train_rows) == 360 and len(val_rows) == 40 and not train_rows & val_rows
    assert rows(other.train.x) | rows(other.val.x) == train_rows | val_rows  # same pool
    # a corrupt cache file is regenerated, not trusted
    monkeypatch.undo()
    cached[0].write_bytes(b"garbage")
    fresh = D.load("mnist1d", num_samples=500, cache_dir=tmp_path)
    assert torch.equal(fresh.test.x, bundle.test.x)


def test_mnist1d_cache_location_and_bad_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLAB_CACHE", str(tmp_path / "env"))
    assert mnist1d.cache_root() == tmp_path / "env"
    assert mnist1d.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("QATLAB_CACHE")
    assert mnist1d.cache_root().parts[-2:] == (".cache", "qatlab")
    for bad in (5, 0):
        with pytest.raises(ConfigError):
            D.load("mnist1d", num_samples=bad, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="val_fraction"):
        D.load("mnist1d", val_fraction=1.0, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_split_and_normalisation():
    bundle = D.load("digits", val_fraction=0.1, seed=3)
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (1293, 144, 360)
    x = torch.cat([bundle.train.x, bundle.val.x, bundle.test.x])
    assert abs(float(x.mean())) < 0.05 and 0.85 < float(x.std()) < 1.05
    assert float(x.min()) == pytest.approx(-0.75) and float(x.max()) == pytest.approx(1.75)
    assert sorted(bundle.test.y.unique().tolist()) == list(range(10))
    again = D.load("digits", val_fraction=0.1, seed=3)
    assert torch.equal(again.val.x, bundle.val.x) and torch.equal(again.test.y, bundle.test.y)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="did you mean 'mnist1d'") as err:
        D.load("mnist")
    assert all(name in str(err.value) for name in D.DATASETS)


# ----------------------------------------------------------------------------- make_loader
def test_loader_deterministic_lengths_and_no_per_item_access(monkeypatch):
    ds = D.ArrayDataset(torch.arange(50.0)[:, None], torch.arange(50))
    monkeypatch.setattr(D.ArrayDataset, "__getitem__", lambda *a: 1 / 0)  # batches are sliced
    a = [y.tolist() for _, y in D.make_loader(ds, 8, shuffle=True, seed=3, epoch=2)]
    b = [y.tolist() for _, y in D.make_loader(ds, 8, shuffle=True, seed=3, epoch=2)]
    c = [y.tolist() for _, y in D.make_loader(ds, 8, shuffle=True, seed=3, epoch=3)]
    d = [y.tolist() for _, y in D.make_loader(ds, 8, shuffle=True, seed=4, epoch=2)]
    assert a == b and a != c and a != d
    assert sorted(sum(a, [])) == list(range(50)) and [len(v) for v in a] == [8] * 6 + [2]
    assert len(D.make_loader(ds, 8, shuffle=True)) == 7
    assert len(D.make_loader(ds, 8, shuffle=True, drop_last=True)) == 6
    assert [len(y) for _, y in D.make_loader(ds, 8, shuffle=True, drop_last=True)] == [8] * 6
    plain = [y.tolist() for _, y in D.make_loader(ds, 20, shuffle=False)]
    assert plain == [list(range(20)), list(range(20, 40)), list(range(40, 50))]
    loader = D.make_loader(ds, 8, shuffle=True, seed=3, epoch=2)
    assert [y.tolist() for _, y in loader] == [y.tolist() for _, y in loader] == a


def test_loader_augmentation_is_seeded_per_batch():
    def jitter(x, gen):
        return x + torch.rand(x.shape, generator=gen)

    ds = D.ArrayDataset(torch.zeros(12, 1), torch.arange(12), augment=jitter)
    a = [x for x, _ in D.make_loader(ds, 4, shuffle=True, seed=0, epoch=1)]
    b = [x for x, _ in D.make_loader(ds, 4, shuffle=True, seed=0, epoch=1)]
    c = [x for x, _ in D.make_loader(ds, 4, shuffle=True, seed=0, epoch=2)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not any(torch.equal(u, v) for u, v in zip(a, c, strict=True))
    assert not torch.equal(a[0], a[1])  # each batch draws its own noise


@pytest.mark.parametrize("n,world", [(50, 2), (50, 3), (7, 4)])
def test_loader_shards_are_disjoint_equal_and_cover(n, world):
    ds = D.ArrayDataset(torch.zeros(n, 1), torch.arange(n))
    shards = [
        sum(
            (y.tolist() for _, y in D.make_loader(ds, 5, shuffle=True, rank=r, world_size=world)),
            [],
        )
        for r in range(world)
    ]
    per = -(-n // world)
    assert all(len(s) == per for s in shards)
    assert set().union(*map(set, shards)) == set(range(n))
    if n % world == 0:
        assert sum(len(s) for s in shards) == n == len(set().union(*map(set, shards)))
    loader = D.make_loader(ds, 5, shuffle=True, rank=0, world_size=world)
    assert len(loader) == -(-per // 5)


def test_loader_falls_back_to_dataloader_and_checks_arguments():
    ds = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    a = [y.tolist() for _, y in D.make_loader(ds, 4, shuffle=True, seed=1, epoch=0)]
    b = [y.tolist() for _, y in D.make_loader(ds, 4, shuffle=True, seed=1, epoch=0)]
    assert a == b and sorted(sum(a, [])) == list(range(10)) and len(a) == 3
    for kwargs in ({"batch_size": 0}, {"rank": 2, "world_size": 2}, {"world_size": 0}):
        args = {"batch_size": 4, **kwargs}
        with pytest.raises(ConfigError):
            D.make_loader(ds, args.pop("batch_size"), shuffle=False, **args)
