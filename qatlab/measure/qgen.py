"""The generalization measures of QGen (AskariHemmat et al.) as registered measures: ``gap``,
``noise``, ``flatness``, ``sharpness``, ``bounds``, ``landscape`` and ``corruptions``.

Each adapter reads the run through its :class:`~qatlab.measure.registry.MeasureContext` and
calls the library functions of :mod:`qatlab.measure.gap`, ``noise``, ``flatness``,
``landscape`` and ``robustness`` (imported when the measure runs). Choices (METHODS.md §6):

- Searches (``flatness``, ``sharpness``) and ``landscape`` run on a fixed training subset of
  ``subset`` samples (un-augmented, eval mode), drawn with ``ctx.seed``
  (:func:`qatlab.measure.flatness.training_subset`; default 2048 samples, 0 = the whole
  training set): the binomial std of an accuracy near 0.9 on 2048 samples is 0.007, below
  the searches' 0.01 tolerance (``benchmarks/measure_speed.py``).
- ``perturb``: ``"q"`` perturbs the dequantized weights ``q(w)`` (default), ``"latent"`` the
  latent weights with the quantizers on, ``"float"`` the latent float network; step sizes are
  never perturbed.
- ``bounds`` reuses ``sigma``/``sigma_mag``/``alpha``/``alpha_mag`` that earlier measures of the
  same run returned (``ctx.results``), running the ``flatness`` search itself if they are
  missing; its ``init`` bounds need the step-0 weights (``init.pt``, kept by the trainer).
- Corruptions are applied to the test set, seeded with ``ctx.seed``.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from qatlab.measure.registry import (
    Column,
    MeasureContext,
    Section,
    register_measure,
)

GEN = Section(
    "generalization",
    "Generalization gap",
    "Train (un-augmented, eval mode) and test accuracy; gap = train - test accuracy (%) and "
    "test - train loss. Mean ± std over seeds, smallest gap in bold.",
)
FLAT = Section(
    "flatness",
    "Flatness, sharpness and PAC-Bayes bounds",
    "sigma: the largest std of Gaussian weight noise that drops training accuracy by 0.1 "
    "(sigma': magnitude-aware, N(0, sigma'^2 w^2 + eps^2)); alpha, alpha': the same for the "
    "worst case in a box (projected gradient ascent). PAC-Bayes and sharpness measures "
    "(flatness = 1/sigma^2 ..., orig and init bounds), each as sqrt(v / m) with m the "
    "training set size (Jiang et al. 2019; METHODS.md §6): larger = sharper.",
)
NOISE = Section(
    "noise",
    "Quantization noise",
    "Var(q(w) - w) / (s^2/12) averaged over quantized layers: 1 when the rounding error is "
    "uniform over a bin, as the noise model assumes; _Wb: the latent weights post-training "
    "quantized at b bits (weights only, max-abs).",
)
LAND = Section(
    "landscape",
    "Loss landscape",
    "Training loss along a filter-normalized random direction (biases and norm layers "
    "zeroed) at the trained weights, and its mean rise over the grid.",
)
CORR = Section(
    "corruptions",
    "Accuracy on corrupted test data",
    "Test accuracy (%) under each corruption, averaged over severities 1-5; mean over corruptions.",
)


# ----------------------------------------------------------------------------- data
def dataset_tensors(dataset, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x, y)`` of ``dataset`` (un-augmented), or of ``n`` samples of it drawn with ``seed``
    (a fixed subset: the same seed gives the same samples, in index order)."""
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        x, y = dataset.x, dataset.y
    else:
        from qatlab.data import make_loader

        xs, ys = zip(*make_loader(dataset, 512, shuffle=False), strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
    if n and n < len(y):
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(y), generator=gen)[:n].sort().values
        x, y = x[idx], y[idx]
    return x, y


def _train_subset(ctx: MeasureContext, subset: int) -> tuple[torch.Tensor, torch.Tensor]:
    from qatlab.measure.flatness import training_subset

    return training_subset(ctx.data.train_eval, subset or None, ctx.seed)


def _given(**options: Any) -> dict[str, Any]:
    """Options the user set (None = the library function's default)."""
    return {k: v for k, v in options.items() if v is not None}


