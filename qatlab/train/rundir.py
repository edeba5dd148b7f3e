"""Exclusive run folders: one training process writes into a run folder at a time.

:func:`claim_run_dir` holds an OS lock (``flock``) on the run folder itself for the whole run,
so a second ``qatlab train`` with the same ``--name`` is refused with one line instead of
mixing its files into the first run's. The kernel drops the lock when the holder exits or is
killed, so a crashed run never leaves the folder locked; the folder itself is the lock, so no
lock file is left behind. Under the lock the claim checks what the folder holds (a fresh run
never overwrites a run; ``--resume`` needs something to resume) and removes temp files that a
kill during an atomic write left behind. A folder the claim created is removed again when it
is released still empty (the run failed before writing anything), so bad input leaves no
trace.

Under torchrun only rank 0 writes, so only rank 0 claims (checks and locks); if it is
refused, torchrun stops the other ranks.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from qatlab.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; the checks still run
    fcntl = None  # type: ignore[assignment]

RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "summary.json")  # what makes a folder a run
_local = threading.local()  # run folders this thread holds (fit() inside run() reuses the claim)


def _held() -> set[str]:
    if not hasattr(_local, "held"):
        _local.held = set()
    return _local.held


def check_run_dir(run_dir: Path) -> None:
    """A fresh run never writes into a folder that already holds one."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing:
        raise ConfigError(
            f"{run_dir} already holds a run ({existing[0]}); pass --resume to continue it, "
            "or choose another --name / --out-dir"
        )


def resume_point(run_dir: Path) -> bool:
    """Whether ``run_dir`` can be resumed: True if it has a ``ckpt.pt`` to continue from,
    False if the run stopped before its first checkpoint was whole (only ``config.yaml`` and
    the epoch-0 record exist, or it was killed while writing that ``ckpt.pt``, after epoch 1's
    ``best.pt``): it starts over in place, which is exactly the uninterrupted run.

    Anything else cannot be resumed and raises one :class:`ConfigError` line: no run at all
    (a mistyped ``--name``), or a finished run whose ``ckpt.pt`` is gone.
    """
    run_dir = Path(run_dir)
    if (run_dir / "ckpt.pt").is_file():
        return True
    if _killed_in_first_checkpoint(run_dir):
        return False  # starting over rewrites the same best.pt: nothing is lost
    done = [n for n in ("best.pt", "summary.json") if (run_dir / n).exists()]
    if done:
        raise ConfigError(
            f"cannot resume {run_dir}: its ckpt.pt is missing ({done[0]} is there), so there is "
            "no training state to continue; nothing was changed. Train it again under a new "
            "--name"
        )
    if not any((run_dir / n).is_file() for n in ("config.yaml", "metrics.jsonl")):
        raise ConfigError(
            f"nothing to resume: no run in {run_dir}; check --name and --out-dir "
            "(drop --resume to start a new run)"
        )
    return False


def _killed_in_first_checkpoint(run_dir: Path) -> bool:
    """A run killed while writing its first ``ckpt.pt``: ``best.pt`` of epoch 1 is there (it is
    written first), ``summary.json`` is not, and the log holds no epoch after the first."""
    from qatlab.train.metrics import read_jsonl

    if (run_dir / "summary.json").exists() or not (run_dir / "best.pt").is_file():
        return False
    records = read_jsonl(run_dir / "metrics.jsonl")
    return bool(records) and max(r.get("epoch", 0) for r in records) <= 1


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path, *, resume: bool = False) -> Iterator[bool]:
    """Hold ``run_dir`` exclusively for a training run; yield whether there is a ``ckpt.pt``
    to resume from.

    Refused with one :class:`ConfigError` line (and nothing touched) when another process
    holds the folder, when a fresh run (``resume=False``) finds a run there, or when
    ``resume=True`` finds nothing to resume (:func:`resume_point`). A nested claim of a folder
    this thread already holds (``fit`` inside ``run``) just yields.
    """
    run_dir = Path(run_dir)
    key = os.path.abspath(run_dir)
    held = _held()
    if key in held or int(os.environ.get("RANK", "0")) != 0:
        yield resume and (run_dir / "ckpt.pt").is_file()
        return
    if resume:
        resume_point(run_dir)  # a mistyped --name is refused before anything is created
    created = _missing_dirs(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock(run_dir)
    try:
        if resume:
            resuming = resume_point(run_dir)  # again, under the lock
        else:
            check_run_dir(run_dir)
            resuming = False
        clean_stale_temp_files(run_dir)
        held.add(key)
        try:
            yield resuming
        finally:
            held.discard(key)
    finally:
        # a run that wrote nothing (it failed before training) leaves no folder behind;
        # this also works when the claim is released without the exception (ExitStack.close)
        for path in created:  # deepest first; a folder with anything in it stays
            try:
                path.rmdir()
            except OSError:
                break
        if fd is not None:
            os.close(fd)  # releases the flock


def clean_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove ``.<name>.<random>.tmp`` files that a kill during an atomic write left behind
    (call only while holding the folder: a live writer's temp file looks the same)."""
    stale = [p for p in Path(run_dir).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _lock(run_dir: Path) -> int | None:
    """An fd of ``run_dir`` holding an exclusive flock, or a ConfigError if someone else has it."""
    if fcntl is None:
        return None
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"{run_dir} is in use by another training process; wait for it to finish, "
            "or choose another --name / --out-dir"
        ) from None
    except OSError:  # a file system without locks: run unlocked rather than not at all
        os.close(fd)
        return None
    return fd
