"""In-memory datasets and a fast, deterministic, shardable batch loader.

Every random choice a loader makes (shuffle order, augmentation) is a pure function of
``(seed, epoch)`` (plus rank and batch index), so a run resumed at epoch k sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from qatlab.errors import ConfigError

Augment = Callable[[Tensor, torch.Generator], Tensor]
"""A batch augmentation: ``(x of shape (N, ...), generator) -> augmented x of the same shape``."""


def stream_seed(*parts: int) -> int:
    """A 63-bit generator seed derived from integers; distinct tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ArrayDataset(Dataset):
    """Samples held as two tensors ``x`` and ``y``, with an optional batch-level augmentation.

    :func:`make_loader` slices whole batches from the tensors (no per-item collate) and applies
    ``augment`` to each batch, which is what makes small-data CPU training fast. Indexing
    (``ds[i]``) returns the stored, un-augmented sample.
    """

    def __init__(self, x: Tensor, y: Tensor, augment: Augment | None = None) -> None:
        if len(x) != len(y):
            raise ConfigError(
                f"x and y differ in length ({len(x)} vs {len(y)}); pass one label per sample"
            )
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def subset(self, idx: Tensor, augment: bool = True) -> ArrayDataset:
        """The samples at ``idx`` (a copy), keeping this dataset's augmentation if ``augment``."""
        return ArrayDataset(self.x[idx], self.y[idx], self.augment if augment else None)

    def without_augmentation(self) -> ArrayDataset:
        """The same samples (shared storage) with augmentation switched off."""
        return ArrayDataset(self.x, self.y, None)

    def tensors_on(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` on ``device``, copied there once and kept (batches are then gathered and
        augmented on that device, with no host-to-device copy per batch)."""
        device = torch.device(device)
        if self.x.device == device:
            return self.x, self.y
        cached = getattr(self, "_on_device", None)
        if cached is None or cached[0] is not self.x or cached[1].device != device:
            cached = (self.x, self.x.to(device), self.y.to(device))
            self._on_device = cached
        return cached[1], cached[2]


class _ArrayLoader:
    """Batches gathered from an :class:`ArrayDataset`'s tensors; identical on every pass."""

    def __init__(
        self,
        ds: ArrayDataset,
        batch_size: int,
        order: Tensor,
        drop_last: bool,
        seeds: tuple,
        device: torch.device | None = None,
    ) -> None:
        self.dataset, self.batch_size, self.order = ds, batch_size, order
        self.drop_last, self.seeds, self.device = drop_last, seeds, device

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        ds = self.dataset
        xs, ys = (ds.x, ds.y) if self.device is None else ds.tensors_on(self.device)
        order = self.order.to(xs.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = xs[idx]
            if ds.augment is not None:  # random draws from a CPU generator: same on any device
                x = ds.augment(x, torch.Generator().manual_seed(stream_seed(*self.seeds, b)))
            yield x, ys[idx]


class _SeededItems(Dataset):
    """``dataset`` read in ``order``; item j augmented with a generator seeded from (seeds, j)."""

    def __init__(self, dataset: Dataset, order: list[int], seeds: tuple) -> None:
        self.dataset, self.order, self.seeds = dataset, order, seeds
        self.augment: Augment | None = getattr(dataset, "augment", None)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset[self.order[j]]
        if self.augment is not None:
            gen = torch.Generator().manual_seed(stream_seed(*self.seeds, j))
            x = self.augment(x.unsqueeze(0), gen).squeeze(0)
        return x, y


def shuffled_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> Tensor:
    """The index order of one epoch: a permutation seeded from (seed, epoch), or 0..n-1."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


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
    device: torch.device | str | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterable[tuple[Tensor, Tensor]]:
    """Batches ``(x, y)`` of ``dataset``; order and augmentation depend only on (seed, epoch).

    ``rank``/``world_size`` give each process a disjoint, equal-size share of the shuffled
    indices (like ``DistributedSampler``: the list is padded by wrapping around to a multiple of
    ``world_size``). The result supports ``len()`` (batches per epoch) and can be iterated
    again with identical batches. :class:`ArrayDataset` batches are sliced from its tensors and
    augmented per batch; any other dataset goes through a ``DataLoader`` (augmenting items
    through the dataset's ``augment`` attribute, if it has one, with seeded generators).

    ``device``: :class:`ArrayDataset` batches are gathered and augmented there (its tensors
    copied there once), e.g. on the GPU; the batches hold the same numbers as on the CPU.
    ``num_workers``/``pin_memory`` go to the ``DataLoader`` of other datasets (workers decode
    items in parallel; pinned batches copy to the GPU asynchronously). Items are augmented
    with per-item seeds, so workers change nothing in the numbers.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank {rank} / world_size {world_size} is invalid; need world_size >= 1 and "
            "0 <= rank < world_size"
        )
    n = len(dataset)
    order = shuffled_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    if world_size > 1 and n > 0:
        per = -(-n // world_size)
        order = order.repeat(-(-per * world_size // n))[: per * world_size][rank::world_size]
    seeds = (seed, epoch, rank)
    if isinstance(dataset, ArrayDataset):
        where = None if device is None else torch.device(device)
        return _ArrayLoader(dataset, batch_size, order, drop_last, seeds, where)
    return DataLoader(
        _SeededItems(dataset, order.tolist(), seeds),
        batch_size=batch_size,
        shuffle=False,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
