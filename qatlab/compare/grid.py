"""Run many training jobs in worker processes (one torch thread each); finished runs are reused."""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from typing import Any


def train_job(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Train one run (or resume it, or read it back if finished); return its summary."""
    from qatlab.train import RunConfig, run

    cfg = RunConfig.from_dict(cfg_dict)
    summary_path = cfg.run_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    started = any((cfg.run_dir / f).is_file() for f in ("ckpt.pt", "config.yaml"))
    return run(cfg, resume=started, verbose=False)  # a run killed in epoch 1 starts over


def _call(job: tuple[str, dict[str, Any]]) -> Any:
    import torch

    torch.set_num_threads(1)
    target, arg = job
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)(arg)


def run_jobs(
    jobs: Sequence[tuple[str | Callable, dict[str, Any]]], processes: int = 2, label: str = ""
) -> list[Any]:
    """Run ``(function, argument)`` jobs (functions importable by dotted name), in order of
    submission, on ``processes`` spawned workers; print one line per finished job."""
    named = [(f"{f.__module__}.{f.__name__}" if callable(f) else f, arg) for f, arg in jobs]
    start = time.perf_counter()
    results: list[Any] = [None] * len(named)
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        pending = {i: pool.apply_async(_call, (job,)) for i, job in enumerate(named)}
        for i, res in pending.items():
            results[i] = res.get()
            name = named[i][1].get("name", i) if isinstance(named[i][1], dict) else i
            print(
                f"[{label} {i + 1}/{len(named)} {time.perf_counter() - start:6.0f}s] {name}",
                flush=True,
            )
    return results
