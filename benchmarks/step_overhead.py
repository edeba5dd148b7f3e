"""Training-step overhead of LSQ W4A4 QAT over float, next to torch.ao's QAT, in one run.

Three modes (``--mode``; ``all`` runs them in turn):

* ``step``: median training-step time of each variant on the reference net (6 conv-BN-ReLU
  blocks 3->32->32->64->64->128->128, stride 2 at the 3rd and 5th conv, global average pool,
  linear to 10 classes; batch 64x3x32x32; SGD lr 0.01 momentum 0.9; cross-entropy), its ratio
  to float, and peak memory growth during training steps measured in a fresh spawned process
  per variant (CPU: peak RSS, reset through ``/proc/self/clear_refs`` where the kernel allows;
  CUDA: ``torch.cuda.max_memory_allocated``). Variants are interleaved (ABCD ABCD ...) so drift
  on a shared machine hits them alike.
* ``op``: the fake-quant op alone, forward + backward on a 64x32x32x32 activation tensor with a
  per-tensor learned step: qatlab vs ``torch._fake_quantize_learnable_per_tensor_affine`` vs a
  naive autograd LSQ, in ms and effective GB/s.
* ``profile``: ``torch.profiler`` top ops by self CPU time in the qatlab QAT step, next to the
  same ops in the float step (per step), to show where the overhead comes from.

``--experiments`` adds variants that monkeypatch qatlab *per instance* (a subclass of
``Quantizer`` swapped in on that model only, so they interleave with the unpatched one) to
measure suggested changes; qatlab itself is not modified.

torch.ao is used here only as a point of comparison; the library never imports it.
Run: ``python benchmarks/step_overhead.py`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

import qatlab
from qatlab.quant.quantizer import _EPS, Quantizer, fake_quantize

BASE_VARIANTS = ("float", "qatlab", "ao-qat", "ao-lsq")
EXPERIMENT_VARIANTS = (
    "qatlab+savedout",
    "qatlab+leanfwd",
    "qatlab+both",
    "qatlab+bncal",
    "qatlab+wonly",
)
DESCRIPTIONS = {
    "float": ("float baseline", "-", "no"),
    "qatlab": ("qatlab LSQ W4A4 (defaults: first/last layer 8-bit W)", "W4A4 LSQ", "no (BN kept)"),
    "ao-qat": (
        "torch.ao eager QAT, get_default_qat_qconfig('x86')",
        "W8 per-ch, A 0..127 (reduce_range), fused obs+FQ",
        "yes (fuse_modules_qat)",
    ),
    "ao-lsq": (
        "torch.ao _LearnableFakeQuantize, 4-bit, param learning on",
        "W4 (-8..7) A4 (0..15) learned",
        "yes (fuse_modules_qat)",
    ),
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


# --------------------------------------------------------------------------- reference net
def reference_net(num_classes: int = 10) -> nn.Sequential:
    """6 conv-BN-ReLU blocks 3->32->32->64->64->128->128 (stride 2 at 3rd and 5th), pool, linear."""
    widths, layers, cin = [32, 32, 64, 64, 128, 128], [], 3
    for i, cout in enumerate(widths):
        stride = 2 if i in (2, 4) else 1
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
    )


# --------------------------------------------------------------------------- experiments
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


# --------------------------------------------------------------------------- torch.ao
class _AOWrapper(nn.Module):
    """QuantStub -> net -> DeQuantStub, as torch.ao's eager-mode recipe wants."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant = QuantStub()
        self.net = net
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.net(self.quant(x)))


def _ao_learnable_qconfig():
    from torch.ao.quantization import MovingAverageMinMaxObserver, QConfig
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    common = dict(observer=MovingAverageMinMaxObserver, scale=1.0, zero_point=0.0)
    act = _LearnableFakeQuantize.with_args(
        quant_min=0, quant_max=15, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
        use_grad_scaling=True, **common,
    )  # fmt: skip
    weight = _LearnableFakeQuantize.with_args(
        quant_min=-8, quant_max=7, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
        use_grad_scaling=True, **common,
    )  # fmt: skip
    return QConfig(activation=act, weight=weight)


def _ao_model(kind: str, x: Tensor) -> nn.Module:
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    model = _AOWrapper(reference_net()).train()
    groups = [[f"net.{3 * i}", f"net.{3 * i + 1}", f"net.{3 * i + 2}"] for i in range(6)]
    model = fuse_modules_qat(model, groups)  # torch.ao's recipe: Conv+BN+ReLU -> ConvBnReLU2d
    model.qconfig = get_default_qat_qconfig("x86") if kind == "ao-qat" else _ao_learnable_qconfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prepare_qat(model)
    model = model.to(x.device)
    with torch.no_grad():
        model(x)  # one observed batch: initial scales (observers stay on for ao-qat, as default)
    if kind == "ao-lsq":
        from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

        for m in model.modules():
            if isinstance(m, _LearnableFakeQuantize):
                m.enable_param_learning()  # LSQ: learn scale (and zero point), observer off
    return model


