"""QAT training-step cost on the networks users train, eager and under ``torch.compile``.

For each ``--models`` entry (the benchmark's reference net, resnet20, mobilenetv2; CIFAR shape,
batch 64, SGD lr 0.01 momentum 0.9, cross-entropy) every variant is built from seed 0:

* ``float``, ``qatlab`` (``qatlab.quantize`` W4A4 LSQ with the library defaults, calibrated on
  the batch), ``ao-qat`` (torch.ao eager QAT, x86 qconfig) and ``ao-lsq`` (torch.ao
  ``_LearnableFakeQuantize``, 4 bit), as in ``step_overhead.py``; torch.ao's conv+BN(+ReLU)
  are fused with ``fuse_modules_qat`` wherever a conv is followed by its BN in registration
  order (ReLU6 and a shared ReLU module are left unfused);
* the same models wrapped in ``torch.compile`` (``--compiled``, default ``float,qatlab``),
  suffixed ``+compile``. Each is compiled (first forward + backward) before timing; the
  compile time is reported.

All variants of a model are then stepped interleaved (ABCD DCBA ...), so load from other work
hits them alike; the table gives median step, IQR, the ratio of medians to the float step of
the same mode (eager rows to eager float, compiled rows to compiled float) and the IQR of the
step-by-step ratios. Peak memory growth (fresh spawned process per variant, as in
``common.measure_memory``) is measured for the eager variants only (a child would have to
compile again). ``--profile`` adds a torch.profiler per-op table (self CPU per step, eager
float vs eager qatlab) for each model.

Run: ``python benchmarks/model_overhead.py --json out.json`` (see ``benchmarks/README.md``).
torch.ao is used here only as a point of comparison; the library never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
from common import (
    add_memory_arguments,
    data,
    finish,
    header,
    interleaved,
    machine_info,
    measure_memory,
    reference_net,
    sgd,
    sgd_step,
    summarize,
    sync,
)
from step_overhead import _ao_learnable_qconfig, _AOWrapper
from torch import Tensor, nn

import qatlab
from qatlab import models
from qatlab.quant import fused, quantizer

MODELS = ("reference", "resnet20", "mobilenetv2")
KINDS = ("float", "qatlab", "ao-qat", "ao-lsq")
# also: "qatlab-aten", the same qatlab model stepped with QATLAB_FUSED_KERNELS=0 (the ATen passes
# in place of the fused one-pass kernels of qatlab/quant/fused.py): an A/B of the kernels; and
# three that take qatlab's overhead apart: "qatlab-off" (quantizers disabled: the wrappers
# alone), "qatlab-wonly" (weights quantized, activations float: act_bits=None) and
# "qatlab-identity" (every fake_quantize call replaced by an autograd Function that returns a
# copy of its input: the cost of a Function per call and one pass, without the quantizer's math);
# and "qatlab-fullpath", the qatlab model with every Quantizer call taking the full path
# (Quantizer._forward, no settled plan): an A/B of the plan
DECOMPOSITION = ("qatlab-off", "qatlab-wonly", "qatlab-identity", "qatlab-fullpath")


class _Copy(torch.autograd.Function):
    """``x.clone()`` with the identity gradient and none for the step: a stand-in quantizer."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, n: int, p: int, grad_scale: float, floor):
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None, None, None, None


def _copy_quantize(x, step, n, p, grad_scale=1.0, floor=None) -> Tensor:
    return _Copy.apply(x, step, n, p, grad_scale, floor)


class _IdentityQuantizers:
    """``qatlab.quant.quantizer.fake_quantize`` swapped for :func:`_copy_quantize` in a block."""

    def __enter__(self) -> None:
        self.saved = quantizer.fake_quantize
        quantizer.fake_quantize = _copy_quantize

    def __exit__(self, *exc) -> None:
        quantizer.fake_quantize = self.saved


class _FullPath:
    """Every ``Quantizer`` call through ``Quantizer._forward`` (no plan) in a with block."""

    def __enter__(self) -> None:
        self.saved = quantizer.Quantizer.forward
        quantizer.Quantizer.forward = quantizer.Quantizer._forward

    def __exit__(self, *exc) -> None:
        quantizer.Quantizer.forward = self.saved


class _AtenPasses:
    """``QATLAB_FUSED_KERNELS=0`` for the duration of a with block."""

    def __enter__(self) -> None:
        self.saved = os.environ.get(fused.ENV)
        os.environ[fused.ENV] = "0"

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            os.environ.pop(fused.ENV, None)
        else:
            os.environ[fused.ENV] = self.saved


def step_fn(kind: str, model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor):
    """One SGD step of variant ``kind`` (``qatlab-aten``: with the fused kernels off;
    ``qatlab-identity``: with copies in place of the quantizers; ``qatlab-fullpath``: without
    the quantizers' settled plans)."""
    if kind == "qatlab-aten":
        with _AtenPasses():
            return sgd_step(model, opt, x, y)
    if kind == "qatlab-identity":
        with _IdentityQuantizers():
            return sgd_step(model, opt, x, y)
    if kind == "qatlab-fullpath":
        with _FullPath():
            return sgd_step(model, opt, x, y)
    return sgd_step(model, opt, x, y)


