"""Results as files: atomic JSON/CSV/text writes and the append-only ``metrics.jsonl`` log.

Every file except the log is written to a temp file in the same folder and renamed over the
target, so a crash never leaves a half-written result and an error never clobbers an old one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    The file gets the permissions a plain ``open`` would give (``0o666`` minus the umask), not
    the temp file's private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere: set and restore (the only portable way to read it)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic, indented JSON; NaN/inf become null so any JSON reader accepts the file."""
    write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Atomic CSV with the union of the rows' keys as header (in first-seen order)."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (a torn last line from a crash is skipped)."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line (epoch or step records).

    ``keep_epochs`` (on resume) first drops records of epochs after the checkpoint, so the
    log of a resumed run reads like the log of an uninterrupted one.
    """

    def __init__(self, path: str | Path, keep_epochs: int | None = None) -> None:
        self.path = Path(path)
        if keep_epochs is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("epoch", 0) <= keep_epochs]
            write_text(self.path, "".join(json.dumps(_clean(r)) + "\n" for r in kept))
        elif keep_epochs is None:
            self.path.unlink(missing_ok=True)
        self._file = None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115 - held open for the run
        self._file.write(json.dumps(_clean(record)) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _clean(obj: Any) -> Any:
    """JSON-safe copy: tensors/numpy scalars to numbers, NaN/inf to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
