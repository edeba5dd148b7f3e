"""From a :class:`RunConfig` to results: build data, model and hooks, then :func:`fit`; and
evaluate a saved checkpoint (the measures themselves, PTQ sweeps included, live in
:mod:`qatlab.measure`; ``ptq_sweep`` is re-exported here). The CLI calls these.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn

from qatlab.errors import CheckpointError, ConfigError
from qatlab.measure.ptq import SPLITS, calib_loader, ptq_sweep, split_dataset
from qatlab.quant import calibrate, dequantize, quantize, reestimate_bn
from qatlab.train.checkpoint import (
    load_checkpoint,
    load_model_state,
    model_from_checkpoint,
    quant_config,
    quiet_quantize,
    seed_everything,
)
from qatlab.train.config import DataConfig, ModelConfig, RunConfig
from qatlab.train.distributed import resolve_device, sync_batchnorm
from qatlab.train.loop import count_steps, evaluate, fit, train_loader
from qatlab.train.rundir import claim_run_dir

__all__ = ["build", "checkpoint_data", "evaluate_checkpoint", "load_data", "ptq_sweep", "run"]


def load_data(cfg: DataConfig):
    """The :class:`qatlab.data.DataBundle` that ``cfg`` describes."""
    from qatlab import data

    return data.load(
        cfg.name,
        data_dir=cfg.data_dir,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        augment=cfg.augment,
        num_samples=cfg.num_samples,
        cache_dir=cfg.cache_dir,
        image_size=cfg.image_size,
    )


def create_model(cfg: ModelConfig, data) -> nn.Module:
    """A fresh float model from the registry, shaped for ``data``."""
    from qatlab import models

    try:
        return models.create(cfg.name, data.num_classes, tuple(data.input_shape), **cfg.kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {cfg.name}: {exc}") from None


def init_weights(
    model: nn.Module, ckpt: dict[str, Any], path: str | Path, model_name: str
) -> nn.Module:
    """Load the weights of checkpoint ``ckpt`` (read from ``path``) into float ``model``; a QAT
    checkpoint gives its latent float weights. Returns the model to use."""
    spec = ckpt.get("model_spec") or {}
    if spec.get("name") not in (None, model_name):
        raise CheckpointError(
            f"--init-from {path} holds a {spec['name']} model but this run trains {model_name}"
        )
    if ckpt.get("quant") is not None:
        qmodel = quiet_quantize(model, quant_config(ckpt["quant"]))
        load_model_state(qmodel, ckpt["model"], path)
        return dequantize(qmodel)
    load_model_state(model, ckpt["model"], path)
    return model


def build(cfg: RunConfig, *, resume: bool = False):
    """``(model, data, hooks)`` for ``cfg``: data loaded, model created, initialised from
    ``init_from``, quantized and calibrated (unless resuming), method hooks built."""
    from qatlab.methods import build_hooks

    resuming = resume and (cfg.run_dir / "ckpt.pt").exists()
    if resuming:
        load_checkpoint(cfg.run_dir / "ckpt.pt")  # unreadable: fail before loading data
    init = None
    if cfg.init_from is not None and not resuming:
        _check_init_from(cfg)
        init = load_checkpoint(cfg.init_from)
    data = load_data(cfg.data)
    seed_everything(cfg.train.seed)
    model = create_model(cfg.model, data)
    if init is not None:
        model = init_weights(model, init, cfg.init_from, cfg.model.name)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    world_size = max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    model.to(resolve_device(cfg.train.device, local_rank))  # hooks are built on the device
    if world_size > 1 and cfg.train.sync_bn:
        sync_batchnorm(model)
    if cfg.quant is not None:
        model = quantize(model, cfg.quant)
        if world_size > 1 and cfg.train.calib_batches == 0:
            raise ConfigError(
                "train.calib_batches is 0 under torchrun: each process would set its "
                "activation step sizes from its own first batch; use calib_batches >= 1"
            )
        if not resuming and cfg.train.calib_batches > 0:
            # every process calibrates on the same global batches (N processes x batch_size),
            # i.e. on what one process with the global batch size would see
            calib = dataclasses.replace(cfg.train, batch_size=cfg.train.batch_size * world_size)
            calibrate(model, train_loader(data, calib, 0), cfg.train.calib_batches)
    total_steps = cfg.train.epochs * count_steps(data, cfg.train)
    hooks = build_hooks(cfg.method.name, cfg.method.options, model, cfg.quant, total_steps)
    if cfg.train.monitors:  # logging hooks after the method's (qatlab.train.monitors)
        from qatlab.train.monitors import build_monitors

        hooks += build_monitors(cfg.train.monitors, model, hooks, count_steps(data, cfg.train))
    return model, data, hooks


def run(cfg: RunConfig, *, resume: bool = False, verbose: bool = True) -> dict[str, Any]:
    """Train the run ``cfg`` describes into ``cfg.run_dir``; return its summary.

    Everything is validated and built before the run folder is touched, so bad input leaves
    no trace; a folder that already holds a run is refused unless ``resume``.
    """
    cfg.validate()
    if not resume:
        _check_init_from(cfg)
    with claim_run_dir(cfg.run_dir, resume=resume) as resuming:
        # held until the run ends: a second run with this name is refused, not mixed in
        if resume and not resuming and verbose:
            print(f"{cfg.run_dir} stopped before its first checkpoint: starting it over")
        model, data, hooks = build(cfg, resume=resuming)
        return fit(
            model,
            data,
            cfg.train,
            hooks=hooks,
            run_dir=cfg.run_dir,
            resume=resuming,
            run_config=cfg,
            verbose=verbose,
        )


def _check_init_from(cfg: RunConfig) -> None:
    """A fresh run needs its ``init_from`` checkpoint; a resumed one does not (it may have
    moved since)."""
    if cfg.init_from is not None and not Path(cfg.init_from).is_file():
        raise ConfigError(f"--init-from: no checkpoint file at {cfg.init_from}")


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_data(ckpt: dict[str, Any], path: str | Path, data_dir: str | None = None):
    """The dataset a checkpoint was trained on (``data_dir`` overrides where it lives)."""
    config = ckpt.get("config") or {}
    if "data" not in config:
        raise CheckpointError(f"checkpoint {path} does not say which data it was trained on")
    data_cfg = dict(config["data"])
    if data_dir is not None:
        data_cfg["data_dir"] = data_dir
    return load_data(DataConfig.from_dict(data_cfg))


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str = "test",
    bn_reestimate: bool = False,
    batch_size: int = 512,
    data_dir: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Accuracy and loss of a saved model on one split (``test``, ``val`` or ``train``), on
    ``device`` (``auto``: the GPU if there is one)."""
    if split not in SPLITS:  # bad input: one line before anything is loaded
        split_dataset(None, split)
    where = resolve_device(device)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(where)
    data = checkpoint_data(ckpt, path, data_dir)
    if bn_reestimate:
        reestimate_bn(model, calib_loader(data, batch_size), 50)
    result = evaluate(model, split_dataset(data, split), batch_size)
    quant = ckpt.get("quant")
    bits = "float" if quant is None else quant_config(quant).describe()
    return {
        "checkpoint": str(path),
        "epoch": ckpt.get("epoch"),
        "split": split,
        "bits": bits,
        "bn_reestimate": bn_reestimate,
        **result,
    }
