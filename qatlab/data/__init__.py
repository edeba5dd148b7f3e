"""Datasets: MNIST-1D (generated offline), scikit-learn digits, CIFAR-10/100, ImageFolder.

``load(name, ...)`` returns a :class:`DataBundle` of train/val/test splits; ``make_loader``
yields ``(x, y)`` batches whose order and augmentation are a pure function of
``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from qatlab.data.loader import ArrayDataset, make_loader
from qatlab.data.sources import DATASETS, DataBundle, load

__all__ = ["DATASETS", "ArrayDataset", "DataBundle", "load", "make_loader"]
