"""MNIST-1D generated offline with the ``mnist1d`` package and cached as ``.npz``."""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qatlab.errors import ConfigError, DataError

Split = tuple[Tensor, Tensor]
_FORMAT = 1  # bump when the cached arrays change meaning
_KEYS = ("x", "y", "x_test", "y_test")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$QATLAB_CACHE``, else ``~/.cache/qatlab``."""
    root = cache_dir or os.environ.get("QATLAB_CACHE") or Path.home() / ".cache" / "qatlab"
    return Path(root).expanduser()


def load_mnist1d(
    num_samples: int = 10_000, cache_dir: str | Path | None = None
) -> tuple[Split, Split]:
    """``((x_train, y_train), (x_test, y_test))``: x float32 ``(N, 1, 40)``, y int64.

    Uses the package's own arguments (seed 42, ``train_split`` 0.8) with ``num_samples``
    set (rounded down to a multiple of 10 by the generator). Generation takes seconds, so
    the arrays are cached under ``cache_dir`` in a file keyed by a hash of the arguments.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 20:
        raise ConfigError(f"mnist1d num_samples must be an integer >= 20, got {num_samples!r}")
    try:
        from mnist1d.data import get_dataset_args
    except ImportError:
        raise DataError("mnist1d needs the 'mnist1d' package: pip install 'qatlab[data]'") from None
    args = get_dataset_args()
    args.num_samples = num_samples
    key = {"format": _FORMAT, **{k: v for k, v in vars(args).items() if k != "url"}}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_root(cache_dir) / f"mnist1d-{digest}.npz"
    arrays = _read_cache(path)
    if arrays is None:
        arrays = _generate(args)
        _write_cache(path, arrays)

    def tensors(x: np.ndarray, y: np.ndarray) -> Split:
        return torch.from_numpy(x).float().unsqueeze(1), torch.from_numpy(y).long()

    return tensors(arrays["x"], arrays["y"]), tensors(arrays["x_test"], arrays["y_test"])


def _generate(args) -> dict[str, np.ndarray]:
    """Run the generator, leaving Python's and NumPy's global RNG state as it found them
    (``make_dataset`` reseeds both)."""
    from mnist1d.data import make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.asarray(data[k]) for k in _KEYS}


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if the file is missing or unreadable (then regenerate)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            return {k: f[k] for k in _KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + ``os.replace``); an unwritable cache only warns."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not cache MNIST-1D at {path} ({exc}); set QATLAB_CACHE", stacklevel=3)
