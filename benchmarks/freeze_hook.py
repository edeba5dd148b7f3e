"""Cost of iterative freezing's ``after_step`` alone (no forward/backward), per step, in ms.

The reference net of ``common.py`` at LSQ W4A4, one thread. Three regimes, each a fresh
:class:`qatlab.methods.oscillation.IterativeFreezing` stepped on weights set to their start
value plus noise of half a step size before each call (integers flip back and forth, so
frequencies build up as in an oscillating run):

- ``closed``: before ``start`` (threshold off: nothing can freeze);
- ``open-none``: threshold open but too high for any weight to pass (nothing frozen);
- ``open-some``: threshold open and low: a share of the weights is frozen (printed).

Rows are interleaved step by step. To compare two versions of qatlab, run the script under
each (``PYTHONPATH=...``) alternately and compare medians (see README.md).

Run: ``python benchmarks/freeze_hook.py [--steps 200]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import data, quantized_reference

from qatlab.methods.oscillation import IterativeFreezing
from qatlab.quant.layers import quant_layers

REGIMES = {  # (start, threshold_start, threshold_end)
    "closed": (1.0, 0.1, 0.01),
    "open-none": (0.0, 2.0, 2.0),
    "open-some": (0.0, 0.6, 0.6),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, _ = data(64, torch.device("cpu"))
    rows = {}
    for name, (start, t0, t1) in REGIMES.items():
        model = quantized_reference(x)
        hook = IterativeFreezing(model, momentum=0.1, threshold_start=t0, threshold_end=t1,
                                 start=start, max_bits=8)  # fmt: skip
        weights = [
            (m.weight, m.weight.detach().clone(), 0.5 * m.weight_quantizer.step.detach().mean())
            for _, m in quant_layers(model)
        ]
        rows[name] = (model, hook, weights, torch.Generator().manual_seed(0))
    total = args.warmup + args.steps
    times: dict[str, list[float]] = {k: [] for k in rows}
    for step in range(total):
        for name in list(rows)[:: 1 if step % 2 else -1]:
            model, hook, weights, gen = rows[name]
            with torch.no_grad():  # the "optimizer's" move
                for w, start, scale in weights:
                    w.copy_(start + scale * torch.randn(w.shape, generator=gen))
            t0 = time.perf_counter()
            hook.after_step(model, step, total)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    for name, (_, hook, _, _) in rows.items():
        print(
            f"{name:10s} after_step {statistics.median(times[name]) * 1e3:7.3f} ms "
            f"(IQR {statistics.quantiles(times[name], n=4)[0] * 1e3:.3f}-"
            f"{statistics.quantiles(times[name], n=4)[2] * 1e3:.3f})  "
            f"frozen share {hook.frozen_share():.3f}"
        )


if __name__ == "__main__":
    main()
