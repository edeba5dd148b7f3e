"""Study: oscillation regularization + PTQ (Wenshøj et al., TMLR 2025), made fair.

MLP5 on MNIST-1D, weights only, every layer at the target bit width, restricted grid.
Arms, each at target bits 2 (ternary), 3 and 4, over several seeds: float + PTQ (selected by
float validation accuracy, as the paper does), the regularizer at lambda 0 with the
regularizer's selection rule (the control), the regularizer with the authors' gradient (through
``s = max|W|/p``) and with the step held constant, QAT with LSQ (qatlab's from-scratch recipe)
and QAT with the paper's max-abs STE quantizer. Every run trains all epochs (no early stop);
both the early-stopped model (best epoch by the selection metric) and the final epoch are
evaluated, then post-training quantized at {2, 3, 4, 8} and float. Plus a lambda sweep
(1 to 1000), the size-independent ``uniform`` aggregation, and per-layer statistics of the
regularizer over training. ``python -m qatlab.compare oscreg``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from qatlab.compare.grid import run_jobs, train_job
from qatlab.compare.report import markdown_table, mean_std
from qatlab.train.metrics import write_json

DATASET, MODEL = "mnist1d", "mlp5"
TARGETS = (2, 3, 4)
EVAL_BITS = (2, 3, 4, 8)
LAMBDA = 1.0  # the paper's value for MLP5 from scratch (lr 1e-3)
SWEEP = (1.0, 10.0, 100.0, 1000.0)  # log-spaced, at target 2
STATS_EVERY = 28  # steps between per-layer regularizer statistics (2 per epoch)

ARMS = {
    "float": "float + PTQ",
    "reg0": "oscreg λ=0 + PTQ (control)",
    "reg": "oscreg + PTQ (authors' gradient)",
    "regconst": "oscreg + PTQ (constant step)",
    "reguni": "oscreg + PTQ (authors', uniform agg.)",
    "qat": "QAT, LSQ",
    "qatste": "QAT, max-abs STE",
}


def config(
    arm: str, target: int | None, seed: int, runs: Path, epochs: int, lam: float = LAMBDA
) -> dict[str, Any]:
    """One run: Adam lr 1e-3 (cosine), all epochs; ``best.pt`` by the arm's selection metric."""
    train = {
        "epochs": epochs,
        "lr": 1e-3,
        "seed": seed,
        "progress": False,
    }
    cfg: dict[str, Any] = {
        "out_dir": str(runs),
        "data": {"name": DATASET},
        "model": {"name": MODEL},
        "train": train,
    }
    tag = f"oscreg2-{DATASET}-{MODEL}"
    if arm == "float":
        cfg["name"] = f"{tag}-float-s{seed}"
    elif arm in ("qat", "qatste"):
        cfg["name"] = f"{tag}-{arm}{target}-s{seed}"
        cfg["quant"] = {
            "weight_bits": target,
            "weights_only": True,
            "act_bits": None,
            "weight_grid": "restricted",
            "weight_scale": "maxabs_ste" if arm == "qatste" else "lsq",
            "first_layer": "same",
            "last_layer": "same",
        }
    else:
        lam = 0.0 if arm == "reg0" else lam
        cfg["name"] = f"{tag}-{arm}{target}-l{lam:g}-s{seed}"
        cfg["method"] = {
            "name": "oscreg",
            "target_bits": target,
            "lam": lam,
            "step_grad": arm != "regconst",
            "aggregation": "uniform" if arm == "reguni" else "mean",
            "stats_every": STATS_EVERY,
        }
        train["early_stop_metric"] = f"val_ptq{target}_acc"
    cfg["arm"] = arm  # popped before the config is built
    return cfg


