"""Seeded input corruptions at 5 severities, in torch: CIFAR-10-C's for images, 1-D analogues
for signals (MNIST-1D).

Images are batches ``(N, C, H, W)`` with pixels in ``[0, 1]`` (map normalised data there with
``pixel_range``, see :func:`corrupt` and :func:`dataset_pixel_range`); the severity parameters
are those of hendrycks/robustness ``make_cifar_c.py``:

=================  =====================================  ===================================
name               parameter (severity 1..5)              what
=================  =====================================  ===================================
gaussian_noise     sigma .04 .06 .08 .09 .10              ``x + N(0, sigma^2)``
shot_noise         lambda 500 250 100 75 50               ``Poisson(lambda x) / lambda``
impulse_noise      amount .01 .02 .03 .05 .07             salt and pepper per value (1/2 each)
speckle_noise      sigma .06 .1 .12 .16 .2                ``x + x N(0, sigma^2)``
gaussian_blur      sigma .4 .6 .7 .8 1 (pixels)           separable, radius ``4 sigma``, edge
contrast           c .75 .5 .4 .3 .15                     ``(x - mean) c + mean`` per channel
brightness         +.05 .1 .15 .2 .3                      HSV value ``v + c`` (gray: ``x + c``)
pixelate           size .95 .9 .85 .75 .65                box filter down, box filter back up
jpeg               quality 80 65 58 50 40                 8x8 block DCT, IJG tables, YCbCr
=================  =====================================  ===================================

Every image result is clipped to ``[0, 1]``. ``jpeg`` is a JPEG-like distortion, not a codec:
YCbCr (3 channels; other channel counts use the luminance table per channel), level shift,
8x8 orthonormal DCT, rounding to the IJG quality-scaled quantisation tables, inverse, rounding
to 8-bit levels; no chroma subsampling and no entropy coding (neither changes the decoded
values beyond subsampling). ``pixelate`` resamples with exact box-filter weights both ways, as
PIL's ``BOX`` resize that CIFAR-10-C uses.

Signals are batches ``(N, C, L)`` on any scale: each sample is mapped to ``[0, 1]`` by its own
min and max over ``(C, L)``, corrupted, and mapped back (no clipping: a signal has no hard
range), so the parameters mean the same as for pixels: the four noises, ``contrast`` and
``offset`` (brightness) use the CIFAR-10-C values above; ``blur_1d`` a Gaussian of std .5 .75
1 1.5 2 samples; ``resample`` keeps .95 .9 .85 .75 .65 of the samples (linear down- and
up-sampling); ``shift`` moves each sample by 2.5 5 7.5 10 15 % of its length (direction random
per sample, edge values repeated); ``time_warp`` resamples at ``t + a L sin(pi t / (L-1))``
(sign random per sample) with ``a`` = .02 .04 .06 .08 .1.

Everything is a pure function of ``(x, name, severity, seed)``: shape and dtype are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qatlab.errors import ConfigError

Corruption = Callable[[Tensor, int, torch.Generator], Tensor]
SEVERITIES = (1, 2, 3, 4, 5)


# --------------------------------------------------------------------------- helpers
def _randn(x: Tensor, g: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=g).to(x)


def _rand(x: Tensor, g: torch.Generator) -> Tensor:
    return torch.rand(x.shape, generator=g).to(x)


def _poisson(lam: Tensor, g: torch.Generator) -> Tensor:
    return torch.poisson(lam.detach().cpu().float(), generator=g).to(lam)


def _gauss_kernel(sigma: float, device, dtype) -> Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _blur_last(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur along the last axis of ``(M, 1, L)``, edge values repeated."""
    k = _gauss_kernel(sigma, x.device, x.dtype)
    r = (len(k) - 1) // 2
    return F.conv1d(F.pad(x, (r, r), mode="replicate"), k.view(1, 1, -1))


def _salt_pepper(x: Tensor, amount: float, g: torch.Generator, lo=0.0, hi=1.0) -> Tensor:
    flipped = _rand(x, g) < amount
    salt = _rand(x, g) < 0.5
    out = torch.where(flipped & salt, torch.full_like(x, hi), x)
    return torch.where(flipped & ~salt, torch.full_like(x, lo), out)


# --------------------------------------------------------------------------- images
_GAUSS = (0.04, 0.06, 0.08, 0.09, 0.10)
_SHOT = (500, 250, 100, 75, 50)
_IMPULSE = (0.01, 0.02, 0.03, 0.05, 0.07)
_SPECKLE = (0.06, 0.1, 0.12, 0.16, 0.2)
_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_BRIGHT = (0.05, 0.1, 0.15, 0.2, 0.3)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
_JPEG = (80, 65, 58, 50, 40)


