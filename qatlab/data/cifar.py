"""CIFAR-10/100 from the standard python-pickle folders (``cifar-10-batches-py``,
``cifar-100-python``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qatlab.errors import DataError

Split = tuple[Tensor, Tensor]
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_LAYOUT = {  # folder, archive, pretty name, train files, test files, label key, classes
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        "CIFAR-10",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        "CIFAR-100",
        ["train"],
        ["test"],
        b"fine_labels",
        100,
    ),
}


def load_cifar(name: str, data_dir: str | Path | None = None) -> tuple[Split, Split, int]:
    """``((x_train, y_train), (x_test, y_test), num_classes)`` for ``cifar10``/``cifar100``.

    ``data_dir`` holds the extracted folder (or is that folder itself; default ``./data``).
    x is float32 ``(N, 3, 32, 32)`` normalised with the usual per-channel mean/std; y int64.
    """
    folder, archive, label, train_files, test_files, key, classes = _LAYOUT[name]
    base = Path(data_dir if data_dir is not None else "data").expanduser()
    root = base if base.name == folder or (base / train_files[0]).is_file() else base / folder
    if not root.is_dir():
        raise DataError(
            f"{label} not found: expected {root} (download {archive} from {URL} and "
            f"extract it into {base}, or pass --data-dir)"
        )
    mean = torch.tensor(MEAN[name]).view(1, 3, 1, 1)
    std = torch.tensor(STD[name]).view(1, 3, 1, 1)

    def read(files: list[str]) -> Split:
        xs, ys = [], []
        for fname in files:
            path = root / fname
            if not path.is_file():
                raise DataError(
                    f"{label} folder {root} is incomplete: {fname} is missing (extract "
                    f"{archive} again)"
                )
            try:
                with open(path, "rb") as fh:
                    entry = pickle.load(fh, encoding="bytes")
                x = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(entry[key], dtype=np.int64)
            except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as exc:
                raise DataError(
                    f"cannot read {path} as a {label} batch ({type(exc).__name__}: {exc}); "
                    f"extract {archive} again"
                ) from None
            if len(x) != len(y) or (len(y) and not 0 <= y.min() <= y.max() < classes):
                raise DataError(f"{path} has bad labels for {label}; extract {archive} again")
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
        return x.sub_(mean).div_(std), torch.from_numpy(np.concatenate(ys))

    return read(train_files), read(test_files), classes
