"""In-memory datasets and a fast, deterministic batch loader."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Augment = Callable[[Tensor, torch.Generator], Tensor]


class ArrayDataset(Dataset):
    """Samples held as two tensors, with optional batch-level augmentation.

    Batches are sliced from the tensors directly (no per-item collate), which is what makes
    small-data CPU training fast.
    """

    def __init__(self, x: Tensor, y: Tensor, augment: Augment | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def subset(self, idx: Tensor, augment: bool = True) -> ArrayDataset:
        return ArrayDataset(self.x[idx], self.y[idx], self.augment if augment else None)

    def without_augmentation(self) -> ArrayDataset:
        return ArrayDataset(self.x, self.y, None)


class _ArrayLoader:
    def __init__(
        self,
        ds: ArrayDataset,
        batch_size: int,
        order: Tensor,
        drop_last: bool,
        gen: torch.Generator,
    ) -> None:
        self.ds, self.batch_size, self.order, self.drop_last, self.gen = (
            ds,
            batch_size,
            order,
            drop_last,
            gen,
        )

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for b in range(len(self)):
            idx = self.order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.ds.x[idx]
            if self.ds.augment is not None:
                x = self.ds.augment(x, self.gen)
            yield x, self.ds.y[idx]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
):
    """Batches of ``dataset``; shuffle order and augmentation depend only on (seed, epoch).

    ``rank``/``world_size`` give each process a disjoint, equal-size share (like
    ``DistributedSampler``: the index list is padded by wrapping to a multiple of world_size).
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n = len(dataset)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    if world_size > 1:
        per = -(-n // world_size)
        order = torch.cat([order, order[: per * world_size - n]])[rank::world_size]
    if isinstance(dataset, ArrayDataset):
        return _ArrayLoader(dataset, batch_size, order, drop_last, gen)
    return DataLoader(
        torch.utils.data.Subset(dataset, order.tolist()),
        batch_size=batch_size,
        shuffle=False,
        drop_last=drop_last,
        num_workers=0,
    )
