"""Speed of the flatness searches on the trained cnn1d of MNIST-1D, and what evaluating them on
a fixed training subset costs in precision.

Trains cnn1d (width 32) on MNIST-1D (10,000 samples, qatlab's split: 7,200 train) in float,
seeded, then fine-tunes a W4A4 LSQ copy (QAT), and for both models times:

* the magnitude-aware ``sigma'`` search (the issue's budget: at most 60 s) and the plain
  ``sigma`` search, defaults (bisection on [0, 2], 15 steps, 10 draws, target 0.1, tol 0.01),
  on a fixed random training subset (``--subset``, 2048) and on the full training set;
* ``sigma'`` on disjoint subsets of the same size, and the accuracy drop at the ``sigma'``
  found measured on each of them and on the full set (the spread the subset choice causes),
  next to the binomial std ``sqrt(p (1 - p) / n)`` of an accuracy estimated on ``n`` samples;
* optionally the ``alpha'`` search (``--alpha``), and 10 draws evaluated one after another vs
  vectorised with ``torch.func.vmap`` (float model only; vmap cannot run the quantizers).

Run: ``nice -n 10 python benchmarks/measure_speed.py [--json out.json]`` (see README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import torch
from common import finish, header, machine_info
from torch import nn

import qatlab
from qatlab.data import load, make_loader
from qatlab.measure.flatness import _Perturbed, alpha_search, sigma_search
from qatlab.models import create


def train(model: nn.Module, bundle, epochs: int, lr: float, seed: int) -> float:
    """Adam, batch 128, cross-entropy, seeded; returns the wall time."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in make_loader(bundle.train, 128, shuffle=True, seed=seed, epoch=epoch):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return time.perf_counter() - t0


