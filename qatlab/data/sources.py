"""Where samples come from: each source returns train/test tensors (or datasets) and a shape."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from qatlab.data.augment import crop_flip, image_folder_dataset
from qatlab.data.loader import ArrayDataset
from qatlab.errors import ConfigError, DataError

DATASETS = ("mnist1d", "digits", "cifar10", "cifar100", "imagefolder")
_CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass
class DataBundle:
    """A dataset split for training: augmented train, un-augmented val/test/train_eval."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    train_eval: Dataset
    input_shape: tuple[int, ...]
    num_classes: int


def load(
    name: str,
    *,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    num_samples: int | None = None,
    cache_dir: str | Path | None = None,
    image_size: int = 64,
) -> DataBundle:
    """Load dataset ``name`` and carve a validation split from train with a fixed seed."""
    if name not in DATASETS:
        hint = difflib.get_close_matches(name, DATASETS, n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown dataset {name!r}{tip}; choose from {', '.join(DATASETS)}")
    if name == "imagefolder":
        return _imagefolder(data_dir, val_fraction, seed, augment, image_size)
    if name == "mnist1d":
        ((xtr, ytr), (xte, yte)), classes = _mnist1d(num_samples or 10_000, cache_dir), 10
        aug = None
    elif name == "digits":
        ((xtr, ytr), (xte, yte)), classes = _digits(), 10
        aug = None
    else:
        (xtr, ytr), (xte, yte), classes = _cifar(name, data_dir)
        aug = crop_flip(padding=4) if augment else None
        if num_samples:
            xtr, ytr = xtr[:num_samples], ytr[:num_samples]
    full = ArrayDataset(xtr, ytr, aug)
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(full) * val_fraction))
    train = full.subset(perm[n_val:])
    return DataBundle(
        name=name,
        train=train,
        val=full.subset(perm[:n_val], augment=False),
        test=ArrayDataset(xte, yte),
        train_eval=train.without_augmentation(),
        input_shape=tuple(xtr.shape[1:]),
        num_classes=classes,
    )


# ----------------------------------------------------------------------------- MNIST-1D
def _cache_root(cache_dir: str | Path | None) -> Path:
    root = cache_dir or os.environ.get("QATLAB_CACHE") or Path.home() / ".cache" / "qatlab"
    return Path(root)


def _mnist1d(num_samples: int, cache_dir: str | Path | None):
    """Generate MNIST-1D offline with the ``mnist1d`` package; cache arrays keyed by its args."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("mnist1d needs the 'mnist1d' package: pip install 'qatlab[data]'") from None
    args = get_dataset_args()
    args.num_samples = num_samples
    key = {k: v for k, v in vars(args).items() if k != "url"} if hasattr(args, "__dict__") else {}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = _cache_root(cache_dir) / f"mnist1d-{digest}.npz"
    if path.is_file():
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        data = make_dataset(args)
        arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def tensors(x, y) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(x).float().unsqueeze(1), torch.from_numpy(y).long()

    return tensors(arrays["x"], arrays["y"]), tensors(arrays["x_test"], arrays["y_test"])


# ----------------------------------------------------------------------------- digits
def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits needs scikit-learn: pip install 'qatlab[data]'") from None
    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4  # roughly zero mean, unit std
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(len(y) * 0.8)
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


# ----------------------------------------------------------------------------- CIFAR
def _cifar(name: str, data_dir: str | Path | None):
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    base = Path(data_dir or "data")
    root = base if base.name == folder else base / folder
    if not root.is_dir():
        raise DataError(
            f"{label} not found: expected {root} (download {archive} from {_CIFAR_URL} and "
            f"extract it into {base}, or pass --data-dir)"
        )
    if name == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = ["test_batch"], b"labels"
    else:
        train_files, test_files, key = ["train"], ["test"], b"fine_labels"

    def read(files):
        xs, ys = [], []
        for f in files:
            path = root / f
            if not path.is_file():
                raise DataError(f"{label} folder {root} is incomplete: {f} is missing")
            try:
                with open(path, "rb") as fh:
                    entry = pickle.load(fh, encoding="bytes")
                xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(entry[key], dtype=np.int64))
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
                raise DataError(f"cannot read {path}: {type(exc).__name__} ({exc})") from None
        x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
        mean = torch.tensor(_CIFAR_MEAN[name]).view(1, 3, 1, 1)
        std = torch.tensor(_CIFAR_STD[name]).view(1, 3, 1, 1)
        return (x - mean) / std, torch.from_numpy(np.concatenate(ys))

    return read(train_files), read(test_files), (10 if name == "cifar10" else 100)


# ----------------------------------------------------------------------------- ImageFolder
def _imagefolder(data_dir, val_fraction, seed, augment, image_size) -> DataBundle:
    if data_dir is None:
        raise DataError("imagefolder needs --data-dir pointing at a folder with train/ and val/")
    root = Path(data_dir)
    train, classes = image_folder_dataset(root / "train", image_size, augment)
    test, _ = image_folder_dataset(root / "val", image_size, False, classes)
    train_eval, _ = image_folder_dataset(root / "train", image_size, False, classes)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(train) * val_fraction))
    sub = torch.utils.data.Subset
    return DataBundle(
        name="imagefolder",
        train=sub(train, perm[n_val:].tolist()),
        val=sub(train_eval, perm[:n_val].tolist()),
        test=test,
        train_eval=sub(train_eval, perm[n_val:].tolist()),
        input_shape=(3, image_size, image_size),
        num_classes=len(classes),
    )
