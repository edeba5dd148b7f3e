"""What the benchmark scripts share: the reference net and batch, interleaved timing with paired
ratios, the memory children, the fake-quant op timer, machine info and the tables.

Reference net: 6 conv-BN-ReLU blocks 3->32->32->64->64->128->128 (stride 2 at the 3rd and 5th
conv), global average pool, linear to 10 classes; batch 64x3x32x32 (seeded); SGD lr 0.01
momentum 0.9; cross-entropy. Variants are stepped interleaved (ABCD DCBA ...) so load from
other work on a shared machine hits them alike, and each ratio comes with the IQR of the
step-by-step ratios to the baseline step run next to it.

Imported by the scripts in this folder (``sys.path`` holds the script's folder); nothing under
``qatlab/`` imports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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
from qatlab.quant.quantizer import _EPS, fake_quantize

Builder = Callable[[str, Tensor], tuple[nn.Module, torch.optim.Optimizer]]


# --------------------------------------------------------------------------- net and data
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


def data(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The benchmark batch: ``batch`` x 3x32x32 normal inputs and random labels, seed 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x.to(device), y.to(device)


def quantized_reference(x: Tensor, act_bits: int | None = 4) -> nn.Module:
    """The reference net (seed 0) quantized by ``qatlab.quantize`` at W4 (A4 by default) with the
    library defaults (first/last layer 8-bit weights), calibrated on ``x``, in training mode."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qatlab.quantize(
            reference_net().to(x.device), qatlab.QuantConfig(weight_bits=4, act_bits=act_bits)
        )
    qatlab.calibrate(model, [x])
    return model.train()


def build_base(kind: str, x: Tensor) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``float`` or ``qatlab`` (LSQ W4A4): a fresh model from seed 0 and its SGD optimizer."""
    if kind == "float":
        torch.manual_seed(0)
        model = reference_net().to(x.device).train()
    elif kind == "qatlab":
        model = quantized_reference(x)
    else:
        raise ValueError(f"unknown variant {kind!r}")
    return model, sgd(model)


def sgd(model: nn.Module) -> torch.optim.SGD:
    """The reference optimizer: SGD lr 0.01 momentum 0.9 on every parameter."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One plain training step (no hooks): the step every variant of step_overhead runs."""
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


# --------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minflt() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def quartile(values: list[float], which: float) -> float:
    """``which`` in (0.25, 0.5, 0.75): that quartile of ``values`` (inclusive method)."""
    return statistics.quantiles(values, n=4, method="inclusive")[int(which * 4) - 1]


