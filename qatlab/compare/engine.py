"""Run a grid's cells, resumably, on worker processes (local) or Ray tasks; record every result.

The comparison folder holds ``comparison.json`` (the marker: this is a qatlab comparison of
this grid), ``cells.json`` (the expanded cells), ``events.jsonl`` (start/finish of each cell,
written by the driver only) and ``cells/<cell>/``: an ordinary run folder plus
``result.json`` (the cell's row: written last, atomically, so its presence means *finished*)
or ``failed.json`` (the reason). A cell folder without either was interrupted: it is resumed
from its ``ckpt.pt`` (or started again if it has none); a finished cell is never run again.

A cell is identified by its own config (:func:`cell_key`: a hash of its run config, seed
included, and of its dependency's key), recorded in ``cells/<cell>/cell.json``; its follow-ups
by theirs (``followups.json`` keeps each one's numbers). So a grid may grow in its folder:
rerun it with more seeds, axis values, stages or follow-ups and only new cells train, a new
follow-up on a finished cell runs just that follow-up, and a cell whose config changed trains
again (its old folder is moved to ``replaced/<cell>@<key>``, never deleted, and moved back if
the config returns). Cells no longer in the grid stay in ``cells/``; the report ignores them.
Stages that ``use`` a selection run once the selecting stage settled (``selections.json``).
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

from qatlab.compare.spec import Cell, Grid, bits_label, resolve, select_values
from qatlab.errors import ConfigError, TrainingDiverged
from qatlab.train.metrics import read_jsonl, write_json

MARKER = "comparison.json"
CELL_FILE = "cell.json"  # the key of the config a cell folder holds
FOLLOW_FILE = "followups.json"  # follow-up key -> its numbers
REPLACED = "replaced"  # folders of cells whose config changed
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
        if (run_dir / "result.json").is_file() and measured(run_dir, cell):
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
    row = _with_arm(row, cell)
    row.update({k: v for k, v in summary.items() if k.startswith("val_") and k not in row})
    row.update(logged_stats(read_jsonl(cfg.run_dir / "metrics.jsonl")))
    ctx = CellContext(cfg, summary, results=row)  # a follow-up sees the row so far
    done = _read(cfg.run_dir / FOLLOW_FILE) if (cfg.run_dir / FOLLOW_FILE).is_file() else {}
    if any(v is None for v in done.values()):  # adopted: those numbers are in its old row
        old = _read(cfg.run_dir / "result.json")
        ctx.results.update({k: v for k, v in old.items() if k not in row})
    for follow_up in cell.follow_ups:
        key = follow_key(follow_up)
        if key in done:  # measured before (the cell grew a follow-up since)
            ctx.results.update(done[key] or {})
            continue
        done[key] = run_follow_up(ctx, follow_up)
        write_json(cfg.run_dir / FOLLOW_FILE, done)  # a killed cell keeps what it measured
    write_json(cfg.run_dir / "result.json", row)
    return row


def _with_arm(row: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """``arm`` right after the label columns, then the values a selection gave the cell."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        out[key] = value
        if key == "bits_trained":
            out["arm"] = cell.arm
    out.setdefault("arm", cell.arm)
    for key, value in cell.selected.items():
        out[f"selected_{key.rsplit('.', 1)[-1]}"] = value
    return out


# ----------------------------------------------------------------------------- identity
def _hash(data: Any) -> str:
    import hashlib

    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_key(cell: Cell, by_name: dict[str, Cell]) -> str:
    """What identifies a cell's training: its run config (seed included) and, when it starts
    from another cell, that cell's key. Follow-ups are not part of it (:func:`follow_key`)."""
    parent = by_name[cell.depends_on] if cell.depends_on else None
    return _hash({"config": cell.config, "init": cell_key(parent, by_name) if parent else None})


def follow_key(spec: dict[str, Any]) -> str:
    """What identifies a follow-up: its entry without ``when`` (which only picks cells)."""
    return _hash({k: v for k, v in spec.items() if k != "when"})


def measured(run_dir: Path, cell: Cell) -> bool:
    """Whether every follow-up of ``cell`` has its numbers in ``run_dir``."""
    path = run_dir / FOLLOW_FILE
    if not path.is_file():
        return not cell.follow_ups
    done = _read(path)
    return all(follow_key(f) in done for f in cell.follow_ups)


