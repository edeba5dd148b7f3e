"""Run configuration: dataclasses validated at the boundary, loaded from YAML plus overrides.

A run is described by one :class:`RunConfig`; its YAML form is the same nesting::

    name: mnist1d-cnn1d-w4a4
    data: {name: mnist1d, num_samples: 4000}
    model: {name: cnn1d}            # any other key is a model keyword argument
    quant: {weight_bits: 4, act_bits: 4}   # null (or absent) = float training
    train: {epochs: 10, lr: 0.001}
    method: {name: qat}             # any other key is a method option

Command-line overrides (``--set train.lr=0.01``) are applied to the plain dict before
validation, so a typo anywhere gets the same one-line error with a suggestion.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatlab.checks import check_keys, choice, mapping, positive, typed
from qatlab.errors import ConfigError
from qatlab.quant.config import QuantConfig

OPTIMIZERS = ("adam", "adamw", "sgd")
# step sizes may also train with "logadam" (Adam on log s: relative, scale-free updates)
QUANT_OPTIMIZERS = (*OPTIMIZERS, "logadam")
# What train.quant_optimizer / train.quant_lr = "auto" become (docs/results/qat_recipe.md):
# from a float checkpoint, Nagel et al.'s fine-tuning set-up; from scratch, the weight steps
# train with Adam on log s at lr 5e-3 (plain Adam at 1e-5 cannot follow weights that grow
# several-fold: -14 points at W2 on MLP5 / MNIST-1D; plain Adam at the weights' LR drives small
# steps to zero and kills W2A2 / SAQ runs; LogAdam's relative moves do neither). LogAdam's LR
# is a relative rate (at most ~0.5% change per update here), not in weight units, so it is not
# tied to the weights' LR (an SGD LR of 0.1 would make any multiple of it absurd).
STEP_RECIPES: dict[str, dict[str, Any]] = {
    "fine_tune": {
        "quant_optimizer": "adam",
        "quant_lr": 1e-5,
        "act_quant_optimizer": None,  # None: as the weight step sizes
        "act_quant_lr": None,
        "weight_init": "mse",
    },
    "scratch": {
        "quant_optimizer": "logadam",
        "quant_lr": 5e-3,
        "act_quant_optimizer": "adam",
        "act_quant_lr": 1e-5,
        "weight_init": "meanabs",
    },
}
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")


# ----------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Which dataset and how to split it (arguments of :func:`qatlab.data.load`)."""

    name: str = "mnist1d"
    data_dir: str | None = None
    val_fraction: float = 0.1
    seed: int = 0  # the train/val split; kept apart from train.seed so seeds share one split
    augment: bool = True
    num_samples: int | None = None
    cache_dir: str | None = None
    image_size: int = 64  # imagefolder: images are resized to this

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        return _section(cls, data, "data").validate()

    def validate(self) -> DataConfig:
        from qatlab import data

        choice("data.name", self.name, data.DATASETS)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_samples is not None and self.num_samples < 10:
            raise ConfigError(f"data.num_samples must be at least 10, got {self.num_samples}")
        return self


@dataclass
class ModelConfig:
    """A registry model: its name and keyword arguments for :func:`qatlab.models.create`."""

    name: str = "cnn1d"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ModelConfig:
        from qatlab import models

        choice("model.name", self.name, tuple(models.list_models()))
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(mapping(data, "model"))
        return cls(name=typed(data.pop("name", cls.name), str, "model.name"), kwargs=data)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.kwargs}


@dataclass
class MethodConfig:
    """A training method from :mod:`qatlab.methods`: its name and options.

    ``name="auto"`` resolves to ``float`` for a float run and ``qat`` for a quantized one.
    """

    name: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, quantized: bool) -> MethodConfig:
        from qatlab import methods

        if self.name == "auto":
            self.name = "qat" if quantized else "float"
        self.options = methods.check_options(self.name, self.options)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        data = dict(mapping(data, "method"))
        return cls(name=typed(data.pop("name", cls.name), str, "method.name"), options=data)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


