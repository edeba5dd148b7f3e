"""Run a grid's cells, resumably, on worker processes (local) or Ray tasks; record every result.

The comparison folder holds ``comparison.json`` (the marker: this is a qatlab comparison of
this grid), ``cells.json`` (the expanded cells), ``events.jsonl`` (start/finish of each cell,
written by the driver only) and ``cells/<cell>/``: an ordinary run folder plus
``result.json`` (the cell's row: written last, atomically, so its presence means *finished*)
or ``failed.json`` (the reason). A cell folder without either was interrupted: it is resumed
from its ``ckpt.pt`` (or started again if it has none); a finished cell is never run again.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qatlab.compare.spec import Cell, Grid, bits_label
from qatlab.errors import ConfigError, TrainingDiverged
from qatlab.train.metrics import read_jsonl, write_json

MARKER = "comparison.json"
KIND = "qatlab comparison"
BACKENDS = ("local", "ray")


# ----------------------------------------------------------------------------- one cell
def cell_config(cell: Cell, cells_dir: str | Path, device: str | None = None) -> dict[str, Any]:
    """The run config of ``cell`` inside ``cells_dir`` (its dependency's ``best.pt`` as
    ``init_from``; ``device``, if given, as ``train.device``: a run-time choice, not part of
    the grid, and resumable)."""
    cfg = copy.deepcopy(cell.config)
    cfg.update(name=cell.name, out_dir=str(cells_dir))
    cfg.setdefault("train", {})["progress"] = False
    if device is not None:
        cfg["train"]["device"] = device
    if cell.depends_on is not None:
        cfg["init_from"] = str(Path(cells_dir) / cell.depends_on / "best.pt")
    return cfg


def run_cell(
    cell_dict: dict[str, Any], cells_dir: str, threads: int = 0, device: str | None = None
) -> dict[str, Any]:
    """Train (or resume, or reuse) one cell, run its follow-ups, write ``result.json``; any
    exception (divergence included) is written to ``failed.json`` instead. Returns
    ``{"status": "done"|"failed", "cell": name, "row"|"reason": ...}``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    import fcntl

    cell = Cell.from_dict(cell_dict)
    run_dir = Path(cells_dir) / cell.name
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".lock", "a")  # noqa: SIM115
    try:
        # a worker orphaned by a killed driver may still be finishing this cell: wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (run_dir / "result.json").is_file():
            return {"status": "done", "cell": cell.name, "row": _read(run_dir / "result.json")}
        row = _train_and_measure(cell, cells_dir, device)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the grid goes on
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        write_json(
            run_dir / "failed.json",
            {"cell": cell.name, "reason": reason, "traceback": traceback.format_exc()},
        )
        return {"status": "failed", "cell": cell.name, "reason": reason}
    finally:
        lock.close()
    return {"status": "done", "cell": cell.name, "row": row}


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _train_and_measure(cell: Cell, cells_dir: str, device: str | None = None) -> dict[str, Any]:
    from qatlab.compare.measures import CellContext, logged_stats, run_follow_up
    from qatlab.train.config import RunConfig
    from qatlab.train.runner import run

    cfg = RunConfig.from_dict(cell_config(cell, cells_dir, device))
    summary_path = cfg.run_dir / "summary.json"
    if summary_path.is_file():  # trained, but killed during its follow-ups
        summary = json.loads(summary_path.read_text())
    else:  # fresh, or interrupted mid-training (then it continues from ckpt.pt, if any)
        started = any((cfg.run_dir / f).is_file() for f in ("ckpt.pt", "config.yaml"))
        summary = run(cfg, resume=started, verbose=False)
    for key in ("train_eval_loss", "test_loss"):
        value = summary.get(key)
        if value is None or not math.isfinite(value):
            raise TrainingDiverged(f"{key} is not finite at the end of training ({value})")
    row: dict[str, Any] = {
        "cell": cell.name,
        "stage": cell.stage,
        "seed": cell.seed,
        **cell.labels,
        "bits_trained": bits_label(cell.config),
        "method_name": cfg.method.name,
        "test_acc": summary["test_acc"],
        "test_loss": summary["test_loss"],
        "val_acc": summary.get("val_acc"),
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "wall_time_s": summary["wall_time_s"],
    }
    row.update(logged_stats(read_jsonl(cfg.run_dir / "metrics.jsonl")))
    ctx = CellContext(cfg, summary, results=row)  # a follow-up sees the row so far
    for follow_up in cell.follow_ups:
        row.update(run_follow_up(ctx, follow_up))
    write_json(cfg.run_dir / "result.json", row)
    return row


