"""``to_integer``: integer weights, step sizes and bit widths per layer, for custom runtimes.

Two files: a tensor file read with ``torch.load(..., weights_only=True)`` (no code runs on
load; safetensors is not installed in the pinned environment, so it is not used) and a JSON
manifest beside it that says, per quantized layer, which tensors it has, its grids and how to
dequantize. ``weight_int * weight_step`` (step per output channel along axis 0 when
``weight_per_channel``) reproduces the quantizer's ``q(w)`` bit for bit. The remaining float
state (biases, BatchNorm, float layers) is stored under its state-dict names.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qatlab.errors import CheckpointError, ConfigError
from qatlab.quant.layers import quant_layers

FORMAT = "qatlab-int-1"


def manifest_path(path: str | Path) -> Path:
    """The JSON manifest beside tensor file ``path`` (``model.int.pt`` -> ``model.int.json``)."""
    path = Path(path)
    return path.with_suffix(".json")


def to_integer(
    qmodel: nn.Module, path: str | Path, model_spec: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``qmodel``'s integer weights to ``path`` and a manifest to ``manifest_path(path)``.

    Refuses a model with no quantized layer. Returns the two paths; both are written
    atomically (the manifest last).
    """
    from qatlab.export.onnx import check_exportable
    from qatlab.train.metrics import atomic_write

    layers = list(quant_layers(qmodel))
    if not layers:
        raise ConfigError(
            "cannot export integer weights: the model has no quantized layer (a float model); "
            "quantize and train it, or use --format onnx"
        )
    check_exportable(qmodel)
    tensors: dict[str, Tensor] = {}
    rows = []
    latent = set()
    for name, layer in layers:
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        prefix = f"{name}." if name else ""
        if not wq.enabled:
            raise ConfigError(
                f"cannot export integer weights of {name or 'the model'}: its weight quantizer "
                "is disabled"
            )
        latent.add(f"{prefix}weight")
        tensors[f"{prefix}weight_int"] = layer.weight_int().to(torch.int8).contiguous()
        tensors[f"{prefix}weight_step"] = wq.current_step(layer.weight).detach().clone()
        row = {
            "name": name,
            "kind": type(layer).__name__,
            "weight_shape": list(layer.weight.shape),
            "weight_bits": wq.bits,
            "weight_grid": list(wq.grid_range),
            "weight_per_channel": bool(wq.per_channel),
            "input_bits": None,
            "input_grid": None,
            "input_offset": False,
        }
        if aq is not None and aq.enabled:
            tensors[f"{prefix}input_step"] = aq.current_step().detach().clone()
            row.update(input_bits=aq.bits, input_grid=list(aq.grid_range))
            if aq.policy == "lsq+":
                tensors[f"{prefix}input_offset"] = aq.offset.detach().clone()
                row["input_offset"] = True
        rows.append(row)
    for key, value in qmodel.state_dict().items():
        parts = key.split(".")
        if key in latent or "weight_quantizer" in parts or "input_quantizer" in parts:
            continue
        if isinstance(value, Tensor):
            tensors[key] = value.detach().clone()
    manifest = {
        "format": FORMAT,
        "tensors": Path(path).name,
        "dequantize": "weight = weight_int * weight_step (per output channel on axis 0 when "
        "weight_per_channel); input q(x) = input_step * clamp(round((x - offset) / input_step), "
        "*input_grid) + offset (offset 0 unless input_offset)",
        "model_spec": model_spec,
        "layers": rows,
        "float_tensors": sorted(k for k in tensors if not _is_int_key(k, rows)),
    }
    buf = io.BytesIO()
    torch.save(tensors, buf)
    path = Path(path)
    atomic_write(path, buf.getvalue())
    atomic_write(manifest_path(path), (json.dumps(manifest, indent=1) + "\n").encode())
    return path, manifest_path(path)


def _is_int_key(key: str, rows: list[dict]) -> bool:
    for row in rows:
        prefix = f"{row['name']}." if row["name"] else ""
        if key in (
            f"{prefix}weight_int",
            f"{prefix}weight_step",
            f"{prefix}input_step",
            f"{prefix}input_offset",
        ):
            return True
    return False


def load_integer(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read what :func:`to_integer` wrote: ``(manifest, tensors)`` (``weights_only`` load)."""
    path = Path(path)
    try:
        manifest = json.loads(manifest_path(path).read_text())
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # torch's are long
        raise CheckpointError(f"cannot read integer export {path}: {first}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path(path)} is not a qatlab integer-export manifest")
    return manifest, tensors


def dequantize_weights(manifest: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{layer: weight_int * weight_step}``: the quantized weights ``q(w)`` the model used."""
    out = {}
    for row in manifest["layers"]:
        prefix = f"{row['name']}." if row["name"] else ""
        ints, step = tensors[f"{prefix}weight_int"], tensors[f"{prefix}weight_step"]
        if step.dim() == 1:
            step = step.reshape(-1, *([1] * (ints.dim() - 1)))
        out[row["name"]] = ints.to(step.dtype) * step
    return out
