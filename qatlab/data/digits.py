"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download)."""

from __future__ import annotations

import torch
from torch import Tensor

from qatlab.errors import DataError

Split = tuple[Tensor, Tensor]
MEAN, STD = 0.3, 0.4  # of the pixels scaled to [0, 1] (actual: 0.305, 0.376)


def load_digits() -> tuple[Split, Split]:
    """``((x_train, y_train), (x_test, y_test))``: x float32 ``(N, 1, 8, 8)`` scaled to [0, 1]
    and normalised with a fixed mean/std, y int64; a fixed 80/20 split (seed 0)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError("digits needs scikit-learn: pip install 'qatlab[data]'") from None
    d = sk_digits()
    x = (torch.from_numpy(d.images).float().unsqueeze(1) / 16.0 - MEAN) / STD
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(len(y) * 0.8)
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])