# ----------------------------------------------------------------------------- gap
@register_measure(
    "gap",
    columns=[
        Column("train_acc", "train acc %", section="generalization"),
        Column("gap_acc", "gap (acc) %", better="min", section="generalization"),
        Column("train_loss", "train loss", 1.0, 3, None, "generalization"),
        Column("gap_loss", "gap (loss)", 1.0, 3, "min", "generalization"),
    ],
    section=GEN,
)
def gap(ctx: MeasureContext, batch_size: int = 512) -> dict[str, Any]:
    """Generalization gap: train (un-augmented, eval mode) vs test accuracy and loss."""
    from qatlab.measure.gap import generalization_gap

    res = generalization_gap(ctx.model(), ctx.data.train_eval, ctx.data.test, batch_size)
    return {k: float(v) for k, v in res.items()}


# ----------------------------------------------------------------------------- noise
@register_measure(
    "noise",
    columns=[
        Column("noise_ratio", "noise ratio", 1.0, 3, None, "noise"),
        Column("noise_step", "mean step s", 1.0, 4, None, "noise"),
        Column("noise_ratio_", "noise ratio {}", 1.0, 3, None, "noise"),
    ],
    section=NOISE,
)
def noise(ctx: MeasureContext, bits: list = (8, 4, 2), plot: bool = True) -> dict[str, Any]:
    """Quantization noise per layer (step ``s``, ``s^2/12``, measured ``Var(q(w)-w)``) of the
    model as trained and of its latent weights post-training quantized at each of ``bits``;
    ``noise_steps.png``: step size by layer for each width."""
    from qatlab.measure.crossbit import ptq_config
    from qatlab.measure.noise import plot_step_sizes, quantization_noise
    from qatlab.quant import dequantize, is_quantized, ptq

    model = ctx.model()
    out: dict[str, Any] = {}
    by_bits: dict[str, list[dict]] = {}
    if is_quantized(model):
        layers = quantization_noise(model)
        if layers:
            widths = "/".join(str(r["bits"]) for r in layers)  # per layer: 8/4/4/8 etc.
            by_bits[f"as trained (W{widths})"] = layers
            out["noise_ratio"] = _mean(layers, "noise_ratio")
            out["noise_step"] = _mean(layers, "step")
            out["noise_layers"] = [
                {k: v for k, v in r.items() if isinstance(v, (int, float, str))} for r in layers
            ]
        model = dequantize(model)
    for b in bits:
        layers = quantization_noise(ptq(model, ptq_config(int(b)), []))
        by_bits[f"W{b}"] = layers
        out[f"noise_ratio_W{b}"] = _mean(layers, "noise_ratio")
    if plot and by_bits:
        plot_step_sizes(by_bits, ctx.out_dir / "noise_steps.png")  # written atomically
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- flatness
def _bound_label(family: str):
    def label(suffix: str) -> str:  # pacbayes_mag_init -> "PAC-Bayes mag init"
        return f"{family} {suffix.replace('_', ' ')}"

    return label


FLAT_COLUMNS = [
    Column("sigma", "sigma", 1.0, 4, "max", "flatness"),
    Column("sigma_mag", "sigma'", 1.0, 4, "max", "flatness"),
    Column("alpha", "alpha", 1.0, 4, "max", "flatness"),
    Column("alpha_mag", "alpha'", 1.0, 4, "max", "flatness"),
    Column("pacbayes_", "PAC-Bayes {}", 1.0, 3, "min", "flatness", _bound_label("PAC-Bayes")),
    Column("sharpness_", "sharpness {}", 1.0, 3, "min", "flatness", _bound_label("sharpness")),
]


def _search(ctx: MeasureContext, kind: str, subset: int, options: dict[str, Any]) -> dict[str, Any]:
    """``sigma``/``sigma_mag`` (kind "sigma") or ``alpha``/``alpha_mag`` (kind "alpha"), with
    the base accuracy, drops reached and evaluation counts, on the fixed training subset."""
    from qatlab.measure import flatness

    search = flatness.sigma_search if kind == "sigma" else flatness.alpha_search
    x, y = _train_subset(ctx, subset)
    out: dict[str, Any] = {}
    for mag, suffix in ((False, ""), (True, "_mag")):
        res = search(
            ctx.model(), x, y, magnitude_aware=mag, seed=ctx.seed, progress=ctx.progress, **options
        )
        out[f"{kind}{suffix}"] = float(res[kind])
        out[f"{kind}{suffix}_drop"] = float(res["drop"])
        out[f"{kind}{suffix}_evals"] = int(res["evals"])
        out[f"{kind}_base_acc"] = float(res["base_acc"])
    return out


