"""One-off experiments on the qatlab training step: suggested changes measured by monkeypatching
qatlab *per instance*, next to unpatched qatlab and float, interleaved in one run.

qatlab itself is not modified: a subclass of ``Quantizer`` is swapped onto one model's
quantizers only, so patched and unpatched models interleave step by step. The results and the
suggestions drawn from them are in ``docs/results/performance.md``. Variants (``--experiments``,
all by default):

* ``savedout``: backward from the saved output (:class:`_FakeQuantSavedOut`, CPU only);
* ``leanfwd``: a lean ``Quantizer.forward`` (no per-call init check, grid or grad-scale
  recomputation, step clamped in place);
* ``both``: the two together;
* ``bncal``: calibration with BatchNorm on batch statistics (what ``qatlab.calibrate`` now does
  for BN layers that have seen no data, so this row should equal ``qatlab``);
* ``wonly``: weights only (``act_bits=None``).

``--mode op`` (or ``all``) times the fake-quant op alone: qatlab's vs the saved-output backward
vs a ``torch.compile``'d LSQ (inductor; a lower bound for a fused kernel; needs a C++ compiler
on CPU). Reference net, timing and memory children: ``common.py``.
Run: ``python benchmarks/step_experiments.py`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable

import torch
from common import (
    add_memory_arguments,
    build_base,
    finish,
    header,
    machine_info,
    measure_memory,
    memory_note,
    op_bench,
    op_table,
    qatlab_fake_quant,
    quantized_reference,
    reference_net,
    sgd,
    step_table,
    time_steps,
)
from torch import Tensor, nn

import qatlab
from qatlab.quant.quantizer import _EPS, Quantizer, fake_quantize

EXPERIMENTS = ("savedout", "leanfwd", "both", "bncal", "wonly")
DESCRIPTIONS = {
    "float": ("float baseline", "-", "no"),
    "qatlab": ("qatlab LSQ W4A4 (defaults: first/last layer 8-bit W)", "W4A4 LSQ", "no (BN kept)"),
    "qatlab+savedout": ("experiment: backward from saved output", "W4A4 LSQ", "no (BN kept)"),
    "qatlab+leanfwd": ("experiment: lean Quantizer.forward", "W4A4 LSQ", "no (BN kept)"),
    "qatlab+both": ("experiment: savedout + leanfwd", "W4A4 LSQ", "no (BN kept)"),
    "qatlab+wonly": ("experiment: weights only (act_bits=None)", "W4A-", "no (BN kept)"),
    "qatlab+bncal": (
        "experiment: calibrated with BN on batch statistics",
        "W4A4 LSQ",
        "no (BN kept)",
    ),
}


# --------------------------------------------------------------------------- patches
class _FakeQuantSavedOut(torch.autograd.Function):
    """Suggested ``_FakeQuant``: same gradients, backward from the saved output.

    The output ``q = s * levels`` is the next layer's input, which that layer saves anyway, so
    saving it costs no memory. Then ``sum g*levels = <g, q> / s`` and the in-range test
    ``n - 0.5 < x/s < p + 0.5`` becomes ``(n - 0.5) s < x < (p + 0.5) s``: backward is one
    ``hardtanh_backward`` (one fresh buffer) and two dot products, instead of six passes over
    the tensor and two fresh buffers. Per-tensor steps on CPU only here (``float(step)``); a
    CUDA version would build the bounds as tensors to avoid a sync.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, n: int, p: int, grad_scale: float) -> Tensor:
        out = torch.mul(x, 1.0 / step)
        out.round_().clamp_(n, p).mul_(step)
        ctx.save_for_backward(x, out, step)
        ctx.n, ctx.p, ctx.grad_scale = n, p, grad_scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, step = ctx.saved_tensors
        s = float(step)
        grad_x = torch.ops.aten.hardtanh_backward(grad, x, (ctx.n - 0.5) * s, (ctx.p + 0.5) * s)
        grad_step = None
        if ctx.needs_input_grad[1]:
            g, xf = grad.reshape(-1), x.reshape(-1)
            grad_step = (torch.dot(g, out.reshape(-1)) - torch.dot(grad_x.reshape(-1), xf)) / step
            grad_step = grad_step * ctx.grad_scale
        return (grad_x if ctx.needs_input_grad[0] else None), grad_step, None, None, None


