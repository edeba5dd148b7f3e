"""``load(name)``: a dataset's train/val/test splits as a :class:`DataBundle`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from qatlab.data.augment import CropFlip
from qatlab.data.cifar import load_cifar
from qatlab.data.digits import load_digits
from qatlab.data.imagefolder import ImageFolderDataset, scan
from qatlab.data.loader import ArrayDataset
from qatlab.data.mnist1d import load_mnist1d
from qatlab.errors import ConfigError, DataError

DATASETS: tuple[str, ...] = ("mnist1d", "digits", "cifar10", "cifar100", "imagefolder")


@dataclass
class DataBundle:
    """A dataset split for training.

    ``train`` is augmented on the fly (where the dataset has augmentation); ``val`` (carved
    from the training data with a fixed seed), ``test`` and ``train_eval`` (the ``train``
    samples, un-augmented, for generalization-gap measures) never are.
    """

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
    """Load dataset ``name`` (one of :data:`DATASETS`) as train/val/test splits.

    ``val_fraction`` of the training data becomes ``val`` (a permutation seeded by ``seed``;
    the rest is ``train``). ``num_samples``: MNIST-1D samples to generate (default 10,000),
    or a cap on the CIFAR/ImageFolder training set. ``cache_dir``: where MNIST-1D is cached.
    ``data_dir``: the CIFAR/ImageFolder root. ``image_size``: ImageFolder resize target.
    """
    if name not in DATASETS:
        hint = difflib.get_close_matches(str(name), DATASETS, n=1)
        tip = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown dataset {name!r}{tip}; choose from {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ConfigError(f"num_samples must be a positive integer or None, got {num_samples!r}")
    if name == "imagefolder":
        return _imagefolder(data_dir, val_fraction, seed, augment, num_samples, image_size)
    aug = None
    if name == "mnist1d":
        (xtr, ytr), (xte, yte) = load_mnist1d(num_samples or 10_000, cache_dir)
        classes = 10
    elif name == "digits":
        (xtr, ytr), (xte, yte) = load_digits()
        classes = 10
    else:
        (xtr, ytr), (xte, yte), classes = load_cifar(name, data_dir)
        aug = CropFlip(padding=4) if augment else None
        if num_samples:
            xtr, ytr = xtr[:num_samples], ytr[:num_samples]
    full = ArrayDataset(xtr, ytr, aug)
    val_idx, train_idx = _split(len(full), val_fraction, seed, name)
    train = full.subset(train_idx)
    return DataBundle(
        name=name,
        train=train,
        val=full.subset(val_idx, augment=False),
        test=ArrayDataset(xte, yte),
        train_eval=train.without_augmentation(),
        input_shape=tuple(xtr.shape[1:]),
        num_classes=classes,
    )


def _split(n: int, val_fraction: float, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(val indices, train indices): a permutation of range(n) seeded by ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    if n_val >= n:
        raise ConfigError(
            f"val_fraction {val_fraction} leaves no {name} training samples out of {n}; lower it"
        )
    return perm[:n_val], perm[n_val:]


def _imagefolder(
    data_dir: str | Path | None,
    val_fraction: float,
    seed: int,
    augment: bool,
    num_samples: int | None,
    image_size: int,
) -> DataBundle:
    if data_dir is None:
        raise DataError(
            "imagefolder needs data_dir (--data-dir) pointing at a folder with train/ and val/"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
        raise ConfigError(f"image_size must be an integer >= 4, got {image_size!r}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: expected {root} with train/ and val/ inside")
    files, classes = scan(root / "train")
    test_files, _ = scan(root / "val", classes)
    if num_samples:
        files = files[:num_samples]
    aug = CropFlip(padding=max(1, image_size // 8)) if augment else None
    full = ImageFolderDataset(files, image_size, aug)
    val_idx, train_idx = _split(len(full), val_fraction, seed, "imagefolder")
    train = full.subset(train_idx.tolist())
    return DataBundle(
        name="imagefolder",
        train=train,
        val=full.subset(val_idx.tolist(), augment=False),
        test=ImageFolderDataset(test_files, image_size),
        train_eval=train.subset(list(range(len(train))), augment=False),
        input_shape=(3, image_size, image_size),
        num_classes=len(classes),
    )