def settle(out: Path, cell: Cell, key: str, before: list | None = None) -> str:
    """The status of ``cell`` in ``out`` given its key: ``done``, ``failed``, ``partial``,
    ``measure`` (trained; a follow-up is new) or ``new``. A folder holding another config is
    moved to ``replaced/`` (and a replaced folder of this config moved back). ``before``: the
    follow-ups the folder's previous ``cells.json`` gave this cell (for a folder of an older
    qatlab, which recorded no keys)."""
    folder = out / "cells" / cell.name
    if folder.exists():
        meta = _read(folder / CELL_FILE) if (folder / CELL_FILE).is_file() else {}
        old = meta.get("key")
        if old is not None and old != key:
            target = out / REPLACED / f"{cell.name}@{old}"
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                import shutil

                shutil.rmtree(target)  # an older copy of the very same config and cell
            os.replace(folder, target)
    if not folder.exists():
        kept = out / REPLACED / f"{cell.name}@{key}"
        if kept.is_dir():
            os.replace(kept, folder)
    status = cell_status(out, cell.name)
    if status == "done" and not (folder / CELL_FILE).is_file():
        _adopt(folder, cell, key, cell.follow_ups if before is None else before)
    if status == "done" and not measured(folder, cell):
        return "measure"
    return status


def _adopt(folder: Path, cell: Cell, key: str, follow_ups: list) -> None:
    """A cell finished before cells had keys: take it as this config's, and ``follow_ups``
    (what it was measured with) as measured: their numbers stay in its ``result.json``
    (``None`` in ``followups.json``)."""
    if not (folder / FOLLOW_FILE).is_file():
        write_json(folder / FOLLOW_FILE, {follow_key(f): None for f in follow_ups})
    write_json(folder / CELL_FILE, {"cell": cell.name, "key": key, "adopted": True})