def timed(fn, *args, **kwargs) -> tuple[dict, float]:
    """``(result, wall seconds)``; the call's process CPU seconds go to ``result["cpu_s"]``
    (with one thread and an idle machine the two agree; on a shared machine CPU time is
    the figure that does not depend on the other load)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    wall = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0
    return out, wall


def vmap_vs_loop(model: nn.Module, x: torch.Tensor, draws: int = 10) -> dict:
    """Seconds for ``draws`` noisy forwards of ``x``: a loop vs ``vmap`` over stacked draws."""
    from torch.func import functional_call, vmap

    pm = _Perturbed(model, "float", fold_bn=True)
    g = torch.Generator().manual_seed(0)
    deltas = [{k: 0.01 * torch.randn(w.shape, generator=g) for k, w in pm.weights.items()}
              for _ in range(draws)]  # fmt: skip
    out = {}
    with pm.ready(), torch.no_grad():
        t0 = time.perf_counter()
        for d in deltas:
            pm(x, d)
        out["loop_s"] = time.perf_counter() - t0
        stacked = {}
        for target in pm.overrides(deltas[0]):
            stacked[target] = torch.stack([pm.overrides(d)[target] for d in deltas])
        t0 = time.perf_counter()
        vmap(lambda p: functional_call(model, p, (x,)))(stacked)
        out["vmap_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", type=int, default=2048, help="training samples the searches use")
    p.add_argument("--epochs", type=int, default=10, help="float training epochs")
    p.add_argument("--qat-epochs", type=int, default=3, help="W4A4 fine-tuning epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--alpha", action="store_true", help="also time the alpha' search")
    p.add_argument("--no-full", action="store_true", help="skip the full-training-set searches")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"))
    info["cpu_s_start"] = time.process_time()
    wall0 = time.perf_counter()
    print(header(info))

    bundle = load("mnist1d", seed=args.seed)
    torch.manual_seed(args.seed)
    float_net = create("cnn1d", bundle.num_classes, bundle.input_shape)
    t_float = train(float_net, bundle, args.epochs, 3e-3, args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qnet = qatlab.quantize(float_net, qatlab.QuantConfig(weight_bits=4, act_bits=4))
    qatlab.calibrate(qnet, make_loader(bundle.train, 128, shuffle=True, seed=args.seed), 8)
    t_qat = train(qnet, bundle, args.qat_epochs, 1e-3, args.seed)
    models = {"float": float_net.eval(), "W4A4": qnet.eval()}

    xtr, ytr = bundle.train_eval.x, bundle.train_eval.y
    n = len(ytr)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    k = min(args.subset, n)
    subsets = [perm[i * k : (i + 1) * k] for i in range(n // k)]
    results: dict = {"info": info, "subset": k, "train_size": n, "models": {}}
    results["train_s"] = {"float": t_float, "W4A4_qat": t_qat}
    for name, model in models.items():
        acc = {
            "train": qatlab.measure.evaluate(model, bundle.train_eval)["acc"],
            "test": qatlab.measure.evaluate(model, bundle.test)["acc"],
        }
        row: dict = {"acc": acc}
        xs, ys = xtr[subsets[0]], ytr[subsets[0]]
        row["sigma_mag"], row["sigma_mag_s"] = timed(sigma_search, model, xs, ys,
                                                     magnitude_aware=True)  # fmt: skip
        row["sigma"], row["sigma_s"] = timed(sigma_search, model, xs, ys)
        if not args.no_full:
            row["sigma_mag_full"], row["sigma_mag_full_s"] = timed(
                sigma_search, model, xtr, ytr, magnitude_aware=True
            )
        row["sigma_mag_subsets"] = [row["sigma_mag"]["sigma"]] + [
            sigma_search(model, xtr[s], ytr[s], magnitude_aware=True)["sigma"] for s in subsets[1:]
        ]
        # the precision the subset costs: the drop at the sigma' found, on every disjoint subset
        # and on the full set (one bisection step of width 2 sigma' evaluates exactly at sigma')
        at = row["sigma_mag"]["sigma"]
        row["drop_at_sigma_mag"] = [
            sigma_search(model, xtr[s], ytr[s], magnitude_aware=True, steps=1, upper=2 * at)["drop"]
            for s in subsets
        ]
        row["drop_at_sigma_mag_full"] = sigma_search(
            model, xtr, ytr, magnitude_aware=True, steps=1, upper=2 * at
        )["drop"]
        if args.alpha:
            row["alpha_mag"], row["alpha_mag_s"] = timed(alpha_search, model, xs, ys,
                                                         magnitude_aware=True)  # fmt: skip
        if name == "float":
            row["draws"] = vmap_vs_loop(model, xs)
        results["models"][name] = row
        print(f"{name}: done ({time.perf_counter() - wall0:.0f} s)", flush=True)

    finish(info, wall0)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


def report(res: dict) -> str:
    k, n = res["subset"], res["train_size"]
    lines = [
        f"Searches on a fixed random subset of {k} of the {n} training samples (full: all {n}).",
        "",
        "| model | train / test acc | sigma' (subset) | drop | evals | wall / CPU (s) "
        "| sigma' (full) | wall / CPU full (s) | sigma (subset) | wall / CPU (s) "
        "| sigma' over disjoint subsets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in res["models"].items():
        sm, s = r["sigma_mag"], r["sigma"]
        full = r.get("sigma_mag_full")
        spread = r["sigma_mag_subsets"]
        sd = statistics.stdev(spread) if len(spread) > 1 else math.nan
        lines.append(
            f"| {name} | {r['acc']['train']:.3f} / {r['acc']['test']:.3f} | {sm['sigma']:.4f} "
            f"| {sm['drop']:.3f} | {sm['evals']} | {r['sigma_mag_s']:.1f} / {sm['cpu_s']:.1f} "
            f"| {full['sigma'] if full else math.nan:.4f} "
            f"| {r.get('sigma_mag_full_s', math.nan):.1f} / "
            f"{full['cpu_s'] if full else math.nan:.1f} "
            f"| {s['sigma']:.4f} | {r['sigma_s']:.1f} / {s['cpu_s']:.1f} "
            f"| {', '.join(f'{v:.4f}' for v in spread)} (sd {sd:.4f}) |"
        )
    lines.append("")
    for name, r in res["models"].items():
        base = r["sigma_mag"]["base_acc"]
        p = base - 0.1
        sd_base = math.sqrt(base * (1 - base) / k)
        lines.append(
            f"{name}: binomial std of an accuracy on {k} samples: {sd_base:.4f}"
            f" at the base accuracy {base:.3f}, {math.sqrt(p * (1 - p) / k):.4f} at the target"
            f" {p:.3f} (on all {n}: {math.sqrt(p * (1 - p) / n):.4f})."
        )
        drops = r["drop_at_sigma_mag"]
        lines.append(
            f"{name}: drop at sigma' = {r['sigma_mag']['sigma']:.4f} on the {len(drops)} disjoint "
            f"subsets: {', '.join(f'{d:.4f}' for d in drops)} (sd {statistics.stdev(drops):.4f});"
            f" on all {n}: {r['drop_at_sigma_mag_full']:.4f}."
        )
        if "alpha_mag" in r:
            a = r["alpha_mag"]
            lines.append(
                f"{name}: alpha' {a['alpha']:.5f} (drop {a['drop']:.3f}, {a['evals']} evals) in "
                f"{r['alpha_mag_s']:.1f} s wall, {a['cpu_s']:.1f} s CPU"
            )
        if "draws" in r:
            d = r["draws"]
            lines.append(
                f"{name}: 10 noisy forwards of {k} samples: loop {d['loop_s']:.2f} s, vmap "
                f"{d['vmap_s']:.2f} s ({d['vmap_s'] / d['loop_s']:.1f}x)"
            )
    lines.append(
        f"Training: float {res['train_s']['float']:.0f} s, QAT {res['train_s']['W4A4_qat']:.0f} s."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
