"""The ``qatlab`` command: parses arguments and calls the library (:mod:`qatlab.train`).

Any bad input ends as one line on stderr, ``qatlab: error: ...``, and exit code 2; a diverging
training run ends the same way with exit code 3.
Multi-process training: ``torchrun --nproc_per_node 2 -m qatlab.cli train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qatlab.errors import ConfigError, TrainingDiverged

# generic method flags -> method option names (each method maps them to its own via aliases)
METHOD_FLAGS = {"lambda_": "lambda", "target_bits": "target_bits", "rho": "rho"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a ConfigError (one line, exit 2) instead of a usage dump."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --epoch is a typo, not --epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see '{self.prog} --help')")


# ----------------------------------------------------------------------------- parsers
def build_parser() -> argparse.ArgumentParser:
    """The full ``qatlab`` argument parser."""
    parser = _Parser(prog="qatlab", description="Quantization-aware training experiments.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="train a float or quantized model",
        description="Train a model from a YAML config and/or flags. Without --wbits (and no\n"
        "quant section in the config) the model trains in float.\n"
        "Precedence: config file < flags < --set.",
        epilog=_methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--name", help="run name: results go to OUT_DIR/NAME (default: derived)")
    p.add_argument("--out-dir", help="folder of runs (default: runs)")
    p.add_argument("--dataset", help="mnist1d, digits, cifar10, cifar100 or imagefolder")
    p.add_argument("--data-dir", help="folder holding the dataset (cifar, imagefolder)")
    p.add_argument("--num-samples", type=int, help="mnist1d: samples to generate")
    p.add_argument("--model", help="mlp5, cnn1d, resnet18, resnet20, mobilenetv2 or vit_tiny")
    p.add_argument("--wbits", type=int, help="weight bit width (2-8): quantization-aware training")
    p.add_argument("--abits", type=_abits, help="activation bit width, or 'none' (default: 4)")
    p.add_argument("--weights-only", action="store_true", help="quantize weights only")
    p.add_argument("--method", help="training method (see the list below)")
    p.add_argument("--lambda", dest="lambda_", type=float, help="method option 'lambda'")
    p.add_argument("--target-bits", type=int, help="method option 'target_bits'")
    p.add_argument("--rho", type=float, help="method option 'rho'")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the training step (train.compile; the first step compiles)",
    )
    p.add_argument("--init-from", metavar="CKPT", help="start from this checkpoint's weights")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue OUT_DIR/NAME from its ckpt.pt (its config.yaml is the base config "
        "when --config is not given); refused, with nothing changed, when there is no run "
        "to continue",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. train.lr=0.01, method.lambda_max=0.1, "
        "quant=null (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint",
        description="Accuracy and loss of a saved model on one split; prints "
        "them and writes a JSON file.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="ckpt.pt or best.pt")
    p.add_argument("--split", default="test", help="test, val or train (default: test)")
    p.add_argument(
        "--bn-reestimate",
        action="store_true",
        help="re-estimate BatchNorm statistics on 50 training batches first",
    )
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--data-dir", help="where the dataset lives now (if it moved)")
    p.add_argument("--out", help="JSON file to write (default: next to the checkpoint)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "ptq",
        help="post-training quantize a checkpoint at several bit widths",
        description="Accuracy of a checkpoint's float model post-training "
        "quantized at each bit width, next to its float accuracy (a QAT "
        "checkpoint is evaluated as trained too). Printed and saved as JSON+CSV.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--bits", default="2,3,4,8", help="weight bit widths, e.g. 2,3,4,8")
    p.add_argument(
        "--abits",
        type=_abits,
        default="same",
        help="activation bits: a width, 'same' as the weights (default), or 'none'",
    )
    p.add_argument("--weights-only", action="store_true", help="quantize weights only")
    p.add_argument("--calib-batches", type=int, default=4, help="calibration batches")
    p.add_argument("--split", default="test", help="test, val or train")
    p.add_argument("--bn-reestimate", action="store_true")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--data-dir")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="QuantConfig option for every PTQ model, e.g. weight_granularity=channel",
    )
    p.add_argument("--out", help="output prefix (default: ptq-<checkpoint> next to it)")
    p.set_defaults(func=cmd_ptq)

    p = sub.add_parser(
        "compare",
        help="run a comparison grid (methods x bits x seeds ...), resumable, with a report",
        description="Run every cell of a comparison grid (a YAML file or a preset: "
        + ", ".join(_presets())
        + ") into --out, then write report.md/report.html/results.csv there. Finished cells are "
        "never run again; a killed comparison resumes; a failed cell is recorded and the rest go "
        "on.",
    )
    p.add_argument("grid", metavar="GRID", help="grid YAML file or preset name")
    p.add_argument("--out", help="comparison folder (default: runs/compare/<grid name>)")
    p.add_argument("--workers", type=int, default=2, help="cells run in parallel (default 2)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores/workers)")
    p.add_argument("--backend", default="local", help="local (worker processes) or ray")
    p.add_argument("--address", help="ray: address of an existing cluster (default: local)")
    p.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
    p.add_argument("--retry-failed", action="store_true", help="run failed cells again")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the grid document, e.g. seeds=[0], base.train.epochs=2",
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "report",
        help="rebuild a comparison's report from its stored results",
        description="Rewrite report.md, report.html, results.csv/.jsonl and plots of a "
        "comparison folder from the results stored there (nothing is trained).",
    )
    p.add_argument("dir", metavar="DIR", help="a folder written by qatlab compare")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo",
        help="every registered method on MNIST-1D at W4A4/W3A3/W2A2, 2 seeds (a few minutes)",
        description="Run the 'demo' comparison preset (MNIST-1D, cnn1d, every registered method "
        "at its defaults, 2 seeds) and print its table and the path of report.html.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny version (seconds), for tests")
    p.add_argument("--cache-dir", help="where generated MNIST-1D is cached")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _methods_epilog() -> str:
    """``--method`` choices with their one-line descriptions and options, from the registry."""
    from qatlab.methods import METHODS

    lines = ["methods (--method NAME, options with --set method.OPTION=VALUE):"]
    for name, spec in sorted(METHODS.items()):
        lines.append(f"  {name:<9} {spec.description}")
        if spec.options:
            opts = ", ".join(f"{k}={v!r}" for k, v in spec.options.items())
            lines.append(
                textwrap.fill(opts, 96, initial_indent=" " * 14, subsequent_indent=" " * 14)
            )
    return "\n".join(lines)


def _abits(text: str) -> int | str:
    if text.lower() in ("none", "same"):
        return text.lower()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"activation bits must be an integer, 'same' or 'none', got {text!r}"
        ) from None


# ----------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from qatlab.train.runner import run

    cfg = config_from_args(args)
    run(cfg, resume=args.resume, verbose=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        print(f"results in {cfg.run_dir}")
    return 0


def config_from_args(args: argparse.Namespace):
    """The validated :class:`RunConfig` of ``qatlab train``: (saved config on --resume) <
    --config file < named flags < --set overrides."""
    from qatlab.train.config import load_config, merge, read_yaml, set_dotted

    data: dict[str, Any] = {}
    if args.resume and args.config is None and args.name:
        saved = Path(args.out_dir or "runs") / args.name / "config.yaml"
        if saved.is_file():
            data = read_yaml(saved)
    if args.config is not None:
        data = merge(data, read_yaml(args.config))
    quant_flag = args.abits is not None or args.weights_only
    if args.wbits is None and quant_flag and not data.get("quant"):
        raise ConfigError("--abits/--weights-only need --wbits (or a quant section in --config)")
    flags = {
        "name": args.name,
        "out_dir": args.out_dir,
        "data.name": args.dataset,
        "data.data_dir": args.data_dir,
        "data.num_samples": args.num_samples,
        "model.name": args.model,
        "quant.weight_bits": args.wbits,
        "method.name": args.method,
        "train.epochs": args.epochs,
        "train.lr": args.lr,
        "train.batch_size": args.batch_size,
        "train.seed": args.seed,
        "train.device": args.device,
        "train.compile": args.compile,
        "init_from": args.init_from,
    }
    flags.update({f"method.{opt}": getattr(args, attr) for attr, opt in METHOD_FLAGS.items()})
    if args.abits is not None:
        if args.abits == "same":
            raise ConfigError("train --abits takes an integer or 'none'")
        flags["quant.act_bits"] = None if args.abits == "none" else args.abits
    if args.weights_only:
        flags["quant.weights_only"] = True
    if args.quiet:
        flags["train.progress"] = False
    for key, value in flags.items():
        if value is not None or key == "quant.act_bits":
            set_dotted(data, key, value)
    return load_config(None, args.overrides, base=data)


def cmd_eval(args: argparse.Namespace) -> int:
    from qatlab.train.metrics import write_json
    from qatlab.train.runner import evaluate_checkpoint

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.parent / f"eval-{ckpt.stem}-{args.split}.json"
    result = evaluate_checkpoint(
        ckpt,
        split=args.split,
        bn_reestimate=args.bn_reestimate,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
    )
    write_json(out, result)
    print(
        f"{args.split} acc {result['acc']:.4f} loss {result['loss']:.4f} "
        f"({result['bits']}, epoch {result['epoch']})"
    )
    print(f"wrote {out}")
    return 0


def cmd_ptq(args: argparse.Namespace) -> int:
    from qatlab.quant import QuantConfig
    from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint
    from qatlab.train.config import parse_override
    from qatlab.train.metrics import write_csv, write_json
    from qatlab.train.runner import checkpoint_data, ptq_sweep

    bits = _bit_list(args.bits)
    act_bits = None if args.weights_only or args.abits == "none" else args.abits
    options = {}
    for item in args.overrides:
        key, value = parse_override(item)
        options[key.removeprefix("quant.")] = value
    for key in ("weight_bits", "act_bits", "weights_only"):
        if key in options:
            raise ConfigError(f"set {key} with --bits/--abits/--weights-only, not --set")
    for b in bits:  # every bit width and option is checked before any work
        a = b if act_bits == "same" else act_bits
        QuantConfig.from_dict(
            {"weight_bits": b, "act_bits": a, "weights_only": a is None, **options}
        )
    if args.calib_batches < 1:
        raise ConfigError(f"--calib-batches must be >= 1, got {args.calib_batches}")
    ckpt_path = Path(args.checkpoint)
    prefix = Path(args.out) if args.out else ckpt_path.parent / f"ptq-{ckpt_path.stem}"
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path)
    data = checkpoint_data(ckpt, ckpt_path, args.data_dir)
    rows = ptq_sweep(
        model,
        data,
        bits,
        act_bits=act_bits,
        split=args.split,
        calib_batches=args.calib_batches,
        batch_size=args.batch_size,
        bn_reestimate=args.bn_reestimate,
        quant_options=options,
    )
    write_json(
        prefix.with_name(prefix.name + ".json"),
        {"checkpoint": str(ckpt_path), "split": args.split, "rows": rows},
    )
    write_csv(prefix.with_name(prefix.name + ".csv"), rows)
    print(f"{'method':<10}{'bits':<8}{args.split + ' acc':>10}{'loss':>9}")
    for r in rows:
        print(f"{r['method']:<10}{r['bits']:<8}{100 * r['acc']:>9.2f}%{r['loss']:>9.4f}")
    print(f"wrote {prefix}.json and {prefix}.csv")
    return 0


def _presets() -> list[str]:
    from importlib import resources

    folder = resources.files("qatlab.compare") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def cmd_compare(args: argparse.Namespace) -> int:
    from qatlab.compare.spec import load_grid

    grid = load_grid(args.grid, args.overrides)  # every cell checked before anything runs
    out = Path(args.out) if args.out else Path("runs/compare") / grid.name
    if args.dry_run:
        from qatlab.compare.engine import cell_status, prepare_folder

        prepare_folder(out, grid, args.grid, create=False)
        for cell in grid.cells:
            after = f"  (after {cell.depends_on})" if cell.depends_on else ""
            print(f"{cell_status(out, cell.name):8}{cell.name}{after}")
        print(f"{len(grid.cells)} cells; folder {out}")
        return 0
    return _compare(grid, out, args.grid, args)


def _compare(grid, out: Path, source: str, args: argparse.Namespace) -> int:
    from qatlab.compare.engine import run_grid
    from qatlab.compare.report import build_report

    counts = run_grid(
        grid,
        out,
        source=source,
        workers=args.workers,
        backend=getattr(args, "backend", "local"),
        address=getattr(args, "address", None),
        threads=getattr(args, "threads", None),
        retry_failed=getattr(args, "retry_failed", False),
        progress=not args.quiet,
    )
    table = build_report(out)
    print(table)
    failed = f", {counts['failed']} failed (see the report)" if counts["failed"] else ""
    done = f"{counts['done']}/{len(grid.cells)} cells finished{failed}"
    print(f"{done}; report: {out / 'report.html'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qatlab.compare.report import build_report

    print(build_report(args.dir))
    print(f"report: {Path(args.dir) / 'report.html'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qatlab.compare.spec import load_grid

    overrides = []
    if args.quick:
        overrides += ["base.data.num_samples=1500", "base.train.epochs=1", "seeds=[0]"]
    if args.cache_dir:
        overrides.append(f"base.data.cache_dir={args.cache_dir}")
    grid = load_grid("demo", overrides)
    return _compare(grid, Path(args.out), "demo", args)


def _bit_list(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(
            f"--bits must be comma-separated integers like 2,3,4,8; got {text!r}"
        ) from None
    if not bits:
        raise ConfigError("--bits needs at least one bit width, e.g. 4 or 2,3,4,8")
    return bits


# ----------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qatlab`` command; return its exit code (0 ok, 2 bad input or a run folder that
    is in use / holds a run / has nothing to resume, 3 training diverged, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ConfigError as exc:
        _fail(str(exc))
        return 2
    except TrainingDiverged as exc:  # the run stopped; no best.pt of non-finite weights
        _fail(str(exc))
        return 3
    except OSError as exc:  # unwritable output folder, disk full...
        where = f" {exc.filename}" if exc.filename else ""
        _fail(f"cannot access{where}: {exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        print("qatlab: interrupted; continue a training run with --resume", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


def _fail(message: str) -> None:
    print("qatlab: error: " + " ".join(message.split()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
