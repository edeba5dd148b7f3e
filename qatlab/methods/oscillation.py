"""Weight oscillations in QAT (Nagel et al., ICML 2022): tracking, dampening, iterative freezing.

All three read integers and transitions from the quant core (``Quantizer.integer``,
:class:`qatlab.quant.TransitionCounter`), run only in training steps (never in evaluation or BN
re-estimation), and keep their state in buffers of an ``nn.Module`` so it travels with
``state_dict()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from qatlab.errors import ConfigError
from qatlab.methods.base import Hook
from qatlab.methods.registry import register_method
from qatlab.quant.layers import QuantLayer, quant_layers
from qatlab.quant.quantizer import Quantizer
from qatlab.quant.transitions import TransitionCounter, counted_layers

AGGREGATIONS = ("kernel_mean", "mean", "sum")


# ----------------------------------------------------------------------------- schedules
def cosine_ramp(progress: float, start: float = 0.25, peak: float = 1.0) -> float:
    """0 until ``start`` (fraction of training), then a cosine ramp from 0 up to ``peak`` at 1."""
    if progress <= start:
        return 0.0
    t = min(1.0, (progress - start) / max(1e-12, 1.0 - start))
    return peak * 0.5 * (1.0 - math.cos(math.pi * t))


def cosine_decay(progress: float, begin: float, end: float, start: float = 0.25) -> float:
    """``inf`` until ``start`` (nothing passes), then a cosine from ``begin`` down to ``end``."""
    if progress <= start:
        return math.inf
    t = min(1.0, (progress - start) / max(1e-12, 1.0 - start))
    return end + (begin - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def aggregate(values: Tensor, how: str) -> Tensor:
    """Reduce a per-weight tensor: ``kernel_mean`` (sum over output channels, mean over the
    rest; the aggregation Nagel's ``lambda`` is tied to), ``mean`` or ``sum``."""
    if how == "kernel_mean":
        return values.reshape(values.shape[0], -1).mean(1).sum()
    if how == "mean":
        return values.mean()
    if how == "sum":
        return values.sum()
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


def bin_distance(weight: Tensor, quantizer: Quantizer, aggregation: str = "kernel_mean") -> Tensor:
    """``agg((sg[q(w)] - clamp(w, s*n, s*p))^2)`` with the step held constant.

    Gradient: ``2 (w - q(w))`` (times the aggregation factor) for in-range weights, 0 for
    clipped ones. Dampening adds it; the oscillation regularizer subtracts it (§3 of the spec:
    its gradient is exactly the negative).
    """
    n, p = quantizer.grid_range
    s = quantizer.broadcast_step(weight).detach()
    target = quantizer.quantize_detached(weight)
    clamped = torch.maximum(torch.minimum(weight, s * p), s * n)
    return aggregate((target - clamped).pow(2), aggregation)


def _key(name: str) -> str:
    return name.replace(".", "__") or "root"


# ----------------------------------------------------------------------------- tracking
class OscillationTracker(nn.Module, Hook):
    """Per-weight oscillation frequency in the integer domain, updated once per training step.

    ``o_t = 1`` when the integer moves opposite to its last non-zero move; ``f = EMA(o)`` with
    momentum ``m``. :meth:`stats` gives per-layer share of weights with ``f > threshold``,
    mean ``f`` and a histogram. Moves come from its :class:`TransitionCounter`
    (``self.transitions``), which other methods and the trainer's log can share.
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.001,
        threshold: float = 0.01,
        max_bits: int | None = None,
        log_every: int = 50,
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.threshold = threshold
        self.log_every = log_every
        self.transitions = TransitionCounter(model, max_bits)
        self.layer_names = list(self.transitions.layer_names)
        for name in self.layer_names:
            k = _key(name)
            w_int = self.transitions.previous(name)
            # every buffer on the weights' device (w_int lives there), so a user's own loop
            # needs no .to() of the hook before stepping
            self.register_buffer(f"{k}__dir", torch.zeros_like(w_int))
            self.register_buffer(f"{k}__freq", torch.zeros_like(w_int, dtype=torch.float32))
            self.register_buffer(f"{k}__ema_int", w_int.float())
            self.register_buffer(f"{k}__flips", torch.zeros_like(w_int, dtype=torch.int32))

    def buffer(self, name: str, kind: str) -> Tensor:
        return getattr(self, f"{_key(name)}__{kind}")

    def frequency(self, name: str) -> Tensor:
        """Oscillation frequency ``f`` of every weight of layer ``name``."""
        return self.buffer(name, "freq")

    def flips(self, name: str) -> Tensor:
        """How many oscillations (direction reversals) each weight of ``name`` has made."""
        return self.buffer(name, "flips")

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> dict[str, Tensor]:
        """Record one training step; returns each layer's current integers."""
        moves = self.transitions.update(model, step)
        m = self.momentum
        for name in self.layer_names:
            w_int, direction = moves.current[name], moves.direction[name]
            last_dir = self.buffer(name, "dir")
            moved = direction != 0
            osc = moved & (direction == -last_dir)
            self.buffer(name, "freq").mul_(1 - m).add_(osc.float(), alpha=m)
            self.buffer(name, "ema_int").mul_(1 - m).add_(w_int.float(), alpha=m)
            self.buffer(name, "flips").add_(osc.int())
            last_dir.copy_(torch.where(moved, direction, last_dir))
        return moves.current

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict | None:
        self.update(model, step)
        if self.log_every and (step + 1) % self.log_every == 0:
            return {"osc_share": self.oscillating_share()}
        return None

    @torch.no_grad()
    def oscillating_share(self, threshold: float | None = None) -> float:
        """Fraction of all tracked weights whose frequency exceeds ``threshold``."""
        th = self.threshold if threshold is None else threshold
        total = sum(self.buffer(n, "freq").numel() for n in self.layer_names)
        hits = sum(int((self.buffer(n, "freq") > th).sum()) for n in self.layer_names)
        return hits / max(total, 1)

    @torch.no_grad()
    def stats(self, bins: int = 20) -> dict[str, dict]:
        """Per layer: share above threshold, mean frequency, histogram of frequencies."""
        out = {}
        for name in self.layer_names:
            f = self.buffer(name, "freq")
            hist = torch.histc(f, bins=bins, min=0.0, max=max(float(f.max()), 1e-6))
            out[name] = {
                "share": float((f > self.threshold).float().mean()),
                "mean_freq": float(f.mean()),
                "hist": hist.tolist(),
                "hist_max": float(f.max()),
            }
        return out

    def frequencies(self) -> Tensor:
        """All tracked frequencies as one flat tensor (for histograms)."""
        return torch.cat([self.frequency(n).reshape(-1) for n in self.layer_names])


# ----------------------------------------------------------------------------- dampening
class OscillationDampening(Hook):
    """Loss term ``lambda(t) * sum_layers agg((sg[q(w)] - clamp(w, s*n, s*p))^2)``.

    Its gradient pulls each in-range latent weight toward its bin centre; clipped weights get
    none. ``lambda`` is 0 for the first ``start`` of training, then a cosine ramp to
    ``lambda_max``. The step size is held constant here (only weights feel this term).

    Like the authors' code, every quantized layer is dampened, the first and last layers
    pinned to 8 bits included (``include_pinned=False`` leaves those out); ``max_bits``
    restricts it to layers of at most that many bits.
    """

    def __init__(
        self,
        lambda_max: float = 0.1,
        aggregation: str = "kernel_mean",
        start: float = 0.25,
        max_bits: int | None = None,
        include_pinned: bool = True,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.lambda_max = lambda_max
        self.aggregation = aggregation
        self.start = start
        self.max_bits = max_bits
        self.include_pinned = include_pinned

    def weight(self, step: int, total_steps: int) -> float:
        return cosine_ramp(step / max(total_steps, 1), self.start, self.lambda_max)

    def penalty(self, model: nn.Module) -> Tensor:
        """The un-weighted dampening sum over layers (:func:`bin_distance`'s value and gradient,
        fused into one pass per layer: :class:`_BinDistance`)."""
        terms = [
            _bin_distance(layer.weight, layer.weight_quantizer, self.aggregation)
            for _, layer in counted_layers(model, self.max_bits, self.include_pinned)
        ]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def loss_term(self, model: nn.Module, step: int, total_steps: int) -> Tensor | None:
        lam = self.weight(step, total_steps)
        if lam == 0.0:
            return None  # skip the work while the ramp is off
        return lam * self.penalty(model)


def _bin_distance(weight: Tensor, quantizer: Quantizer, aggregation: str) -> Tensor:
    """:func:`bin_distance` (same value and gradient) with a hand-written backward."""
    if quantizer.policy == "lsq+" or not quantizer.enabled:
        return bin_distance(weight, quantizer, aggregation)
    n, p = quantizer.grid_range
    step = quantizer.broadcast_step(weight).detach()
    return _BinDistance.apply(weight, step, n, p, aggregation)


class _BinDistance(torch.autograd.Function):
    """``agg((s * clamp(round(w/s), n, p) - clamp(w, s*n, s*p))^2)``, gradient ``-2 d * c``.

    ``d`` is the bracket (0 for clipped weights) and ``c`` the aggregation's weight per element
    (1/kernel size, 1/numel or 1). Autograd's version keeps about six full-size intermediates
    alive for its backward; this keeps ``d`` only and computes it with in-place ops, which is
    most of dampening's cost per step (benchmarks/method_overhead.py).
    """

    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, n: int, p: int, how: str) -> Tensor:
        target = torch.mul(w, 1.0 / s).round_().clamp_(n, p).mul_(s)  # quantize_detached
        d = target.sub_(torch.maximum(torch.minimum(w, s * p), s * n))
        if how == "kernel_mean":
            scale = 1.0 / max(d[0].numel(), 1) if d.dim() > 0 else 1.0
        elif how == "mean":
            scale = 1.0 / max(d.numel(), 1)
        elif how == "sum":
            scale = 1.0
        else:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
        ctx.save_for_backward(d)
        ctx.scale = scale
        return aggregate(d.square(), how)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (d,) = ctx.saved_tensors
        return d * (grad * (-2.0 * ctx.scale)), None, None, None, None


# ----------------------------------------------------------------------------- freezing
class IterativeFreezing(OscillationTracker):
    """Freeze a weight for good at ``round(ema_int)`` once its oscillation frequency exceeds a
    threshold that is off for the first ``start`` of training, then a cosine from
    ``threshold_start`` down to ``threshold_end`` (Nagel: 0.01 at 4 bit, 0.011 at 3 bit).

    A frozen weight's latent value is written back as ``s * frozen_int`` after every step and
    its task gradient is masked to zero, so its integer never changes again — through
    checkpoints, inspection and export, which all read the latent weight.

    The step does no host-device sync: new freezes and the write-back are masked tensor ops
    (no ``any()``, no boolean indexing). Before the threshold first opens nothing can be
    frozen, so the write-back is skipped then (a Python flag, not a read of the mask).
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.001,
        threshold_start: float = 0.1,
        threshold_end: float = 0.01,
        start: float = 0.25,
        max_bits: int = 4,
        log_every: int = 50,
    ) -> None:
        super().__init__(model, momentum, threshold_end, max_bits, log_every)
        self.threshold_start = threshold_start
        self.threshold_end = threshold_end
        self.start = start
        for name in self.layer_names:
            w_int = self.transitions.previous(name)  # on the weights' device
            self.register_buffer(f"{_key(name)}__frozen", torch.zeros_like(w_int, dtype=torch.bool))
            self.register_buffer(
                f"{_key(name)}__frozen_int", torch.zeros_like(w_int, dtype=torch.int8)
            )
        # False while no weight can be frozen (fresh, threshold still closed): skip write-backs
        self._may_be_frozen = False
        self._hooked: dict[str, object] = {}
        self.attach(model)

    def attach(self, model: nn.Module) -> None:
        """(Re-)register the gradient masks on ``model``'s weights (after loading a checkpoint)."""
        for handle in self._hooked.values():
            handle.remove()
        layers = dict(quant_layers(model))
        for name in self.layer_names:  # look the mask up at call time: buffers may move
            self._hooked[name] = layers[name].weight.register_hook(
                lambda g, name=name: g.masked_fill(self.buffer(name, "frozen"), 0.0)
            )

    def threshold_at(self, step: int, total_steps: int) -> float:
        return cosine_decay(
            step / max(total_steps, 1), self.threshold_start, self.threshold_end, self.start
        )

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict | None:
        layers = dict(quant_layers(model))
        if self._may_be_frozen:
            self.write_back(layers)  # the optimizer may have moved frozen weights
        self.update(model, step)
        threshold = self.threshold_at(step, total_steps)
        if math.isfinite(threshold):
            self._may_be_frozen = True
            for name in self.layer_names:
                frozen = self.buffer(name, "frozen")
                new = (self.buffer(name, "freq") > threshold) & ~frozen
                frozen_int = self.buffer(name, "frozen_int")
                rounded = self.buffer(name, "ema_int").round().to(torch.int8)
                torch.where(new, rounded, frozen_int, out=frozen_int)
                frozen |= new
            self.write_back(layers)
        if self.log_every and (step + 1) % self.log_every == 0:
            return {"osc_share": self.oscillating_share(), "frozen_share": self.frozen_share()}
        return None

    @torch.no_grad()
    def write_back(self, layers: dict[str, QuantLayer]) -> None:
        """Set every frozen latent weight to ``s * frozen_int`` at the current step size."""
        for name in self.layer_names:
            weight = layers[name].weight
            value = layers[name].weight_quantizer.from_integer(
                self.buffer(name, "frozen_int"), weight
            )
            torch.where(self.buffer(name, "frozen"), value, weight.data, out=weight.data)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._may_be_frozen = True  # loaded masks may hold frozen weights

    def frozen(self, name: str) -> Tensor:
        """Boolean mask of the frozen weights of layer ``name``."""
        return self.buffer(name, "frozen")

    @torch.no_grad()
    def frozen_share(self) -> float:
        total = sum(self.buffer(n, "frozen").numel() for n in self.layer_names)
        return sum(int(self.buffer(n, "frozen").sum()) for n in self.layer_names) / max(total, 1)


# ----------------------------------------------------------------------------- registry
LOG_POINTS = 100  # log_every=0: the oscillating share is logged about this often per run


def _log_every(log_every: int, total_steps: int) -> int:
    """``log_every`` in steps; 0 picks about :data:`LOG_POINTS` points over the run, enough to
    draw a curve of a short run (a fixed 50 gave 3 points in the demo's 198 steps)."""
    return log_every if log_every > 0 else max(1, total_steps // LOG_POINTS)


@register_method("track", needs_quant=True)
def _track(
    model, quant, total_steps, momentum: float = 0.001, threshold: float = 0.01, log_every: int = 0
) -> list[Hook]:
    """QAT plus an oscillation tracker (the LSQ baseline of the oscillation study)."""
    log_every = _log_every(log_every, total_steps)
    return [OscillationTracker(model, momentum, threshold, log_every=log_every)]


def _check_dampen(aggregation: str, **_: Any) -> None:
    """A one-line ConfigError for an aggregation ``dampen`` does not offer."""
    if aggregation not in AGGREGATIONS:
        raise ConfigError(
            f"method.aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}"
        )


@register_method("dampen", aliases={"lambda": "lambda_max"}, needs_quant=True, check=_check_dampen)
def _dampen(
    model,
    quant,
    total_steps,
    lambda_max: float = 0.1,
    aggregation: str = "kernel_mean",
    start: float = 0.25,
    include_pinned: bool = True,
    momentum: float = 0.001,
    threshold: float = 0.01,
    log_every: int = 0,
) -> list[Hook]:
    """QAT with oscillation dampening, a loss pulling weights to bin centres (Nagel et al.)."""
    log_every = _log_every(log_every, total_steps)
    return [
        OscillationDampening(lambda_max, aggregation, start, include_pinned=include_pinned),
        OscillationTracker(model, momentum, threshold, log_every=log_every),
    ]


@register_method("freeze", needs_quant=True)
def _freeze(
    model,
    quant,
    total_steps,
    momentum: float = 0.001,
    threshold_start: float = 0.1,
    threshold_end: float = 0.0,  # 0: Nagel's 0.011 at 3 bits, else 0.01
    start: float = 0.25,
    max_bits: int = 4,
    log_every: int = 0,
) -> list[Hook]:
    """QAT with iterative freezing of oscillating weights (Nagel et al.)."""
    log_every = _log_every(log_every, total_steps)
    if not threshold_end:
        threshold_end = 0.011 if quant is not None and quant.weight_bits == 3 else 0.01
    return [
        IterativeFreezing(
            model, momentum, threshold_start, threshold_end, start, max_bits, log_every
        )
    ]