def analyse(cfg_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (if needed); the cross-bit rows of the early-stopped and the final model."""
    from qatlab.measure.crossbit import cross_bit
    from qatlab.train import RunConfig, evaluate
    from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint
    from qatlab.train.runner import load_data

    cfg_dict = dict(cfg_dict)
    arm = cfg_dict.pop("arm")
    summary = train_job(cfg_dict)
    cfg = RunConfig.from_dict(cfg_dict)
    path = cfg.run_dir / "crossbit.json"
    if path.is_file():
        return json.loads(path.read_text())
    data = load_data(cfg.data)
    target = (
        cfg.quant.weight_bits if cfg.quant is not None else cfg.method.options.get("target_bits")
    )
    rows = []
    for which, file in (("early-stopped", "best.pt"), ("final", "ckpt.pt")):
        ckpt_path = cfg.run_dir / file
        ckpt = load_checkpoint(ckpt_path)
        model = model_from_checkpoint(ckpt, ckpt_path).eval()
        res = cross_bit(model, lambda m: evaluate(m.eval(), data.test, 512)["acc"], EVAL_BITS)
        rows.append(
            {
                "arm": arm,
                "method": ARMS[arm],
                "target": "–" if arm == "float" else str(target),
                "lam": cfg.method.options.get("lam"),
                "model": which,
                "seed": cfg.train.seed,
                **{f"b{k}": v for k, v in res.items()},
                "epoch": ckpt.get("epoch", summary["epochs_run"]),
                "wall_time_s": summary["wall_time_s"],
            }
        )
    write_json(path, rows)
    return rows


def main(out: Path, runs: Path, seeds: int = 3, processes: int = 1, quick: bool = False) -> str:
    start = time.perf_counter()
    epochs = 3 if quick else 30
    seed_list = list(range(seeds))
    cfgs = []
    for s in seed_list:
        cfgs.append(config("float", None, s, runs, epochs))
        for t in TARGETS:
            for arm in ("reg0", "reg", "regconst", "qat", "qatste"):
                cfgs.append(config(arm, t, s, runs, epochs))
            if t in (2, 3):
                cfgs.append(config("reguni", t, s, runs, epochs))
    sweep = [
        config("reg", 2, s, runs, epochs, lam) for lam in SWEEP if lam != LAMBDA for s in seed_list
    ]
    results = run_jobs([(analyse, c) for c in cfgs + sweep], processes, "oscreg")
    rows = [r for rs in results for r in rs]
    wall = time.perf_counter() - start
    main_rows = [r for r in rows if r["arm"] not in ("reg",) or r["lam"] == LAMBDA]
    sweep_rows = [r for r in rows if r["arm"] in ("reg", "reg0") and r["target"] == "2"]
    for r in sweep_rows:
        r["lam_s"] = f"{r['lam']:g}"

    cols_bits = [f"b{b}" for b in EVAL_BITS] + ["bfloat"]
    order = list(ARMS)
    tables = {}
    for which in ("early-stopped", "final"):
        part = [r for r in main_rows if r["model"] == which]
        table = mean_std(part, ["arm", "method", "target"], [*cols_bits, "btrained", "epoch"])
        table.sort(key=lambda r: (r["target"], order.index(r["arm"])))
        tables[which] = table
    lam_table = mean_std(
        [r for r in sweep_rows if r["model"] == "final"], ["target", "lam_s", "lam"], cols_bits
    )
    lam_table.sort(key=lambda r: (r["target"], r["lam"]))
    out.mkdir(parents=True, exist_ok=True)
    _plot_crossbit(tables["final"], out)
    stats = _plot_stats(runs, seed_list[0], epochs, out)
    verdict = _claims(tables) + _ablations(tables)
    train_s = sum(r["wall_time_s"] for r in rows if r["model"] == "final")
    text = _markdown(tables, lam_table, verdict, seeds, epochs, wall, quick, train_s, processes)
    text += _stats_table(stats)
    (out / "oscreg.md").write_text(text)
    write_json(out / "oscreg.json", {"rows": rows, "wall_time_s": wall})
    return text


def _acc(table, arm: str, target: str, col: str) -> float | None:
    for r in table:
        if r["arm"] == arm and r["target"] == target and r.get(col):
            return r[col][0]
    return None


def _claims(tables) -> list[str]:
    """The paper's three claims, checked on the final-epoch and early-stopped models."""
    fmt = "{:+.1f}".format
    lines = []
    for which, table in tables.items():
        c1, c2, c3 = [], [], []
        for t in ("3", "4"):
            reg = _acc(table, "reg", t, f"b{t}")
            for qarm in ("qat", "qatste"):
                c1.append((t, qarm, reg - _acc(table, qarm, t, "btrained")))
        reg2 = _acc(table, "reg", "2", "b2")
        for qarm in ("qat", "qatste"):
            c2.append((qarm, _acc(table, qarm, "2", "btrained") - reg2))
        for t in ("2", "3"):
            above = [f"b{b}" for b in EVAL_BITS if b > int(t)] + ["bfloat"]
            for qarm in ("qat", "qatste"):
                gaps = [_acc(table, "reg", t, c) - _acc(table, qarm, t, c) for c in above]
                c3.append((t, qarm, sum(gaps) / len(gaps)))
        name = {"qat": "LSQ", "qatste": "max-abs STE"}
        lines += [
            f"**{which} models**",
            "",
            "1. *Regularized + PTQ recovers QAT accuracy at >= 3 bits*: oscreg (authors', "
            f"λ={LAMBDA:g}) + PTQ minus QAT as trained, points: "
            + "; ".join(f"{t}-bit vs {name[q]} {fmt(d * 100)}" for t, q, d in c1)
            + f". Within 1 point or better in {sum(d > -0.01 for *_, d in c1)}/{len(c1)}.",
            "2. *QAT wins at ternary*: QAT as trained minus oscreg + PTQ at 2 bits: "
            + "; ".join(f"{name[q]} {fmt(d * 100)}" for q, d in c2)
            + f". QAT ahead in {sum(d > 0 for _, d in c2)}/{len(c2)}.",
            "3. *Better cross-bit accuracy above the target*: mean over the widths above the "
            "target (incl. float) of oscreg + PTQ minus QAT (latent weights, PTQ): "
            + "; ".join(f"target {t} vs {name[q]} {fmt(d * 100)}" for t, q, d in c3)
            + f". Regularized ahead in {sum(d > 0 for *_, d in c3)}/{len(c3)}.",
            "",
        ]
    return lines


def _ablations(tables) -> list[str]:
    """Step gradient and aggregation: differences at the target, final and early-stopped."""
    lines = ["**Ablations** (PTQ accuracy at the target bits, points):", ""]
    for which, table in tables.items():
        parts = []
        for t in ("2", "3", "4"):
            reg, const = _acc(table, "reg", t, f"b{t}"), _acc(table, "regconst", t, f"b{t}")
            ctrl, uni = _acc(table, "reg0", t, f"b{t}"), _acc(table, "reguni", t, f"b{t}")
            part = f"target {t}: authors' − control {(reg - ctrl) * 100:+.1f}, "
            part += f"constant step − control {(const - ctrl) * 100:+.1f}"
            if uni is not None:
                part += f", uniform − mean aggregation {(uni - reg) * 100:+.1f}"
            parts.append(part)
        lines.append(f"- {which}: " + "; ".join(parts) + ".")
    return [*lines, ""]


def _plot_crossbit(table, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(4.2 * len(TARGETS), 3.4), sharey=True)
    xs = [str(b) for b in EVAL_BITS] + ["float"]
    for ax, t in zip(axes, TARGETS, strict=True):
        for r in table:
            if r["target"] not in (str(t), "–"):
                continue
            ax.plot(xs, [r[f"b{x}"][0] * 100 for x in xs], marker="o", label=r["method"])
        ax.set_title(f"target {t} bit (final epoch)", fontsize=9)
        ax.set_xlabel("evaluation bits (PTQ)")
    axes[0].set_ylabel("test acc (%)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "oscreg_crossbit.png", dpi=110)
    plt.close(fig)


def _plot_stats(runs: Path, seed: int, epochs: int, out: Path) -> list[dict[str, Any]]:
    """Per layer over training (target 2, one seed): the regularizer's gradient relative to
    the task gradient, mean position inside the bin, and max|W| / std(W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qatlab.train.metrics import read_jsonl

    runs_to_plot = [
        ("λ=0 (control)", config("reg0", 2, seed, runs, epochs)),
        (f"authors' λ={LAMBDA:g}", config("reg", 2, seed, runs, epochs)),
        (f"constant step λ={LAMBDA:g}", config("regconst", 2, seed, runs, epochs)),
        ("authors' λ=100", config("reg", 2, seed, runs, epochs, 100.0)),
    ]
    stats = (
        ("reg_ratio", "‖λ∇R‖ / ‖∇task‖", True),
        ("bin_pos", "mean |w/s − round(w/s)|", False),
        ("max_std", "max|W| / std(W)", False),
    )
    fig, axes = plt.subplots(
        len(stats), len(runs_to_plot), figsize=(3.6 * len(runs_to_plot), 7.5), squeeze=False
    )
    summary = []
    for j, (title, cfg) in enumerate(runs_to_plot):
        path = runs / cfg["name"] / "metrics.jsonl"
        records = [r for r in read_jsonl(path) if any(k.startswith("bin_pos/") for k in r)]
        layers = sorted({k.split("/", 1)[1] for r in records for k in r if "/" in k}, key=str)
        last = records[-1] if records else {}
        row: dict[str, Any] = {"run": title}
        for key, _, _ in stats:
            for layer in layers:
                if f"{key}/{layer}" in last:
                    row[f"{key}/{layer}"] = f"{last[f'{key}/{layer}']:.3g}"
        summary.append(row)
        for i, (key, label, log) in enumerate(stats):
            ax = axes[i][j]
            for layer in layers:
                pts = [(r["step"], r[f"{key}/{layer}"]) for r in records if f"{key}/{layer}" in r]
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=f"layer {layer}", lw=1)
            if log and ax.has_data():
                ax.set_yscale("log")
            if key == "bin_pos":
                ax.axhline(0.25, color="grey", ls=":", lw=0.8)
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if i == len(stats) - 1:
                ax.set_xlabel("step")
    axes[1][0].legend(fontsize=6)
    fig.suptitle("Regularizer statistics per layer, MLP5 / MNIST-1D, target 2 bit, seed 0")
    fig.tight_layout()
    fig.savefig(out / "oscreg_stats.png", dpi=100)
    plt.close(fig)
    return summary


def _markdown(tables, lam_table, verdict, seeds, epochs, wall, quick, train_s, processes) -> str:
    cols = (
        [("method", "method"), ("target", "target bits")]
        + [(f"b{b}", f"PTQ {b}-bit") for b in EVAL_BITS]
        + [("bfloat", "float"), ("btrained", "as trained"), ("epoch", "epoch")]
    )
    scales = {"epoch": (1.0, 0)}
    lam_cols = (
        [("target", "target bits"), ("lam_s", "lambda")]
        + [(f"b{b}", f"PTQ {b}-bit") for b in EVAL_BITS]
        + [("bfloat", "float")]
    )
    lines = [
        "# Oscillation regularization + PTQ on MNIST-1D (Wenshøj et al., TMLR 2025)",
        "",
        f"Regenerate: `python -m qatlab.compare oscreg --jobs {processes}` "
        f"({'--quick, ' if quick else ''}seeds 0..{seeds - 1}; training time summed over all "
        f"runs {train_s / 60:.1f} min; this invocation {wall / 60:.1f} min wall with "
        f"{processes} worker process(es) of 1 thread on a shared 2-core machine, reusing "
        "finished runs).",
        "",
        f"Protocol: MLP5 (5 linear layers, width 128) on MNIST-1D, Adam lr 1e-3 (cosine), "
        f"batch 128, {epochs} epochs, every run trained to the end. **Early-stopped** = the "
        "epoch with the best validation metric of the arm: float accuracy for the float "
        "baseline (as the paper selects it), accuracy after PTQ at the target bits for every "
        "regularizer arm (λ=0 control included), the QAT model's own accuracy for QAT. "
        "**Final** = the last epoch. Weights only are quantized, every layer (first and last "
        "too), restricted grid (ternary at 2 bits); PTQ is round-to-nearest with the max-abs "
        "step. Regularizer λ = 1 is the paper's value for MLP5 trained from scratch at "
        "lr 1e-3 (0.75 for ResNet-18; 14 in the authors' ternary notebook). 'Authors' "
        "gradient' differentiates through `s = max|W|/p` as their code does (default in "
        "qatlab); 'constant step' holds `s` fixed (gradient `2(q-w)/numel` only). 'uniform "
        "agg.' weights each layer's mean by its size, so every weight is pulled equally "
        "(with `mean`, a 128×128 layer's weights are pulled ~13× less than the 128×10 "
        "head's). QAT LSQ uses qatlab's from-scratch recipe (weight steps on LogAdam, Adam on "
        "log s, at 5x the weights' LR, mean-abs init, see qat_recipe.md); QAT max-abs STE is "
        "the paper's "
        "baseline quantizer (`weight_scale=maxabs_ste`). 'as trained' = a QAT model with its "
        "own quantizer; the PTQ columns quantize its latent float weights. Test accuracy in "
        "%, mean ± std over seeds.",
        "",
        "## Final epoch",
        "",
        markdown_table(tables["final"], cols, scales),
        "",
        "## Early-stopped (best validation epoch of each arm's selection metric)",
        "",
        markdown_table(tables["early-stopped"], cols, scales),
        "",
        "![accuracy vs evaluation bits](oscreg_crossbit.png)",
        "",
        "## The paper's claims here",
        "",
        *verdict,
        "## Lambda sweep (authors' gradient, final epoch)",
        "",
        markdown_table(lam_table, lam_cols),
        "",
        "## What the regularizer does, per layer",
        "",
        "![regularizer statistics](oscreg_stats.png)",
        "",
        "Logged by the regularizer's `after_step` every "
        f"{STATS_EVERY} steps (`method.stats_every`) into metrics.jsonl: `reg_ratio/<layer>` "
        "= ‖λ∇R‖/‖∇task‖, `bin_pos/<layer>` = mean |w/s − round(w/s)| (0.25 for weights "
        "spread uniformly inside their bins, 0.5 when they sit at the bin edges), "
        "`max_std/<layer>` = max|W| / std(W).",
        "",
        "How to read it (target 2, λ=1): without the regularizer (and with the constant-step "
        "variant, whose gradient is 10-100x weaker than the authors') each layer's largest "
        "weight grows to 4-6 standard deviations, so at ternary `s = max|W|` and most weights "
        "round to 0 (mean bin position far below 0.25). The authors' gradient through "
        "`max|W|` keeps the range near 2 standard deviations: that, not the push of weights "
        "toward the bin edges, is what makes the model survive ternary PTQ. At λ=100 the "
        "weights do sit at the bin edges (bin position ~0.45) and the regularizer's gradient "
        "dominates the task's (10-30x): accuracy drops.",
        "",
    ]
    return "\n".join(lines)


def _stats_table(stats: list[dict[str, Any]]) -> str:
    """The last logged value of each statistic, per layer, for the plotted runs."""
    if not stats:
        return ""
    keys = sorted({k for r in stats for k in r if k != "run"}, key=lambda k: (k.split("/")[0], k))
    cols = [("run", "run (target 2, seed 0, last step)")] + [(k, k) for k in keys]
    return "\n" + markdown_table(stats, cols) + "\n"