def _bounds(ctx: MeasureContext, found: dict[str, Any], perturb: str, eps: float | None):
    """Jiang et al.'s flatness measures and PAC-Bayes bounds (``pacbayes_*``, ``sharpness_*``,
    each ``sqrt(v / m)``) from the radii in ``found``; ``*_init`` need the run's step-0
    weights."""
    from qatlab.measure.flatness import pac_bayes_bounds, perturbable_weights

    model = ctx.model()
    init = ctx.init_state()
    init_weights = None
    if init is not None:
        start = ctx.model()
        start.load_state_dict(init)
        init_weights = perturbable_weights(start, perturb)
    res = pac_bayes_bounds(
        perturbable_weights(model, perturb),
        init_weights,
        len(ctx.data.train),
        sigma=found.get("sigma"),
        sigma_mag=found.get("sigma_mag"),
        alpha=found.get("alpha"),
        alpha_mag=found.get("alpha_mag"),
        **_given(eps=eps),
    )
    return {k: float(v) for k, v in res.items()}


@register_measure("flatness", columns=FLAT_COLUMNS, section=FLAT)
def flatness(
    ctx: MeasureContext,
    subset: int = 2048,
    perturb: str = "q",
    target: float | None = None,
    tol: float | None = None,
    steps: int | None = None,
    upper: float | None = None,
    draws: int | None = None,
    eps: float | None = None,
    alpha: bool = False,
) -> dict[str, Any]:
    """PAC-Bayes flatness: bisection for the largest Gaussian weight-noise std (plain
    ``sigma`` and magnitude-aware ``sigma'``) that drops training accuracy by ``target``, on a
    fixed training subset, and the ``pacbayes_*`` measures and bounds built from them;
    ``alpha``: also the sharpness search and its ``sharpness_*`` bounds."""
    options = _given(
        perturb=perturb, target=target, tol=tol, steps=steps, upper=upper, draws=draws, eps=eps
    )
    out = _search(ctx, "sigma", subset, options)
    if alpha:
        out.update(_search(ctx, "alpha", subset, _given(perturb=perturb, target=target, eps=eps)))
    out.update(_bounds(ctx, out, perturb, eps))
    return out


@register_measure("sharpness")
def sharpness(
    ctx: MeasureContext,
    subset: int = 2048,
    perturb: str = "q",
    target: float | None = None,
    tol: float | None = None,
    steps: int | None = None,
    upper: float | None = None,
    ascent_steps: int | None = None,
    restarts: int | None = None,
    eps: float | None = None,
) -> dict[str, Any]:
    """Sharpness: the largest box radius (plain ``alpha`` and magnitude-aware ``alpha'``)
    whose worst case, found by projected gradient ascent with restarts, drops training
    accuracy by ``target``, on a fixed training subset; and its ``sharpness_*`` bounds."""
    options = _given(
        perturb=perturb,
        target=target,
        tol=tol,
        steps=steps,
        upper=upper,
        ascent_steps=ascent_steps,
        restarts=restarts,
        eps=eps,
    )
    out = _search(ctx, "alpha", subset, options)
    out.update(_bounds(ctx, out, perturb, eps))
    return out


@register_measure("bounds")
def bounds(
    ctx: MeasureContext,
    subset: int = 2048,
    perturb: str = "q",
    sharpness: bool = False,
    eps: float | None = None,
) -> dict[str, Any]:
    """All PAC-Bayes and sharpness bounds together from ``sigma``, ``sigma'`` (and ``alpha``,
    ``alpha'`` when known, or searched with ``sharpness``) that earlier measures of the run
    found (the ``flatness`` search is run if they are missing), the trained and step-0
    weights (``init`` bounds; none if the run kept no ``init.pt``) and the training set size."""
    found = dict(ctx.results)
    new: dict[str, Any] = {}
    if found.get("sigma") is None or found.get("sigma_mag") is None:
        new.update(_search(ctx, "sigma", subset, _given(perturb=perturb, eps=eps)))
    if sharpness and (found.get("alpha") is None or found.get("alpha_mag") is None):
        new.update(_search(ctx, "alpha", subset, _given(perturb=perturb, eps=eps)))
    found.update(new)
    return {**new, **_bounds(ctx, found, perturb, eps)}