@dataclass
class TrainConfig:
    """How :func:`qatlab.train.fit` trains: optimizer, schedule, evaluation, early stopping."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    nesterov: bool = False
    weight_decay: float = 0.0  # never applied to quantizer step sizes
    # How quantizer step sizes train. "auto" picks a recipe by how the run starts (resolved by
    # RunConfig.validate, see STEP_RECIPES): fine-tuning from a checkpoint (init_from) gets
    # Nagel et al.'s set-up, Adam at 1e-5 apart from the weights; from scratch the weight steps
    # train with "logadam" (Adam on log s, relative moves) at lr 5e-3, since the grid must
    # follow weights that grow several-fold. A bare TrainConfig resolves "auto" to scratch.
    # quant_optimizer: adam | adamw | sgd | logadam | null (= the weights' optimizer);
    # quant_lr: a number, "<k>x" (k times lr) or null (= lr).
    quant_optimizer: str | None = "auto"
    quant_lr: float | str | None = "auto"
    # activation step sizes (calibrated from data, not growing with the weights): from scratch
    # they keep Adam at 1e-5; at the weights' LR they collapse some W2A2 and SAQ runs
    # (docs/results/qat_recipe.md). None = as the weight step sizes.
    act_quant_optimizer: str | None = "auto"
    act_quant_lr: float | str | None = "auto"
    schedule: str = "cosine"  # cosine | constant, a function of the step over all steps
    schedule_per: str = "step"  # "step" or "epoch": when the cosine moves
    min_lr: float = 0.0  # as a fraction of the initial LR
    early_stop_metric: str = "val_acc"  # also picks best.pt; any logged eval metric
    early_stop_mode: str = "auto"  # max | min | auto (min if the name ends in "loss")
    patience: int | None = None  # epochs without improvement before stopping; None = never
    restore_best: bool = True  # end with the best weights (by early_stop_metric)
    bn_reestimate: bool = False  # re-estimate BN stats on un-augmented train batches before eval
    bn_batches: int = 50
    calib_batches: int = 2  # training batches that initialise activation step sizes
    sync_bn: bool = True  # under torchrun: BatchNorm statistics over all processes' batches
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # CUDA: deterministic cuDNN/cuBLAS kernels, no TF32, so a run (and its exact resume)
    # repeats bit for bit; False: cuDNN benchmarking and TF32 (faster). No effect on the CPU.
    deterministic: bool = True
    # DataLoader workers for datasets read item by item (ImageFolder); None = 0 on the CPU,
    # up to 4 (per process) on CUDA. In-memory datasets never need workers.
    num_workers: int | None = None
    log_every: int = 0  # also log train loss/LR every N steps (0 = per epoch only)
    log_transitions: bool = True  # quantized runs: log the transition rate ``tr`` per epoch
    # logging hooks by name (qatlab.train.monitors), e.g. [{name: flips, every: 10}]
    monitors: list = field(default_factory=list)
    divergence_factor: float = 100.0  # stop when the loss exceeds this x the first (0 = never)
    progress: bool = True  # tqdm bar (shown only when stderr is a terminal)
    # torch.compile the training forward (and its backward); evaluation and the methods' own
    # work stay eager. A run may be resumed with it switched on or off.
    compile: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _section(cls, data, "train").validate()

    def apply_recipe(self, fine_tune: bool) -> TrainConfig:
        """Resolve ``"auto"`` step-size settings: the fine-tune or the from-scratch recipe."""
        recipe = STEP_RECIPES["fine_tune" if fine_tune else "scratch"]
        if self.quant_optimizer == "auto":
            self.quant_optimizer = recipe["quant_optimizer"]
        if self.quant_lr == "auto":
            self.quant_lr = recipe["quant_lr"]
        if self.act_quant_optimizer == "auto":
            self.act_quant_optimizer = recipe["act_quant_optimizer"]
        if self.act_quant_lr == "auto":
            self.act_quant_lr = recipe["act_quant_lr"]
        return self

    def validate(self) -> TrainConfig:
        self.apply_recipe(fine_tune=False)
        for name in ("quant_lr", "act_quant_lr"):
            value = getattr(self, name)
            if isinstance(value, str) and _lr_multiple(value) is None:
                raise ConfigError(
                    f"train.{name} must be a number, '<k>x' (k times train.lr), null or 'auto', "
                    f"got {value!r}"
                )
        choice("train.optimizer", self.optimizer, OPTIMIZERS)
        for name in ("quant_optimizer", "act_quant_optimizer"):
            if getattr(self, name) is not None:
                choice(f"train.{name}", getattr(self, name), QUANT_OPTIMIZERS)
        choice("train.schedule", self.schedule, SCHEDULES)
        choice("train.schedule_per", self.schedule_per, ("step", "epoch"))
        choice("train.early_stop_mode", self.early_stop_mode, ("auto", "max", "min"))
        choice("train.device", self.device, DEVICES)
        for name in ("epochs", "batch_size", "eval_batch_size", "bn_batches"):
            positive(f"train.{name}", getattr(self, name))
        for name in ("lr", "quant_lr", "act_quant_lr"):
            value = self.resolve_lr(getattr(self, name))
            if value is not None and not value > 0:
                raise ConfigError(f"train.{name} must be > 0, got {value}")
        for name in (
            "weight_decay",
            "momentum",
            "min_lr",
            "calib_batches",
            "log_every",
            "divergence_factor",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.patience is not None:
            positive("train.patience", self.patience)
        if self.monitors:
            from qatlab.train.monitors import check_monitors

            check_monitors(self.monitors)
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0 or null, got {self.num_workers}")
        return self

    def resolve_lr(self, value: float | str | None) -> float | None:
        """A step-size LR as a number: ``"<k>x"`` is ``k * lr``; None (= the weights') stays."""
        if isinstance(value, str):
            multiple = _lr_multiple(value)
            if multiple is None:
                raise ConfigError(f"not a learning rate: {value!r}")
            return multiple * self.lr
        return value

    @property
    def mode(self) -> str:
        """``max`` or ``min``: the direction in which ``early_stop_metric`` improves."""
        if self.early_stop_mode != "auto":
            return self.early_stop_mode
        return "min" if self.early_stop_metric.endswith("loss") else "max"


def _lr_multiple(text: str) -> float | None:
    """``k`` of a ``"<k>x"`` LR (``"0.1x"`` -> 0.1), or None if ``text`` is not of that form."""
    try:
        return float(text[:-1]) if text.endswith("x") else None
    except ValueError:
        return None


@dataclass
class RunConfig:
    """Everything that defines one training run; saved as ``runs/<name>/config.yaml``."""

    name: str = ""  # empty: derived from dataset, model, method, bits and seed
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig | None = None  # None = float training
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    init_from: str | None = None  # checkpoint whose weights start this run (e.g. float -> QAT)

    def validate(self) -> RunConfig:
        # the step-size recipe depends on how the run starts (fine-tune vs from scratch)
        fine_tune = self.init_from is not None
        self.train.apply_recipe(fine_tune)
        if self.quant is not None and self.quant.weight_init == "auto":
            self.quant.weight_init = STEP_RECIPES["fine_tune" if fine_tune else "scratch"][
                "weight_init"
            ]
        self.data.validate()
        self.model.validate()
        if self.quant is not None:
            self.quant.validate()
        self.train.validate()
        self.method.validate(quantized=self.quant is not None)
        if not self.name:
            self.name = self.default_name()
        if "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"run name must be a plain folder name, got {self.name!r}")
        # init_from is checked when a fresh run starts (a resumed run does not need it)
        return self

    def default_name(self) -> str:
        bits = "float" if self.quant is None else self.quant.describe().lower()
        return f"{self.data.name}-{self.model.name}-{self.method.name}-{bits}-s{self.train.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate from a plain (YAML) dict; every error is one ConfigError line."""
        data = dict(mapping(data, "config"))
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "the config")
        quant = data.get("quant")
        return cls(
            name=typed(data.get("name", ""), str, "name") or "",
            out_dir=typed(data.get("out_dir", "runs"), str, "out_dir"),
            data=_section(DataConfig, data.get("data"), "data"),
            model=ModelConfig.from_dict(data.get("model") or {}),
            quant=None if quant is None else QuantConfig.from_dict(_quant_dict(quant)),
            train=_section(TrainConfig, data.get("train"), "train"),
            method=MethodConfig.from_dict(data.get("method") or {}),
            init_from=typed(data.get("init_from"), str | None, "init_from"),
        ).validate()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "out_dir": self.out_dir,
            "data": dataclasses.asdict(self.data),
            "model": self.model.to_dict(),
            "quant": None if self.quant is None else self.quant.to_dict(),
            "train": dataclasses.asdict(self.train),
            "method": self.method.to_dict(),
            "init_from": self.init_from,
        }


