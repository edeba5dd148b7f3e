"""The per-tensor fake quantizer's eager kernels, per op and per size, and in whole steps.

For each size (``--sizes``, elements; defaults: a small and a large weight tensor and
resnet20's and mobilenetv2's activations at CIFAR shape, batch 64: 2304, 2^15, 2^18, 2^19,
2^20 and 64x96x32x32) and each kernel, the median time of the forward alone (no grad) and of
forward + backward through ``qatlab.fake_quantize`` (post-ReLU input, 4-bit unsigned grid, a
learned per-tensor step, the quantizer's 1e-8 floor), interleaved:

* ``aten``: the ATen passes of ``_FakeQuant`` (``QATLAB_FUSED_KERNELS=0``): forward ``mul``,
  ``round_``, ``clamp_``, ``mul_``; backward two dot products and ``hardtanh_backward``;
* ``fused``: ``qatlab/quant/fused.py``'s C++ autograd Function (one loop each way), what the
  library uses for every per-tensor CPU float32 call.

With ``--models resnet20,...`` it also times whole training steps (as ``model_overhead.py``,
interleaved): ``float``, ``qatlab`` (the library as it is) and ``qatlab-aten``.

Run: ``python benchmarks/fused_kernels.py --threads 2 --json out.json``
(``--models resnet20,mobilenetv2,reference --steps 20`` for the model-level A/B).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from common import finish, header, machine_info

from qatlab.quant import fused
from qatlab.quant.quantizer import fake_quantize

SIZES = (2304, 1 << 15, 1 << 18, 1 << 19, 1 << 20, 64 * 96 * 32 * 32)


def median_us(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def variants(numel: int) -> dict:
    """``{kernel: (forward, forward_backward)}`` closures on one post-ReLU tensor."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen).relu_()
    g = torch.randn(numel, generator=gen)
    step = torch.tensor(0.1, requires_grad=True)
    leaf = x.clone().requires_grad_()

    def qat(env: str):
        def forward():
            os.environ[fused.ENV] = env
            with torch.no_grad():
                fake_quantize(leaf, step, 0, 15, 0.01, 1e-8)

        def forward_backward():
            os.environ[fused.ENV] = env
            fake_quantize(leaf, step, 0, 15, 0.01, 1e-8).backward(g)

        return forward, forward_backward

    return {"aten": qat("0"), "fused": qat("1")}


def model_rows(names: list[str], args) -> list[dict]:
    """Training-step times per net and kernel choice, interleaved; printed as a table."""
    from common import data, interleaved, sgd, summarize
    from model_overhead import build_model, step_fn

    device = torch.device("cpu")
    kinds = ["float", "qatlab", "qatlab-aten"]
    rows = []
    print("\n| net | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for name in names:
        torch.manual_seed(0)
        x, y = data(args.batch, device)
        nets = {}
        for kind in kinds:
            model = build_model(name, "float" if kind == "float" else "qatlab", x)
            nets[kind] = (model, sgd(model))

        def stepper(kind, net, opt, x=x, y=y):
            return lambda i: step_fn(kind, net, opt, x, y)  # qatlab-aten: the kernels off

        steps = {k: stepper(k, *nets[k]) for k in kinds}
        times, _ = interleaved(steps, args.steps, 3, device)
        summary = summarize(times, "float")
        cells = []
        for kind in kinds:
            r = summary[kind]
            rows.append({"net": name, "kernel": kind, **r})
            cells.append(f"{r['median_ms']:.1f} ms ({r['ratio']:.3f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--repeats", type=int, default=60, help="timed calls per kernel")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--models", default="", help="also time training steps of these nets")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per net and kernel")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    info = machine_info(torch.device("cpu"))
    print(header(info), end="")
    t0 = time.perf_counter()
    if fused._load() is None:
        parser.error("the fused kernels could not be built (see the warning above)")
    build_s = time.perf_counter() - t0
    print(f"# fused kernels built or loaded in {build_s:.1f} s")
    rows = []
    for numel in (int(s) for s in args.sizes.split(",")):
        closures = variants(numel)
        times: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            order = list(closures) if round_ % 2 == 0 else list(closures)[::-1]
            for kernel in order:
                for what, fn in zip(("forward", "forward+backward"), closures[kernel], strict=True):
                    fn()  # warm
                    times.setdefault((kernel, what), []).extend(median_us(fn, args.repeats))
        for (kernel, what), ts in times.items():
            rows.append(
                {
                    "numel": numel,
                    "kernel": kernel,
                    "what": what,
                    "median_us": statistics.median(ts),
                    "calls": len(ts),
                }
            )
    os.environ.pop(fused.ENV, None)
    print("\n| elements | pass | aten (us) | fused (us) |")
    print("|---:|---|---:|---:|")
    for numel in sorted({r["numel"] for r in rows}):
        for what in ("forward", "forward+backward"):
            cells = [
                f"{r['median_us']:.0f}" for r in rows if r["numel"] == numel and r["what"] == what
            ]
            print(f"| {numel:,} | {what} | " + " | ".join(cells) + " |")
    models = model_rows(args.models.split(","), args) if args.models else []
    finish(info, wall0)
    if args.json:
        result = {"info": info, "build_s": build_s, "rows": rows, "models": models}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