def float_net(name: str) -> nn.Module:
    """The named float network for 3x32x32 inputs and 10 classes, seed 0."""
    torch.manual_seed(0)
    if name == "reference":
        return reference_net()
    return models.create(name, 10, (3, 32, 32))


def _fuse_groups(model: nn.Module) -> list[list[str]]:
    """``[conv, bn]`` (``+ relu`` for an ``nn.ReLU`` right after, in a Sequential) pairs, where
    a Conv2d is followed by a BatchNorm2d in registration order: torch.ao's fusion recipe."""
    groups = []
    for prefix, parent in model.named_modules():
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children[:-1]):
            nxt_name, nxt = children[i + 1]
            if isinstance(child, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                group = [name, nxt_name]
                if (
                    isinstance(parent, nn.Sequential)
                    and i + 2 < len(children)
                    and type(children[i + 2][1]) is nn.ReLU
                ):
                    group.append(children[i + 2][0])
                groups.append([f"{prefix}.{n}" if prefix else n for n in group])
    return groups


def ao_model(name: str, kind: str, x: Tensor) -> nn.Module:
    """torch.ao eager-mode QAT of the named net: stubs, fused conv-BN(-ReLU), prepare_qat, one
    observed batch (and param learning on for ``ao-lsq``)."""
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    model = _AOWrapper(float_net(name)).train()
    model = fuse_modules_qat(model, _fuse_groups(model))
    model.qconfig = get_default_qat_qconfig("x86") if kind == "ao-qat" else _ao_learnable_qconfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prepare_qat(model)
    model = model.to(x.device)
    with torch.no_grad():
        model(x)
    if kind == "ao-lsq":
        for m in model.modules():
            if isinstance(m, _LearnableFakeQuantize):
                m.enable_param_learning()
    return model


def build_model(name: str, kind: str, x: Tensor) -> nn.Module:
    """A fresh ``kind`` model of net ``name`` in training mode (same seed, same float weights)."""
    if kind == "float":
        return float_net(name).to(x.device).train()
    if kind in ("qatlab", "qatlab-aten", *DECOMPOSITION):
        act_bits = None if kind == "qatlab-wonly" else 4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = qatlab.quantize(
                float_net(name).to(x.device), qatlab.QuantConfig(weight_bits=4, act_bits=act_bits)
            )
        qatlab.calibrate(model, [x])
        if kind == "qatlab-off":
            for module in model.modules():
                if isinstance(module, quantizer.Quantizer):
                    module.enabled = False
        return model.train()
    if kind in ("ao-qat", "ao-lsq"):
        return ao_model(name, kind, x).train()
    raise ValueError(f"unknown variant {kind!r}")


class MemoryBuilder:
    """A picklable ``build(kind, x)`` for the memory children of one net."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, kind: str, x: Tensor):
        if kind == "qatlab-aten":  # one variant per child process: the setting holds for it
            os.environ[fused.ENV] = "0"
        model = build_model(self.name, kind, x)
        return model, sgd(model)


def bench_model(name: str, args, device: torch.device) -> dict:
    """Compile, then time every variant of net ``name`` interleaved; memory of eager ones."""
    x, y = data(args.batch, device)
    variants: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for kind in args.kinds:
        model = build_model(name, kind, x)
        variants[kind] = (model, sgd(model))
    compile_s = {}
    for kind in args.compiled:
        model = build_model(name, kind, x)
        opt = sgd(model)
        compiled = torch.compile(model)
        sync(device)
        t0 = time.perf_counter()
        sgd_step(compiled, opt, x, y)  # compiles forward and backward
        sync(device)
        compile_s[kind] = time.perf_counter() - t0
        print(f"# {name}: compiled {kind} in {compile_s[kind]:.0f} s", flush=True)
        variants[f"{kind}+compile"] = (compiled, opt)
    steps = {k: (lambda i, k=k: step_fn(k, *variants[k], x, y)) for k in variants}
    times, _ = interleaved(steps, args.steps, args.warmup, device)
    eager = summarize({k: v for k, v in times.items() if not k.endswith("+compile")}, "float")
    comp = {k: v for k, v in times.items() if k.endswith("+compile")}
    rows = dict(eager)
    if comp:
        base = "float+compile" if "float+compile" in comp else None
        rows.update(summarize(comp, base))
        if "float" in times:
            for k, r in rows.items():
                if k.endswith("+compile"):
                    r["ratio_to_eager_float"] = r["median_ms"] / rows["float"]["median_ms"]
    for kind, secs in compile_s.items():
        rows[f"{kind}+compile"]["compile_s"] = secs
    mem = None
    if not args.no_memory:
        mem = measure_memory(list(args.kinds), MemoryBuilder(name), args)
    out = {"steps": rows, "memory": mem}
    if args.profile:
        out["profile"] = profile_model(name, args, device)
    return out


def profile_model(name: str, args, device: torch.device) -> list[dict]:
    """Self CPU time per op and step, eager float vs eager qatlab, interleaved in one session."""
    import bisect

    from torch.profiler import ProfilerActivity, profile, record_function

    x, y = data(args.batch, device)
    kinds = ("float", "qatlab")
    variants = {}
    for k in kinds:
        model = build_model(name, k, x)
        variants[k] = (model, sgd(model))
    for _ in range(2):
        for k in kinds:
            sgd_step(*variants[k], x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.profile_steps):
            for k in kinds if i % 2 == 0 else kinds[::-1]:
                with record_function(f"step:{k}"):
                    sgd_step(*variants[k], x, y)
                    sync(device)
    events = list(prof.events())
    ranges = sorted(
        (ev.time_range.start, ev.time_range.end, ev.name.split(":", 1)[1])
        for ev in events
        if ev.name in ("step:float", "step:qatlab")
    )
    starts = [r[0] for r in ranges]
    per_op: dict[str, dict[str, list]] = {}
    for ev in events:
        j = bisect.bisect_right(starts, ev.time_range.start) - 1
        if j < 0 or ev.time_range.start > ranges[j][1]:
            continue
        kind = ranges[j][2]
        op = "(step range self: Python + untraced)" if ev.name.startswith("step:") else ev.name
        cell = per_op.setdefault(op, {}).setdefault(kind, [0.0, 0])
        cell[0] += ev.self_cpu_time_total / 1e3 / args.profile_steps
        cell[1] += 1
    rows = []
    for op, d in per_op.items():
        q_ms, q_n = d.get("qatlab", [0.0, 0])
        f_ms, f_n = d.get("float", [0.0, 0])
        rows.append(
            {
                "op": op,
                "qatlab_ms": q_ms,
                "float_ms": f_ms,
                "delta_ms": q_ms - f_ms,
                "qatlab_calls": q_n // args.profile_steps,
                "float_calls": f_n // args.profile_steps,
            }
        )
    rows.sort(key=lambda r: -abs(r["delta_ms"]))
    return rows


def table(name: str, res: dict) -> str:
    rows, mem = res["steps"], res["memory"] or {}
    lines = [
        f"### {name}",
        "",
        "| variant | mode | median step (ms) | IQR (ms) | ratio to float (same mode) "
        "| paired ratio IQR | ratio to eager float | compile (s) | peak mem growth (MB) |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for k, r in rows.items():
        kind, mode = (k[: -len("+compile")], "compiled") if k.endswith("+compile") else (k, "eager")
        ratio = f"{r['ratio']:.3f}x" if "ratio" in r else "-"
        paired = f"{r['paired_ratio_q1']:.3f}-{r['paired_ratio_q3']:.3f}" if "ratio" in r else "-"
        to_eager = r.get("ratio_to_eager_float", r.get("ratio") if mode == "eager" else None)
        to_eager = f"{to_eager:.3f}x" if to_eager is not None else "-"
        comp = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        m = mem.get(k)
        mcell = f"{m['peak_growth_mb']:.0f} ({m['min_mb']:.0f}-{m['max_mb']:.0f})" if m else "-"
        lines.append(
            f"| {kind} | {mode} | {r['median_ms']:.1f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} "
            f"| {ratio} | {paired} | {to_eager} | {comp} | {mcell} |"
        )
    return "\n".join(lines)


def profile_table(rows: list[dict], top: int) -> str:
    q_total = sum(r["qatlab_ms"] for r in rows)
    f_total = sum(r["float_ms"] for r in rows)
    lines = [
        f"Self CPU per step (profiler on): qatlab {q_total:.1f} ms, float {f_total:.1f} ms; "
        f"ops sorted by |delta|.",
        "",
        "| op | qatlab (ms/step) | float (ms/step) | delta (ms) | calls qatlab | calls float |",
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
        description="QAT step cost vs float on the reference net, resnet20 and mobilenetv2, "
        "eager and torch.compile'd, next to torch.ao."
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--kinds", default=",".join(KINDS), help="eager variants")
    parser.add_argument("--compiled", default="float,qatlab", help="compiled variants ('' none)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--profile", action="store_true", help="per-op profile per model")
    parser.add_argument("--profile-steps", type=int, default=6)
    parser.add_argument("--profile-top", type=int, default=14)
    parser.add_argument("--json", default=None, help="write all results here")
    add_memory_arguments(parser)
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.compiled = [k for k in args.compiled.split(",") if k]
    if "float" not in args.kinds:
        parser.error("--kinds must include float (the baseline)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device)
    wall0 = time.perf_counter()
    print(header(info))
    results: dict = {"machine": info, "args": vars(args), "models": {}}
    for name in args.models:
        res = bench_model(name, args, device)
        results["models"][name] = res
        print(table(name, res) + "\n", flush=True)
        if "profile" in res:
            print(profile_table(res["profile"], args.profile_top) + "\n", flush=True)
        if args.json:  # after every model: a partial run is not lost
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    finish(info, wall0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
