"""Study: weight oscillations in QAT (Nagel et al.) on MNIST-1D.

Float pre-training, then LSQ QAT at W4A4 and W3A3 with plain LSQ (tracked), dampening and
iterative freezing, for the depthwise-separable ``mobilenetv2`` and ``mlp5``; each evaluated
with and without BN re-estimation. ``python -m qatlab.compare oscillations``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from qatlab.compare.grid import run_jobs, train_job
from qatlab.compare.report import markdown_table, mean_std
from qatlab.train.metrics import write_json

MODELS = {"mobilenetv2": {"width_mult": 0.25}, "mlp5": {}}
BITS = (4, 3)
METHODS = ("track", "dampen", "freeze")
MOMENTUM = 0.01  # f's EMA momentum: Nagel's 0.001 is for ~10^5 steps; these runs have ~10^3
THRESHOLD = 0.01  # a weight "oscillates" when its frequency f exceeds this
HIST_MAX = 0.1  # histogram range of f (frequencies above it land in the last bin)


def float_config(model: str, seed: int, runs: Path, epochs: int) -> dict[str, Any]:
    return {
        "name": f"osc-{model}-float-s{seed}",
        "out_dir": str(runs),
        "data": {"name": "mnist1d"},
        "model": {"name": model, **MODELS[model]},
        "train": {"epochs": epochs, "lr": 3e-3, "seed": seed, "progress": False},
    }


def qat_config(model: str, bits: int, method: str, seed: int, runs: Path, epochs: int) -> dict:
    options: dict[str, Any] = {"momentum": MOMENTUM, "log_every": 20}
    if method != "freeze":
        options["threshold"] = THRESHOLD
    return {
        "name": f"osc-{model}-w{bits}a{bits}-{method}-s{seed}",
        "out_dir": str(runs),
        "data": {"name": "mnist1d"},
        "model": {"name": model, **MODELS[model]},
        "quant": {"weight_bits": bits, "act_bits": bits},
        "train": {
            "epochs": epochs,
            "lr": 1e-3,
            "seed": seed,
            "progress": False,
            "restore_best": False,
        },
        "method": {"name": method, **options},
        "init_from": str(runs / f"osc-{model}-float-s{seed}" / "best.pt"),
    }


def analyse(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Train (if needed), then: test acc without/with BN re-estimation, BN-statistics error,
    final share of oscillating / frozen weights, and the frequency histogram."""
    from qatlab.quant import reestimate_bn
    from qatlab.train import RunConfig, evaluate
    from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint
    from qatlab.train.runner import load_data

    summary = train_job(cfg_dict)
    cfg = RunConfig.from_dict(cfg_dict)
    path = cfg.run_dir / "analysis.json"
    if path.is_file():
        return json.loads(path.read_text())
    ckpt = load_checkpoint(cfg.run_dir / "ckpt.pt")
    model = model_from_checkpoint(ckpt, cfg.run_dir / "ckpt.pt").eval()
    data = load_data(cfg.data)
    from qatlab.data import make_loader

    batches = make_loader(data.train_eval, cfg.train.batch_size, shuffle=True, seed=1)
    report = reestimate_bn(model, batches, 50)
    after = evaluate(model, data.test, 512)
    freqs = torch.cat(
        [v.reshape(-1) for h in ckpt["hooks"] for k, v in h.items() if k.endswith("__freq")]
    )
    frozen = [v.reshape(-1) for h in ckpt["hooks"] for k, v in h.items() if k.endswith("__frozen")]
    row = {
        "model": cfg.model.name,
        "bits": f"W{cfg.quant.weight_bits}A{cfg.quant.act_bits}",
        "method": cfg.method.name,
        "seed": cfg.train.seed,
        "acc": summary["test_acc"],
        "acc_bn": after["acc"],
        "osc_share": float((freqs > THRESHOLD).float().mean()),
        "frozen_share": float(torch.cat(frozen).float().mean()) if frozen else None,
        "bn_mean_err": _avg([r["mean"] for r in report.values()]),
        "bn_var_err": _avg([r["var"] for r in report.values()]),
        "hist": torch.histc(freqs, bins=25, min=0.0, max=HIST_MAX).tolist(),
        "wall_time_s": summary["wall_time_s"],
    }
    write_json(path, row)
    return row


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main(out: Path, runs: Path, seeds: int = 3, processes: int = 2, quick: bool = False) -> str:
    start = time.perf_counter()
    float_epochs, qat_epochs = (3, 2) if quick else (15, 8)
    seed_list = list(range(seeds))
    floats = [float_config(m, s, runs, float_epochs) for m in MODELS for s in seed_list]
    float_summaries = run_jobs([(train_job, c) for c in floats], processes, "float")
    qats = [
        qat_config(m, b, meth, s, runs, qat_epochs)
        for m in MODELS
        for b in BITS
        for meth in METHODS
        for s in seed_list
    ]
    rows = run_jobs([(analyse, c) for c in qats], processes, "qat")
    wall = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    table = mean_std(
        rows,
        ["model", "bits", "method"],
        ["acc", "acc_bn", "osc_share", "frozen_share", "bn_mean_err", "bn_var_err"],
    )
    float_rows = mean_std(
        [
            {"model": c["model"]["name"], "acc": s["test_acc"]}
            for c, s in zip(floats, float_summaries, strict=True)
        ],
        ["model"],
        ["acc"],
    )
    _plots(rows, runs, qats, out)
    train_s = sum(r["wall_time_s"] for r in rows) + sum(s["wall_time_s"] for s in float_summaries)
    text = _markdown(table, float_rows, seeds, float_epochs, qat_epochs, wall, quick, train_s)
    text += "\n## Do the paper's claims hold here?\n\n" + "\n".join(_verdict(table)) + "\n"
    (out / "oscillations.md").write_text(text)
    write_json(out / "oscillations.json", {"rows": rows, "wall_time_s": wall})
    return text


