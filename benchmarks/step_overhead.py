"""Training-step overhead of LSQ W4A4 QAT over float, next to torch.ao's QAT, in one run.

Three modes (``--mode``; ``all`` runs them in turn):

* ``step``: median training-step time of each variant on the reference net (see
  ``common.py``: 6 conv-BN-ReLU blocks, batch 64x3x32x32, SGD lr 0.01 momentum 0.9), its ratio
  to float with the IQR of paired step-by-step ratios, and peak memory growth during training
  steps measured in a fresh spawned process per variant (CPU: peak RSS, reset through
  ``/proc/self/clear_refs`` where the kernel allows; CUDA: ``torch.cuda.max_memory_allocated``).
  Variants are interleaved (ABCD DCBA ...) so drift on a shared machine hits them alike.
* ``op``: the fake-quant op alone, forward + backward on a 64x32x32x32 activation tensor with a
  per-tensor learned step: qatlab vs ``torch._fake_quantize_learnable_per_tensor_affine`` vs a
  naive autograd LSQ, in ms and effective GB/s.
* ``profile``: ``torch.profiler`` top ops by self CPU time in the qatlab QAT step, next to the
  same ops in the float step (per step), to show where the overhead comes from.

The one-off experiments (monkeypatched quantizers, a ``torch.compile``'d op) are in
``step_experiments.py``; the per-method overhead is ``method_overhead.py``.
torch.ao is used here only as a point of comparison; the library never imports it.
Run: ``python benchmarks/step_overhead.py`` (see ``benchmarks/README.md``).
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
    data,
    finish,
    header,
    machine_info,
    measure_memory,
    memory_note,
    op_bench,
    op_table,
    qatlab_fake_quant,
    reference_net,
    sgd,
    sgd_step,
    step_table,
    sync,
    time_steps,
)
from torch import Tensor, nn

VARIANTS = ("float", "qatlab", "ao-qat", "ao-lsq")
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
}


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


def build(kind: str, x: Tensor) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model of ``kind`` (same seed, same initial float weights) and its optimizer."""
    if kind in ("float", "qatlab"):
        return build_base(kind, x)
    if kind in ("ao-qat", "ao-lsq"):
        torch.manual_seed(0)
        model = _ao_model(kind, x)
        return model, sgd(model)
    raise ValueError(f"unknown variant {kind!r}")


# --------------------------------------------------------------------------- op benchmark
def _naive_lsq(x: Tensor, step: Tensor, n: int, p: int, grad_scale: float) -> Tensor:
    """LSQ as its paper's pseudo-code: grad-scaled step, clamp, round with STE, rescale."""
    s = (step - step * grad_scale).detach() + step * grad_scale
    v = (x / s).clamp(n, p)
    v = (v.round() - v).detach() + v
    return v * s


def _torch_learnable(x: Tensor, s: Tensor, n: int, p: int, gs: float) -> Tensor:
    zero = torch.zeros(1, device=x.device)
    return torch._fake_quantize_learnable_per_tensor_affine(x, s.reshape(1), zero, n, p, gs)


OP_FNS: dict[str, Callable] = {
    "qatlab _FakeQuant": qatlab_fake_quant,
    "torch._fake_quantize_learnable_per_tensor_affine": _torch_learnable,
    "naive autograd LSQ (STE)": _naive_lsq,
}


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

    x, y = data(args.batch, device)
    kinds = ("float", "qatlab")
    variants = {k: build(k, x) for k in kinds}
    for _ in range(args.warmup):
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
    add_memory_arguments(parser)
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
    print(header(info))
    if args.mode in ("step", "all"):
        kinds = list(VARIANTS)
        res = time_steps(kinds, build, args, device)
        mem = None if args.no_memory else measure_memory(kinds, build, args)
        results["step"], results["memory"] = res, mem
        print(
            f"## Training step (batch {args.batch}, {args.steps} measured steps per variant, "
            f"{args.warmup} warm-up, interleaved)\n"
        )
        print(step_table(res, mem, DESCRIPTIONS))
        if mem:
            print("\n" + memory_note(mem, args))
        print()
    if args.mode in ("op", "all"):
        res = op_bench(OP_FNS, args, device)
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
    finish(info, wall0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