def fake_quantize_savedout(x: Tensor, step: Tensor, n: int, p: int, grad_scale: float) -> Tensor:
    if step.dim() != 0 or x.device.type != "cpu":
        return fake_quantize(x, step, n, p, grad_scale)
    return _FakeQuantSavedOut.apply(x, step, n, p, grad_scale)


class _PatchedQuantizer(Quantizer):
    """``Quantizer`` with the suggested changes; swapped onto one model's quantizers only.

    ``_savedout``: use :class:`_FakeQuantSavedOut`. ``_lean``: no per-call
    ``bool(self.initialized)`` (a device sync on CUDA), no ``grid_range``/grad-scale
    recomputation, and the step clamped in place (no autograd node) instead of ``clamp_min``.
    Only valid for a calibrated lsq quantizer whose bits/sign do not change while it runs.
    """

    _savedout = False
    _lean = False

    def forward(self, x: Tensor) -> Tensor:
        if not self._lean:
            if not self._savedout:
                return super().forward(x)
            if not self.enabled or self._observing or self.policy != "lsq":
                return super().forward(x)
            if not bool(self.initialized):
                self.initialize(x)
            n, p = self.grid_range
            step = self.current_step(x)
            gs = self._grad_scale(x, p) if step.requires_grad else 1.0
            return fake_quantize_savedout(x, step, n, p, gs)
        if not self.enabled or self._observing or self.policy != "lsq":
            return super().forward(x)
        key = (x.shape, self.bits, self.signed)
        cached = self.__dict__.get("_lean_cache")
        if cached is None or cached[0] != key:
            if not bool(self.initialized):
                self.initialize(x)
            n, p = self.grid_range
            cached = (key, n, p, self._grad_scale(x, p))
            self.__dict__["_lean_cache"] = cached
        _, n, p, gs = cached
        with torch.no_grad():
            self.step.clamp_(min=_EPS)
        fq = fake_quantize_savedout if self._savedout else fake_quantize
        return fq(x, self.step, n, p, gs)


def _patch(model: nn.Module, savedout: bool, lean: bool) -> nn.Module:
    cls = type("PatchedQuantizer", (_PatchedQuantizer,), {"_savedout": savedout, "_lean": lean})
    for m in model.modules():
        if type(m) is Quantizer:
            m.__class__ = cls
    return model


# --------------------------------------------------------------------------- variants
def _calibrate_batch_stat_bn(model: nn.Module, x: Tensor) -> None:
    """``qatlab.calibrate`` with every BatchNorm normalising by batch statistics.

    On a fresh net BN's running statistics are (0, 1); calibrating in eval mode with them saw
    activations that shrink layer by layer and gave far too small steps (the finding of the
    first run). Running BN on batch statistics during calibration (running statistics restored
    afterwards) gives training-time activations. ``qatlab.calibrate`` now does this itself for
    BN layers that have seen no data.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    hooks = [
        m.register_forward_pre_hook(lambda mod, _: setattr(mod, "training", True)) for m in bns
    ]
    try:
        qatlab.calibrate(model, [x])
    finally:
        for h in hooks:
            h.remove()
        for m, state in zip(bns, saved, strict=True):
            m.load_state_dict(state)


def build(kind: str, x: Tensor) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``float``, ``qatlab`` or ``qatlab+EXPERIMENT``: a fresh model (seed 0), its optimizer."""
    if kind in ("float", "qatlab"):
        return build_base(kind, x)
    exp = kind.removeprefix("qatlab+")
    if exp not in EXPERIMENTS:
        raise ValueError(f"unknown variant {kind!r}")
    if exp == "wonly":
        model = quantized_reference(x, act_bits=None)
    elif exp == "bncal":
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = qatlab.quantize(
                reference_net().to(x.device), qatlab.QuantConfig(weight_bits=4, act_bits=4)
            )
        _calibrate_batch_stat_bn(model, x)
        model.train()
    else:
        model = quantized_reference(x)
        _patch(model, savedout=exp in ("savedout", "both"), lean=exp in ("leanfwd", "both"))
    return model, sgd(model)


