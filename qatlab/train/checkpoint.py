"""Checkpoints: atomic save, validated load, RNG states, and rebuilding a model from one.

A checkpoint is a dict saved with ``torch.save`` and read back with ``weights_only=True`` (no
arbitrary code runs on load). Keys: ``format``, ``model`` (state dict), ``model_spec`` (registry
name, kwargs, classes, input shape), ``quant`` (QuantConfig dict or None), ``config`` (the run
config), ``epoch``; ``ckpt.pt`` adds the training state (``optimizer``, ``hooks``, ``step``,
``best``, ``bad_epochs``, ``elapsed``, ``rng``, ``train``).
"""

from __future__ import annotations

import io
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qatlab.errors import CheckpointError, ConfigError
from qatlab.train.metrics import atomic_write

FORMAT = "qatlab-checkpoint-1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a qatlab checkpoint onto the CPU; anything unreadable is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated zip, pickle garbage, wrong file type...
        # PyTorch's own message (cut to one line it ends mid-word) does not help: say what the
        # file looks like and what to pass instead
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        what = (
            "truncated or damaged (a kill while it was written?)"
            if is_zip
            else ("not a PyTorch checkpoint")
        )
        raise CheckpointError(
            f"cannot read checkpoint {path}: {what}; pass a best.pt or ckpt.pt written by "
            "qatlab train"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a qatlab checkpoint (saved by qatlab train)")
    return ckpt


def load_model_state(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """``model.load_state_dict(state)`` with a one-line error when the shapes or keys differ."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"checkpoint {path} does not fit the model: {detail}") from None


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the checkpoint's model (quantized like it was) and load its weights."""
    from qatlab import models

    spec = ckpt.get("model_spec")
    if not spec:
        raise CheckpointError(
            f"checkpoint {path} does not say which model it holds (saved by fit() without a "
            "run config); load its 'model' state dict into your model yourself"
        )
    try:
        model = models.create(
            spec["name"], spec["num_classes"], tuple(spec["input_shape"]), **spec["kwargs"]
        )
        if ckpt.get("quant") is not None:
            model = quiet_quantize(model, quant_config(ckpt["quant"]))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    load_model_state(model, ckpt["model"], path)
    return model


def quant_config(quant: dict[str, Any]):
    """The :class:`qatlab.QuantConfig` a checkpoint recorded (as a plain dict)."""
    from qatlab.quant import QuantConfig

    return QuantConfig.from_dict({**quant, "skip": tuple(quant.get("skip", ()))})


def quiet_quantize(model: nn.Module, cfg) -> nn.Module:
    """``qatlab.quantize`` without the unsupported-layer warning (given when training began)."""
    from qatlab.quant import quantize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize(model, cfg)


# ----------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a CPU run repeats bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step can touch, in a form ``weights_only`` loading accepts.

    ``cuda`` lists one generator state per visible GPU (index = device index);
    :func:`set_rng_state` restores those of the GPUs that exist when resuming."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved.

    CUDA generators are restored by device index for the GPUs visible now, so a checkpoint
    saved with 8 GPUs visible resumes with fewer (the states of absent GPUs are dropped) or
    on the CPU, and one saved with fewer leaves the other GPUs' generators as seeded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved is not None and torch.cuda.is_available():
        for index, gen_state in enumerate(list(saved)[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gen_state, index)


def set_deterministic(enabled: bool, device: torch.device | str = "cpu") -> None:
    """Make CUDA runs repeat bit for bit (what exact resume needs) or let them run fast.

    ``enabled``: cuDNN picks deterministic algorithms without benchmarking, TF32 matmuls and
    convolutions are off, and ``torch.use_deterministic_algorithms(True, warn_only=True)``
    warns about any op without a deterministic kernel (``CUBLAS_WORKSPACE_CONFIG`` is set for
    cuBLAS if the user has not set it). Off: cuDNN benchmarking and TF32 on (fast, not
    repeatable). CPU runs are deterministic either way; nothing is changed for them.
    """
    if torch.device(device).type != "cuda":
        return
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cuda.matmul.allow_tf32 = not enabled
    torch.backends.cudnn.allow_tf32 = not enabled
    torch.use_deterministic_algorithms(enabled, warn_only=True)
