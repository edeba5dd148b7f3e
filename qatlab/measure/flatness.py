"""Flatness and sharpness of a trained model: the PAC-Bayes ``sigma``/``sigma'`` and the
worst-case ``alpha``/``alpha'`` searches of Jiang et al. (2019), and the bounds built from them.

* ``sigma`` (plain): the largest std of Gaussian noise ``N(0, sigma^2)`` added to every
  perturbable parameter that drops training accuracy by ``target`` (0.1), Monte-Carlo over
  ``draws``; ``sigma'`` (magnitude-aware): noise ``N(0, sigma'^2 w_i^2 + eps^2)``.
* ``alpha`` / ``alpha'``: the largest box radius (``|u_i| <= alpha``, or ``|u_i| <= alpha|w_i| +
  eps``) whose worst case, found by projected sign-gradient ascent on the cross-entropy with
  random restarts, drops training accuracy by ``target``.

What is perturbed (:func:`perturbable_weights`): every parameter of the model except quantizer
parameters (step sizes, offsets are never perturbed), in eval mode, with each BatchNorm folded
into the Conv/Linear registered just before it (the reference code's ``_reparam``): the folded
weight ``a_c W`` and bias ``a_c (b - mu) + beta`` (``a_c = gamma / sqrt(var + eps)``) are the
perturbed tensors. Folding is exact and done implicitly: noise ``U`` on ``a_c W`` is noise
``U / a_c`` on ``W`` with BN left in place, noise on the folded bias is noise on ``beta``; the
model is never written. ``fold_bn=False`` perturbs ``W`` and the BN parameters as they are.

For a quantized model, ``perturb`` picks the weight that noise is added to:

* ``"q"`` (default): the dequantized ``q(w)``, i.e. the forward pass of
  :func:`qatlab.quant.perturbed_weights` at ``q(w) + delta`` (the weight quantizers are switched
  off and ``q(w) + delta`` is passed in its place, which gives the same numbers and lets the
  alpha search differentiate through ``delta``); activation quantizers stay on.
* ``"latent"``: the latent ``w``, quantizers on: the forward uses ``q(w + delta)`` (learned
  steps stay fixed; a max-abs weight quantizer recomputes its step from ``w + delta``, as it
  does on every call).
* ``"float"``: all quantizers off, the latent float network ``w + delta``.

Measures never modify the model: parameters are substituted with ``torch.func.functional_call``
and every switch (eval mode, disabled quantizers) is restored on exit, so the state dict
(latent weights, step sizes, BN buffers) is bitwise unchanged.

Speed: each Monte-Carlo draw is one forward of the whole evaluation set in large batches
(``batch_size``); the draws run one after another. ``torch.func.vmap`` over draws was measured
~3x slower on CPU (batched-weight convolutions become grouped convolutions) and cannot run the
quantizers' autograd function, so draws are not vectorised. Pass a fixed training subset as
``x, y`` (``benchmarks/measure_speed.py`` states the cost in precision).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from qatlab.errors import ConfigError
from qatlab.quant.layers import QuantLayer
from qatlab.quant.quantize import quantization_disabled
from qatlab.quant.quantizer import Quantizer

PERTURB = ("q", "latent", "float")
_BN = nn.modules.batchnorm._BatchNorm
_SEED_BASE = 10348628753  # offset of the noise streams (the reference code's constant)

Progress = bool | Callable[[int, int, dict], None]


# --------------------------------------------------------------------------- what is perturbed
@dataclass
class _Entry:
    """One perturbable tensor: ``key`` (reported name), the parameter it overrides in the
    functional call (``target``), its raw value there, and how noise maps onto it."""

    key: str
    target: str
    raw: Tensor  # value passed for ``target`` when unperturbed (q(w), w, or the parameter)
    effective: Tensor  # the perturbed quantity (folded weight/bias, or ``raw``)
    scale: Tensor | None  # folded weights: noise on ``effective`` is ``noise / a_c`` on ``raw``


def _check_perturb(perturb: str) -> None:
    if perturb not in PERTURB:
        raise ConfigError(f"perturb must be one of {', '.join(PERTURB)}; got {perturb!r}")


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _fold_pairs(model: nn.Module) -> dict[str, tuple[str, nn.Module, nn.Module]]:
    """``{bn name: (layer name, layer, bn)}`` for each BatchNorm (with running statistics)
    registered right after a Conv/Linear whose output channels it normalises."""
    pairs: dict[str, tuple[str, nn.Module, nn.Module]] = {}
    prev: tuple[str, nn.Module] | None = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            prev = None if getattr(m, "transposed", False) else (name, m)
        elif isinstance(m, _BN):
            if (
                prev is not None
                and m.running_var is not None
                and prev[1].weight.shape[0] == m.num_features
            ):
                pairs[name] = (prev[0], prev[1], m)
            prev = None
    return pairs


def _bn_scale(bn: nn.Module) -> Tensor:
    """``a_c = gamma / sqrt(running_var + eps)`` (gamma = 1 without affine)."""
    a = (bn.running_var.detach() + bn.eps).rsqrt()
    return a * bn.weight.detach() if bn.weight is not None else a


def _channel(v: Tensor, like: Tensor) -> Tensor:
    """A per-output-channel vector shaped to broadcast against ``like`` (axis 0)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def _entries(model: nn.Module, perturb: str, fold_bn: bool) -> list[_Entry]:
    _check_perturb(perturb)
    quantizer_params = {
        f"{qn}.{pn}" if qn else pn
        for qn, q in model.named_modules()
        if isinstance(q, Quantizer)
        for pn, _ in q.named_parameters()
    }
    folds = _fold_pairs(model) if fold_bn else {}
    by_layer = {layer_name: (bn_name, bn) for bn_name, (layer_name, _, bn) in folds.items()}
    skip = set(quantizer_params)
    for bn_name, (_, _, bn) in folds.items():
        for pn, _ in bn.named_parameters(recurse=False):
            skip.add(f"{bn_name}.{pn}")
    entries: list[_Entry] = []
    layer_params: set[str] = set()
    for name, layer in _weight_layers(model):
        prefix = f"{name}." if name else ""
        w = layer.weight.detach()
        if perturb == "q" and isinstance(layer, QuantLayer) and layer.weight_quantizer.enabled:
            raw = layer.weight_quantizer.quantize_detached(w)
        else:
            raw = w.clone()
        layer_params.add(prefix + "weight")
        bias = layer.bias.detach() if getattr(layer, "bias", None) is not None else None
        if bias is not None:
            layer_params.add(prefix + "bias")
        if name in by_layer:
            bn_name, bn = by_layer[name]
            a = _bn_scale(bn)
            entries.append(
                _Entry(prefix + "weight", prefix + "weight", raw, raw * _channel(a, raw), a)
            )
            if bn.bias is not None:
                b = bias if bias is not None else torch.zeros_like(a)
                folded = a * (b - bn.running_mean.detach()) + bn.bias.detach()
                entries.append(_Entry(prefix + "bias", f"{bn_name}.bias", bn.bias.detach().clone(),
                                      folded, None))  # fmt: skip
        else:
            entries.append(_Entry(prefix + "weight", prefix + "weight", raw, raw, None))
            if bias is not None:
                entries.append(_Entry(prefix + "bias", prefix + "bias", bias.clone(), bias, None))
    for pname, p in model.named_parameters():
        if pname in skip or pname in layer_params:
            continue
        entries.append(_Entry(pname, pname, p.detach().clone(), p.detach(), None))
    # a conv bias followed by a folded BN is not perturbed itself (the folded bias, noise on
    # beta, is)
    return entries


