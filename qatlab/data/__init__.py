"""Datasets: MNIST-1D (generated offline), scikit-learn digits, CIFAR-10/100, ImageFolder.

``load(name, ...)`` returns a :class:`DataBundle` of train/val/test splits; ``make_loader``
yields ``(x, y)`` batches whose order and augmentation are a pure function of
``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from qatlab.data.augment import CropFlip
from qatlab.data.bundle import DATASETS, DataBundle, load
from qatlab.data.imagefolder import ImageFolderDataset
from qatlab.data.loader import ArrayDataset, make_loader

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "CropFlip",
    "DataBundle",
    "ImageFolderDataset",
    "load",
    "make_loader",
]
