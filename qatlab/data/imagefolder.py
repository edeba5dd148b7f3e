"""``<root>/<split>/<class>/*.png|jpg|jpeg`` image trees, decoded with PIL item by item."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from qatlab.data.loader import Augment
from qatlab.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics
STD = (0.229, 0.224, 0.225)


class ImageFolderDataset(Dataset):
    """Image files with labels, decoded to RGB, resized to ``size`` x ``size`` and normalised.

    ``ds[i]`` is the un-augmented image; ``augment`` (a batch augmentation) is applied by
    :func:`qatlab.data.make_loader` with generators seeded from (seed, epoch).
    """

    def __init__(
        self, files: list[tuple[Path, int]], size: int, augment: Augment | None = None
    ) -> None:
        self.files, self.size, self.augment = files, size, augment
        self._mean = torch.tensor(MEAN).view(3, 1, 1)
        self._std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        path, label = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as exc:
            raise DataError(
                f"cannot read image {path} ({exc}); remove or replace the file"
            ) from None
        x = (torch.from_numpy(arr).permute(2, 0, 1) - self._mean) / self._std
        return x, torch.tensor(label, dtype=torch.int64)

    @property
    def targets(self) -> list[int]:
        """The label of every sample (without decoding any image)."""
        return [label for _, label in self.files]

    def subset(self, idx: list[int], augment: bool = True) -> ImageFolderDataset:
        """The samples at ``idx``, keeping this dataset's augmentation if ``augment``."""
        return ImageFolderDataset(
            [self.files[i] for i in idx], self.size, self.augment if augment else None
        )


def scan(
    folder: Path, classes: list[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """``(files with labels, class names)`` of ``folder/<class>/*``; classes sorted, or given
    (then a class sub-folder not among them is an error)."""
    if not folder.is_dir():
        raise DataError(
            f"image folder not found: expected {folder} with one sub-folder of images per class"
        )
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(
                f"{folder} has class folder(s) {extra} that the training set lacks; "
                "use the same class sub-folders in train/ and val/"
            )
    files = [
        (f, c)
        for c, name in enumerate(classes)
        if (folder / name).is_dir()
        for f in sorted((folder / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
    ]
    if not files:
        raise DataError(
            f"no images (.png/.jpg/.jpeg) found under {folder}/<class>/; put each class's "
            "images in its own sub-folder"
        )
    return files, classes