# --------------------------------------------------------------------------- variants
def _calibrate_batch_stat_bn(model: nn.Module, x: Tensor) -> None:
    """``qatlab.calibrate`` with every BatchNorm normalising by batch statistics.

    ``calibrate`` runs the model in eval mode; on a fresh net BN's running statistics are
    (0, 1), so the observed activations are not the ones training sees (they shrink layer by
    layer here) and the steps come out far too small. Running BN on batch statistics during
    calibration (running statistics restored afterwards) gives training-time activations.
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


def gradient_reaches_first_conv(model: nn.Module, x: Tensor, y: Tensor) -> bool:
    """One forward/backward (no optimizer step): is the first conv's weight gradient nonzero?"""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    ok = conv.weight.grad is not None and bool(conv.weight.grad.abs().sum() > 0)
    model.zero_grad(set_to_none=True)
    return ok


def build(kind: str, x: Tensor) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model of ``kind`` (same seed, same initial float weights) and its optimizer."""
    torch.manual_seed(0)
    if kind == "float":
        model = reference_net().to(x.device).train()
    elif kind.startswith("qatlab"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            act_bits = None if kind == "qatlab+wonly" else 4
            model = qatlab.quantize(
                reference_net().to(x.device), qatlab.QuantConfig(weight_bits=4, act_bits=act_bits)
            )
        if kind == "qatlab+bncal":
            _calibrate_batch_stat_bn(model, x)
        else:
            qatlab.calibrate(model, [x])  # as the issue prescribes
        if kind not in ("qatlab", "qatlab+bncal", "qatlab+wonly"):
            exp = kind.split("+", 1)[1]
            _patch(model, savedout=exp in ("savedout", "both"), lean=exp in ("leanfwd", "both"))
        model.train()
    elif kind in ("ao-qat", "ao-lsq"):
        model = _ao_model(kind, x)
    else:
        raise ValueError(f"unknown variant {kind!r}")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x.to(device), y.to(device)


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _q(values: list[float], which: float) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[int(which * 4) - 1]


def time_steps(kinds: list[str], args, device: torch.device) -> dict[str, dict]:
    """Median/IQR step time per variant, interleaved; also paired ratios to float."""
    x, y = _data(args.batch, device)
    variants = {k: build(k, x) for k in kinds}
    grads_flow = {k: gradient_reaches_first_conv(variants[k][0], x, y) for k in kinds}
    saved_mb = {k: saved_for_backward_mb(variants[k][0], x, y) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    faults: dict[str, list[int]] = {k: [] for k in kinds}
    for i in range(args.warmup + args.steps):
        order = kinds if i % 2 == 0 else kinds[::-1]  # ABCD DCBA: no fixed position effects
        for k in order:
            _sync(device)
            f0, t0 = _minflt(), time.perf_counter()
            train_step(*variants[k], x, y)
            _sync(device)
            t1, f1 = time.perf_counter(), _minflt()
            if i >= args.warmup:
                times[k].append(t1 - t0)
                faults[k].append(f1 - f0)
    base = statistics.median(times["float"]) if "float" in times else None
    out = {}
    for k in kinds:
        t = times[k]
        row = {
            "median_ms": statistics.median(t) * 1e3,
            "q1_ms": _q(t, 0.25) * 1e3,
            "q3_ms": _q(t, 0.75) * 1e3,
            "minor_faults_per_step": statistics.median(faults[k]),
            "grad_reaches_first_conv": grads_flow[k],
            "saved_for_backward_mb": saved_mb[k],
            "times_ms": [v * 1e3 for v in t],
        }
        if base is not None:
            paired = [a / b for a, b in zip(t, times["float"], strict=True)]
            row["ratio"] = statistics.median(t) / base
            row["paired_ratio_q1"] = _q(paired, 0.25)
            row["paired_ratio_q3"] = _q(paired, 0.75)
        out[k] = row
    return out


# --------------------------------------------------------------------------- memory
def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _memory_child(kind: str, batch: int, steps: int, threads: int, device: str) -> dict:
    """Runs in a fresh spawned process: peak memory growth over ``steps`` training steps."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    x, y = _data(batch, dev)
    model, opt = build(kind, x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        for _ in range(steps):
            train_step(model, opt, x, y)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {"peak_growth_mb": (peak - before) / 2**20, "method": "cuda max_memory_allocated"}
    method = "VmHWM after malloc_trim + clear_refs"
    gc.collect()
    try:  # hand memory freed during setup (calibration) back, so the baseline is live memory
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        method = "VmHWM after clear_refs"
    try:  # reset the peak-RSS high-water mark, so calibration/setup peaks do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kb("VmRSS")
    except OSError:
        before = None
    if before is None:  # fallback: ru_maxrss (kB on Linux) before and after
        method = "ru_maxrss after - before"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        train_step(model, opt, x, y)
    if method.startswith("VmHWM"):
        peak = _rss_kb("VmHWM") or 0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_growth_mb": (peak - before) / 1024, "method": method}


def saved_for_backward_mb(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Bytes autograd keeps for backward in one training forward (distinct storages), in MB."""
    seen: dict[tuple, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        seen[(st.data_ptr(), t.device)] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    del loss
    return sum(seen.values()) / 2**20


def measure_memory(kinds: list[str], args) -> dict[str, dict]:
    """Median over ``--memory-repeats`` fresh spawned processes per variant (interleaved)."""
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.memory_repeats):
        for k in kinds:
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                runs[k].append(
                    pool.apply(
                        _memory_child, (k, args.batch, args.memory_steps, args.threads, args.device)
                    )
                )
    out = {}
    for k, rs in runs.items():
        vals = [r["peak_growth_mb"] for r in rs]
        out[k] = {
            "peak_growth_mb": statistics.median(vals),
            "min_mb": min(vals),
            "max_mb": max(vals),
            "runs_mb": vals,
            "method": rs[0]["method"],
        }
    return out


# --------------------------------------------------------------------------- op benchmark
def _naive_lsq(x: Tensor, step: Tensor, n: int, p: int, grad_scale: float) -> Tensor:
    """LSQ as its paper's pseudo-code: grad-scaled step, clamp, round with STE, rescale."""
    s = (step - step * grad_scale).detach() + step * grad_scale
    v = (x / s).clamp(n, p)
    v = (v.round() - v).detach() + v
    return v * s


def _lsq_for_compile(x: Tensor, step: Tensor, n: int, p: int, grad_scale: float) -> Tensor:
    """LSQ with qatlab's gradients (in-range test on the rounded value), written for inductor."""
    s = (step - step * grad_scale).detach() + step * grad_scale
    v = x / s
    r = v.round()
    q = r.clamp(n, p)
    return torch.where((r >= n) & (r <= p), (q - v).detach() + v, q) * s


def _op_fns(device: torch.device, experiments: bool) -> dict[str, Callable]:
    def ours(x, s, n, p, gs):
        return fake_quantize(x, s.clamp_min(_EPS), n, p, gs)

    def torch_learnable(x, s, n, p, gs):
        zero = torch.zeros(1, device=x.device)
        return torch._fake_quantize_learnable_per_tensor_affine(x, s.reshape(1), zero, n, p, gs)

    fns = {
        "qatlab _FakeQuant": ours,
        "torch._fake_quantize_learnable_per_tensor_affine": torch_learnable,
        "naive autograd LSQ (STE)": _naive_lsq,
    }
    if experiments and device.type == "cpu":
        fns["experiment: backward from saved output"] = lambda x, s, n, p, gs: (
            fake_quantize_savedout(x, s.clamp_min(_EPS), n, p, gs)
        )
    if experiments:
        # a lower bound for a fused kernel: inductor fuses forward and backward into few passes
        # (compiled during warm-up; needs a C++ compiler on CPU)
        fns["experiment: torch.compile'd LSQ (inductor, fused)"] = torch.compile(
            _lsq_for_compile, dynamic=False
        )
    return fns


def op_bench(args, device: torch.device) -> dict[str, dict]:
    """Forward and backward time of each fake-quant implementation, interleaved."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.op_shape, generator=g).relu_().to(device)  # a post-ReLU activation
    grad = torch.randn(args.op_shape, generator=g).to(device)
    n, p = 0, 15
    step0 = float(2 * x0.mean() / math.sqrt(p))
    gs = 1.0 / math.sqrt(x0[0].numel() * p)
    fns = _op_fns(device, args.experiments)
    fwd: dict[str, list[float]] = {k: [] for k in fns}
    bwd: dict[str, list[float]] = {k: [] for k in fns}
    flt: dict[str, list[int]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(args.warmup + args.op_iters):
        for k in names if i % 2 == 0 else names[::-1]:
            x = x0.detach().requires_grad_()
            s = torch.tensor(step0, device=device, requires_grad=True)
            _sync(device)
            f0, t0 = _minflt(), time.perf_counter()
            out = fns[k](x, s, n, p, gs)
            _sync(device)
            t1 = time.perf_counter()
            out.backward(grad)
            _sync(device)
            t2, f1 = time.perf_counter(), _minflt()
            if i >= args.warmup:
                fwd[k].append(t1 - t0)
                bwd[k].append(t2 - t1)
                flt[k].append(f1 - f0)
            del out, x, s
    # effective traffic: forward reads x, writes q; backward reads g and x, writes dx (fp32)
    nbytes = 5 * x0.numel() * x0.element_size()
    res = {}
    for k in names:
        total = [a + b for a, b in zip(fwd[k], bwd[k], strict=True)]
        med = statistics.median(total)
        res[k] = {
            "fwd_ms": statistics.median(fwd[k]) * 1e3,
            "bwd_ms": statistics.median(bwd[k]) * 1e3,
            "total_ms": med * 1e3,
            "total_q1_ms": _q(total, 0.25) * 1e3,
            "total_q3_ms": _q(total, 0.75) * 1e3,
            "gb_per_s": nbytes / med / 1e9,
            "minor_faults": statistics.median(flt[k]),
        }
    return res


# --------------------------------------------------------------------------- profile
def profile_step(args, device: torch.device) -> list[dict]:
    """Self CPU time per op and step: qatlab QAT vs float, interleaved in one profiler session.

    Steps alternate (float, qatlab, qatlab, float, ...) inside ``record_function`` ranges; every
    op is attributed to the step whose range contains its start, so load from other work on a
    shared machine hits both alike. The ranges' own self time (Python between ops, untraced
    work) is reported as one row.
    """
    import bisect

    from torch.profiler import ProfilerActivity, profile, record_function

    x, y = _data(args.batch, device)
    kinds = ("float", "qatlab")
    variants = {k: build(k, x) for k in kinds}
    for _ in range(args.warmup):
        for k in kinds:
            train_step(*variants[k], x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.profile_steps):
            for k in kinds if i % 2 == 0 else kinds[::-1]:
                with record_function(f"step:{k}"):
                    train_step(*variants[k], x, y)
                    _sync(device)
    events = list(prof.events())
    ranges = sorted(
        (ev.time_range.start, ev.time_range.end, ev.name.split(":", 1)[1])
        for ev in events
        if ev.name in ("step:float", "step:qatlab")
    )
    starts = [r[0] for r in ranges]
    per_op: dict[str, dict[str, tuple[float, int]]] = {}
    for ev in events:
        j = bisect.bisect_right(starts, ev.time_range.start) - 1
        if j < 0 or ev.time_range.start > ranges[j][1]:
            continue  # outside every step
        kind = ranges[j][2]
        name = "(step range self: Python + untraced)" if ev.name.startswith("step:") else ev.name
        ms, n = per_op.setdefault(name, {}).get(kind, (0.0, 0))
        per_op[name][kind] = (ms + ev.self_cpu_time_total / 1e3 / args.profile_steps, n + 1)
    rows = []
    for name, d in per_op.items():
        q_ms, q_n = d.get("qatlab", (0.0, 0))
        f_ms, f_n = d.get("float", (0.0, 0))
        rows.append(
            {
                "op": name,
                "qatlab_ms": q_ms,
                "float_ms": f_ms,
                "delta_ms": q_ms - f_ms,
                "qatlab_calls": q_n // args.profile_steps,
                "float_calls": f_n // args.profile_steps,
            }
        )
    rows.sort(key=lambda r: -r["qatlab_ms"])
    return rows


# --------------------------------------------------------------------------- output
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def step_table(res: dict, mem: dict | None) -> str:
    lines = [
        "| variant | what | bits | conv-BN-ReLU fused | median step (ms) | IQR (ms) "
        "| ratio to float | paired ratio IQR | minor faults/step | saved for backward (MB) "
        "| peak mem growth (MB) | grad reaches conv1 |",
        "|---|---|---|---|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for k, r in res.items():
        what, bits, fused = DESCRIPTIONS[k]
        ratio = f"{r['ratio']:.3f}x" if "ratio" in r else "-"
        piqr = f"{r['paired_ratio_q1']:.3f}-{r['paired_ratio_q3']:.3f}" if "ratio" in r else "-"
        m = "-"
        if mem and k in mem:
            mk = mem[k]
            m = f"{mk['peak_growth_mb']:.0f} ({mk['min_mb']:.0f}-{mk['max_mb']:.0f})"
        lines.append(
            f"| {k} | {what} | {bits} | {fused} | {r['median_ms']:.1f} "
            f"| {r['q1_ms']:.1f}-{r['q3_ms']:.1f} | {ratio} | {piqr} "
            f"| {r['minor_faults_per_step']:.0f} | {r['saved_for_backward_mb']:.0f} | {m} "
            f"| {'yes' if r['grad_reaches_first_conv'] else 'NO'} |"
        )
    return "\n".join(lines)


def op_table(res: dict, shape: list[int]) -> str:
    lines = [
        f"Fake-quant op alone: {'x'.join(map(str, shape))} fp32, per-tensor learned step, "
        "unsigned 4-bit (0..15), forward + backward (dx and dstep).",
        "",
        "| implementation | fwd (ms) | bwd (ms) | fwd+bwd (ms) | IQR (ms) | effective GB/s "
        "| minor faults/call |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for k, r in res.items():
        lines.append(
            f"| {k} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | {r['total_ms']:.2f} "
            f"| {r['total_q1_ms']:.2f}-{r['total_q3_ms']:.2f} | {r['gb_per_s']:.1f} "
            f"| {r['minor_faults']:.0f} |"
        )
    lines.append("")
    lines.append("Effective GB/s = 5 x 4 bytes x numel / (fwd+bwd): read x, write q; read g, x, "
                 "write dx.")  # fmt: skip
    return "\n".join(lines)


def profile_table(rows: list[dict], top: int) -> str:
    q_total = sum(r["qatlab_ms"] for r in rows)
    f_total = sum(r["float_ms"] for r in rows)
    lines = [
        "Self CPU time per training step (torch.profiler, profiler overhead included): "
        f"qatlab {q_total:.1f} ms, float {f_total:.1f} ms.",
        "",
        "| op | qatlab self CPU (ms/step) | float self CPU (ms/step) | delta (ms) "
        "| calls/step qatlab | calls/step float |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows[:top]:
        lines.append(
            f"| {r['op']} | {r['qatlab_ms']:.2f} | {r['float_ms']:.2f} | {r['delta_ms']:+.2f} "
            f"| {r['qatlab_calls']} | {r['float_calls']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="QAT training-step overhead vs float (qatlab, torch.ao), fake-quant op "
        "timings and a profile of the qatlab step."
    )
    parser.add_argument("--mode", choices=("step", "op", "profile", "all"), default="all")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps per variant")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument(
        "--experiments", action="store_true", help="add monkeypatched qatlab variants"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory children")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory child")
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="memory children per variant (median)"
    )
    parser.add_argument("--op-iters", type=int, default=50, help="measured calls per op")
    parser.add_argument("--op-shape", type=int, nargs=4, default=[64, 32, 32, 32])
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--profile-top", type=int, default=20)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device)
    wall0 = time.perf_counter()
    results: dict = {"machine": info, "args": vars(args)}
    print(
        f"# {info['command']}\n# cpu: {info['cpu']} ({info['cores']} cores), torch "
        f"{info['torch']}, threads {info['threads']}, device {info['device']}, {info['date']}\n"
    )
    if args.mode in ("step", "all"):
        kinds = list(BASE_VARIANTS) + (list(EXPERIMENT_VARIANTS) if args.experiments else [])
        if args.device == "cuda":
            kinds = [k for k in kinds if k not in ("qatlab+savedout", "qatlab+both")]
        res = time_steps(kinds, args, device)
        mem = None if args.no_memory else measure_memory(kinds, args)
        results["step"], results["memory"] = res, mem
        print(
            f"## Training step (batch {args.batch}, {args.steps} measured steps per variant, "
            f"{args.warmup} warm-up, interleaved)\n"
        )
        print(step_table(res, mem))
        if mem:
            method = next(iter(mem.values()))["method"]
            print(
                f"\nPeak memory growth: median (min-max) of {args.memory_repeats} fresh spawned "
                f"processes per variant, {args.memory_steps} steps each, {method}. Saved for "
                "backward: distinct storages autograd keeps in one forward (deterministic)."
            )
        print()
    if args.mode in ("op", "all"):
        res = op_bench(args, device)
        results["op"] = res
        print("## Fake-quant op\n")
        print(op_table(res, args.op_shape))
        print()
    if args.mode in ("profile", "all"):
        rows = profile_step(args, device)
        results["profile"] = rows
        print(f"## Profile: qatlab step vs float step ({args.profile_steps} steps)\n")
        print(profile_table(rows, args.profile_top))
        print()
    info["wall_s"] = time.perf_counter() - wall0
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    print(f"wall time {info['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