def gaussian_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    return (x + _randn(x, g) * _GAUSS[severity - 1]).clamp(0, 1)


def shot_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    lam = _SHOT[severity - 1]
    return (_poisson(x.clamp_min(0) * lam, g) / lam).clamp(0, 1)


def impulse_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    return _salt_pepper(x, _IMPULSE[severity - 1], g)


def speckle_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    return (x + x * _randn(x, g) * _SPECKLE[severity - 1]).clamp(0, 1)


def gaussian_blur(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    sigma = _BLUR[severity - 1]
    n, c, h, w = x.shape
    rows = _blur_last(x.reshape(-1, 1, w), sigma).reshape(n, c, h, w)
    cols = _blur_last(rows.transpose(2, 3).reshape(-1, 1, h), sigma).reshape(n, c, w, h)
    return cols.transpose(2, 3).clamp(0, 1)


def contrast(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    mean = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    return ((x - mean) * _CONTRAST[severity - 1] + mean).clamp(0, 1)


def brightness(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """HSV value + c with hue and saturation kept: RGB scales by ``v'/v`` (black becomes gray
    ``v'``); a single channel is its own value."""
    c = _BRIGHT[severity - 1]
    if x.shape[1] != 3:
        return (x + c).clamp(0, 1)
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    scaled = x * (v_new / v.clamp_min(1e-12))
    return torch.where(v > 0, scaled, v_new.expand_as(x)).clamp(0, 1)


def _box_matrix(n_out: int, n_in: int) -> Tensor:
    """Box-filter resampling ``n_in -> n_out`` samples (PIL's ``BOX``): output cell ``j``
    covers ``[j, j+1) * n_in/n_out`` of the input; weights = overlap with each input pixel."""
    scale = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * scale
    i = torch.arange(n_in, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(lo + scale, i + 1) - torch.maximum(lo, i)).clamp_min(0)
    return overlap / overlap.sum(1, keepdim=True)


def pixelate(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = _PIXELATE[severity - 1]
    h, w = x.shape[-2:]
    hs, ws = max(1, int(h * c)), max(1, int(w * c))
    rows = (_box_matrix(h, hs) @ _box_matrix(hs, h)).to(x)
    cols = (_box_matrix(w, ws) @ _box_matrix(ws, w)).to(x)
    return (rows @ x @ cols.T).clamp(0, 1)


_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)


def jpeg_table(quality: int, chroma: bool = False) -> Tensor:
    """The IJG quantisation table at ``quality`` (1..100): base table scaled by ``5000/q``
    below 50, ``200 - 2q`` from 50, rounded, clamped to 1..255."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    base = torch.tensor(_CHROMA if chroma else _LUMA, dtype=torch.float64)
    return ((base * scale + 50) / 100).floor().clamp(1, 255)


def _dct_matrix(n: int = 8) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m  # orthonormal DCT-II: coefficients = M @ block @ M.T


def _jpeg_plane(p: Tensor, table: Tensor) -> Tensor:
    """Block-DCT quantisation of ``(M, H, W)`` planes in 0..255 (float64)."""
    m, h, w = p.shape
    ph, pw = -h % 8, -w % 8
    if ph or pw:
        p = F.pad(p.unsqueeze(1), (0, pw, 0, ph), mode="replicate").squeeze(1)
    hh, ww = p.shape[-2:]
    blocks = (p - 128).reshape(m, hh // 8, 8, ww // 8, 8).transpose(2, 3)  # M, by, bx, 8, 8
    d = _dct_matrix().to(p.device)
    t = table.to(p.device)
    coef = d @ blocks @ d.T
    coef = torch.round(coef / t) * t
    out = (d.T @ coef @ d).transpose(2, 3).reshape(m, hh, ww) + 128
    return out[:, :h, :w]


def jpeg(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    quality = _JPEG[severity - 1]
    n, c, h, w = x.shape
    v = torch.round(x.double().clamp(0, 1) * 255)
    luma, chroma = jpeg_table(quality), jpeg_table(quality, chroma=True)
    if c == 3:
        r, gg, b = v[:, 0], v[:, 1], v[:, 2]
        y = 0.299 * r + 0.587 * gg + 0.114 * b
        cb = -0.168736 * r - 0.331264 * gg + 0.5 * b + 128
        cr = 0.5 * r - 0.418688 * gg - 0.081312 * b + 128
        y, cb, cr = _jpeg_plane(y, luma), _jpeg_plane(cb, chroma), _jpeg_plane(cr, chroma)
        r = y + 1.402 * (cr - 128)
        gg = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
        b = y + 1.772 * (cb - 128)
        out = torch.stack([r, gg, b], dim=1)
    else:
        out = _jpeg_plane(v.reshape(n * c, h, w), luma).reshape(n, c, h, w)
    return (torch.round(out.clamp(0, 255)) / 255).to(x.dtype)


IMAGE_CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg": jpeg,
}


# --------------------------------------------------------------------------- signals
_BLUR_1D = (0.5, 0.75, 1.0, 1.5, 2.0)
_SHIFT = (0.025, 0.05, 0.075, 0.1, 0.15)
_WARP = (0.02, 0.04, 0.06, 0.08, 0.1)


def _unit(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, lo, span)``: each sample mapped to [0, 1] by its min/max over (C, L)."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.amin(1).view(-1, 1, 1)
    span = (flat.amax(1).view(-1, 1, 1) - lo).clamp_min(1e-12)
    return (x - lo) / span, lo, span


def _on_unit(fn: Callable[[Tensor, int, torch.Generator], Tensor]) -> Corruption:
    def wrapped(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
        u, lo, span = _unit(x)
        return fn(u, severity, g) * span + lo

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _sig_gaussian(u, s, g):
    return u + _randn(u, g) * _GAUSS[s - 1]


def _sig_shot(u, s, g):
    return _poisson(u.clamp_min(0) * _SHOT[s - 1], g) / _SHOT[s - 1]


def _sig_impulse(u, s, g):
    return _salt_pepper(u, _IMPULSE[s - 1], g)


def _sig_speckle(u, s, g):
    return u + u * _randn(u, g) * _SPECKLE[s - 1]


def _sig_blur(u, s, g):
    n, c, length = u.shape
    return _blur_last(u.reshape(-1, 1, length), _BLUR_1D[s - 1]).reshape(n, c, length)


def _sig_contrast(u, s, g):
    mean = u.mean(dim=-1, keepdim=True)
    return (u - mean) * _CONTRAST[s - 1] + mean


def _sig_offset(u, s, g):
    return u + _BRIGHT[s - 1]


def _sample_at(u: Tensor, pos: Tensor) -> Tensor:
    """Linear interpolation of ``(N, C, L)`` at positions ``pos`` ``(N, L')`` (clamped)."""
    length = u.shape[-1]
    pos = pos.clamp(0, length - 1)
    i0 = pos.floor().long().clamp(0, length - 1)
    i1 = (i0 + 1).clamp(max=length - 1)
    frac = (pos - i0.to(pos.dtype)).unsqueeze(1).to(u.dtype)
    idx0 = i0.unsqueeze(1).expand(-1, u.shape[1], -1)
    idx1 = i1.unsqueeze(1).expand(-1, u.shape[1], -1)
    return u.gather(-1, idx0) * (1 - frac) + u.gather(-1, idx1) * frac


def _sig_resample(u, s, g):
    length = u.shape[-1]
    short = max(2, int(length * _PIXELATE[s - 1]))
    down = F.interpolate(u, size=short, mode="linear", align_corners=True)
    return F.interpolate(down, size=length, mode="linear", align_corners=True)


def _signs(n: int, g: torch.Generator, device) -> Tensor:
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(device, torch.float64)


def _sig_shift(u, s, g):
    n, _, length = u.shape
    k = max(1, round(length * _SHIFT[s - 1]))
    t = torch.arange(length, device=u.device, dtype=torch.float64)
    return _sample_at(u, t[None, :] - k * _signs(n, g, u.device)[:, None])


def _sig_time_warp(u, s, g):
    n, _, length = u.shape
    t = torch.arange(length, device=u.device, dtype=torch.float64)
    bump = _WARP[s - 1] * length * torch.sin(math.pi * t / max(length - 1, 1))
    return _sample_at(u, t[None, :] + _signs(n, g, u.device)[:, None] * bump[None, :])


SIGNAL_CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _on_unit(_sig_gaussian),
    "shot_noise": _on_unit(_sig_shot),
    "impulse_noise": _on_unit(_sig_impulse),
    "speckle_noise": _on_unit(_sig_speckle),
    "blur_1d": _on_unit(_sig_blur),
    "contrast": _on_unit(_sig_contrast),
    "offset": _on_unit(_sig_offset),
    "resample": _on_unit(_sig_resample),
    "shift": _on_unit(_sig_shift),
    "time_warp": _on_unit(_sig_time_warp),
}


# --------------------------------------------------------------------------- entry point
PixelRange = tuple[float | Sequence[float], float | Sequence[float]]


def corruption_table(x: Tensor) -> dict[str, Corruption]:
    """The corruptions for ``x``'s rank: images ``(N, C, H, W)`` or signals ``(N, C, L)``."""
    if x.dim() == 4:
        return IMAGE_CORRUPTIONS
    if x.dim() == 3:
        return SIGNAL_CORRUPTIONS
    raise ConfigError(
        f"corruptions take a batch of images (N, C, H, W) or signals (N, C, L), got shape "
        f"{tuple(x.shape)}; add the batch dimension"
    )


def _range_tensors(pixel_range: PixelRange, x: Tensor) -> tuple[Tensor, Tensor]:
    lo, hi = (torch.as_tensor(v, dtype=torch.float32, device=x.device) for v in pixel_range)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    lo = lo.reshape(shape) if lo.dim() else lo
    hi = hi.reshape(shape) if hi.dim() else hi
    if bool((hi <= lo).any()):
        raise ConfigError(f"pixel_range must be (low, high) with high > low, got {pixel_range}")
    return lo, hi


def corrupt(
    x: Tensor, name: str, severity: int, seed: int = 0, *, pixel_range: PixelRange | None = None
) -> Tensor:
    """``x`` corrupted by ``name`` at ``severity`` (1..5); same shape and dtype, a pure function
    of ``(x, name, severity, seed)``. The table is picked by ``x``'s rank (see module notes).

    Images must be pixels in ``[0, 1]``, or give ``pixel_range=(low, high)``: the values that
    pixel 0 and pixel 1 have in ``x`` (scalars or one per channel; for data normalised as
    ``(p - mean) / std`` that is ``(-mean/std, (1 - mean)/std)``, :func:`dataset_pixel_range`).
    The result is then in ``x``'s scale again. Signals ignore ``pixel_range``.
    """
    table = corruption_table(x)
    if name not in table:
        kind = "image" if table is IMAGE_CORRUPTIONS else "signal"
        raise ConfigError(f"unknown {kind} corruption {name!r}; choose from {', '.join(table)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ConfigError(f"corruption severity must be an integer from 1 to 5, got {severity!r}")
    if not x.is_floating_point():
        raise ConfigError(f"corruptions need a floating-point tensor, got {x.dtype}")
    g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    work = x.detach().float()
    if table is IMAGE_CORRUPTIONS:
        if pixel_range is not None:
            lo, hi = _range_tensors(pixel_range, work)
            work = (work - lo) / (hi - lo)
        if work.numel() and (float(work.min()) < -1e-3 or float(work.max()) > 1 + 1e-3):
            raise ConfigError(
                f"image corruptions need pixels in [0, 1], got values in [{float(work.min()):.3g}, "
                f"{float(work.max()):.3g}]; pass pixel_range=(low, high) for normalised data "
                "(qatlab.data.corruptions.dataset_pixel_range(name))"
            )
        out = table[name](work.clamp(0, 1), severity, g)
        if pixel_range is not None:
            out = out * (hi - lo) + lo
    else:
        out = table[name](work, severity, g)
    return out.to(x.dtype)


def dataset_pixel_range(name: str) -> PixelRange | None:
    """``pixel_range`` of a qatlab dataset's inputs: per channel for CIFAR/ImageFolder (their
    mean/std normalisation), digits' fixed ``(p - 0.3) / 0.4``; ``None`` for MNIST-1D (signals)."""
    if name == "mnist1d":
        return None
    if name in ("cifar10", "cifar100"):
        from qatlab.data.cifar import MEAN, STD

        mean, std = MEAN[name], STD[name]
    elif name == "digits":
        from qatlab.data.digits import MEAN as DMEAN
        from qatlab.data.digits import STD as DSTD

        return (-DMEAN / DSTD, (1 - DMEAN) / DSTD)
    elif name == "imagefolder":
        from qatlab.data.imagefolder import MEAN as mean
        from qatlab.data.imagefolder import STD as std
    else:
        raise ConfigError(f"no pixel range known for dataset {name!r}")
    return (
        tuple(-m / s for m, s in zip(mean, std, strict=True)),
        tuple((1 - m) / s for m, s in zip(mean, std, strict=True)),
    )