# ----------------------------------------------------------------------------- loading
def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """A validated :class:`RunConfig` from ``base`` (dict), then a YAML file, then overrides.

    Later sources win. Each override is ``dotted.key=value`` with a YAML value
    (``train.lr=0.01``, ``quant=null``, ``quant.skip=[fc1]``).
    """
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return RunConfig.from_dict(data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a syntax error is a one-line ConfigError."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"config file {path} is not a text (UTF-8) YAML file; pass a .yaml config "
            "like those in configs/"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    return mapping(data, f"config file {path}")


def write_yaml(data: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` as YAML atomically (temp file + rename)."""
    import yaml

    from qatlab.train.metrics import write_text

    write_text(path, yaml.safe_dump(data, sort_keys=False))


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=0.01"`` -> ``("train.lr", 0.01)``; the value is parsed as YAML."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. train.lr=0.01), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"``, creating sections on the way."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set {key}: {where} is not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``other`` win, ``None`` replaces a section."""
    out = dict(base)
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- checking
def _section(cls: type, data: Any, name: str):
    data = mapping(data or {}, name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(data, list(fields), name)
    hints = typing.get_type_hints(cls)
    return cls(**{k: typed(v, hints[k], f"{name}.{k}") for k, v in data.items()})


def _quant_dict(data: Any) -> dict[str, Any]:
    data = dict(mapping(data, "quant"))
    hints = typing.get_type_hints(QuantConfig)
    for key, value in data.items():
        if key in hints and key != "skip":
            data[key] = typed(value, hints[key], f"quant.{key}")
    if isinstance(data.get("skip"), list):
        data["skip"] = tuple(data["skip"])
    return data
