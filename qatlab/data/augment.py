"""Augmentation (vectorised over a batch) and the ImageFolder reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from qatlab.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def crop_flip(padding: int = 4):
    """Random crop with zero padding and horizontal flip, for a whole batch at once."""

    def augment(x: Tensor, gen: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        padded = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w)
        cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        batch = torch.arange(n)[:, None, None, None]
        chan = torch.arange(x.shape[1])[None, :, None, None]
        result = padded[batch, chan, rows, cols]
        flip = torch.rand(n, generator=gen) < 0.5
        result[flip] = result[flip].flip(-1)
        return result

    return augment


class _ImageFolder(Dataset):
    def __init__(self, files: list[tuple[Path, int]], size: int, augment: bool) -> None:
        self.files, self.size, self.augment = files, size, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        path, label = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((self.size, self.size))
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        x = (torch.from_numpy(arr).permute(2, 0, 1) - 0.45) / 0.25
        if self.augment:
            x = crop_flip(self.size // 8)(
                x[None], torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
            ).squeeze(0)
        return x, torch.tensor(label)


def image_folder_dataset(
    folder: Path, size: int, augment: bool, classes: list[str] | None = None
) -> tuple[Dataset, list[str]]:
    """``folder/<class>/*.png|jpg`` as a dataset; class names sorted (or given)."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: expected {folder} with one sub-folder per class")
    classes = classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [
        (f, c)
        for c, name in enumerate(classes)
        if (folder / name).is_dir()
        for f in sorted((folder / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(f"no images (.png/.jpg) found under {folder}/<class>/")
    return _ImageFolder(files, size, augment), classes
