"""The per-tensor fake quantizer's eager kernels, per op and per activation size.

For each size (``--sizes``, elements; defaults are resnet20's and mobilenetv2's activations at
CIFAR shape, batch 64: 2^18, 2^19, 2^20 and 64x96x32x32) and each kernel, the median time of
the forward alone (no grad) and of forward + backward through ``qatlab.fake_quantize`` (post-ReLU
input, 4-bit unsigned grid, a learned per-tensor step), interleaved:

* ``aten``: the ATen passes (``QATLAB_FUSED_KERNELS=0``): forward ``mul``, ``round_``,
  ``clamp_``, ``mul_``; backward two dot products and ``hardtanh_backward``;
* ``fused``: ``qatlab/quant/fused.py``, one inductor-built loop each way, called through
  ``torch.compile``'s wrapper (forced on below ``MIN_NUMEL`` here to show the crossover);
* ``cpp`` (``--cpp``; x86-64 only): a prototype, not part of qatlab: the same two loops as a
  C++ extension (``torch.utils.cpp_extension.load_inline``, ``-O3 -march=x86-64-v2``,
  ``at::parallel_for``, per-lane float accumulators, chunk sums in double), called directly
  (no autograd Function; the forward is checked bitwise against ATen). It measures what a
  fused kernel without ``torch.compile``'s per-call overhead would gain; building it takes
  ~20 s and needs ninja and a C++ compiler.

With ``--models resnet20,...`` it also times whole training steps (as ``model_overhead.py``,
interleaved): ``float``, ``qatlab`` (the library: fused kernels from ``MIN_NUMEL``),
``qatlab-aten`` and, with ``--cpp``, ``qatlab-cpp`` (the prototype behind every per-tensor CPU
call, through the same autograd Function): whether a kernel that wins cache-warm per op also
wins inside a network, where its input is cold.

Run: ``python benchmarks/fused_kernels.py --threads 2 --cpp --json out.json``
(``--models resnet20,mobilenetv2,reference --steps 20`` for the model-level A/B).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from common import finish, header, machine_info

from qatlab.quant import fused
from qatlab.quant.quantizer import fake_quantize

SIZES = (1 << 18, 1 << 19, 1 << 20, 64 * 96 * 32 * 32)

CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

torch::Tensor fq_forward(const torch::Tensor& x, double inv, double s, double n, double p) {
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fi = inv, fs = s, fn = n, fp = p;
  at::parallel_for(0, x.numel(), 32768, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float v = std::nearbyint(xp[i] * fi);
      v = v < fn ? fn : v;
      v = v > fp ? fp : v;
      op[i] = v * fs;
    }
  });
  return out;
}

std::vector<torch::Tensor> fq_backward(const torch::Tensor& g, const torch::Tensor& x,
                                       double inv, double n, double p, double lo, double hi) {
  auto gx = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* op = gx.data_ptr<float>();
  const float fi = inv, fn = n, fp = p, flo = lo, fhi = hi;
  const int64_t N = x.numel(), grain = 32768, chunks = (N + grain - 1) / grain;
  std::vector<double> s1(chunks, 0.0), s2(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * grain, e = std::min(N, b + grain);
      float a1[16] = {0}, a2[16] = {0};
      int64_t i = b;
      for (; i + 16 <= e; i += 16) {
        for (int j = 0; j < 16; ++j) {
          const float xv = xp[i + j], gv = gp[i + j];
          float v = std::nearbyint(xv * fi);
          v = v < fn ? fn : v;
          v = v > fp ? fp : v;
          const float gi = (xv > flo && xv < fhi) ? gv : 0.f;
          op[i + j] = gi;
          a1[j] += gv * v;
          a2[j] += gi * xv;
        }
      }
      double t1 = 0, t2 = 0;
      for (; i < e; ++i) {
        const float xv = xp[i], gv = gp[i];
        float v = std::nearbyint(xv * fi);
        v = v < fn ? fn : v;
        v = v > fp ? fp : v;
        const float gi = (xv > flo && xv < fhi) ? gv : 0.f;
        op[i] = gi;
        t1 += gv * v;
        t2 += gi * xv;
      }
      for (int j = 0; j < 16; ++j) { t1 += a1[j]; t2 += a2[j]; }
      s1[c] = t1; s2[c] = t2;
    }
  });
  double t1 = 0, t2 = 0;
  for (int64_t c = 0; c < chunks; ++c) { t1 += s1[c]; t2 += s2[c]; }
  return {gx, torch::tensor(t1), torch::tensor(t2)};
}
"""


