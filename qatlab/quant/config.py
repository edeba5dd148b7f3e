"""``QuantConfig``: what to quantize and how, validated once at the boundary."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from qatlab.checks import choice
from qatlab.errors import ConfigError
from qatlab.quant.quantizer import GRIDS, INIT_METHODS, SCALE_POLICIES, check_bits

LAYER_POLICIES = ("8bit", "same", "float")


@dataclass
class QuantConfig:
    """How :func:`qatlab.quantize` quantizes a model.

    Defaults follow Nagel et al.'s released set-up: LSQ steps initialised by MSE search, the
    input of every Conv/Linear and its weight quantized, first layer with 8-bit weights and a
    float input, last layer with 8-bit weights and an 8-bit input. Grids are recorded in every
    result because "3-bit" means a different grid in different papers.
    """

    weight_bits: int = 4
    act_bits: int | None = 4  # None: weights only
    weights_only: bool = False
    weight_grid: str = "full"  # "full" (-8..7 at 4 bit) or "restricted" (-7..7; ternary at 2)
    act_grid: str = "full"
    weight_granularity: str = "tensor"  # "tensor" or "channel" (per output channel)
    weight_scale: str = "lsq"
    act_scale: str = "lsq"
    # how an lsq weight step starts: mse, meanabs, minmax, percentile, or "auto": mse (Nagel's
    # search, for trained weights) here and in quantize(); a training run resolves it by how it
    # starts (RunConfig.validate): mse when fine-tuning, meanabs (LSQ's) from scratch
    weight_init: str = "auto"
    act_init: str = "mse"
    act_signed: bool | str = "auto"  # "auto": unsigned if the first data seen has no negatives
    lsq_grad_scale: bool = True
    first_layer: str = "8bit"  # "8bit" weights + float input, "same" as the rest, or "float"
    last_layer: str = "8bit"  # "8bit" weights + 8-bit input, "same", or "float"
    skip: tuple[str, ...] = field(default_factory=tuple)  # module names (fnmatch) kept float

    def __post_init__(self) -> None:
        self.validate()

    @property
    def quantize_acts(self) -> bool:
        return not self.weights_only and self.act_bits is not None

    def validate(self) -> QuantConfig:
        """Raise :class:`ConfigError` with one clear line if any field is impossible."""
        for name in ("weight_bits", "act_bits"):  # named: the user may not know "bit width"
            bits = getattr(self, name)
            if bits is not None or name == "weight_bits":
                try:
                    check_bits(bits)
                except ConfigError:
                    raise ConfigError(
                        f"{name} must be an integer from 2 to 8, got {bits!r}"
                    ) from None
        choice("weight_grid", self.weight_grid, GRIDS)
        choice("act_grid", self.act_grid, GRIDS)
        choice("weight_granularity", self.weight_granularity, ("tensor", "channel"))
        choice("weight_scale", self.weight_scale, tuple(p for p in SCALE_POLICIES if p != "lsq+"))
        choice("act_scale", self.act_scale, SCALE_POLICIES)
        choice("weight_init", self.weight_init, (*INIT_METHODS, "auto"))
        choice("act_init", self.act_init, INIT_METHODS)
        choice("first_layer", self.first_layer, LAYER_POLICIES)
        choice("last_layer", self.last_layer, LAYER_POLICIES)
        if self.act_signed not in (True, False, "auto"):
            raise ConfigError(f"act_signed must be true, false or 'auto', got {self.act_signed!r}")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        if not isinstance(self.skip, (list, tuple)) or not all(
            isinstance(name, str) for name in self.skip
        ):
            raise ConfigError(
                f"skip must be a list of module names (fnmatch patterns) kept float, e.g. "
                f"skip=['fc', 'layer1.*']; got {self.skip!r}"
            )
        self.skip = tuple(self.skip)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Build from a plain dict (YAML); unknown keys are an error with a suggestion."""
        if not isinstance(data, dict):
            raise ConfigError(f"quant config must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                tip = f" (did you mean '{hint[0]}'?)" if hint else f"; valid keys: {names}"
                raise ConfigError(f"unknown key '{key}' in quant{tip}")
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - defensive
            raise ConfigError(f"bad quant config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skip"] = list(self.skip)
        return out

    def describe(self) -> str:
        """Short label such as ``W4A4`` or ``W3A-``, for tables."""
        act = str(self.act_bits) if self.quantize_acts else "-"
        return f"W{self.weight_bits}A{act}"
