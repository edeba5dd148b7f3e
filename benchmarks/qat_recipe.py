"""From-scratch QAT: qatlab's default LSQ recipe vs the paper's max-abs STE baseline.

MNIST-1D, weights only, every layer at the target bits, restricted grid (ternary at 2 bits),
Adam lr 1e-3 cosine, batch 128, final-epoch test accuracy. Arms:

* ``max-abs STE``: ``weight_scale=maxabs_ste`` (step ``max|W|/p`` every call, gradient through
  it), the QAT baseline of Wenshøj et al.;
* ``LSQ, default``: qatlab's defaults (``train.quant_lr/quant_optimizer`` and
  ``quant.weight_init`` = ``auto``, which resolve to the from-scratch recipe: LogAdam at lr 5e-3,
  mean-abs init);
* ``LSQ, LogAdam 3e-3``: the same at lr 3e-3 (it ties with 5e-3 on validation accuracy);
* ``LSQ, plain Adam 0.1x``: the previous from-scratch recipe (steps with plain Adam at a tenth
  of the weights' LR, mean-abs init);
* ``LSQ, previous defaults``: Nagel's fine-tuning recipe used from scratch (steps with their
  own Adam at 1e-5, MSE-search init), what qatlab did before.

Run: ``python benchmarks/qat_recipe.py [--seeds 5] [--jobs 2] [--out docs/results]`` (runs
are reused from ``--runs``). Writes ``qat_recipe.md`` (table part) and ``qat_recipe.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

from qatlab.compare.report import markdown_table, mean_std

# model, bits, epochs, arms (cnn1d without the previous defaults, to keep the run short)
SETUPS = [
    ("mlp5", (2, 3, 4), 30, ("ste", "default", "log3x", "tenth", "old")),
    ("cnn1d", (3, 4), 20, ("ste", "default", "log3x")),
]
ARMS = {
    "ste": ("max-abs STE (paper's baseline)", {"quant.weight_scale": "maxabs_ste"}),
    "default": ("LSQ, qatlab default (auto: LogAdam at lr 5e-3)", {}),
    "log3x": ("LSQ, LogAdam at lr 3e-3", {"train.quant_lr": 3e-3}),
    "tenth": (
        "LSQ, plain Adam at 0.1x (previous recipe)",
        {"train.quant_optimizer": "adam", "train.quant_lr": "0.1x"},
    ),
    "old": (
        "LSQ, previous defaults (steps Adam 1e-5, MSE init)",
        {"train.quant_optimizer": "adam", "train.quant_lr": 1e-5, "quant.weight_init": "mse"},
    ),
}


def config(model: str, bits: int, arm: str, seed: int, epochs: int, runs: Path) -> dict:
    cfg: dict[str, Any] = {
        "name": f"qatrecipe-{model}-w{bits}-{arm}-s{seed}",
        "out_dir": str(runs),
        "data": {"name": "mnist1d"},
        "model": {"name": model},
        "train": {"epochs": epochs, "seed": seed, "restore_best": False, "progress": False},
        "quant": {
            "weight_bits": bits,
            "weights_only": True,
            "act_bits": None,
            "weight_grid": "restricted",
            "first_layer": "same",
            "last_layer": "same",
        },
    }
    for key, value in ARMS[arm][1].items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def train_job(cfg_dict: dict) -> dict:
    """Train one run (resume it, or read it back if finished); return its summary."""
    import torch

    from qatlab.train import RunConfig, run

    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict)
    if (cfg.run_dir / "summary.json").is_file():
        return json.loads((cfg.run_dir / "summary.json").read_text())
    started = any((cfg.run_dir / f).is_file() for f in ("ckpt.pt", "config.yaml"))
    return run(cfg, resume=started, verbose=False)


def job(cfg: dict) -> dict:
    summary = train_job(cfg)
    _, model, w, arm, seed = cfg["name"].split("-")
    return {
        "model": model,
        "bits": w[1:],
        "arm": arm,
        "method": ARMS[arm][0],
        "seed": int(seed[1:]),
        "acc": summary["test_acc"],
        "wall_time_s": summary["wall_time_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--runs", default="runs/qat_recipe")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    start = time.perf_counter()
    cfgs = [
        config(model, b, arm, s, epochs, Path(args.runs))
        for model, bits, epochs, arms in SETUPS
        for b in bits
        for s in range(args.seeds)
        for arm in arms
    ]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(job, cfgs, chunksize=1)
    wall = time.perf_counter() - start
    table = mean_std(rows, ["model", "bits", "arm", "method"], ["acc"])
    order = list(ARMS)
    table.sort(key=lambda r: (r["model"] != "mlp5", r["bits"], order.index(r["arm"])))
    for r in table:  # gap to the baseline, in points
        base = next(
            t for t in table if (t["model"], t["bits"], t["arm"]) == (r["model"], r["bits"], "ste")
        )
        r["gap"] = f"{(r['acc'][0] - base['acc'][0]) * 100:+.1f}"
    text = "\n".join(
        [
            markdown_table(
                table,
                [
                    ("model", "model"),
                    ("bits", "weight bits"),
                    ("method", "QAT"),
                    ("acc", "test acc (final epoch)"),
                    ("gap", "vs max-abs STE"),
                ],
            ),
            "",
            f"Seeds 0..{args.seeds - 1}; training time summed over runs "
            f"{sum(r['wall_time_s'] for r in rows) / 60:.1f} min; this invocation "
            f"{wall / 60:.1f} min wall ({args.jobs} worker, 1 thread, shared 2-core machine).",
        ]
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qat_recipe_table.md").write_text(text + "\n")
    (out / "qat_recipe.json").write_text(json.dumps({"rows": rows, "wall_time_s": wall}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
