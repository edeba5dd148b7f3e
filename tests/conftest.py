"""Shared fixtures: a tiny MNIST-1D generated once per session into a temporary cache."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SAMPLES = 1500  # 1080 train / 120 val / 300 test: a few seconds per run on 2 cores


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide data cache folder (MNIST-1D is generated into it once)."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def tiny_data(data_cache: Path):
    """A small MNIST-1D :class:`qatlab.data.DataBundle`."""
    from qatlab import data

    return data.load("mnist1d", num_samples=TINY_SAMPLES, cache_dir=str(data_cache))


@pytest.fixture(scope="session")
def tiny_data_config(data_cache: Path) -> dict:
    """The ``data`` section of a run config that loads :func:`tiny_data`."""
    return {"name": "mnist1d", "num_samples": TINY_SAMPLES, "cache_dir": str(data_cache)}


@pytest.fixture(scope="session")
def small_data(data_cache: Path) -> dict:
    """400 MNIST-1D samples (generated once): a run of one epoch takes a few seconds."""
    from qatlab import data

    data.load("mnist1d", num_samples=400, cache_dir=str(data_cache))
    return {"num_samples": 400, "cache_dir": str(data_cache)}