# ----------------------------------------------------------------------------- landscape
@register_measure(
    "landscape",
    columns=[
        Column("land_loss0", "train loss at w", 1.0, 3, None, "landscape"),
        Column("land_rise", "mean loss rise", 1.0, 3, "min", "landscape"),
    ],
    section=LAND,
)
def landscape(
    ctx: MeasureContext,
    subset: int = 2048,
    dims: int = 1,
    points: int = 51,
    span: float = 1.0,
    perturb: str = "q",
    plot: bool = True,
) -> dict[str, Any]:
    """Loss landscape along ``dims`` (1 or 2) filter-normalized random directions, ``points``
    per axis over [-span, span], on a fixed training subset: the curve (``land_*`` lists) and
    ``landscape.png`` (``landscape2d.png`` for 2-D)."""
    from qatlab.measure.landscape import loss_landscape, plot_landscape

    x, y = _train_subset(ctx, subset)
    res = loss_landscape(
        ctx.model(), x, y, dims=dims, points=points, span=span, seed=ctx.seed, perturb=perturb
    )
    loss = torch.as_tensor(res["loss"], dtype=torch.float64)
    center = loss[(points // 2,) * loss.dim()]
    out: dict[str, Any] = {
        "land_loss0": float(center),
        "land_rise": float(loss.mean() - center),
        "land_coords": _plain(res["coords"]),
        "land_loss": _plain(res["loss"]),
        "land_acc": _plain(res["acc"]),
    }
    if plot:
        name = "landscape.png" if dims == 1 else "landscape2d.png"
        plot_landscape({"trained": res}, ctx.out_dir / name)  # written atomically
    return out


def _plain(value: Any) -> Any:
    """Tensors and arrays as (nested) lists of floats: JSON-ready."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- corruptions
def _corr_label(suffix: str) -> str | None:
    if re.search(r"_s\d+$", suffix):  # per severity: in measures.json, not in report tables
        return None
    return "mean %" if suffix == "mean" else f"{suffix} %"


@register_measure(
    "corruptions",
    columns=[
        Column("clean_acc", "clean %", section="corruptions"),
        Column("corr_", "{} %", section="corruptions", label=_corr_label),
        Column("ptqclean_", "PTQ {} clean %", section="corruptions"),
        Column("ptqcorr_", "PTQ {} corrupted %", section="corruptions"),
    ],
    section=CORR,
)
def corruptions(
    ctx: MeasureContext,
    names: list | None = None,
    severities: list = (1, 2, 3, 4, 5),
    batch_size: int = 512,
    subset: int = 0,
    ptq_bits: list = (),
    calib_batches: int = 4,
) -> dict[str, Any]:
    """Test accuracy under each corruption (image or 1-D signal set, by the data's shape) at
    each severity, per corruption and the mean, seeded; ``subset``: test samples (0 = all).
    ``ptq_bits``: also the model's (latent) float weights post-training quantized at each
    width (WbAb, calibrated on ``calib_batches`` training batches, as the ``ptq`` measure):
    ``ptqclean_WbAb`` and ``ptqcorr_WbAb`` (mean over corruptions), so QAT can be set against
    float + PTQ."""
    from qatlab.data.corruptions import dataset_pixel_range
    from qatlab.measure.ptq import calib_loader
    from qatlab.measure.robustness import corruption_accuracy
    from qatlab.quant import QuantConfig, dequantize, is_quantized, ptq

    x, y = dataset_tensors(ctx.data.test, subset or None, ctx.seed)

    def measure(model) -> dict[str, float]:
        res = corruption_accuracy(
            model,
            x,
            y,
            names=list(names) if names is not None else None,
            severities=tuple(severities),
            seed=ctx.seed,
            batch_size=batch_size,
            pixel_range=dataset_pixel_range(ctx.data.name),  # images: corrupt in pixel space
        )
        return {k: float(v) for k, v in res.items()}

    model = ctx.model()
    out = measure(model)
    if ptq_bits:
        float_model = dequantize(model) if is_quantized(model) else model
        for b in ptq_bits:
            cfg = QuantConfig.from_dict({"weight_bits": int(b), "act_bits": int(b)})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qmodel = ptq(float_model, cfg, calib_loader(ctx.data, 512), calib_batches)
            res = measure(qmodel.eval())
            out[f"ptqclean_{cfg.describe()}"] = res["clean_acc"]
            out[f"ptqcorr_{cfg.describe()}"] = res["corr_mean"]
    return out
