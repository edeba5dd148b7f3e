"""``qatlab demo``: float vs post-training-quantized vs QAT on MNIST-1D, in a few minutes.

Trains a float ``cnn1d``, quantizes it after training (PTQ at W4A4 and W8A8), fine-tunes an
LSQ W4A4 model from it (QAT), and writes a results table, training curves and accuracy bars.
Re-running replaces the previous demo results in the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatlab.quant import QuantConfig
from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint
from qatlab.train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from qatlab.train.loop import RUN_FILES
from qatlab.train.metrics import read_jsonl, write_csv, write_json
from qatlab.train.plots import plot_bars, plot_curves
from qatlab.train.runner import load_data, ptq_sweep, run

# (samples, float epochs, QAT epochs): the full demo takes ~2-3 minutes on 2 CPU cores
FULL = (10_000, 20, 8)
QUICK = (2_000, 4, 2)


def demo(
    out_dir: str | Path = "runs/demo",
    *,
    quick: bool = False,
    cache_dir: str | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Run the demo into ``out_dir``; return the result rows (also ``results.json``/``.csv``)."""
    out = Path(out_dir)
    samples, float_epochs, qat_epochs = QUICK if quick else FULL
    data_cfg = DataConfig(name="mnist1d", num_samples=samples, cache_dir=cache_dir)
    model_cfg = ModelConfig(name="cnn1d")

    def config(name: str, **kwargs) -> RunConfig:
        train = kwargs.pop("train")
        return RunConfig(
            name=name, out_dir=str(out), data=data_cfg, model=model_cfg, train=train, **kwargs
        ).validate()

    float_cfg = config(
        "float", train=TrainConfig(epochs=float_epochs, lr=3e-3, batch_size=128, progress=verbose)
    )
    _clear(float_cfg.run_dir)
    _say(verbose, f"== float cnn1d on MNIST-1D ({samples} samples, {float_epochs} epochs)")
    float_summary = run(float_cfg, verbose=verbose)
    float_ckpt = float_cfg.run_dir / "best.pt"

    _say(verbose, "== post-training quantization of the float model (W4A4, W8A8)")
    float_model = model_from_checkpoint(load_checkpoint(float_ckpt), float_ckpt)
    ptq_rows = ptq_sweep(float_model, load_data(data_cfg), [4, 8], act_bits="same")

    qat_cfg = config(
        "qat-w4a4",
        quant=QuantConfig(weight_bits=4, act_bits=4),
        init_from=str(float_ckpt),
        train=TrainConfig(epochs=qat_epochs, lr=1e-3, batch_size=128, progress=verbose),
    )
    _clear(qat_cfg.run_dir)
    _say(verbose, f"== LSQ QAT W4A4, fine-tuned from the float model ({qat_epochs} epochs)")
    qat_summary = run(qat_cfg, verbose=verbose)

    rows = [
        {
            "method": "float",
            "bits": "float",
            "test_acc": float_summary["test_acc"],
            "wall_time_s": float_summary["wall_time_s"],
        }
    ]
    rows += [
        {"method": "ptq", "bits": r["bits"], "test_acc": r["acc"], "wall_time_s": r["time_s"]}
        for r in ptq_rows
        if r["method"] == "ptq"
    ]
    rows.append(
        {
            "method": "qat (lsq, from float)",
            "bits": "W4A4",
            "test_acc": qat_summary["test_acc"],
            "wall_time_s": qat_summary["wall_time_s"],
        }
    )
    write_json(out / "results.json", rows)
    write_csv(out / "results.csv", rows)
    plot_curves(
        {
            "float": read_jsonl(float_cfg.run_dir / "metrics.jsonl"),
            "qat W4A4": read_jsonl(qat_cfg.run_dir / "metrics.jsonl"),
        },
        out / "curves.png",
        title="MNIST-1D cnn1d",
    )
    labels = ["float"] + [f"{r['method'].split(' ')[0]} {r['bits']}" for r in rows[1:]]
    plot_bars(
        [{"label": label, "acc": r["test_acc"]} for label, r in zip(labels, rows, strict=True)],
        out / "accuracy.png",
        title="MNIST-1D cnn1d: test accuracy",
    )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The demo's rows as an aligned text table."""
    lines = [f"{'method':<24}{'bits':<8}{'test acc':>10}{'wall time':>12}"]
    for r in rows:
        lines.append(
            f"{r['method']:<24}{r['bits']:<8}{100 * r['test_acc']:>9.2f}%{r['wall_time_s']:>11.1f}s"
        )
    return "\n".join(lines)


def _clear(run_dir: Path) -> None:
    """Remove the files a previous demo run wrote there (and nothing else)."""
    for name in (*RUN_FILES, "config.yaml", "curves.png"):
        (run_dir / name).unlink(missing_ok=True)


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(text, flush=True)