# ----------------------------------------------------------------------------- the folder
def prepare_folder(out: Path, grid: Grid, source: str, *, create: bool = True) -> None:
    """Refuse a folder that holds anything but this grid's comparison; write the marker."""
    marker = out / MARKER
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("kind") != KIND:
            raise ConfigError(f"{out} has a {MARKER} that is not a qatlab comparison marker")
        if meta.get("fingerprint") != grid.fingerprint:
            raise ConfigError(
                f"{out} holds another comparison ({meta.get('grid_name')!r}, a different grid); "
                "choose another --out (each folder holds one grid)"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} exists and is not a qatlab comparison folder (no {MARKER}); "
            "choose another --out: qatlab never writes into a folder it did not create"
        )
    if not create:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        marker,
        {
            "kind": KIND,
            "grid_name": grid.name,
            "fingerprint": grid.fingerprint,
            "source": source,
            "grid": grid.source,
        },
    )
    write_json(
        out / "cells.json",
        {"label_columns": grid.label_columns, "cells": [c.to_dict() for c in grid.cells]},
    )


def cell_status(out: Path, name: str) -> str:
    """``done``, ``failed``, ``partial`` (a folder without a result) or ``new``."""
    folder = out / "cells" / name
    if (folder / "result.json").is_file():
        return "done"
    if (folder / "failed.json").is_file():
        return "failed"
    return "partial" if folder.exists() else "new"


class _Lock:
    """One driver per comparison folder (an OS file lock, released when the process dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = None

    def __enter__(self) -> _Lock:
        import fcntl

        self.file = open(self.path, "a")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise ConfigError(f"another qatlab compare is running on {self.path.parent}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


# ----------------------------------------------------------------------------- backends
def default_threads(workers: int) -> int:
    """Torch threads per worker: the cores this process may use, shared evenly."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, cores // max(workers, 1))


def _init_worker(threads: int, parent: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)

    def watch() -> None:  # a killed driver must not leave workers writing into its cells
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


