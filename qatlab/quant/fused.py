"""One-pass eager kernels for per-tensor fake quantization of large CPU tensors.

The eager LSQ kernel (:class:`qatlab.quant.quantizer._FakeQuant`) is memory-bound: in ATen ops
its forward makes four passes over an activation (``mul``, ``round_``, ``clamp_``, ``mul_``)
and its backward three (two dot products and ``hardtanh_backward``), each over a tensor larger
than the caches. Here both are single loops, generated once by inductor (``torch.compile``
with dynamic shapes, so one kernel serves every size) and called from the eager autograd
Function: forward reads ``x`` and writes ``q``; backward reads ``g`` and ``x``, writes ``dx``
and reduces the two sums of the step gradient in the same loop.

Values: the forward output and ``dx`` are bitwise equal to the ATen passes (the same float32
operations per element); the step gradient's sums are added in another order (float32
rounding, ~1e-6 relative). Small tensors (below :data:`MIN_NUMEL` elements) keep the ATen passes.

Set ``QATLAB_FUSED_KERNELS=0`` to use the ATen passes everywhere. If inductor cannot build the
kernels (no C++ compiler), the first large call warns once and the ATen passes take over.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

MIN_NUMEL = 1 << 20
"""Tensors with fewer elements keep the ATen passes. A call through ``torch.compile`` costs
~30-80 us more than the ATen calls (guards, wrappers, a fresh constants tensor); on the 2-core
CPU the saved passes repay that from ~1M elements (at 2^19 fused fwd+bwd took 0.73 ms against
the ATen passes' 0.67 ms; at 2^20, 1.10 ms against 1.36 ms). Small models (MNIST-1D MLPs) never
pay the one-off compilation (~10 s cold, ~1-2 s from inductor's disk cache, once per process).
docs/results/performance.md has the measurements."""

ENV = "QATLAB_FUSED_KERNELS"

_PLAIN = (Tensor, torch.nn.Parameter)

_kernels: dict[str, Callable] = {}
_broken = False


def _forward(x: Tensor, consts: Tensor) -> Tensor:
    """``s * clamp(round(x * (1/s)), n, p)``; ``consts = [1/s, s, n, p, lo, hi]`` in float32."""
    return torch.clamp(torch.round(x * consts[0]), consts[2], consts[3]) * consts[1]


def _backward(grad: Tensor, x: Tensor, consts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``dx = g`` where ``lo < x < hi``, else 0; and ``sum g * levels``, ``sum dx * x``."""
    grad_x = torch.where((x > consts[4]) & (x < consts[5]), grad, 0.0)
    levels = torch.clamp(torch.round(x * consts[0]), consts[2], consts[3])
    return grad_x, (grad * levels).sum(), (grad_x * x).sum()


def enabled() -> bool:
    """Whether large per-tensor CPU calls use the fused kernels (``QATLAB_FUSED_KERNELS``)."""
    return not _broken and os.environ.get(ENV) not in ("0", "false", "no", "off")


def applies(x: Tensor) -> bool:
    """A plain contiguous float32 CPU tensor of at least :data:`MIN_NUMEL` elements, kernels on.

    Plain: not a tensor subclass (fake, functional or distributed tensors of a tracer) and not
    inside ``torch.jit.trace``, which would record the compiled call instead of its ops."""
    return (
        not torch.jit.is_tracing()
        and type(x) in _PLAIN
        and x.numel() >= MIN_NUMEL
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.is_contiguous()
        and enabled()
    )


def constants(s: float, n: int, p: int) -> Tensor:
    """The kernels' scalars as one float32 tensor, each rounded from double as ATen rounds a
    Python scalar: ``1/s``, ``s``, ``n``, ``p``, the in-range bounds ``(n-1/2)s``, ``(p+1/2)s``."""
    inverse = 1.0 / s if s != 0 else math.copysign(math.inf, s)
    return torch.tensor([inverse, s, n, p, (n - 0.5) * s, (p + 0.5) * s], dtype=torch.float32)


def _kernel(name: str) -> Callable:
    """The compiled kernel ``name`` (inductor builds it on its first call)."""
    kernel = _kernels.get(name)
    if kernel is None:
        function = _forward if name == "forward" else _backward
        kernel = torch.compile(function, dynamic=True, fullgraph=True)
        _kernels[name] = kernel
    return kernel


def _run(name: str, *args: Tensor):
    """Call kernel ``name``; on a build failure warn once and return None (use ATen)."""
    global _broken
    try:
        return _kernel(name)(*args)
    except Exception as error:  # noqa: BLE001 - any inductor failure means: fall back
        _broken = True
        lines = str(error).strip().splitlines()
        first_line = lines[0].strip() if lines else type(error).__name__
        warnings.warn(
            f"qatlab: fused fake-quant kernels unavailable ({first_line[:200]}); using ATen "
            f"ops (slower). Set {ENV}=0 to silence.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def forward(x: Tensor, consts: Tensor) -> Tensor | None:
    """Fused forward of a flat view of ``x``, shaped like ``x``; None if the kernels failed."""
    out = _run("forward", x.detach().reshape(-1), consts)
    return None if out is None else out.view(x.shape)


def backward(grad: Tensor, x: Tensor, consts: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Fused ``(dx, sum g*levels, sum dx*x)``; None if the kernels failed."""
    result = _run("backward", grad.reshape(-1), x.detach().reshape(-1), consts)
    if result is None:
        return None
    grad_x, levels_sum, inner = result
    return grad_x.view(x.shape), levels_sum, inner