# --------------------------------------------------------------------------- op benchmark
def _lsq_for_compile(x: Tensor, step: Tensor, n: int, p: int, grad_scale: float) -> Tensor:
    """LSQ with qatlab's gradients (in-range test on the rounded value), written for inductor."""
    s = (step - step * grad_scale).detach() + step * grad_scale
    v = x / s
    r = v.round()
    q = r.clamp(n, p)
    return torch.where((r >= n) & (r <= p), (q - v).detach() + v, q) * s


def _op_fns(device: torch.device) -> dict[str, Callable]:
    fns: dict[str, Callable] = {"qatlab _FakeQuant": qatlab_fake_quant}
    if device.type == "cpu":
        fns["experiment: backward from saved output"] = lambda x, s, n, p, gs: (
            fake_quantize_savedout(x, s.clamp_min(_EPS), n, p, gs)
        )
    # a lower bound for a fused kernel: inductor fuses forward and backward into few passes
    # (compiled during warm-up; needs a C++ compiler on CPU)
    fns["experiment: torch.compile'd LSQ (inductor, fused)"] = torch.compile(
        _lsq_for_compile, dynamic=False
    )
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(
        description="One-off experiments on the qatlab step (monkeypatched per instance) and "
        "on the fake-quant op, next to unpatched qatlab and float."
    )
    parser.add_argument("--mode", choices=("step", "op", "all"), default="all")
    parser.add_argument(
        "--experiments",
        default=",".join(EXPERIMENTS),
        help=f"comma-separated step variants out of {', '.join(EXPERIMENTS)} (default: all)",
    )
    parser.add_argument("--steps", type=int, default=30, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps per variant")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="write all results here")
    add_memory_arguments(parser)
    parser.add_argument("--op-iters", type=int, default=50, help="measured calls per op")
    parser.add_argument("--op-shape", type=int, nargs=4, default=[64, 32, 32, 32])
    args = parser.parse_args()
    chosen = [e.strip() for e in args.experiments.split(",") if e.strip()]
    unknown = [e for e in chosen if e not in EXPERIMENTS]
    if unknown:
        parser.error(f"--experiments: unknown {unknown}; choose from {', '.join(EXPERIMENTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device)
    wall0 = time.perf_counter()
    results: dict = {"machine": info, "args": vars(args)}
    print(header(info))
    if args.mode in ("step", "all"):
        if args.device == "cuda":  # the saved-output backward is written for CPU only
            chosen = [e for e in chosen if e not in ("savedout", "both")]
        kinds = ["float", "qatlab"] + [f"qatlab+{e}" for e in chosen]
        res = time_steps(kinds, build, args, device)
        mem = None if args.no_memory else measure_memory(kinds, build, args)
        results["step"], results["memory"] = res, mem
        print(
            f"## Training step experiments (batch {args.batch}, {args.steps} measured steps per "
            f"variant, {args.warmup} warm-up, interleaved)\n"
        )
        print(step_table(res, mem, DESCRIPTIONS))
        if mem:
            print("\n" + memory_note(mem, args))
        print()
    if args.mode in ("op", "all"):
        res = op_bench(_op_fns(device), args, device)
        results["op"] = res
        print("## Fake-quant op experiments\n")
        print(op_table(res, args.op_shape))
        print()
    finish(info, wall0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
