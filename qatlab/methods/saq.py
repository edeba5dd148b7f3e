"""Sharpness-aware quantization, SAQ (Liu, Cai, Zhuang): SAM whose perturbation lives on the
quantized weights. An optimizer wrapper in SAM's shape that wraps any base optimizer and works
in a plain PyTorch loop::

    opt = SAQ(torch.optim.SGD(qmodel.parameters(), lr=0.1), qmodel, rho=0.3)
    def closure(sync=True):
        opt.zero_grad()
        loss = F.cross_entropy(qmodel(x), y)
        loss.backward()
        return loss
    opt.step(closure)                     # pass 1, perturb, pass 2, restore, base step

or by hand, SAM style (no closure)::

    with opt.first_pass():                # case 3 keeps q(w) and dL/dq(w)
        F.cross_entropy(qmodel(x), y).backward()
    opt.first_step(zero_grad=True)        # e from the gradients; forward now uses the ball
    F.cross_entropy(qmodel(x), y).backward()
    opt.second_step(zero_grad=True)       # restore exactly, base optimizer step

**The three cases** (METHODS.md §4), for the weights of every quantized layer:

1. ``L(q(w) + e)``, ``e`` from the latent-weight gradient (STE), added to ``q(w)``;
2. ``L(q(w + e))``: the latent weights are perturbed in place before quantizing (plain SAM on
   a QAT model; rounding swallows most of a small ``e``) and restored exactly;
3. **SAQ** (default): ``L(q(w) + e)`` with ``e`` from ``dL/dq(w)``
   (:func:`qatlab.quant.keep_quantized_weights`), added to ``q(w)`` in the forward pass
   (:func:`qatlab.quant.perturbed_weights`): latent weights and step sizes are never written.

``e = rho * g / ||g||`` over every tensor in the ball (one global L2 norm), measured in the
ball's units (``ball``, below: by default each weight in units of its std). ``adaptive=True``
is ASAM's scale-invariant ball: ``T = |x| + eta`` (``x`` the tensor the gradient is taken
w.r.t.: ``q(w)`` in case 3, ``w`` otherwise), ``e = rho * T^2 g / ||T g||``, so that
``||e / T|| = rho`` exactly (the authors' ``qasam.py`` normalizes by ``||(|x|+eta) g||`` but
scales by ``x^2``, which breaks that identity). Optional members of the ball, perturbed in
place and restored bit for bit from a copy: ``bias`` (biases of the quantized layers), ``norm``
(affine weight and bias of BatchNorm/LayerNorm/GroupNorm), ``act_steps`` (learned step sizes of
the activation quantizers). The official code includes biases and BN affine by default.

**The ball's units (``ball``).** The authors' quantizer (``LIQ_wn``, ``models/LIQ_wn_qsam.py``)
standardizes each conv weight with its detached mean and std before quantizing (2^b levels in
``[-alpha, alpha]``, no zero level) and feeds the standardized ``q(w)`` to the conv (BN absorbs
the scale), so their ``dL/dq(w)`` and ``e`` live in units of the weight's std; qatlab's LSQ
quantizes raw weights, where the same ``rho`` is a ball 10-40x larger relative to ``||q(w)||``
(docs/results/saq.md measures it per layer). Rather than a second quantizer, the ball is scaled
per tensor: with ``u_k`` the unit of tensor ``k``, ``e_k = rho u_k^2 g_k / ||(u_k g_k)_k||`` (so
``||(e_k / u_k)_k|| = rho``). ``ball="raw"``: every ``u = 1`` (qatlab's original).
``ball="std"`` (default): ``u`` = the detached, unbiased std of the layer's latent weight for
that weight (and its learned step size, ``weight_steps``), 1 for everything else.
``ball="authors"``: ``std`` for conv layers, raw for linear ones, as their code (their
``QLinear`` does not standardize). Why a scaled ball and not their quantizer: for a layer whose
output scale is normalised away (BN after it), ``std_l`` times their ``e`` *is* ``e_l`` above,
so ``rho`` means what it means in the paper, while any qatlab quantizer and any model (also
without BN, where dropping the std changes the network) keep working; the test suite checks it
against their ``QSAM`` on identical tensors (conv + BN + linear, W4A4). The adaptive ball in
``std`` units is ``T = |x| + eta u`` (their ``|x'| + eta`` on standardized ``x' = x / std``).
Default ``ball="std", rho=0.05``: what validation picks in docs/results/saq.md (in a tie with
std 0.3/0.4 and raw 0.05), where the paper's ``rho = 0.3`` in std units trains within noise of
plain QAT (early-stopped) and the same 0.3 in raw units is about 4 points worse on validation.

**The authors' other options.** ``weight_steps`` = their ``include_wclip`` (weight step sizes in
the ball, perturbed in place; off by default, as theirs). ``act_steps`` = their
``include_aclip``: on in their runs whatever the flag says (``--include_aclip False`` parses as
``True``: argparse ``type=bool``). Their ball holds the clip ``alpha`` (activation step
``alpha / (2^b - 1)``), qatlab's the LSQ step ``s`` (its gradient also carries LSQ's gradient
scale), so for the same loss a step moves about ``(2^b - 1)^2`` times further in qatlab's ball
than theirs, in step units. ``norm`` = their
``include_bn`` (on in theirs), ``bias``: always on in theirs. Their adaptive variant (QASAM)
leaves biases (layer and BN) unscaled: ``adaptive_bias=False``; qatlab's default ``True`` scales
every tensor in the ball. The authors' full default ball is ``ball="authors", bias=True,
norm=True, act_steps=True``.

**Better than the official code:** the second pass runs inside
:func:`qatlab.methods.frozen_bn_stats` (BN running statistics move once per step;
``bn_update=True`` gives the authors' behaviour); ``rho == 0`` skips the second pass, so the step
is exactly plain QAT; whatever is perturbed in place is restored from a copy (not ``p - e``),
also when the second pass raises; under DDP the default is the exact global ``e`` (case 3: the
first pass skips the parameter all-reduce and the ``dL/dq(w)`` tensors are averaged over ranks in
one all-reduce; cases 1/2 sync the first pass), ``per_replica=True`` the cheaper per-replica ``e``
(first pass ``closure(sync=False)``, no communication), which is what the authors' code does.

**Efficient variant (``every=k``).** Every k-th step is a full SAQ step (two passes) that also
keeps its ``e``; the k-1 steps in between are *single* passes at ``q(w) + e_last`` (BN
statistics update normally, as in any single-pass step), and the optimizer steps with those
gradients. Cost per step: ``(k + 1) / k`` passes instead of 2, i.e. 1.25x an LSQ step at k=4
against about 2x for full SAQ. Why it keeps most of the gain: the ascent direction of a small
ball changes slowly from step to step (the premise of LookSAM-style reuse), and the descent
gradient is still taken at a point on the sharpness-aware neighbourhood every step; only its
ascent direction is up to k-1 steps stale. Knobs: ``every`` (k; 1 = full SAQ), ``rho`` as usual.
Trade-off: staler ``e`` as k grows; reused steps' first (logged) pass is the perturbed one, so
the train loss the loop logs is measured at ``q(w) + e_last`` on those steps. ``e_last`` and the
step counter are wrapper state (saved with the optimizer), so a resumed run is exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qatlab.errors import ConfigError
from qatlab.methods.base import Hook, OptimizerWrapper, frozen_bn_stats, grad_norm
from qatlab.methods.registry import register_method
from qatlab.quant.layers import quant_layers
from qatlab.quant.weights import KeptWeights, keep_quantized_weights, perturbed_weights, release

CASES = (1, 2, 3)
BALLS = ("raw", "std", "authors")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_EPS = 1e-12


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# The defaults are what docs/results/saq.md's validation selection picks among raw rho {0.05,
# 0.3} and std rho {0.05, 0.3, 0.4, 1} (cnn1d/mlp5, W3A3/W4A4, selection seeds 100-101): the
# std ball (rho in units of each weight's std, as the authors' standardized weights), rho 0.05
# (SAM's default), within 0.31 points of std 0.3/0.4 and raw 0.05 on validation. At the paper's
# 0.3 (ImageNet) the std ball is within noise of plain QAT there (early-stopped test -0.83
# [-1.83, +0.17] points, 12 pairs) where the raw ball is ~4 points worse on validation; pass
# rho=0.3 (``--rho 0.3``) for the paper's setting, ``ball="raw"`` for qatlab's original units
# (before 2026-12: raw, 0.05).
DEFAULT_RHO = 0.05
DEFAULT_BALL = "std"


class SAQ(OptimizerWrapper):
    """SAM on a quantized model (cases 1, 2, 3 = SAQ), wrapping ``base``; see the module doc.

    ``step(closure)`` calls the closure twice on a full step (once on a reused step of the
    efficient variant, once with ``rho == 0``); the learning rate is the loop's.
    """

    def __init__(
        self,
        base: Any,
        model: nn.Module,
        rho: float = DEFAULT_RHO,
        case: int = 3,
        *,
        every: int = 1,
        adaptive: bool = False,
        eta: float = 0.01,
        bias: bool = False,
        norm: bool = False,
        act_steps: bool = False,
        weight_steps: bool = False,
        ball: str = DEFAULT_BALL,
        adaptive_bias: bool = True,
        bn_update: bool = False,
        per_replica: bool = False,
    ) -> None:
        super().__init__(base)
        check(rho, case, every, eta, ball)
        self.model = model
        self.rho, self.case, self.every = float(rho), int(case), int(every)
        self.adaptive, self.eta, self.adaptive_bias = adaptive, float(eta), adaptive_bias
        self.ball = ball
        self.bn_update, self.per_replica = bn_update, per_replica
        self.layers = dict(quant_layers(model))
        if not self.layers:
            raise ConfigError("SAQ needs a quantized model (qatlab.quantize)")
        self.extras, self.biases, self.step_of = _extras(
            model, self.layers, bias, norm, act_steps, weight_steps
        )
        self.steps = 0  # optimizer steps taken (drives `every`)
        self.last_e: dict[str, Tensor] | None = None  # the reused perturbation (every > 1)
        self._kept: KeptWeights | None = None
        self._stack: contextlib.ExitStack | None = None
        self._saved: dict[str, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ SAM-shaped API
    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Run the first forward/backward inside: case 3 keeps ``q(w)`` and ``dL/dq(w)``."""
        if self.case != 3:
            yield
            return
        if self._kept is not None:
            release(self._kept)
        with keep_quantized_weights(self.model) as kept:
            self._kept = kept
            yield

    @torch.no_grad()
    def perturbation(self) -> dict[str, Tensor]:
        """``e`` for every tensor in the ball, from the first pass's gradients: keys are layer
        names (weights) and parameter names (extras); global L2 norm ``rho`` (in the ``T``
        metric if adaptive)."""
        grads, refs = self._gradients()
        if not grads:
            raise RuntimeError(
                "SAQ found no gradients: run the first forward/backward (case 3: inside "
                "first_pass()) before first_step()"
            )
        units = self.units(grads)
        if self.adaptive:
            scales = {
                k: refs[k].abs().add(self.eta * units.get(k, 1.0))
                for k in grads
                if self.adaptive_bias or k not in self.biases
            }
        else:
            scales = units
        if not scales:  # the plain ball: e = rho g / ||g||
            factor = self.rho / (grad_norm(list(grads.values())) + _EPS)
            return {k: g * factor for k, g in grads.items()}
        scaled = {k: g * scales[k] if k in scales else g.clone() for k, g in grads.items()}
        factor = self.rho / (grad_norm(list(scaled.values())) + _EPS)
        return {
            k: (s.mul_(scales[k]) if k in scales else s).mul_(factor) for k, s in scaled.items()
        }

    @torch.no_grad()
    def units(self, keys: Any = None) -> dict[str, Tensor]:
        """The unit each tensor of the ball is measured in, where it is not 1: under
        ``ball="std"`` the (detached, unbiased) std of the layer's latent weight for that weight
        and its learned step size; under ``ball="authors"`` the same for conv layers only."""
        if self.ball == "raw":
            return {}
        keys = set(self.layers) | set(self.step_of) if keys is None else set(keys)
        stds: dict[str, Tensor] = {}
        for key in keys:
            layer = key if key in self.layers else self.step_of.get(key)
            if layer is None:
                continue
            m = self.layers[layer]
            if m.weight.numel() < 2 or (
                self.ball == "authors" and not isinstance(m, nn.modules.conv._ConvNd)
            ):
                continue  # no std of one number; the authors standardize conv weights only
            if layer not in stds:
                stds[layer] = m.weight.detach().std()
            stds[key] = stds[layer]
        return {k: v for k, v in stds.items() if k in keys}

    def first_step(self, zero_grad: bool = False) -> dict[str, Tensor]:
        """Compute ``e`` and move the model onto ``w + e`` (per case) until :meth:`restore`;
        BN running statistics frozen meanwhile (unless ``bn_update``). Returns ``e``."""
        e = self.perturbation()
        if self._kept is not None:
            release(self._kept)
            self._kept = None
        self.perturb(e, freeze_bn=not self.bn_update)
        if zero_grad:
            self.zero_grad()
        return e

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore everything perturbed, then the base optimizer step with the current
        (second-pass) gradients."""
        self.restore()
        self.base.step()
        self.steps += 1
        if zero_grad:
            self.zero_grad()

    # ------------------------------------------------------------------ closure API
    def step(self, closure: Callable | None = None):
        """One SAQ step; ``closure(sync=...)`` zeroes grads, runs forward + backward, returns
        the loss. Returns the first pass's loss."""
        if closure is None:
            raise ValueError("SAQ.step needs a closure (it runs two passes)")
        if self.rho == 0.0:  # exactly plain QAT: one pass, no perturbation
            with torch.enable_grad():
                loss = closure()
            self.base.step()
            self.steps += 1
            return loss
        fresh = self.every == 1 or self.last_e is None or self.steps % self.every == 0
        if fresh:
            with torch.enable_grad(), self.first_pass():
                loss = _call(closure, self._sync_first_pass())
            self._reduce_kept()
            e = self.first_step()
            try:
                with torch.enable_grad():
                    _call(closure, True)
            finally:
                self.restore()
            if self.every > 1:
                self.last_e = e
        else:  # efficient variant: one pass at q(w) + e_last, BN statistics update as usual
            self.perturb(self.last_e, freeze_bn=False)
            try:
                with torch.enable_grad():
                    loss = _call(closure, True)
            finally:
                self.restore()
        self.base.step()
        self.steps += 1
        return loss

    # ------------------------------------------------------------------ perturb / restore
    @torch.no_grad()
    def perturb(self, e: dict[str, Tensor], freeze_bn: bool = True) -> None:
        """Apply ``e``: added to ``q(w)`` in the forward pass (cases 1, 3) or in place to the
        latent weights (case 2); extras in place. Undone by :meth:`restore`."""
        self.restore()
        stack = contextlib.ExitStack()
        try:
            deltas = {}
            for key, delta in e.items():
                if key in self.layers and self.case != 2:
                    deltas[key] = delta
                    continue
                p = self.layers[key].weight if key in self.layers else self.extras[key]
                self._saved[key] = (p, p.detach().clone())
                p.add_(delta.to(p))
            if deltas:
                stack.enter_context(perturbed_weights(self.model, deltas))
            if freeze_bn:
                stack.enter_context(frozen_bn_stats(self.model))
        except BaseException:
            self._stack = stack
            self.restore()
            raise
        self._stack = stack

    @torch.no_grad()
    def restore(self) -> None:
        """Undo :meth:`perturb` exactly (in-place tensors copied back); safe to call twice."""
        stack, self._stack = self._stack, None
        saved, self._saved = self._saved, {}
        try:
            if stack is not None:
                stack.close()
        finally:
            for p, old in saved.values():
                p.copy_(old)

    # ------------------------------------------------------------------ state
    def wrapper_state(self) -> dict:
        last = (
            None if self.last_e is None else {k: v.detach().cpu() for k, v in self.last_e.items()}
        )
        return {"steps": self.steps, "last_e": last}

    def load_wrapper_state(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))
        last = state.get("last_e")
        self.last_e = None if last is None else {k: v.to(self._tensor(k)) for k, v in last.items()}

    # ------------------------------------------------------------------ internals
    def _tensor(self, key: str) -> Tensor:
        return self.layers[key].weight if key in self.layers else self.extras[key]

    def _gradients(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        grads: dict[str, Tensor] = {}
        refs: dict[str, Tensor] = {}
        if self.case == 3:
            if self._kept is None:
                raise RuntimeError("SAQ case 3: run the first pass inside first_pass()")
            kept = self._kept.tensors()
            for name, g in self._kept.grads().items():
                grads[name], refs[name] = g, kept[name].detach()
        else:
            for name, m in self.layers.items():
                if m.weight.grad is not None:
                    grads[name], refs[name] = m.weight.grad, m.weight.detach()
        for key, p in self.extras.items():
            if p.grad is not None:
                grads[key], refs[key] = p.grad, p.detach()
        return grads, refs

    def _sync_first_pass(self) -> bool:
        """Whether the first pass needs DDP's gradient all-reduce: never per replica; case 3
        without extras averages dL/dq(w) itself (:meth:`_reduce_kept`) instead."""
        if not _distributed():
            return True
        if self.per_replica:
            return False
        return self.case != 3 or bool(self.extras)

    @torch.no_grad()
    def _reduce_kept(self) -> None:
        """Exact global ``e`` under DDP, case 3: average ``dL/dq(w)`` over ranks (one call)."""
        if self.case != 3 or self.per_replica or not _distributed() or self._kept is None:
            return
        grads = list(self._kept.grads().values())
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _call(closure: Callable, sync: bool):
    """``closure()`` (synchronised pass; also fits closures without a ``sync`` argument) or
    ``closure(sync=False)``."""
    return closure() if sync else closure(sync=False)


def _extras(
    model: nn.Module, layers: dict, bias: bool, norm: bool, act_steps: bool, weight_steps: bool
) -> tuple[dict[str, nn.Parameter], set[str], dict[str, str]]:
    """The optional members of the ball, by parameter name (trainable ones only); which of them
    are biases (left unscaled by the adaptive ball unless ``adaptive_bias``); and, for each
    weight step size, the layer it belongs to (it shares that weight's unit)."""
    names = {id(p): n for n, p in model.named_parameters()}
    chosen: list[Tensor] = []
    bias_ids: set[int] = set()
    owner: dict[int, str] = {}
    for layer_name, m in layers.items():
        if bias and m.bias is not None:
            chosen.append(m.bias)
            bias_ids.add(id(m.bias))
        q = m.input_quantizer
        step = getattr(q, "step", None) if q is not None else None
        if act_steps and isinstance(step, nn.Parameter):
            chosen.append(step)
        wstep = getattr(m.weight_quantizer, "step", None)
        if weight_steps and isinstance(wstep, nn.Parameter):
            chosen.append(wstep)
            owner[id(wstep)] = layer_name
    if norm:
        for m in model.modules():
            if isinstance(m, _NORMS):
                chosen += [p for p in (m.weight, m.bias) if p is not None]
                if m.bias is not None:
                    bias_ids.add(id(m.bias))
    extras = {names[id(p)]: p for p in chosen if id(p) in names and p.requires_grad}
    biases = {k for k, p in extras.items() if id(p) in bias_ids}
    steps = {k: owner[id(p)] for k, p in extras.items() if id(p) in owner}
    return extras, biases, steps


def check(rho: float, case: int, every: int, eta: float, ball: str = "raw", **_: Any) -> None:
    """One-line ConfigErrors for impossible options (the registry's check of ``saq``, too)."""
    if ball not in BALLS:
        raise ConfigError(
            f"method.ball must be one of {', '.join(BALLS)} (std = rho in units of each "
            f"weight's std, as the SAQ authors' standardized weights), got {ball!r}"
        )
    if case not in CASES:
        raise ConfigError(f"method.case must be 1, 2 or 3 (3 = SAQ), got {case!r}")
    if not rho >= 0:
        raise ConfigError(f"method.rho must be >= 0, got {rho!r}")
    if every < 1:
        raise ConfigError(
            f"method.every must be >= 1 (1 = a fresh perturbation every step), got {every!r}"
        )
    if not eta >= 0:
        raise ConfigError(f"method.eta must be >= 0, got {eta!r}")


class SAQHook(Hook):
    """The method as a hook: wraps the loop's optimizer in :class:`SAQ`."""

    # the first pass keeps q(w) and its gradient (retain_grad on a forward intermediate),
    # which a compiled graph does not expose: SAQ trains eagerly under train.compile
    eager_only = True

    def __init__(self, **options: Any) -> None:
        check(
            options.get("rho", DEFAULT_RHO),
            options.get("case", 3),
            options.get("every", 1),
            options.get("eta", 0.01),
            options.get("ball", DEFAULT_BALL),
        )
        self.options = options
        self.optimizer: SAQ | None = None

    def wrap_optimizer(self, optimizer: Any, model: nn.Module) -> SAQ:
        self.optimizer = SAQ(optimizer, model, **self.options)
        return self.optimizer


@register_method("saq", needs_quant=True, check=check)
def _saq(
    model: nn.Module,
    quant: Any,
    total_steps: int,
    rho: float = DEFAULT_RHO,
    case: int = 3,
    every: int = 1,
    adaptive: bool = False,
    eta: float = 0.01,
    bias: bool = False,
    norm: bool = False,
    act_steps: bool = False,
    weight_steps: bool = False,
    ball: str = DEFAULT_BALL,
    adaptive_bias: bool = True,
    bn_update: bool = False,
    per_replica: bool = False,
) -> list[Hook]:
    """Sharpness-aware quantization (Liu et al.): SAM on q(w); case 1/2/3, ball raw/std, every=k."""
    return [
        SAQHook(
            rho=rho,
            case=case,
            every=every,
            adaptive=adaptive,
            eta=eta,
            bias=bias,
            norm=norm,
            act_steps=act_steps,
            weight_steps=weight_steps,
            ball=ball,
            adaptive_bias=adaptive_bias,
            bn_update=bn_update,
            per_replica=per_replica,
        )
    ]
