"""``quantize(model, config)``: swap each supported layer of a model for its quantized twin."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from collections.abc import Iterator

from torch import nn

from qatlab.errors import ConfigError
from qatlab.quant.config import QuantConfig
from qatlab.quant.guard import watch
from qatlab.quant.layers import FLOAT_TO_QUANT, QuantLayer, quantizers, recast
from qatlab.quant.quantizer import Quantizer, check_bits

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
# layers that hold weight matrices; any of these that quantize() cannot swap is reported
_WEIGHT_LAYER_TYPES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.MultiheadAttention,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.RNNBase,
)


def quantize(
    model: nn.Module, config: QuantConfig | None = None, inplace: bool = False
) -> nn.Module:
    """Return a copy of ``model`` whose Conv1d/Conv2d/Linear layers fake-quantize weight and input.

    First and last supported layers (in registration order) follow ``config.first_layer`` and
    ``config.last_layer``. Layers that hold weights but cannot be quantized (e.g. an
    ``nn.MultiheadAttention``, a ``ConvTranspose2d``) stay float and are named in one warning.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"quantize(model): model must be a torch.nn.Module, got {type(model).__name__}; "
            "pass the float model to quantize"
        )
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(
            f"quantize(model, config): config must be a qatlab.QuantConfig, got "
            f"{type(config).__name__}; write QuantConfig(weight_bits=4, ...) "
            "(or QuantConfig.from_dict(d) for a dict)"
        )
    config.validate()
    if not inplace:
        model = copy.deepcopy(model)
    candidates = [
        (name, m) for name, m in model.named_modules() if type(m) in FLOAT_TO_QUANT and name
    ]
    if type(model) in FLOAT_TO_QUANT:  # a bare layer is its own first and last layer
        candidates = [("", model)]
    first = candidates[0][0] if candidates else None
    last = candidates[-1][0] if candidates else None
    swapped = {}
    for name, layer in candidates:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.skip):
            continue
        is_first, is_last = name == first, name == last
        if (is_first and config.first_layer == "float") or (
            is_last and config.last_layer == "float"
        ):
            continue
        swapped[name] = _quant_layer(layer, config, is_first, is_last)
    if not swapped:
        raise ConfigError(_nothing_to_quantize(model, candidates))
    for name, new in swapped.items():  # learned step sizes stay positive (quant/guard.py)
        for role, q in (("weight", new.weight_quantizer), ("input", new.input_quantizer)):
            if q is not None and isinstance(q.step, nn.Parameter):
                watch(name or "<root>", role, q)
    if "" in swapped:
        return swapped[""]
    for name, new in swapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    _warn_unsupported(model)
    return model


def _nothing_to_quantize(model: nn.Module, candidates: list) -> str:
    """Why ``quantize`` found no layer to swap, and what to do (a silent no-op hides a bug)."""
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        return (
            "quantize(model): model is already quantized; pass its float version "
            "(qatlab.quant.dequantize(model)), or change bits with qatlab.set_bits"
        )
    if not candidates:
        return (
            "quantize(model): model has no Conv1d, Conv2d or Linear layer to quantize; "
            "pass a model built from those layers"
        )
    return (
        f"quantize(model, config): all {len(candidates)} quantizable layers are kept float "
        "by config.skip / first_layer / last_layer; skip fewer layers (e.g. "
        "first_layer='8bit')"
    )


def _quant_layer(layer: nn.Module, config: QuantConfig, is_first: bool, is_last: bool) -> nn.Module:
    pin_weight = (is_first and config.first_layer == "8bit") or (
        is_last and config.last_layer == "8bit"
    )
    channels = layer.weight.shape[0] if config.weight_granularity == "channel" else 1
    wq = Quantizer(
        8 if pin_weight else config.weight_bits,
        signed=True,
        grid=config.weight_grid,
        scale=config.weight_scale,
        init="mse" if config.weight_init == "auto" else config.weight_init,
        channels=channels,
        grad_scale=config.lsq_grad_scale,
        role="weight",
    )
    wq.fixed_bits = pin_weight
    wq.initialize(layer.weight.detach())
    aq = None
    float_input = is_first and config.first_layer == "8bit"
    if config.quantize_acts and not float_input:
        pin_act = is_last and config.last_layer == "8bit"
        aq = Quantizer(
            8 if pin_act else config.act_bits,
            signed=config.act_signed,
            grid=config.act_grid,
            scale=config.act_scale,
            init=config.act_init,
            grad_scale=config.lsq_grad_scale,
            role="input",
        )
        aq.fixed_bits = pin_act
    return FLOAT_TO_QUANT[type(layer)].from_float(layer, wq, aq)


def _warn_unsupported(model: nn.Module) -> None:
    names = []
    for name, m in model.named_modules():
        if isinstance(m, (Quantizer, QuantLayer, *_NORM_TYPES)) or type(m) in FLOAT_TO_QUANT:
            continue
        if isinstance(m, _WEIGHT_LAYER_TYPES):
            names.append(f"{name or '<root>'} ({type(m).__name__})")
    if names:
        warnings.warn(
            "qatlab.quantize: these layers are not supported and stay float: " + ", ".join(names),
            stacklevel=3,
        )


def set_bits(
    model: nn.Module,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    *,
    include_fixed: bool = False,
    rescale: bool = True,
) -> nn.Module:
    """Change the bit width of every quantizer after training (cross-bit evaluation).

    Quantizers pinned to 8 bits by the first/last-layer policy keep theirs unless
    ``include_fixed``. ``rescale`` keeps each clipping range ``s * p`` (re-calibrate for PTQ).
    """
    for bits in (weight_bits, act_bits):
        if bits is not None:
            check_bits(bits)
    for _, q in quantizers(model):
        if q.fixed_bits and not include_fixed:
            continue
        bits = weight_bits if q.role == "weight" else act_bits
        if bits is not None:
            q.set_bits(bits, rescale=rescale)
    return model


@contextlib.contextmanager
def quantization_disabled(
    model: nn.Module, weights: bool = True, acts: bool = True
) -> Iterator[nn.Module]:
    """Run ``model`` in float inside the block (all or some quantizers off), then restore."""
    chosen = [q for _, q in quantizers(model) if (weights if q.role == "weight" else acts)]
    before = [q.enabled for q in chosen]
    for q in chosen:
        q.enabled = False
    try:
        yield model
    finally:
        for q, state in zip(chosen, before, strict=True):
            q.enabled = state


def dequantize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A float model with the same latent weights: every quantized layer back to its float class.

    Frozen or trained weights are kept as they are; quantizers are dropped. Used to post-train
    quantize a QAT model at other bit widths, and to compare against its float self.
    """
    if not inplace:
        model = copy.deepcopy(model)
    quant_to_float = {v: k for k, v in FLOAT_TO_QUANT.items()}
    if isinstance(model, QuantLayer):
        return recast(model, quant_to_float[type(model)])
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, recast(layer, quant_to_float[type(layer)]))
    return model