def _claim(out: Path, cell: Cell, key: str) -> None:
    folder = out / "cells" / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CELL_FILE, {"cell": cell.name, "key": key})


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
        if meta.get("grid_name") != grid.name:
            raise ConfigError(
                f"{out} holds another comparison ({meta.get('grid_name')!r}, not "
                f"{grid.name!r}); choose another --out (a folder grows one named grid)"
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
    write_cells(out, grid)


def write_cells(out: Path, grid: Grid, chosen: dict | None = None) -> None:
    """``cells.json``: the grid's cells (the report's list; selections as made so far)."""
    doc = {"label_columns": grid.label_columns, "cells": [c.to_dict() for c in grid.cells]}
    if grid.selections:
        doc["selections"] = {
            stage: {**spec, "chosen": (chosen or {}).get(stage)}
            for stage, spec in grid.selections.items()
        }
    write_json(out / "cells.json", doc)


def cell_status(out: Path, name: str) -> str:
    """``done``, ``failed``, ``partial`` (a folder without a result) or ``new``."""
    folder = out / "cells" / name
    if (folder / "result.json").is_file():
        return "done"
    if (folder / "failed.json").is_file():
        return "failed"
    return "partial" if folder.exists() else "new"


def waiting(grid: Grid, out: Path) -> dict[str, str]:
    """Cells that wait for a selection (``--dry-run``): cell name -> the selecting stage, for
    each cell that ``use``s a value of a stage whose cells have not all settled (done or
    failed) in ``out``, or starts from such a cell."""
    settled: dict[str, bool] = {}
    for stage in grid.selections:
        cells = [c for c in grid.cells if c.stage == stage]
        settled[stage] = all(cell_status(out, c.name) in ("done", "failed") for c in cells)
    waits: dict[str, str] = {}
    for cell in grid.cells:  # a parent comes before the cells that start from it
        stage = next((u["stage"] for u in cell.uses.values() if not settled[u["stage"]]), None)
        if stage is None and cell.depends_on in waits:
            stage = waits[cell.depends_on]
        if stage is not None:
            waits[cell.name] = stage
    return waits


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
    """Run every unfinished cell of ``grid`` into ``out`` (dependencies first, stages that use
    a selection after it is made); return the counts ``{"done", "failed", "ran"}``. Finished
    cells are never run again (a new follow-up runs alone); failed ones only with
    ``retry_failed``. ``device`` (auto/cpu/cuda) overrides every cell's ``train.device``
    (training and follow-ups) without changing the grid."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    before = _previous_follow_ups(out)
    prepare_folder(out, grid, source)
    cells_dir = out / "cells"
    cells_dir.mkdir(exist_ok=True)
    by_name = {c.name: c for c in grid.cells}
    with _Lock(out / ".lock"):
        status: dict[str, str] = {}
        chosen: dict[str, dict] = {}
        prog = Progress(len(grid.cells), 0, 0, workers, progress)
        state: dict[str, Any] = {"runner": None, "ran": 0}

        def runner():
            if state["runner"] is None:
                n = threads or default_threads(workers)
                extra = {} if device is None else {"device": device}
                state["runner"] = (make_backend or _backend)(backend, workers, n, address, **extra)
            return state["runner"]

        try:
            while True:
                _select(grid, out, status, chosen)
                ready = []
                for cell in grid.cells:
                    if cell.name in status:
                        continue
                    try:
                        if not resolve(cell, chosen):
                            continue
                    except ConfigError as exc:  # the selecting stage chose nothing for it
                        _fail(out, cell, str(exc), status, prog)
                        continue
                    parent = cell.depends_on
                    if parent and parent not in status and parent not in {c.name for c in ready}:
                        continue  # its parent waits for a selection
                    ready.append(cell)
                if not ready:
                    break
                todo = _settle_all(out, ready, by_name, status, retry_failed, prog, before)
                if todo:
                    state["ran"] += _run_cells(todo, out, status, runner(), prog, workers)
            write_cells(out, grid, chosen)
        finally:
            prog.close()
            if state["runner"] is not None:
                state["runner"].close()
        return {
            "done": sum(s == "done" for s in status.values()),
            "failed": sum(s == "failed" for s in status.values()),
            "ran": state["ran"],
        }


def _previous_follow_ups(out: Path) -> dict[str, list]:
    """Each cell's follow-ups as the folder's ``cells.json`` (its last run) lists them."""
    try:
        doc = json.loads((out / "cells.json").read_text())
        return {c["name"]: c.get("follow_ups") or [] for c in doc["cells"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _settle_all(out, cells, by_name, status, retry_failed, prog, before=None) -> list[Cell]:
    """Statuses of ``cells`` (now resolvable); the ones to run, first seed first."""
    cells_dir = out / "cells"
    todo = []
    n_done = n_failed = 0
    for cell in cells:
        key = cell_key(cell, by_name)
        st = settle(out, cell, key, (before or {}).get(cell.name))
        if st == "failed" and retry_failed:
            (cells_dir / cell.name / "failed.json").unlink()
            st = "partial"
        if st in ("new", "partial", "measure"):
            _claim(out, cell, key)
            todo.append(cell)
        status[cell.name] = st
        n_done += st == "done"
        n_failed += st == "failed"
    prog.done += n_done
    prog.failed += n_failed
    if n_done or n_failed:
        prog.event(f"{n_done} cells finished already, {n_failed} failed (kept)")
    # the first seed of every setting first: a partial comparison already covers the grid
    seeds = list(dict.fromkeys(c.seed for c in cells))
    todo.sort(key=lambda c: seeds.index(c.seed))
    return todo


def _select(grid: Grid, out: Path, status: dict, chosen: dict) -> None:
    """Make the selection of every selecting stage whose cells all settled (done or failed),
    from their validation numbers; written to ``selections.json``."""
    changed = False
    for stage, spec in grid.selections.items():
        cells = [c for c in grid.cells if c.stage == stage]
        if stage in chosen or any(status.get(c.name) not in ("done", "failed") for c in cells):
            continue
        rows = {}
        for c in cells:
            path = out / "cells" / c.name / "result.json"
            if status[c.name] == "done" and path.is_file():
                rows[c.name] = _read(path)
        chosen[stage] = select_values(cells, rows, spec)
        changed = True
    if changed:
        write_json(out / "selections.json", {s: chosen[s] for s in chosen})


def _fail(out: Path, cell: Cell, reason: str, status: dict, prog: Progress) -> None:
    write_json(out / "cells" / cell.name / "failed.json", {"cell": cell.name, "reason": reason})
    status[cell.name] = "failed"
    prog.failed += 1
    prog.event(f"failed {cell.name}: {reason}")


def _run_cells(
    todo: list[Cell], out: Path, status: dict, runner: Any, prog: Progress, workers: int
) -> int:
    """Run ``todo`` on ``runner`` (a cell once its dependency is done; failed dependency:
    failed); update ``status``; return how many ran."""
    cells_dir = out / "cells"
    events = out / "events.jsonl"
    running: dict[Any, tuple[Cell, float]] = {}
    ran = 0
    todo = list(todo)
    while todo or running:
        for cell in list(todo):  # cells whose dependency failed fail too
            if cell.depends_on and status[cell.depends_on] == "failed":
                todo.remove(cell)
                _fail(out, cell, f"depends on failed cell {cell.depends_on}", status, prog)
        ready = [c for c in todo if not c.depends_on or status[c.depends_on] == "done"]
        for cell in ready[: max(0, workers - len(running))]:
            todo.remove(cell)
            _event(events, "start", cell.name, train=status[cell.name] != "measure")
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
    return ran


def _backend(name: str, workers: int, threads: int, address: str | None, device: str | None = None):
    if name == "ray":
        return RayBackend(workers, threads, address, device)
    return LocalBackend(workers, threads, device)


def _event(
    path: Path, kind: str, cell: str, reason: str | None = None, train: bool | None = None
) -> None:
    record: dict[str, Any] = {"event": kind, "cell": cell, "time": round(time.time(), 3)}
    if reason is not None:
        record["reason"] = reason
    if train is not None:
        record["train"] = train  # False: a finished cell measuring a new follow-up
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