def _plots(rows, runs: Path, qats, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qatlab.train.metrics import read_jsonl

    fig, axes = plt.subplots(1, len(BITS), figsize=(10, 3.6), sharey=True)
    for ax, bits in zip(axes, BITS, strict=True):
        for method in METHODS:
            curves = []
            for c in qats:
                if (
                    c["model"]["name"] == "mobilenetv2"
                    and c["quant"]["weight_bits"] == bits
                    and c["method"]["name"] == method
                ):
                    recs = [
                        r
                        for r in read_jsonl(Path(c["out_dir"]) / c["name"] / "metrics.jsonl")
                        if "osc_share" in r
                    ]
                    curves.append([(r["step"], r["osc_share"]) for r in recs])
            n = min(len(cv) for cv in curves)
            steps = [curves[0][i][0] for i in range(n)]
            mean = [sum(cv[i][1] for cv in curves) / len(curves) * 100 for i in range(n)]
            ax.plot(steps, mean, label=method)
        ax.set_title(f"mobilenetv2 W{bits}A{bits}")
        ax.set_xlabel("training step")
    axes[0].set_ylabel(f"weights with f > {THRESHOLD} (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "oscillations_share.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    edges = [i * HIST_MAX / 25 for i in range(26)]
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
    for method in METHODS:
        hist = [
            r["hist"]
            for r in rows
            if r["model"] == "mobilenetv2" and r["bits"] == "W3A3" and r["method"] == method
        ]
        total = [sum(h[i] for h in hist) for i in range(25)]
        ax.plot(centers, [max(t, 0.5) for t in total], marker="o", ms=3, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("oscillation frequency f")
    ax.set_ylabel("weights (all seeds)")
    ax.set_title("mobilenetv2 W3A3: frequency histogram at the end of QAT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "oscillations_hist.png", dpi=120)
    plt.close(fig)


def _verdict(table) -> list[str]:
    """Plain sentences from the numbers: effect on oscillations, accuracy, BN re-estimation."""
    cell = {(r["model"], r["bits"], r["method"]): r for r in table}
    lines = []
    for model in MODELS:
        for bits in (f"W{b}A{b}" for b in BITS):
            lsq, damp, frz = (cell[(model, bits, m)] for m in METHODS)
            parts = [
                f"- **{model} {bits}**: oscillating weights at the end "
                f"{lsq['osc_share'][0] * 100:.2f}% (LSQ) vs {damp['osc_share'][0] * 100:.2f}% "
                f"(dampening); freezing froze {frz['frozen_share'][0] * 100:.2f}%."
            ]
            for name, r in (("dampening", damp), ("freezing", frz)):
                delta = r["acc"][0] - lsq["acc"][0]
                noise = max(r["acc"][1], lsq["acc"][1])
                verdict = "beats" if delta > noise else "loses to" if -delta > noise else "ties"
                parts.append(
                    f"{name} {verdict} LSQ ({delta * 100:+.1f} points, seed std {noise * 100:.1f})."
                )
            if lsq["bn_mean_err"] is not None:
                gain = lsq["acc_bn"][0] - lsq["acc"][0]
                parts.append(
                    f"BN re-estimation changes LSQ accuracy by {gain * 100:+.1f} points "
                    f"(running means were off by {lsq['bn_mean_err'][0] * 100:.1f}%)."
                )
            lines.append(" ".join(parts))
    cells = [
        (
            cell[(m, f"W{b}A{b}", "track")],
            cell[(m, f"W{b}A{b}", "dampen")],
            cell[(m, f"W{b}A{b}", "freeze")],
        )
        for m in MODELS
        for b in BITS
    ]
    reduced = sum(d["osc_share"][0] < t["osc_share"][0] for t, d, _ in cells)
    wins = sum(
        r["acc"][0] - t["acc"][0] > max(r["acc"][1], t["acc"][1])
        for t, d, f in cells
        for r in (d, f)
    )
    lines += [
        "",
        f"Dampening lowers the final share of oscillating weights in {reduced}/{len(cells)} "
        f"settings; dampening or freezing beats LSQ by more than the seed spread in "
        f"{wins}/{2 * len(cells)} comparisons. The paper's accuracy claims (both methods beat "
        "LSQ at W4A4 and W3A3; BN re-estimation recovers much of the loss) come from long "
        "ImageNet training of MobileNetV2/EfficientNet, where oscillating weights persist for "
        "~10^5 steps and corrupt BN statistics; in these short MNIST-1D runs about 1% of the "
        "weights oscillate, and where the effects are below the seed spread the claims are "
        "neither contradicted nor reproduced at this scale.",
    ]
    return lines


def _markdown(table, float_rows, seeds, float_epochs, qat_epochs, wall, quick, train_s) -> str:
    cols = [
        ("model", "model"),
        ("bits", "bits"),
        ("method", "method"),
        ("acc", "test acc %"),
        ("acc_bn", "test acc % (BN re-est.)"),
        ("osc_share", "oscillating %"),
        ("frozen_share", "frozen %"),
        ("bn_mean_err", "BN mean err %"),
        ("bn_var_err", "BN var err %"),
    ]
    lines = [
        "# Weight oscillations on MNIST-1D (Nagel et al., ICML 2022)",
        "",
        "Regenerate: `python -m qatlab.compare oscillations` "
        f"({'--quick, ' if quick else ''}seeds 0..{seeds - 1}, {seeds} seeds; "
        f"training time summed over all runs {train_s / 60:.1f} min, run as 2 worker processes "
        f"of 1 thread on 2 CPU cores; this invocation {wall / 60:.1f} min, reusing finished "
        "runs).",
        "",
        f"Setup: float pre-training ({float_epochs} epochs, Adam 3e-3, cosine), then LSQ QAT "
        f"from the best float checkpoint ({qat_epochs} epochs, Adam 1e-3 for weights, Adam 1e-5 "
        "for step sizes, cosine), MNIST-1D 10,000 samples (7,200 train / 800 val / 2,000 test). "
        "Grids: signed full grid for weights, unsigned for post-ReLU inputs, per-tensor; first "
        "layer 8-bit weights + float input, last layer 8-bit weights + 8-bit input. "
        f"Oscillation frequency EMA momentum m = {MOMENTUM} (Nagel: 0.001, for 100x longer "
        f"runs); 'oscillating' = f > {THRESHOLD}, over the tracked (non-8-bit) layers. "
        "Dampening: lambda_max 0.1, kernel_mean, off for the first 25% then cosine. Freezing: "
        "threshold off for 25%, then cosine 0.1 -> 0.01 (4 bit) / 0.011 (3 bit). "
        "BN re-estimation: 50 training batches, cumulative average; 'BN err' = relative L2 "
        "change of running mean/var, i.e. how stale the statistics were. "
        "Test accuracy is that of the final model (no best-epoch selection); "
        "mean ± std over seeds.",
        "",
        "Float baselines: "
        + ", ".join(
            f"{r['model']} {r['acc'][0] * 100:.1f} ± {r['acc'][1] * 100:.1f}%" for r in float_rows
        ),
        "",
        markdown_table(table, cols),
        "",
        "![oscillating share over training](oscillations_share.png)",
        "",
        "![frequency histogram](oscillations_hist.png)",
        "",
    ]
    return "\n".join(lines)
