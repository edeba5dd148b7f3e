"""One-pass C++ kernels for per-tensor fake quantization on the CPU.

The eager LSQ kernel (:class:`qatlab.quant.quantizer._FakeQuant`) is memory-bound and runs in
Python: its forward makes four ATen passes over an activation (``mul``, ``round_``, ``clamp_``,
``mul_``) and its backward three (two dot products and ``hardtanh_backward``), each over a
tensor larger than the caches, with a Python autograd Function around them. ``fused.cpp`` does
the same as one C++ autograd Function: one loop forward (read ``x``, write ``q``), one loop
backward (read ``g`` and ``x``, write ``dx``, reduce the two sums of the step gradient), which
the compiler vectorises and ``at::parallel_for`` splits into tasks of 65,536 elements, and no
Python in either. Backward writes ``dx`` over the incoming gradient when it holds the only
reference to it (as ``AccumulateGrad`` steals a gradient): one buffer less per call. It is
built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; ~20 s once per
machine, announced on stderr, then cached by torch in ``~/.cache/torch_extensions``). It is
faster than the ATen passes at every size (a weight of 2,304 elements: 23 against 59 us forward
and backward), so every per-tensor CPU float32 call takes it.

Values: the forward output and ``dx`` are bitwise equal to the ATen passes (the same float32
operations per element). The step gradient's two sums are reduced in the loop: 16 float lanes
over 1,024 elements, then double, per task, tasks added in order (the same result for any
number of threads); ``_FakeQuant``'s dot products add in another order, so the two differ by
float32 rounding (~1e-7 of the sum's terms). Under ``create_graph`` the backward uses
differentiable ATen ops. Per channel, on other devices and dtypes, and under tracers the ATen
passes stay.

Set ``QATLAB_FUSED_KERNELS=0`` to use the ATen passes everywhere (every bit as in runs made
before the kernels: ``tests/test_quant_bitwise.py``). If the kernels cannot be built (no
compiler or ninja), the first call warns once and the ATen passes take over.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

ENV = "QATLAB_FUSED_KERNELS"
SOURCE = Path(__file__).with_name("fused.cpp")

_PLAIN = (Tensor, torch.nn.Parameter)

_module: ModuleType | None = None
_broken = False


def enabled() -> bool:
    """Whether per-tensor CPU calls use the fused kernels (``QATLAB_FUSED_KERNELS``)."""
    return not _broken and os.environ.get(ENV) not in ("0", "false", "no", "off")


def applies(x: Tensor, step: Tensor) -> bool:
    """A plain contiguous float32 CPU tensor with one step, kernels on.

    Plain: not a tensor subclass (fake or functional tensors of a tracer), not a ``torch.func``
    wrapper, and not inside ``torch.jit.trace``: the C++ loops read raw memory, which none of
    them could record. (Checked on every call: the cheapest tests first.)"""
    return (
        type(x) in _PLAIN
        and step.dim() == 0
        and x.is_cpu
        and x.dtype is torch.float32
        and x.is_contiguous()
        and not torch._C._is_tracing()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and enabled()
    )


def compiler_flags() -> list[str]:
    """Optimisation flags for this machine: AVX2 and FMA where the CPU has them (x86-64)."""
    flags = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64") and _cpu_has("avx2", "fma"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _cpu_has(*features: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(text.split())
    return all(feature in words for feature in features)


def _build() -> ModuleType:
    """Compile (or load from torch's cache) the extension; its name pins source and flags."""
    from torch.utils.cpp_extension import load

    flags = compiler_flags()
    key = hashlib.sha1(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    name = f"qatlab_fused_{key}"
    if not _built(name):
        print(
            "qatlab: building the fused fake-quant kernels (once per machine, ~20 s) ...",
            file=sys.stderr,
            flush=True,
        )
    return load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _built(name: str) -> bool:
    """Whether torch's extension cache already holds extension ``name`` (no build needed)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:  # noqa: BLE001 - a private torch helper: only decides a message
        return True


def _load() -> ModuleType | None:
    """The built extension; on a build failure warn once and return None (use ATen)."""
    global _module, _broken
    if _module is not None or _broken:
        return _module
    try:
        _module = _build()
    except Exception as error:  # noqa: BLE001 - any build failure means: fall back
        _broken = True
        lines = str(error).strip().splitlines()
        first_line = lines[0].strip() if lines else type(error).__name__
        warnings.warn(
            f"qatlab: fused fake-quant kernels unavailable ({first_line[:200]}); using ATen "
            f"ops (slower). Set {ENV}=0 to silence.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _module


def fake_quantize(
    x: Tensor, step: Tensor, n: int, p: int, grad_scale: float, floor: float | None
) -> Tensor | None:
    """LSQ fake quantization of ``x`` through the C++ op; None where it does not apply
    (:func:`applies`) or the kernels could not be built (then the caller uses ATen)."""
    if not applies(x, step):
        return None
    module = _module if _module is not None else _load()
    if module is None:
        return None
    return module.fake_quantize(x, step, n, p, grad_scale, math.nan if floor is None else floor)
