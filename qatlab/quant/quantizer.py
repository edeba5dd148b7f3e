"""The fake quantizer: what a quantized number is, in one module.

``q(x) = s * clamp(round(x / s), n, p)`` with a straight-through estimator for ``round``.
The integer view ``clamp(round(x / s), n, p)`` is computed here and nowhere else
(:meth:`Quantizer.integer`): trackers, transition counters, freezing and export read it from here.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from qatlab.errors import ConfigError
from qatlab.quant import fused

BITS = range(2, 9)
GRIDS = ("full", "restricted")
SCALE_POLICIES = ("lsq", "lsq+", "maxabs", "maxabs_ste", "mse", "percentile", "minmax")
DYNAMIC_POLICIES = ("maxabs", "maxabs_ste")  # step recomputed from the tensor on every call
INIT_METHODS = ("mse", "meanabs", "minmax", "percentile")
GRANULARITIES = ("tensor", "channel")
_EPS = 1e-8
_MAX_SAMPLES = 1 << 20  # values kept per quantizer while calibrating
# what Quantizer._plan is computed from: setting any of these clears it
_PLAN_INPUTS = frozenset(
    ("enabled", "_observing", "_ready", "policy", "bits", "signed", "grid", "use_grad_scale")
    + ("role", "step", "per_channel")
)


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise a one-line error."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ConfigError(f"bit width must be an integer from 2 to 8, got {bits!r}")
    return bits


def grid_range(bits: int, signed: bool, grid: str = "full") -> tuple[int, int]:
    """Integer grid ``[n, p]``: signed full (-8..7 at 4 bit), restricted (-7..7), or unsigned."""
    check_bits(bits)
    if grid not in GRIDS:
        raise ConfigError(f"grid must be one of {GRIDS}, got {grid!r}")
    if not signed:
        return 0, 2**bits - 1
    p = 2 ** (bits - 1) - 1
    return (-p if grid == "restricted" else -p - 1), p


class _FakeQuant(torch.autograd.Function):
    """LSQ fake quantization (per tensor, or per channel along axis 0) with LSQ's gradients.

    ``dx = g * inside`` and ``ds = sum(g * (q - x/s))`` inside the range, ``sum(g * q)`` where
    clipped (q = n or p), as ``torch._fake_quantize_learnable_*`` defines them (its in-range
    test is on the rounded value: ``n - 0.5 < x/s < p + 0.5``, exact ties aside). The hand-tuned
    eager kernel: PyTorch's own fused kernels (and any op on a bool mask) are several times
    slower on CPU, and every fresh large buffer costs page faults, so the work is a few
    vectorised in-place passes.

    Per tensor on CPU, the step is read once as a Python number (no device sync on the CPU)
    and backward reads the saved output ``out = s * levels`` (the next layer's input, which
    that layer saves anyway: no extra memory): ``sum g*levels = <g, out> / s`` and the
    in-range test is ``(n - 0.5) s < x < (p + 0.5) s``, so backward is one
    ``hardtanh_backward`` and two dot products. Elsewhere (per channel, or on an accelerator,
    where ``float(step)`` would be a host sync) it recomputes ``x / s`` from ``x``.

    ``floor`` (optional sixth input) clamps the step to at least ``floor`` inside, with the
    gradient of ``step.clamp_min(floor)`` (none where ``step < floor``): the quantizer's
    ``1e-8`` guard without a separate autograd node per call.

    Per tensor on a CPU float32 tensor, :func:`fake_quantize` takes the C++ kernels of
    :mod:`qatlab.quant.fused` instead; this Function is their fallback and their reference
    (``QATLAB_FUSED_KERNELS=0``): the same output and ``dx`` bit for bit, the step gradient up
    to float32 rounding (another order of summation).
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, n: int, p: int, grad_scale: float, floor=None):
        ctx.n, ctx.p, ctx.grad_scale, ctx.nargs = n, p, grad_scale, 5 if floor is None else 6
        ctx.floor = floor
        if step.dim() == 0 and x.device.type == "cpu":
            s, ctx.held = _cpu_step(step, floor)
            ctx.s = s
            out = _per_tensor_quantize(x, s, n, p)
            ctx.save_for_backward(x, step, out)
            return out
        ctx.s = None
        clamped = step if floor is None else step.clamp_min(floor)
        s = _broadcast(clamped, x)
        out = torch.mul(x, s.reciprocal())
        out.round_().clamp_(float(n), float(p)).mul_(s)
        ctx.save_for_backward(x, step, None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, step, out = ctx.saved_tensors
        n, p = ctx.n, ctx.p
        grad_step = None
        tail = (None,) * (ctx.nargs - 2)
        s = ctx.s
        if s is not None:
            step_grad = ctx.needs_input_grad[1] and not ctx.held
            # <g, out> first: the next layer's backward has just read ``out`` and written ``g``
            outer = torch.dot(grad.reshape(-1), out.reshape(-1)) if step_grad else None
            grad_x = torch.ops.aten.hardtanh_backward(grad, x, (n - 0.5) * s, (p + 0.5) * s)
            if step_grad:
                inner = torch.dot(grad_x.reshape(-1), x.reshape(-1))
                grad_step = outer.sub_(inner).mul_(ctx.grad_scale / s)
            elif ctx.needs_input_grad[1]:
                grad_step = torch.zeros_like(step)  # clamp_min's gradient below the floor
            return (grad_x if ctx.needs_input_grad[0] else None), grad_step, *tail
        floor = ctx.floor
        s = _broadcast(step if floor is None else step.clamp_min(floor), x)
        scaled = torch.mul(x, s.reciprocal())
        # inside <=> n <= round(x/s) <= p <=> n - 0.5 < x/s < p + 0.5 (exact ties aside)
        grad_x = torch.ops.aten.hardtanh_backward(grad, scaled, n - 0.5, p + 0.5)
        if ctx.needs_input_grad[1]:
            # sum g*(q - x/s) inside + g*q outside  ==  sum g*q - sum (g*inside)*(x/s)
            if step.dim() == 0:
                inner = torch.dot(grad_x.reshape(-1), scaled.reshape(-1))
                levels = scaled.round_().clamp_(float(n), float(p))
                grad_step = torch.dot(grad.reshape(-1), levels.reshape(-1)) - inner
            else:
                rows = step.numel()
                inner = (grad_x * scaled).reshape(rows, -1).sum(1)
                levels = scaled.round_().clamp_(float(n), float(p))
                grad_step = (grad * levels).reshape(rows, -1).sum(1) - inner
            grad_step = grad_step * ctx.grad_scale
            if floor is not None:  # as clamp_min's backward: no gradient below the floor
                grad_step = torch.where(step >= floor, grad_step, 0.0)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_step, *tail


def _per_tensor_quantize(x: Tensor, s: float, n: int, p: int) -> Tensor:
    """``s * clamp(round(x * (1/s)), n, p)`` in four in-place float32 passes over a new tensor.

    ``x * fl32(1/s)`` and ``* s`` as with a 0-dim float tensor (bitwise equal: 1/s rounded to
    double, then to float32, is 1/s rounded to float32); ``s = 0`` gives ``1/s = +-inf``."""
    out = torch.mul(x, 1.0 / s if s != 0 else math.copysign(math.inf, s))
    return out.round_().clamp_(float(n), float(p)).mul_(s)


def _cpu_step(step: Tensor, floor: float | None) -> tuple[float, bool]:
    """A CPU step as a Python number (no device sync on the CPU), clamped to ``floor`` as
    ``clamp_min`` does, and whether the clamp holds it (then it gets no gradient; NaN too)."""
    s = float(step)
    if floor is None or s >= _f32(floor):
        return s, False
    return (s if s != s else _f32(floor)), True


@functools.cache
def _f32(value: float) -> float:
    """``value`` rounded to float32, as a float32 tensor op (clamp_min, >=) sees a Python scalar."""
    return float(torch.tensor(value, dtype=torch.float32))


class _FakeQuantTraceable(torch.autograd.Function):
    """The same function and gradients in out-of-place ops only, for ``torch.compile``.

    Dynamo traces both passes and the compiler fuses them with their neighbours (a
    BatchNorm/ReLU before, the conv's input after; the step gradient becomes one reduction in
    the same loop as ``dx``), which the in-place eager kernel cannot offer it.
    :func:`fake_quantize` picks this form while compiling and :class:`_FakeQuant` otherwise.
    """

    @staticmethod
    def forward(x: Tensor, step: Tensor, n: int, p: int, grad_scale: float) -> Tensor:
        s = _broadcast(step, x)
        return torch.clamp(torch.round(x * s.reciprocal()), n, p) * s

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, step, n, p, grad_scale = inputs
        ctx.save_for_backward(x, step)
        ctx.n, ctx.p, ctx.grad_scale = n, p, grad_scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, step = ctx.saved_tensors
        n, p = ctx.n, ctx.p
        s = _broadcast(step, x)
        scaled = x * s.reciprocal()
        inside = (scaled > n - 0.5) & (scaled < p + 0.5)
        grad_x = torch.where(inside, grad, 0.0)
        grad_step = None
        if ctx.needs_input_grad[1]:
            levels = torch.clamp(torch.round(scaled), n, p)
            per_elem = grad * levels - grad_x * scaled
            if step.dim() == 0:
                grad_step = per_elem.sum() * ctx.grad_scale
            else:
                grad_step = per_elem.reshape(step.numel(), -1).sum(1) * ctx.grad_scale
        return (grad_x if ctx.needs_input_grad[0] else None), grad_step, None, None, None


def _broadcast(step: Tensor, x: Tensor) -> Tensor:
    """A per-channel step as ``[C, 1, 1, ...]`` so it broadcasts along axis 0 of ``x``."""
    return step if step.dim() == 0 else step.reshape(-1, *([1] * (x.dim() - 1)))


def fake_quantize(
    x: Tensor, step: Tensor, n: int, p: int, grad_scale: float = 1.0, floor: float | None = None
) -> Tensor:
    """``step * clamp(round(x / step), n, p)``; per channel (axis 0) when ``step`` is 1-D.

    LSQ's gradients for ``x`` and ``step`` (the latter times ``grad_scale``). Under
    ``torch.compile`` a traceable form the compiler can fuse; eagerly one-pass C++ kernels for a
    per-tensor step on a CPU float32 tensor (:mod:`qatlab.quant.fused`) and a hand-tuned ATen
    kernel otherwise; all give the same values and gradients (float32 rounding aside).
    ``floor``: use ``step.clamp_min(floor)`` (and its gradient) in place of ``step``.
    """
    if torch.compiler.is_compiling():
        if floor is not None:
            step = step.clamp_min(floor)
        return _FakeQuantTraceable.apply(x, step, n, p, grad_scale)
    out = fused.fake_quantize(x, step, n, p, grad_scale, floor)  # per tensor, CPU, float32
    if out is not None:
        return out
    if floor is None:
        return _FakeQuant.apply(x, step, n, p, grad_scale)
    return _FakeQuant.apply(x, step, n, p, grad_scale, floor)


def _channel_view(x: Tensor, per_channel: bool) -> Tensor:
    """Rows = channels (axis 0) for per-channel statistics, one row otherwise."""
    return x.detach().reshape(x.shape[0], -1) if per_channel else x.detach().reshape(1, -1)


def mse_step(x: Tensor, n: int, p: int, per_channel: bool = False, candidates: int = 100) -> Tensor:
    """Step size minimising ``sum (x - q(x))^2`` over clipping thresholds ``T_k = k/100 * max|x|``.

    Nagel et al.'s search (100 candidates). Their code pads ``max|x|`` by 0.5; that makes the
    candidates far too coarse for small weights, so we search ``(0, max|x|]`` (documented choice).
    """
    rows = _channel_view(x, per_channel).float()
    absmax = rows.abs().amax(1).clamp_min(_EPS)  # [R]
    best_err = torch.full_like(absmax, float("inf"))
    best_step = absmax / p
    fractions = torch.arange(1, candidates + 1, device=x.device, dtype=rows.dtype) / candidates
    chunk = max(1, (1 << 24) // max(rows.numel(), 1))
    for start in range(0, candidates, chunk):
        steps = fractions[start : start + chunk, None] * absmax[None, :] / p  # [K, R]
        s = steps[:, :, None]
        err = ((rows[None] / s).round().clamp(n, p) * s - rows[None]).pow(2).sum(-1)  # [K, R]
        k = err.argmin(0)
        cand_err = err.gather(0, k[None]).squeeze(0)
        better = cand_err < best_err
        best_err = torch.where(better, cand_err, best_err)
        best_step = torch.where(better, steps.gather(0, k[None]).squeeze(0), best_step)
    return best_step if per_channel else best_step[0]


def static_step(
    x: Tensor, method: str, n: int, p: int, per_channel: bool = False, percentile: float = 99.99
) -> Tensor:
    """Step size of ``x`` by a calibration method: mse, meanabs (LSQ's), minmax, percentile."""
    if method == "mse":
        return mse_step(x, n, p, per_channel)
    rows = _channel_view(x, per_channel).float().abs()
    if method == "meanabs":
        step = 2 * rows.mean(1) / math.sqrt(p)
    elif method in ("minmax", "maxabs"):
        step = rows.amax(1) / p
    elif method == "percentile":
        if rows.shape[1] > _MAX_SAMPLES:
            idx = torch.randperm(rows.shape[1], device=rows.device)[:_MAX_SAMPLES]
            rows = rows[:, idx]
        step = torch.quantile(rows, percentile / 100.0, dim=1) / p
    else:
        raise ConfigError(f"unknown calibration method {method!r}; choose from {INIT_METHODS}")
    step = step.clamp_min(_EPS)
    return step if per_channel else step[0]


class Quantizer(nn.Module):
    """Fake-quantizes a tensor on a ``bits``-bit integer grid with a step size chosen by a policy.

    Policies: ``lsq`` (learned step), ``lsq+`` (learned step and offset, unsigned grid),
    ``maxabs`` (``max|x|/p`` every call, held constant in backward), ``maxabs_ste``
    (``max|x|/p`` every call with the gradient flowing through it: ``dq/ds = round(x/s) - x/s``
    and ``ds/dx = sign(x)/p`` at the largest ``|x|``; the quantizer of Wenshøj et al.'s QAT
    baseline and regularizer), ``mse``/``percentile``/``minmax`` (calibrated once).
    ``signed="auto"`` decides the sign from the first data seen (unsigned after a ReLU).
    ``enabled=False`` makes it the identity; :meth:`set_bits` changes the bit width afterwards.
    An activation quantizer that was never calibrated initialises itself from its first
    training batch (LSQ), and refuses to run in eval mode (its step would come from
    evaluation data).
    """

    _plan: tuple | None = None
    """Per-call constants of a settled quantizer (``forward``'s fast path): whether the key is
    ``x``'s whole shape, the shape key, a learned step?, ``n``, ``p``, the gradient scale."""

    def __init__(
        self,
        bits: int = 4,
        *,
        signed: bool | str = True,
        grid: str = "full",
        scale: str = "lsq",
        init: str = "mse",
        channels: int = 1,
        grad_scale: bool = True,
        percentile: float = 99.99,
        role: str = "input",
    ) -> None:
        super().__init__()
        check_bits(bits)
        if scale not in SCALE_POLICIES:
            raise ConfigError(f"scale policy must be one of {SCALE_POLICIES}, got {scale!r}")
        if init not in INIT_METHODS:
            raise ConfigError(f"init must be one of {INIT_METHODS}, got {init!r}")
        if grid not in GRIDS:
            raise ConfigError(f"grid must be one of {GRIDS}, got {grid!r}")
        if signed not in (True, False, "auto"):
            raise ConfigError(f"signed must be true, false or 'auto', got {signed!r}")
        self.bits = bits
        self.signed = False if scale == "lsq+" else signed
        self.grid = grid
        self.policy = scale
        self.init_method = init
        self.per_channel = channels > 1
        self.use_grad_scale = grad_scale
        self.role = role  # "weight" or "input": only changes how LSQ's gradient scale counts
        self.percentile = percentile
        self.enabled = True
        self.fixed_bits = False  # set for first/last layers pinned to 8 bits: set_bits skips them
        self._observing = False
        self._samples: list[Tensor] = []
        shape = (channels,) if self.per_channel else ()
        if scale in ("lsq", "lsq+"):
            self.step = nn.Parameter(torch.ones(shape))
        else:
            self.register_buffer("step", torch.ones(shape))
        if scale == "lsq+":
            self.offset = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready: bool | None = False  # Python mirror of ``initialized`` (no GPU sync)

    # ---------------------------------------------------------------- grid
    @property
    def grid_range(self) -> tuple[int, int]:
        """The integer range ``(n, p)`` at the current bit width and sign."""
        signed = True if self.signed == "auto" else self.signed
        return grid_range(self.bits, signed, self.grid)

    def set_bits(self, bits: int, rescale: bool = True) -> None:
        """Change the bit width; ``rescale`` keeps the clipping range ``s * p`` fixed."""
        check_bits(bits)
        _, p_old = self.grid_range
        self.bits = bits
        _, p_new = self.grid_range
        if rescale and self.policy not in DYNAMIC_POLICIES and bool(self.initialized):
            with torch.no_grad():
                self.step.mul_(p_old / p_new)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        plan = self._plan
        if plan is not None:  # the settled per-call constants: no lookups but these
            whole, shape, learned, n, p, scale = plan
            if (x.shape if whole else x.shape[1:]) == shape:
                step = self._parameters["step"] if learned else self._buffers["step"]
                return fake_quantize(x, step, n, p, scale, _EPS)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        """``forward`` in full: every setting read; settles :attr:`_plan` where it can."""
        if not self.enabled:
            return x
        if self._observing:
            self._observe(x)
            return x
        if self._ready is None:  # just loaded from a state dict
            self._ready = bool(self.initialized)
        policy = self.policy
        if not self._ready and policy not in DYNAMIC_POLICIES:
            if not self.training and self.role != "weight":
                # evaluation data (maybe the test set) must never pick a step size
                raise ConfigError(
                    "an activation quantizer has no step size yet and the model is in eval "
                    "mode; call qatlab.calibrate(qmodel, train_batches) first (or train it: "
                    "LSQ initialises from the first training batch)"
                )
            self.initialize(x)
        n, p = self.grid_range
        if policy in DYNAMIC_POLICIES:
            step = self.current_step(x, grad=policy == "maxabs_ste")
            return fake_quantize(x, step, n, p)
        # the step clamped to >= 1e-8 (current_step) inside the kernel: one autograd node
        step = self.step
        if policy == "lsq+":
            scale = self._grad_scale(x, p)
            return fake_quantize(x - self.offset, step, n, p, scale, _EPS) + self.offset
        # LSQ's gradient scale (it only reaches a step that has a gradient)
        scale = self._grad_scale(x, p) if policy == "lsq" else 1.0
        if not torch.compiler.is_compiling():
            # the scale counts a weight's every element, an input's per sample (if it has a
            # batch axis): the shape it was computed for is part of the plan
            whole = self.role == "weight" or x.dim() < 2
            shape = x.shape if whole else x.shape[1:]
            self._plan = (whole, shape, policy == "lsq", n, p, scale)
        return fake_quantize(x, step, n, p, scale, _EPS)

    def __setattr__(self, name: str, value) -> None:
        if name in _PLAN_INPUTS:  # a setting the plan depends on: settle it again
            self.__dict__["_plan"] = None
        super().__setattr__(name, value)

    def current_step(self, x: Tensor | None = None, grad: bool = False) -> Tensor:
        """The step size in use (max-abs policies compute it from ``x``; never below 1e-8).

        ``grad=True`` keeps a max-abs step attached to ``x`` (``max|x|/p`` is differentiable);
        otherwise it is detached. Learned steps are returned as they are.
        """
        if self.policy in DYNAMIC_POLICIES:
            if x is None:
                raise ValueError("a max-abs quantizer needs the tensor to compute its step")
            _, p = self.grid_range
            if not grad:
                return static_step(x, "maxabs", 0, p, self.per_channel).detach()
            rows = x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)
            step = (rows.abs().amax(1) / p).clamp_min(_EPS)
            return step if self.per_channel else step[0]
        return self.step.clamp_min(_EPS)

    def _grad_scale(self, x: Tensor, p: int) -> float:
        """LSQ's ``1/sqrt(N * p)``: N = weights per step, or features per sample for inputs."""
        if not self.use_grad_scale:
            return 1.0
        if self.role == "weight":
            count = x.numel() // self.step.numel()
        else:
            count = math.prod(x.shape[1:]) if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(max(count, 1) * p)

    def broadcast_step(self, x: Tensor) -> Tensor:
        """The step in use, shaped to broadcast against ``x`` (``[C, 1, ...]`` per channel)."""
        return _broadcast(self.current_step(x), x)

    @torch.no_grad()
    def integer(self, x: Tensor) -> Tensor:
        """The integer tensor ``clamp(round(x / s), n, p)`` (``w_int``), without gradient.

        The one place integers are computed: transitions, tracking, freezing, the
        regularizers and export all read them from here.
        """
        n, p = self.grid_range
        step = self.broadcast_step(x)
        if self.policy == "lsq+":
            x = x - self.offset
        return torch.clamp(torch.round(x * (1.0 / step)), n, p)

    @torch.no_grad()
    def from_integer(self, ints: Tensor, like: Tensor) -> Tensor:
        """Dequantize: ``s * ints`` (plus the offset for ``lsq+``), shaped like ``like``."""
        value = ints.to(like.dtype) * self.broadcast_step(like)
        return value + self.offset if self.policy == "lsq+" else value

    @torch.no_grad()
    def quantize_detached(self, x: Tensor) -> Tensor:
        """``sg[q(x)]``: the quantized value without gradient (same numbers as ``forward``)."""
        return self.from_integer(self.integer(x), x)

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the step (and offset, sign) from a tensor: the weight, or a batch of activations."""
        if self.signed == "auto":
            self.signed = bool((x < 0).any())
        if self.policy in DYNAMIC_POLICIES:
            self.initialized.fill_(True)
            self._ready = True
            return
        n, p = self.grid_range
        if self.policy == "lsq+":
            lo, hi = x.min(), x.max()
            self.step.fill_(float(((hi - lo) / p).clamp_min(_EPS)))
            self.offset.fill_(float(lo))
        else:
            method = self.init_method if self.policy == "lsq" else self.policy
            self.step.copy_(static_step(x, method, n, p, self.per_channel, self.percentile))
        self.initialized.fill_(True)
        self._ready = True

    def start_observing(self) -> None:
        """Calibration mode: pass inputs through unchanged and keep a sample of them."""
        self._observing, self._samples = True, []

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Leave calibration mode and initialise the step from everything observed."""
        self._observing = False
        if self._samples:
            data = torch.cat(self._samples, dim=1 if self.per_channel else 0)
            self.initialize(data)
        self._samples = []

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        rows = x.detach().reshape(x.shape[0], -1) if self.per_channel else x.detach().reshape(-1)
        total = (
            sum(s.shape[-1] for s in self._samples)
            if self.per_channel
            else sum(s.numel() for s in self._samples)
        )
        budget = _MAX_SAMPLES - total
        if budget <= 0:
            return
        size = rows.shape[-1]
        if size > budget:
            # keep the extremes (minmax needs them) plus a random subsample
            idx = torch.randperm(size, device=x.device)[:budget]
            extremes = torch.stack([rows.amin(-1), rows.amax(-1)], -1)
            rows = torch.cat([rows[..., idx], extremes], -1)
        self._samples.append(rows.clone())

    # ---------------------------------------------------------------- state
    def settle(self) -> None:
        """Read ``initialized`` into the Python flag now (after a state-dict load it is read
        lazily by the next forward): a host read that should not happen inside a compiled
        graph (``torch.compile`` would break the graph there and compile twice)."""
        if self._ready is None:
            self._ready = bool(self.initialized)

    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "signed": self.signed, "fixed_bits": self.fixed_bits}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        from qatlab.quant.guard import mark

        mark(self)  # a deep copy's learned step stays guarded like the original's

    def set_extra_state(self, state: dict) -> None:
        self.bits = state["bits"]
        self.signed = state["signed"]
        self.fixed_bits = state.get("fixed_bits", False)
        self._ready = None  # re-read ``initialized`` (loaded alongside) on the next forward

    def extra_repr(self) -> str:
        n, p = self.grid_range
        chan = f", channels={self.step.numel()}" if self.per_channel else ""
        return (
            f"bits={self.bits}, grid=[{n},{p}], policy={self.policy}{chan}, enabled={self.enabled}"
        )