def perturbable_weights(
    model: nn.Module, perturb: str = "q", *, fold_bn: bool = True
) -> dict[str, Tensor]:
    """``{name: tensor}``: what the flatness searches perturb (copies; see the module notes).

    Conv/Linear weights (``q(w)`` for ``perturb="q"``, BN folded in when ``fold_bn``), their
    biases (folded: ``a_c (b - mu) + beta`` under the layer's ``<name>.bias``), and every other
    parameter (LayerNorm, embeddings, unfolded BN). Step sizes are never included.
    """
    return {e.key: e.effective.clone() for e in _entries(model, perturb, fold_bn)}


class _Perturbed:
    """Runs ``model`` with ``effective + delta`` substituted for its perturbable tensors."""

    def __init__(self, model: nn.Module, perturb: str, fold_bn: bool) -> None:
        self.model, self.perturb = model, perturb
        self.entries = _entries(model, perturb, fold_bn)
        self.weights = {e.key: e.effective for e in self.entries}

    @contextlib.contextmanager
    def ready(self) -> Iterator[_Perturbed]:
        """Eval mode, and the quantizers ``perturb`` asks to switch off; all restored on exit."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            if self.perturb == "q":
                ctx = quantization_disabled(self.model, weights=True, acts=False)
            elif self.perturb == "float":
                ctx = quantization_disabled(self.model)
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                yield self
        finally:
            for m, mode in modes:
                m.training = mode

    def overrides(self, deltas: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        out = {}
        for e in self.entries:
            value = e.raw
            d = None if deltas is None else deltas.get(e.key)
            if d is not None:
                if e.scale is not None:
                    d = d / _channel(e.scale, d)
                value = value + d
            out[e.target] = value
        return out

    def __call__(self, x: Tensor, deltas: Mapping[str, Tensor] | None = None) -> Tensor:
        return functional_call(self.model, self.overrides(deltas), (x,), strict=False)

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor, deltas=None, batch_size: int = 4096) -> float:
        correct = 0
        for i in range(0, len(y), batch_size):
            out = self(x[i : i + batch_size], deltas)
            correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
        return correct / max(len(y), 1)


# --------------------------------------------------------------------------- noise
def noise_std(
    weights: Mapping[str, Tensor], sigma: float, *, magnitude_aware: bool = False, eps: float = 1e-3
) -> dict[str, Tensor]:
    """Per-element standard deviation: ``sigma`` (plain) or ``sqrt(sigma^2 w^2 + eps^2)``.

    (A public implementation passes the variance where the std goes; this is the std.)
    """
    if magnitude_aware:
        return {k: (sigma**2 * w.square() + eps**2).sqrt() for k, w in weights.items()}
    return {k: torch.full_like(w, float(sigma)) for k, w in weights.items()}


def draw_noise(
    weights: Mapping[str, Tensor],
    sigma: float,
    *,
    magnitude_aware: bool = False,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One Gaussian draw per tensor with the std of :func:`noise_std` (seeded by ``generator``)."""
    std = noise_std(weights, sigma, magnitude_aware=magnitude_aware, eps=eps)
    return {k: _normal(w, generator) * std[k] for k, w in weights.items()}