class LocalBackend:
    """Spawned worker processes (``workers`` of them, ``threads`` torch threads each)."""

    def __init__(self, workers: int, threads: int, device: str | None = None) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads, os.getpid()),
        )
        self.threads, self.device = threads, device

    def submit(self, cell: Cell, cells_dir: str):
        return self.pool.submit(run_cell, cell.to_dict(), cells_dir, self.threads, self.device)

    def wait(self, handles: list, timeout: float) -> list[tuple[Any, dict]]:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for fut in done:
            try:
                out.append((fut, fut.result()))
            except Exception as exc:  # noqa: BLE001 - a worker died (killed, out of memory)
                out.append((fut, {"status": "failed", "reason": f"worker process died: {exc}"}))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Each cell a Ray task (``num_cpus=threads``) on ``ray.init(address)``: a local instance
    by default, a cluster with ``--address`` (qatlab installed on every node and ``--out`` on
    storage they all see)."""

    def __init__(
        self, workers: int, threads: int, address: str | None = None, device: str | None = None
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "--backend ray needs Ray: pip install 'qatlab[ray]' (or use --backend local)"
            ) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = workers * threads
            env = {"OMP_NUM_THREADS": str(threads)}
            if os.environ.get("PYTHONPATH"):
                env["PYTHONPATH"] = os.environ["PYTHONPATH"]
            ray.init(runtime_env={"env_vars": env}, **kwargs)
        self.remote = ray.remote(num_cpus=threads, max_retries=0)(run_cell)
        self.threads, self.device = threads, device

    def submit(self, cell: Cell, cells_dir: str):
        return self.remote.remote(cell.to_dict(), cells_dir, self.threads, self.device)

    def wait(self, handles: list, timeout: float) -> list[tuple[Any, dict]]:
        ready, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - the task's worker died
                out.append((ref, {"status": "failed", "reason": f"ray task failed: {exc}"}))
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


# ----------------------------------------------------------------------------- progress
class Progress:
    """Cells done / running / failed / left with an ETA: a tqdm bar on a terminal, else one
    plain line per event."""

    def __init__(self, total: int, done: int, failed: int, workers: int, enabled: bool) -> None:
        self.total, self.workers, self.enabled = total, workers, enabled
        self.done, self.failed, self.running = done, failed, 0
        self.durations: list[float] = []
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done + failed, desc="cells", file=sys.stderr)

    @property
    def left(self) -> int:
        return self.total - self.done - self.failed - self.running

    def eta(self) -> str:
        if not self.durations:
            return "?"
        per_cell = sum(self.durations) / len(self.durations)  # while `workers` run at once
        seconds = (self.left + 0.5 * self.running) * per_cell / max(1, self.workers)
        return _duration(seconds)

    def status(self) -> str:
        return (
            f"{self.done} done, {self.running} running, {self.failed} failed, "
            f"{self.left} left, ETA {self.eta()}"
        )

    def event(self, text: str, finished: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if finished:
                self.bar.update(1)
            self.bar.set_postfix_str(self.status())
            self.bar.write(text)
        else:
            print(f"[{self.status()}] {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ----------------------------------------------------------------------------- the driver
def run_grid(
    grid: Grid,
    out: str | Path,
    *,
    source: str = "",
    workers: int = 2,
    backend: str = "local",
    address: str | None = None,
    threads: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    make_backend: Callable | None = None,
    device: str | None = None,
) -> dict[str, int]:
    """Run every unfinished cell of ``grid`` into ``out`` (dependencies first); return the
    counts ``{"done", "failed", "ran"}``. Finished cells are never run again; failed ones only
    with ``retry_failed``. ``device`` (auto/cpu/cuda) overrides every cell's ``train.device``
    (training and follow-ups) without changing the grid."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    prepare_folder(out, grid, source)
    cells_dir = out / "cells"
    cells_dir.mkdir(exist_ok=True)
    with _Lock(out / ".lock"):
        status = {c.name: cell_status(out, c.name) for c in grid.cells}
        if retry_failed:
            for name, st in status.items():
                if st == "failed":
                    (cells_dir / name / "failed.json").unlink()
                    status[name] = "partial"
        todo = [c for c in grid.cells if status[c.name] in ("new", "partial")]
        # the first seed of every setting first: a partial comparison already covers the grid
        seeds = list(dict.fromkeys(c.seed for c in grid.cells))
        todo.sort(key=lambda c: seeds.index(c.seed))
        n_done = sum(s == "done" for s in status.values())
        n_failed = sum(s == "failed" for s in status.values())
        prog = Progress(len(grid.cells), n_done, n_failed, workers, progress)
        if n_done or n_failed:
            prog.event(f"{n_done} cells finished already, {n_failed} failed (kept)")
        if not todo:
            prog.close()
            return {"done": n_done, "failed": n_failed, "ran": 0}
        threads = threads or default_threads(workers)
        extra = {} if device is None else {"device": device}
        runner = (make_backend or _backend)(backend, workers, threads, address, **extra)
        events = out / "events.jsonl"
        running: dict[Any, tuple[Cell, float]] = {}
        ran = 0
        try:
            while todo or running:
                for cell in list(todo):  # cells whose dependency failed fail too
                    if cell.depends_on and status[cell.depends_on] == "failed":
                        reason = f"depends on failed cell {cell.depends_on}"
                        write_json(
                            cells_dir / cell.name / "failed.json",
                            {"cell": cell.name, "reason": reason},
                        )
                        status[cell.name] = "failed"
                        todo.remove(cell)
                        prog.failed += 1
                        prog.event(f"failed {cell.name}: {reason}")
                ready = [c for c in todo if not c.depends_on or status[c.depends_on] == "done"]
                for cell in ready[: max(0, workers - len(running))]:
                    todo.remove(cell)
                    _event(events, "start", cell.name)
                    running[runner.submit(cell, str(cells_dir))] = (cell, time.perf_counter())
                    prog.running += 1
                if not running:
                    break
                for handle, result in runner.wait(list(running), timeout=1.0):
                    cell, start = running.pop(handle)
                    prog.running -= 1
                    ran += 1
                    prog.durations.append(time.perf_counter() - start)
                    if result["status"] == "done":
                        status[cell.name] = "done"
                        prog.done += 1
                        _event(events, "done", cell.name)
                        acc = result["row"]["test_acc"]
                        prog.event(f"finished {cell.name} (test acc {acc:.4f})", finished=True)
                    else:
                        if not (cells_dir / cell.name / "failed.json").is_file():
                            write_json(
                                cells_dir / cell.name / "failed.json",
                                {"cell": cell.name, "reason": result["reason"]},
                            )
                        status[cell.name] = "failed"
                        prog.failed += 1
                        _event(events, "failed", cell.name, result["reason"])
                        prog.event(f"failed {cell.name}: {result['reason']}", finished=True)
        finally:
            prog.close()
            runner.close()
        return {
            "done": sum(s == "done" for s in status.values()),
            "failed": sum(s == "failed" for s in status.values()),
            "ran": ran,
        }


def _backend(name: str, workers: int, threads: int, address: str | None, device: str | None = None):
    if name == "ray":
        return RayBackend(workers, threads, address, device)
    return LocalBackend(workers, threads, device)


def _event(path: Path, kind: str, cell: str, reason: str | None = None) -> None:
    record = {"event": kind, "cell": cell, "time": round(time.time(), 3)}
    if reason is not None:
        record["reason"] = reason
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
