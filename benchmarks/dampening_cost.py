"""Dampening's step cost in CPU time: qat vs dampen with the autograd loss term
(``bin_distance``, as before issue 20) vs the fused one (``_BinDistance``).

The rows of ``method_overhead.py`` (its reference net, LSQ W4A4, SGD, batch 64, one thread),
stepped interleaved, timed with ``time.thread_time`` (this thread's CPU time: unlike wall time
it does not grow when other processes share the cores). Medians over ``STEPS`` steps::

    cd benchmarks && python dampening_cost.py 40
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
import method_overhead as mo
from common import data

from qatlab.methods import oscillation as osc

torch.set_num_threads(1)
x, y = data(64, torch.device("cpu"))
steps, warm = int(sys.argv[1]) if len(sys.argv) > 1 else 40, 3
total = steps + warm
rows = {}
for label, method, opts in (
    ("qat", "qat", {}),
    ("dampen", "dampen", {"start": 0.0, "log_every": 50}),
):
    row = mo.Row(label, method, given=opts)
    row.options = mo.check_options(method, opts)
    rows[label] = mo.make_stepper(row, x, y, total, False)[0]
fused = osc._bin_distance


def autograd_version(w, q, how):
    return osc.bin_distance(w, q, how)


order = [("qat", None), ("dampen-autograd", autograd_version), ("dampen-fused", fused)]
times = {k: [] for k, _ in order}
for i in range(total):
    seq = order if i % 2 == 0 else order[::-1]
    for label, impl in seq:
        if impl is not None:
            osc._bin_distance = impl
        t0 = time.thread_time()
        rows["qat" if label == "qat" else "dampen"](i)
        dt = time.thread_time() - t0
        if i >= warm:
            times[label].append(dt)
q = statistics.median(times["qat"])
for label, _ in order:
    m = statistics.median(times[label])
    print(f"{label:16s} median CPU {m * 1e3:7.2f} ms/step  ratio to qat {m / q:.3f}")