def _normal(like: Tensor, generator: torch.Generator | None) -> Tensor:
    z = torch.randn(like.shape, generator=generator, dtype=torch.float32)
    return z.to(device=like.device, dtype=like.dtype)


def _generator(seed: int, *stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((_SEED_BASE + 1_000_003 * seed + sum(s * 7919 ** (i + 1) for i, s in
                                                     enumerate(stream))) % (1 << 62))  # fmt: skip
    return g


def training_subset(dataset, size: int | None = 2048, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(x, y)``: a fixed random subset of ``size`` samples of ``dataset`` (all if ``None`` or
    larger), seeded, for the searches and landscapes. Give the un-augmented training samples
    (``DataBundle.train_eval``). 2048 samples put the binomial std of an accuracy near 0.9 at
    0.007, below the searches' 0.01 tolerance (``benchmarks/measure_speed.py``)."""
    n = len(dataset)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"subset size must be a positive integer or None, got {size!r}")
    if size is None or size >= n:
        idx = torch.arange(n)
    else:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        return dataset.x[idx], dataset.y[idx]
    items = [dataset[int(i)] for i in idx]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.as_tensor(
        [int(y) for _, y in items]
    )


# --------------------------------------------------------------------------- the searches
def _check_search(x: Tensor, y: Tensor, target: float, tol: float, steps: int, upper: float):
    if len(x) != len(y) or len(y) == 0:
        raise ConfigError(
            f"flatness search needs matching non-empty x and y, got {len(x)} and {len(y)} samples"
        )
    if not 0 < target < 1 or not 0 < tol < target:
        raise ConfigError(f"target must be in (0, 1) and tol in (0, target); got {target}, {tol}")
    if steps < 1 or not upper > 0:
        raise ConfigError(f"steps must be >= 1 and upper > 0; got {steps}, {upper}")


def _progress_bar(progress: Progress, total: int, desc: str):
    """A callable ``(step, info)`` reporting progress: tqdm on stderr for ``True``."""
    if callable(progress):
        return (lambda k, info: progress(k, total, info)), (lambda: None)
    if not progress:
        return (lambda k, info: None), (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        return (lambda k, info: None), (lambda: None)
    bar = tqdm(total=total, desc=desc, leave=False)

    def update(k: int, info: dict) -> None:
        bar.update(1)
        bar.set_postfix({k2: f"{v:.4g}" for k2, v in info.items()})

    return update, bar.close


def _bisect(
    drop_at: Callable[[float], float], target, tol, steps, upper, progress: Progress, desc: str
) -> tuple[float, float, int]:
    """Bisection on ``[0, upper]`` for the radius whose drop is within ``tol`` of ``target``:
    stops there, else after ``steps`` midpoints (the reference procedure)."""
    lo, hi = 0.0, float(upper)
    update, close = _progress_bar(progress, steps, desc)
    radius, drop, evals = hi, math.nan, 0
    try:
        for k in range(steps):
            radius = (lo + hi) / 2
            drop = drop_at(radius)
            evals += 1
            update(k, {"radius": radius, "drop": drop})
            if abs(drop - target) < tol:
                break
            if drop > target:
                hi = radius
            else:
                lo = radius
    finally:
        close()
    return radius, drop, evals


def sigma_search(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    magnitude_aware: bool = False,
    target: float = 0.1,
    tol: float = 0.01,
    steps: int = 15,
    upper: float = 2.0,
    draws: int = 10,
    eps: float = 1e-3,
    perturb: str = "q",
    seed: int = 0,
    progress: Progress = False,
    fold_bn: bool = True,
    batch_size: int = 4096,
) -> dict:
    """PAC-Bayes flatness: the largest ``sigma`` (``sigma'`` when ``magnitude_aware``) whose
    Gaussian weight noise drops the accuracy on ``(x, y)`` (training data) by ``target``.

    Bisection on ``[0, upper]`` (``steps`` midpoints, stop when ``|drop - target| < tol``);
    at each midpoint the accuracy is the mean over ``draws`` noise draws. The draws use the same
    standard-normal tensors at every midpoint (common random numbers: the drop is then a
    smooth, nearly monotone function of sigma), seeded by ``seed``. ``drop`` is measured from
    the model's own accuracy on ``(x, y)``. ``fold_bn``, ``perturb``: see the module notes.
    ``progress``: ``True`` for a tqdm bar, or a callable ``(step, total, info)``.

    Returns ``{"sigma", "drop", "base_acc", "evals"}``; ``evals`` counts the midpoints tried
    (each is ``draws`` passes over ``x``).
    """
    _check_search(x, y, target, tol, steps, upper)
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    pm = _Perturbed(model, perturb, fold_bn)
    device = next(iter(pm.weights.values())).device if pm.weights else x.device
    x, y = x.to(device), y.to(device)
    with pm.ready():
        base_acc = pm.accuracy(x, y, batch_size=batch_size)
        numel = sum(w.numel() for w in pm.weights.values())
        cache = numel * draws <= 1 << 25  # keep the draws' normals when they fit in 128 MB
        normals: dict[int, dict[str, Tensor]] = {}

        def z_of(d: int) -> dict[str, Tensor]:
            if d in normals:
                return normals[d]
            g = _generator(seed, d)
            z = {k: _normal(w, g) for k, w in pm.weights.items()}
            if cache:
                normals[d] = z
            return z

        def drop_at(sigma: float) -> float:
            std = noise_std(pm.weights, sigma, magnitude_aware=magnitude_aware, eps=eps)
            accs = []
            for d in range(draws):
                z = z_of(d)
                deltas = {k: z[k] * std[k] for k in pm.weights}
                accs.append(pm.accuracy(x, y, deltas, batch_size))
            return base_acc - sum(accs) / len(accs)

        name = "sigma'" if magnitude_aware else "sigma"
        sigma, drop, evals = _bisect(drop_at, target, tol, steps, upper, progress, name)
    return {"sigma": sigma, "drop": drop, "base_acc": base_acc, "evals": evals}


def alpha_search(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    magnitude_aware: bool = False,
    target: float = 0.1,
    tol: float = 0.01,
    steps: int = 15,
    upper: float = 2.0,
    ascent_steps: int = 5,
    restarts: int = 2,
    eps: float = 1e-3,
    perturb: str = "q",
    seed: int = 0,
    progress: Progress = False,
    fold_bn: bool = True,
    batch_size: int = 4096,
    step_fraction: float = 0.25,
) -> dict:
    """Sharpness: the largest box radius ``alpha`` (``|u_i| <= alpha``; magnitude-aware
    ``alpha'``: ``|u_i| <= alpha |w_i| + eps``) whose worst case drops the accuracy on
    ``(x, y)`` by ``target``.

    The worst case in a box is searched by projected sign-gradient ascent on the mean
    cross-entropy over ``(x, y)``: ``restarts`` starts drawn uniformly in the box (seeded),
    ``ascent_steps`` steps of ``u += step_fraction * r * sign(grad)`` each followed by clipping
    to the box ``[-r, r]``; the drop is that of the restart with the lowest accuracy. The same
    bisection as :func:`sigma_search`. Returns ``{"alpha", "drop", "base_acc", "evals"}``.
    """
    _check_search(x, y, target, tol, steps, upper)
    if restarts < 1 or ascent_steps < 0:
        raise ConfigError(
            f"restarts must be >= 1, ascent_steps >= 0; got {restarts}, {ascent_steps}"
        )
    pm = _Perturbed(model, perturb, fold_bn)
    device = next(iter(pm.weights.values())).device if pm.weights else x.device
    x, y = x.to(device), y.to(device)
    with pm.ready():
        base_acc = pm.accuracy(x, y, batch_size=batch_size)

        def radius_of(alpha: float) -> dict[str, Tensor]:
            if magnitude_aware:
                return {k: alpha * w.abs() + eps for k, w in pm.weights.items()}
            return {k: torch.full_like(w, float(alpha)) for k, w in pm.weights.items()}

        def worst_acc(alpha: float) -> float:
            r = radius_of(alpha)
            keys = list(pm.weights)
            worst = 1.0
            for restart in range(restarts):
                g = _generator(seed, 1 << 20, restart)
                u = {k: (torch.rand(r[k].shape, generator=g).to(r[k]) * 2 - 1) * r[k] for k in keys}
                for _ in range(ascent_steps):
                    grads = _loss_grad(pm, x, y, u, keys, batch_size)
                    with torch.no_grad():
                        for k, gk in zip(keys, grads, strict=True):
                            u[k] = torch.maximum(
                                torch.minimum(u[k] + step_fraction * r[k] * gk.sign(), r[k]), -r[k]
                            )
                worst = min(worst, pm.accuracy(x, y, u, batch_size))
            return worst

        name = "alpha'" if magnitude_aware else "alpha"
        alpha, drop, evals = _bisect(
            lambda a: base_acc - worst_acc(a), target, tol, steps, upper, progress, name
        )
    return {"alpha": alpha, "drop": drop, "base_acc": base_acc, "evals": evals}


def _loss_grad(pm: _Perturbed, x, y, u: dict[str, Tensor], keys: list[str], batch_size: int):
    """Gradient of the mean cross-entropy over ``(x, y)`` w.r.t. the perturbations ``u`` (via
    ``torch.autograd.grad``: no ``.grad`` is written on the model's parameters)."""
    leaves = {k: u[k].detach().requires_grad_() for k in keys}
    total = [torch.zeros_like(u[k]) for k in keys]
    for i in range(0, len(y), batch_size):
        out = pm(x[i : i + batch_size], leaves)
        loss = F.cross_entropy(out, y[i : i + batch_size], reduction="sum") / len(y)
        grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
        for t, gk in zip(total, grads, strict=True):
            if gk is not None:
                t.add_(gk)
    return total


# --------------------------------------------------------------------------- bounds
def pac_bayes_bounds(
    weights: Mapping[str, Tensor],
    init_weights: Mapping[str, Tensor] | None,
    m: int,
    *,
    sigma: float | None = None,
    sigma_mag: float | None = None,
    alpha: float | None = None,
    alpha_mag: float | None = None,
    eps: float = 1e-3,
    weights_only: bool = True,
) -> dict[str, float]:
    """Flatness measures and PAC-Bayes bounds (Jiang et al. 2019), each reported as
    ``sqrt(v / m)`` with ``m`` the training-set size. Larger = sharper.

    With ``w`` the weights, ``w0`` those at initialisation, ``omega`` their number:

    * ``pacbayes_flatness = 1/sigma^2``; ``pacbayes_init = ||w - w0||^2 / (4 sigma^2) +
      log(m / sigma) + 10``; ``pacbayes_orig`` the same with ``||w||``.
    * ``pacbayes_mag_flatness = 1/sigma'^2``; ``pacbayes_mag_init = 1/4 sum_i log((eps^2 +
      (sigma'^2 + 1) ||w - w0||^2 / omega) / (eps^2 + sigma'^2 (w_i - w0_i)^2)) +
      log(m / sigma') + 10``; ``pacbayes_mag_orig`` with ``||w||`` in the numerator.
    * ``sharpness_flatness = 1/alpha^2``; ``sharpness_init = ||w - w0||^2 log(2 omega) /
      (4 alpha^2) + log(m / alpha) + 10``; ``sharpness_orig`` with ``||w||``.
    * ``sharpness_mag_*``: as ``pacbayes_mag_*`` with ``sigma'^2 + 1`` replaced by
      ``alpha'^2 + 4 log(2 omega)`` and ``sigma'`` by ``alpha'``.

    Keys are absent when their input is ``None`` (no ``*_init`` without ``init_weights``).
    Without ``init_weights`` the magnitude-aware ``orig`` bounds take ``w0 = 0`` in the
    denominator. ``weights_only`` (default, as the reference code) uses tensors with 2+
    dimensions only (no biases, no norm parameters) for the norms and ``omega``.
    """
    if not isinstance(m, int) or m < 1:
        raise ConfigError(f"m (training-set size) must be a positive integer, got {m!r}")
    keys = [k for k, w in weights.items() if w.dim() >= 2 or not weights_only]
    if not keys:
        raise ConfigError("pac_bayes_bounds: no weight tensors given")
    if init_weights is not None:
        missing = [k for k in keys if k not in init_weights]
        if missing:
            raise ConfigError(f"pac_bayes_bounds: init_weights lack {', '.join(missing[:3])}")
    w = torch.cat([weights[k].detach().double().reshape(-1) for k in keys])
    w0 = (
        torch.cat([init_weights[k].detach().double().reshape(-1).to(w.device) for k in keys])
        if init_weights is not None
        else None
    )
    dist = w - w0 if w0 is not None else w
    omega = w.numel()
    out: dict[str, float] = {}

    def report(name: str, value: float) -> None:
        out[name] = math.sqrt(value / m) if value > 0 else math.nan

    def plain(scale: float, radius: float, norm2: float) -> float:
        return norm2 * scale / (4 * radius**2) + math.log(m / radius) + 10

    def mag(coef: float, radius: float, norm2: float) -> float:
        num = eps**2 + coef * norm2 / omega
        den = eps**2 + radius**2 * dist.square()
        return 0.25 * float(torch.log(num / den).sum()) + math.log(m / radius) + 10

    sq_w, sq_d = float(w.square().sum()), float(dist.square().sum())
    log2w = math.log(2 * omega)
    if sigma is not None and sigma > 0:
        report("pacbayes_flatness", 1 / sigma**2)
        report("pacbayes_orig", plain(1.0, sigma, sq_w))
        if w0 is not None:
            report("pacbayes_init", plain(1.0, sigma, sq_d))
    if sigma_mag is not None and sigma_mag > 0:
        report("pacbayes_mag_flatness", 1 / sigma_mag**2)
        report("pacbayes_mag_orig", mag(sigma_mag**2 + 1, sigma_mag, sq_w))
        if w0 is not None:
            report("pacbayes_mag_init", mag(sigma_mag**2 + 1, sigma_mag, sq_d))
    if alpha is not None and alpha > 0:
        report("sharpness_flatness", 1 / alpha**2)
        report("sharpness_orig", plain(log2w, alpha, sq_w))
        if w0 is not None:
            report("sharpness_init", plain(log2w, alpha, sq_d))
    if alpha_mag is not None and alpha_mag > 0:
        report("sharpness_mag_flatness", 1 / alpha_mag**2)
        report("sharpness_mag_orig", mag(alpha_mag**2 + 4 * log2w, alpha_mag, sq_w))
        if w0 is not None:
            report("sharpness_mag_init", mag(alpha_mag**2 + 4 * log2w, alpha_mag, sq_d))
    return out