def build_cpp():
    """The prototype extension (seconds to build; cached by torch in ~/.cache)."""
    from torch.utils.cpp_extension import load_inline

    t0 = time.perf_counter()
    module = load_inline(
        "qatlab_fq_prototype",
        cpp_sources=CPP,
        functions=["fq_forward", "fq_backward"],
        extra_cflags=["-O3", "-march=x86-64-v2", "-fno-math-errno", "-ffp-contract=off"],
    )
    return module, time.perf_counter() - t0


def median_us(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def variants(numel: int, cpp) -> dict:
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

    out = {"aten": qat("0"), "fused": qat("1")}
    if cpp is not None:
        s = float(step.detach())
        inv = 1.0 / s

        def cpp_forward():
            cpp.fq_forward(x, inv, s, 0.0, 15.0)

        def cpp_forward_backward():
            cpp.fq_forward(x, inv, s, 0.0, 15.0)
            cpp.fq_backward(g, x, inv, 0.0, 15.0, -0.5 * s, 15.5 * s)

        want = torch.mul(x, inv).round_().clamp_(0.0, 15.0).mul_(s)
        assert torch.equal(cpp.fq_forward(x, inv, s, 0.0, 15.0), want)
        out["cpp"] = (cpp_forward, cpp_forward_backward)
    return out


class KernelChoice:
    """Within a with block: the library as is (``qatlab``), the ATen passes (``qatlab-aten``)
    or the C++ prototype behind ``fused._kernel`` at every size (``qatlab-cpp``)."""

    def __init__(self, kind: str, cpp) -> None:
        self.kind, self.cpp = kind, cpp

    def _cpp_kernel(self, name: str):
        cpp = self.cpp
        if name == "forward":
            return lambda x, c: cpp.fq_forward(x, *c[:4].tolist())

        def backward(g, x, c):
            inv, _, n, p, lo, hi = c.tolist()
            grad_x, levels_sum, inner = cpp.fq_backward(g.contiguous(), x, inv, n, p, lo, hi)
            return grad_x, levels_sum.float(), inner.float()

        return backward

    def __enter__(self) -> None:
        self.saved = fused._kernel, fused.MIN_NUMEL, os.environ.get(fused.ENV)
        if self.kind == "qatlab-aten":
            os.environ[fused.ENV] = "0"
        elif self.kind == "qatlab-cpp":
            fused._kernel, fused.MIN_NUMEL = self._cpp_kernel, 1
            os.environ[fused.ENV] = "1"

    def __exit__(self, *exc) -> None:
        fused._kernel, fused.MIN_NUMEL, env = self.saved
        if env is None:
            os.environ.pop(fused.ENV, None)
        else:
            os.environ[fused.ENV] = env


def model_rows(names: list[str], cpp, args) -> list[dict]:
    """Training-step times per net and kernel choice, interleaved; printed as a table."""
    from common import data, interleaved, sgd, sgd_step, summarize
    from model_overhead import build_model

    device = torch.device("cpu")
    kinds = ["float", "qatlab", "qatlab-aten"] + (["qatlab-cpp"] if cpp is not None else [])
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
            def step(i: int) -> None:
                with KernelChoice(kind, cpp):
                    sgd_step(net, opt, x, y)

            return step

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
    parser.add_argument("--cpp", action="store_true", help="also the C++ extension prototype")
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
    library_bar = fused.MIN_NUMEL
    fused.MIN_NUMEL = 1  # force the fused path at every size (the library's bar is 2^20)
    cpp, build_s = None, None
    if args.cpp:
        if platform.machine() != "x86_64":
            parser.error("--cpp: the prototype's flags are for x86-64")
        cpp, build_s = build_cpp()
        print(f"# C++ prototype built in {build_s:.0f} s")
    rows = []
    for numel in (int(s) for s in args.sizes.split(",")):
        closures = variants(numel, cpp)
        times: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            order = list(closures) if round_ % 2 == 0 else list(closures)[::-1]
            for kernel in order:
                for what, fn in zip(("forward", "forward+backward"), closures[kernel], strict=True):
                    fn()  # warm (the first fused call compiles)
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
    print("\n| elements | pass | " + " | ".join(closures) + " |")
    print("|---:|---|" + "---:|" * len(closures))
    for numel in sorted({r["numel"] for r in rows}):
        for what in ("forward", "forward+backward"):
            cells = [
                f"{r['median_us']:.0f}" for r in rows if r["numel"] == numel and r["what"] == what
            ]
            print(f"| {numel:,} | {what} (us) | " + " | ".join(cells) + " |")
    fused.MIN_NUMEL = library_bar  # the library as it is for the model-level A/B
    models = model_rows(args.models.split(","), cpp, args) if args.models else []
    finish(info, wall0)
    if args.json:
        result = {"info": info, "cpp_build_s": build_s, "rows": rows, "models": models}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
