"""Small test helpers shared by several test files (importable as ``helpers``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from qatlab.methods import Hook


class Killer(Hook):
    """Interrupts training (like Ctrl-C) when ``at`` steps are done; ``None`` never does."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def after_step(self, model, step, total_steps):
        if self.at is not None and step + 1 == self.at:
            raise KeyboardInterrupt
        return None


def train_args(out: Path, name: str, data_cfg: dict, *extra: str) -> list[str]:
    """``qatlab train`` of a tiny float mlp5 (one epoch, seconds) on the ``small_data`` fixture;
    ``extra`` flags come last and win (e.g. ``--model cnn1d``)."""
    return [
        "train",
        "--out-dir",
        str(out),
        "--name",
        name,
        "--dataset",
        "mnist1d",
        "--num-samples",
        str(data_cfg["num_samples"]),
        "--model",
        "mlp5",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--quiet",
        "--set",
        f"data.cache_dir={data_cfg['cache_dir']}",
        *extra,
    ]


def free_port() -> int:
    """A free TCP port on loopback, for a two-process gloo run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretend_torchrun(rank: int, port: int, world_size: int = 2) -> None:
    """The environment torchrun gives process ``rank`` (on loopback)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )


class InlineBackend:
    """A ``run_grid`` backend running cells in this process, in submission order (no spawning,
    so a measure or method registered by the test is known)."""

    def __init__(self, *args, **kwargs) -> None:
        self.results: dict[int, dict] = {}

    def submit(self, cell, cells_dir):
        from qatlab.compare.engine import run_cell

        handle = len(self.results)
        self.results[handle] = run_cell(cell.to_dict(), cells_dir)
        return handle

    def wait(self, handles, timeout):
        return [(h, self.results[h]) for h in handles]

    def close(self) -> None:
        pass
