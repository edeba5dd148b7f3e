"""A saved run as a :class:`qatlab.measure.MeasureContext`: what ``qatlab measure`` and every
cell of a ``qatlab compare`` grid hand to the measures.

The model is the run's ``best.pt`` when the run restored its best epoch (the model its summary
describes), else ``ckpt.pt``; a checkpoint file given directly is that model. The step-0
weights are the run's ``init.pt`` (written by :func:`qatlab.train.fit` at the start of a fresh
run; runs trained before it existed have none and get no ``init`` bounds).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from qatlab.errors import CheckpointError, ConfigError
from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint
from qatlab.train.config import RunConfig
from qatlab.train.loop import INIT_FILE


class RunContext:
    """The measure context of a run folder (or of one checkpoint file inside one)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        cfg: RunConfig | None = None,
        checkpoint: str | Path | None = None,
        out_dir: str | Path | None = None,
        seed: int | None = None,
        progress: bool = False,
        data_dir: str | None = None,
        results: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self._model_path = Path(checkpoint) if checkpoint is not None else None
        self._cfg = cfg
        self._data_dir = data_dir
        self.out_dir = Path(out_dir) if out_dir is not None else self.run_dir
        self._seed = seed
        self.progress = progress
        self.results: dict[str, Any] = results if results is not None else {}

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> RunContext:
        """A run folder (holding ``ckpt.pt`` or ``best.pt``) or a checkpoint file; anything
        else is one :class:`ConfigError`/:class:`CheckpointError` line, before any work."""
        path = Path(path)
        if path.is_dir():
            if not any((path / n).is_file() for n in ("ckpt.pt", "best.pt")):
                raise ConfigError(
                    f"{path} is not a run folder (no ckpt.pt or best.pt in it); give the "
                    "folder of a run trained by qatlab train, or one of its checkpoints"
                )
            ctx = cls(path, **kwargs)
        elif path.is_file():
            ctx = cls(path.parent, checkpoint=path, **kwargs)
        else:
            raise ConfigError(f"no run folder or checkpoint at {path}")
        ctx.checkpoint  # noqa: B018 - read (and validate) the model's checkpoint now
        ctx.cfg  # noqa: B018
        return ctx

    # ------------------------------------------------------------------ what the run holds
    def _load(self, path: Path) -> dict[str, Any]:
        cache = self.__dict__.setdefault("_loaded", {})
        if path not in cache:
            cache[path] = load_checkpoint(path)
        return cache[path]

    @cached_property
    def model_path(self) -> Path:
        """The measured checkpoint: the one given, else ``best.pt`` if the run restored its
        best epoch, else ``ckpt.pt``."""
        if self._model_path is not None:
            return self._model_path
        best, last = self.run_dir / "best.pt", self.run_dir / "ckpt.pt"
        if not last.is_file():
            return best
        return best if best.is_file() and self.cfg.train.restore_best else last

    @property
    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint of the measured model."""
        return self._load(self.model_path)

    @cached_property
    def cfg(self) -> RunConfig:
        """The run's config (as recorded in its checkpoints)."""
        if self._cfg is not None:
            return self._cfg
        source = self._model_path
        if source is None:
            last = self.run_dir / "ckpt.pt"
            source = last if last.is_file() else self.run_dir / "best.pt"
        config = self._load(source).get("config")
        if not config:
            raise CheckpointError(
                f"checkpoint {source} does not record its run config (saved by fit() without "
                "one), so its data and model are unknown; measure it from Python"
            )
        config = dict(config)
        config["init_from"] = None  # not needed to rebuild, and it may have moved
        if self._data_dir is not None:
            config["data"] = {**config["data"], "data_dir": self._data_dir}
        return RunConfig.from_dict(config)

    @property
    def seed(self) -> int:
        return self._seed if self._seed is not None else self.cfg.train.seed

    @property
    def batch_size(self) -> int:
        return self.cfg.train.batch_size

    @cached_property
    def device(self):
        """Where measures run: the run's ``train.device`` (``auto``: the GPU if any)."""
        from qatlab.train.distributed import resolve_device

        return resolve_device(self.cfg.train.device)

    @cached_property
    def data(self):
        """The run's :class:`qatlab.data.DataBundle`."""
        from qatlab.train.runner import load_data

        return load_data(self.cfg.data)

    def model(self):
        """A fresh copy of the measured model, in eval mode."""
        return model_from_checkpoint(self.checkpoint, self.model_path).eval().to(self.device)

    def final_model(self):
        """A fresh copy of the model at the end of the last epoch (``ckpt.pt``), or None."""
        last = self.run_dir / "ckpt.pt"
        if not last.is_file():
            return None
        return model_from_checkpoint(self._load(last), last).eval().to(self.device)

    def init_state(self) -> dict[str, Any] | None:
        """The state dict at step 0 (``init.pt``), or None if the run kept none."""
        path = self.run_dir / INIT_FILE
        return load_checkpoint(path)["model"] if path.is_file() else None

    def logged_records(self) -> list[dict[str, Any]]:
        """The run's ``metrics.jsonl`` records ([] if it kept none)."""
        from qatlab.train.metrics import read_jsonl

        return read_jsonl(self.run_dir / "metrics.jsonl")

    def method_hooks(self) -> list:
        """The method's hooks as training left them (states from ``ckpt.pt``); [] for a float
        run or a run without hook state."""
        from qatlab.methods import build_hooks

        last = self.run_dir / "ckpt.pt"
        if self.cfg.quant is None or not last.is_file():
            return []
        ckpt = self._load(last)
        saved = ckpt.get("hooks") or []
        if not saved:
            return []
        model = model_from_checkpoint(ckpt, last)
        method = self.cfg.method
        hooks = build_hooks(method.name, method.options, model, self.cfg.quant, 1)
        for hook, state in zip(hooks, saved, strict=False):
            hook.load_state_dict(state)
        return hooks