def interleaved(
    steps: dict[str, Callable[[int], None]],
    measured: int,
    warmup: int,
    device: torch.device,
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Call ``steps[k](i)`` for i in 0..warmup+measured-1, the variants interleaved (ABCD DCBA:
    no fixed position effects); return the measured seconds and minor faults per variant."""
    kinds = list(steps)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    faults: dict[str, list[int]] = {k: [] for k in kinds}
    for i in range(warmup + measured):
        for k in kinds if i % 2 == 0 else kinds[::-1]:
            sync(device)
            f0, t0 = minflt(), time.perf_counter()
            steps[k](i)
            sync(device)
            t1, f1 = time.perf_counter(), minflt()
            if i >= warmup:
                times[k].append(t1 - t0)
                faults[k].append(f1 - f0)
    return times, faults


def summarize(times: dict[str, list[float]], base: str | None) -> dict[str, dict]:
    """Per variant: median and IQR of the step time (ms) and, when ``base`` was timed, the
    ratio of medians and of means to it, and the IQR of the step-by-step (paired) ratios."""
    out = {}
    for k, t in times.items():
        row = {
            "median_ms": statistics.median(t) * 1e3,
            "q1_ms": quartile(t, 0.25) * 1e3,
            "q3_ms": quartile(t, 0.75) * 1e3,
            "times_ms": [v * 1e3 for v in t],
        }
        if base is not None and base in times:
            paired = [a / b for a, b in zip(t, times[base], strict=True)]
            row["ratio"] = statistics.median(t) / statistics.median(times[base])
            # a method whose steps differ in cost (SAQ every=k) is judged by its mean
            row["mean_ratio"] = statistics.fmean(t) / statistics.fmean(times[base])
            row["paired_ratio_q1"] = quartile(paired, 0.25)
            row["paired_ratio_q3"] = quartile(paired, 0.75)
        out[k] = row
    return out


def gradient_reaches_first_conv(model: nn.Module, x: Tensor, y: Tensor) -> bool:
    """One forward/backward (no optimizer step): is the first conv's weight gradient nonzero?"""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    ok = conv.weight.grad is not None and bool(conv.weight.grad.abs().sum() > 0)
    model.zero_grad(set_to_none=True)
    return ok


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


def time_steps(kinds: list[str], build: Builder, args, device: torch.device) -> dict[str, dict]:
    """Median/IQR step time of each variant (``build(kind, x)``, plain SGD steps), interleaved,
    with paired ratios to ``float``, minor faults, saved-for-backward MB and gradient flow."""
    x, y = data(args.batch, device)
    variants = {k: build(k, x) for k in kinds}
    grads_flow = {k: gradient_reaches_first_conv(variants[k][0], x, y) for k in kinds}
    saved_mb = {k: saved_for_backward_mb(variants[k][0], x, y) for k in kinds}
    steps = {k: (lambda i, k=k: sgd_step(*variants[k], x, y)) for k in kinds}
    times, faults = interleaved(steps, args.steps, args.warmup, device)
    out = summarize(times, "float")
    for k, row in out.items():
        row["minor_faults_per_step"] = statistics.median(faults[k])
        row["grad_reaches_first_conv"] = grads_flow[k]
        row["saved_for_backward_mb"] = saved_mb[k]
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


def _memory_child(
    build: Builder, kind: str, batch: int, steps: int, threads: int, device: str
) -> dict:
    """Runs in a fresh spawned process: peak memory growth over ``steps`` training steps."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    x, y = data(batch, dev)
    model, opt = build(kind, x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        for _ in range(steps):
            sgd_step(model, opt, x, y)
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
        sgd_step(model, opt, x, y)
    if method.startswith("VmHWM"):
        peak = _rss_kb("VmHWM") or 0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_growth_mb": (peak - before) / 1024, "method": method}


def measure_memory(kinds: list[str], build: Builder, args) -> dict[str, dict]:
    """Median over ``--memory-repeats`` fresh spawned processes per variant (interleaved).

    ``build`` must be a module-level function (it is pickled by name into the child).
    """
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.memory_repeats):
        for k in kinds:
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                child_args = (build, k, args.batch, args.memory_steps, args.threads, args.device)
                runs[k].append(pool.apply(_memory_child, child_args))
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


def add_memory_arguments(parser) -> None:
    parser.add_argument("--no-memory", action="store_true", help="skip the memory children")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory child")
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="memory children per variant (median)"
    )


# --------------------------------------------------------------------------- op benchmark
def qatlab_fake_quant(x: Tensor, s: Tensor, n: int, p: int, gs: float) -> Tensor:
    """qatlab's op as ``Quantizer.forward`` calls it (step clamped, then ``_FakeQuant``)."""
    return fake_quantize(x, s.clamp_min(_EPS), n, p, gs)


def op_bench(fns: dict[str, Callable], args, device: torch.device) -> dict[str, dict]:
    """Forward and backward time of each fake-quant implementation ``fn(x, step, n, p, gs)`` on
    an ``args.op_shape`` post-ReLU tensor (unsigned 4 bit, per-tensor step), interleaved."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.op_shape, generator=g).relu_().to(device)  # a post-ReLU activation
    grad = torch.randn(args.op_shape, generator=g).to(device)
    n, p = 0, 15
    step0 = float(2 * x0.mean() / math.sqrt(p))
    gs = 1.0 / math.sqrt(x0[0].numel() * p)
    fwd: dict[str, list[float]] = {k: [] for k in fns}
    bwd: dict[str, list[float]] = {k: [] for k in fns}
    flt: dict[str, list[int]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(args.warmup + args.op_iters):
        for k in names if i % 2 == 0 else names[::-1]:
            x = x0.detach().requires_grad_()
            s = torch.tensor(step0, device=device, requires_grad=True)
            sync(device)
            f0, t0 = minflt(), time.perf_counter()
            out = fns[k](x, s, n, p, gs)
            sync(device)
            t1 = time.perf_counter()
            out.backward(grad)
            sync(device)
            t2, f1 = time.perf_counter(), minflt()
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
            "total_q1_ms": quartile(total, 0.25) * 1e3,
            "total_q3_ms": quartile(total, 0.75) * 1e3,
            "gb_per_s": nbytes / med / 1e9,
            "minor_faults": statistics.median(flt[k]),
        }
    return res


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


def header(info: dict) -> str:
    return (
        f"# {info['command']}\n# cpu: {info['cpu']} ({info['cores']} cores), torch "
        f"{info['torch']}, threads {info['threads']}, device {info['device']}, {info['date']}\n"
    )


def finish(info: dict, wall0: float) -> None:
    """Record wall time and end load average in ``info``; print the wall time."""
    info["wall_s"] = time.perf_counter() - wall0
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    print(f"wall time {info['wall_s']:.0f} s")


def ratio_cells(r: dict) -> tuple[str, str]:
    """``("1.084x", "1.069-1.101")`` from a :func:`summarize` row (``-`` without a base)."""
    if "ratio" not in r:
        return "-", "-"
    return f"{r['ratio']:.3f}x", f"{r['paired_ratio_q1']:.3f}-{r['paired_ratio_q3']:.3f}"


def step_table(res: dict, mem: dict | None, descriptions: dict[str, tuple[str, str, str]]) -> str:
    lines = [
        "| variant | what | bits | conv-BN-ReLU fused | median step (ms) | IQR (ms) "
        "| ratio to float | paired ratio IQR | minor faults/step | saved for backward (MB) "
        "| peak mem growth (MB) | grad reaches conv1 |",
        "|---|---|---|---|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for k, r in res.items():
        what, bits, fused = descriptions[k]
        ratio, piqr = ratio_cells(r)
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


def memory_note(mem: dict, args) -> str:
    method = next(iter(mem.values()))["method"]
    return (
        f"Peak memory growth: median (min-max) of {args.memory_repeats} fresh spawned "
        f"processes per variant, {args.memory_steps} steps each, {method}. Saved for "
        "backward: distinct storages autograd keeps in one forward (deterministic)."
    )


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