# ----------------------------------------------------------------------------- qatlab measure
MEASURES_FILE = "measures.json"


def measure_run(
    path: str | Path,
    what: list[str],
    *,
    options: dict[str, dict[str, Any]] | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    data_dir: str | None = None,
    report: Any = None,
) -> dict[str, Any]:
    """Run the measures ``what`` (registry names, with ``options[name]``) on a run folder or
    checkpoint; merge their numbers into ``OUT/measures.json`` (written atomically after each
    measure, so a long run keeps what it finished) and write their plots into ``OUT`` (the run
    folder by default). ``seed`` (default: the run's training seed) seeds every random choice.
    Everything is checked before any work. ``report(name, result, s)`` is
    called after each measure. Returns the merged document."""
    import json
    import time

    from qatlab.measure.registry import check_options, get_measure
    from qatlab.train.metrics import write_json

    options = dict(options or {})
    if not what:
        raise ConfigError("nothing to measure: give --what, e.g. gap,noise,flatness")
    for name in what:
        get_measure(name)
    for name, opts in options.items():
        if name not in what:
            raise ConfigError(f"options given for measure {name!r}, which is not in --what")
        check_options(name, opts)
    ctx = RunContext.from_path(path, seed=seed, progress=progress, data_dir=data_dir)
    if out is not None:
        ctx.out_dir = Path(out)
    if ctx.out_dir.exists() and not ctx.out_dir.is_dir():
        raise ConfigError(f"--out {ctx.out_dir} is a file; give a folder")
    target = ctx.out_dir / MEASURES_FILE
    doc: dict[str, Any] = {"checkpoint": str(ctx.model_path), "results": {}, "measures": {}}
    if target.is_file():
        try:
            old = json.loads(target.read_text())
            assert isinstance(old, dict) and isinstance(old.get("results"), dict)
        except (ValueError, AssertionError):
            raise ConfigError(
                f"{target} is not a measures file written by qatlab measure; move it away"
            ) from None
        if Path(old.get("checkpoint", "")).resolve() != ctx.model_path.resolve():
            raise ConfigError(
                f"{target} holds the measures of {old.get('checkpoint')}, not of "
                f"{ctx.model_path}; give --out to write these elsewhere"
            )
        doc.update(old)
        doc.setdefault("measures", {})
    ctx.results.update(doc["results"])
    for name in what:
        start = time.perf_counter()
        result = get_measure(name)(ctx, **options.get(name, {}))
        seconds = time.perf_counter() - start
        ctx.results.update(result)
        doc["results"].update(result)
        doc["measures"][name] = {
            "options": options.get(name, {}),
            "seed": ctx.seed,
            "time_s": round(seconds, 3),
            "keys": sorted(result),
        }
        write_json(target, doc)
        if report is not None:
            report(name, result, seconds)
    return doc
