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
    p.add_argument("--device", default="auto", help="auto (the GPU if any), cpu or cuda")
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
    p.add_argument("--device", default="auto", help="auto (the GPU if any), cpu or cuda")
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
        "measure",
        help="measure a trained run: generalization gap, noise, flatness, landscapes ...",
        description="Run registered measures on a run folder (its best.pt when the run "
        "restored its best epoch, else ckpt.pt) or on one checkpoint; merge their numbers into "
        "measures.json and write their plots (PNG) next to it, in the run folder by default. "
        "Measures: " + ", ".join(_measures()) + ".",
    )
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT", help="a run folder or a checkpoint")
    p.add_argument(
        "--what",
        default="gap,noise,flatness",
        help="comma-separated measures (default gap,noise,flatness), e.g. "
        "gap,noise,flatness,sharpness,bounds,landscape,corruptions",
    )
    p.add_argument("--bits", help="noise: bit widths of the step-size plot (default 8,4,2)")
    p.add_argument(
        "--subset", type=int, help="training samples of searches and landscapes (default 2048)"
    )
    p.add_argument("--seed", type=int, help="seed of every random choice (default: the run's)")
    p.add_argument("--out", help="folder for measures.json and plots (default: the run folder)")
    p.add_argument("--data-dir", help="where the dataset lives now (if it moved)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="MEASURE.OPTION=VALUE",
        help="a measure's option, e.g. flatness.draws=5, landscape.dims=2 (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser(
        "export",
        help="export a trained model to ONNX (runs in ONNX Runtime) or to integer weights",
        description="Export a run's model (RUN_DIR: its best.pt, else ckpt.pt) or a checkpoint. "
        "onnx: QuantizeLinear/DequantizeLinear with the quantizer's integer weights, BatchNorm "
        "folded, checked by onnx.checker; input 'input', output 'output'. int: int8 weights, "
        "step sizes and bit widths per layer in a weights_only torch file plus a JSON manifest, "
        "for custom runtimes.",
    )
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run folder or a checkpoint")
    p.add_argument("--format", default="onnx", choices=("onnx", "int"), help="default: onnx")
    p.add_argument(
        "--out",
        help="output file (default: beside the checkpoint, best.onnx or best.int.pt, whose "
        "manifest is best.int.json)",
    )
    p.add_argument(
        "--qdq-only",
        action="store_true",
        help="onnx: write every layer as DequantizeLinear + float Conv/Gemm (no ConvInteger/"
        "MatMulInteger), for runtimes that only read QDQ graphs",
    )
    p.set_defaults(func=cmd_export)

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
    p.add_argument(
        "--device",
        help="auto, cpu or cuda for every cell's training and follow-ups (default: each "
        "cell's train.device); not part of the grid, so a comparison resumes on another device",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells and their status (new, partial, done, failed; 'waits': it uses a "
        "value a selecting stage has not chosen yet), run nothing",
    )
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
        help="rebuild a comparison's report from its stored results, or publish it as a page",
        description="Rewrite report.md, report.html, results.csv/.jsonl and plots of a "
        "comparison folder from the results stored there (nothing is trained). With --page "
        "docs/results/NAME.md: publish it instead, as that page plus the folder "
        "docs/results/NAME/ holding the stored results it is made of (no checkpoints) and its "
        "CSV/JSON/PNG files; a hand-written docs/results/NAME/notes.md goes into the page "
        "after its generated header. DIR may also be such a published folder: then its page "
        "and files are rebuilt from it alone, byte for byte.",
    )
    p.add_argument(
        "dir", metavar="DIR", help="a folder written by qatlab compare, or a published folder"
    )
    p.add_argument(
        "--page",
        metavar="PAGE.md",
        help="publish DIR as this page (e.g. docs/results/NAME.md) and the folder beside it",
    )
    p.add_argument("--title", help="--page: the page's title (default: the grid's name)")
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
    _check_flag_bits("--wbits", args.wbits)
    _check_flag_bits("--abits", args.abits)
    _check_flag_bits("--target-bits", args.target_bits)
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
        device=args.device,
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
    from qatlab.train.distributed import resolve_device
    from qatlab.train.metrics import write_csv, write_json
    from qatlab.train.runner import checkpoint_data, ptq_sweep

    bits = _bit_list(args.bits)
    for b in bits:
        _check_flag_bits("--bits", b)
    _check_flag_bits("--abits", args.abits)
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
    device = resolve_device(args.device)
    ckpt_path = Path(args.checkpoint)
    prefix = Path(args.out) if args.out else ckpt_path.parent / f"ptq-{ckpt_path.stem}"
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path).to(device)
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


def _measures() -> list[str]:
    from qatlab.measure import MEASURES

    return sorted(MEASURES)


def cmd_measure(args: argparse.Namespace) -> int:
    from qatlab.measure import get_measure
    from qatlab.train.config import parse_override
    from qatlab.train.context import measure_run

    what = [w.strip() for w in args.what.split(",") if w.strip()]
    for name in what:  # unknown names first: one line with a did-you-mean
        get_measure(name)
    options: dict[str, dict[str, Any]] = {}
    for item in args.overrides:
        key, value = parse_override(item)
        name, _, option = key.partition(".")
        if not option:
            raise ConfigError(
                f"--set takes MEASURE.OPTION=VALUE, e.g. flatness.draws=5; got {item!r}"
            )
        options.setdefault(name, {})[option] = value
    if args.bits is not None:
        if "noise" not in what:
            raise ConfigError("--bits sets the widths of the noise measure: add noise to --what")
        options.setdefault("noise", {})["bits"] = _bit_list(args.bits)
    if args.subset is not None:
        if args.subset < 0:
            raise ConfigError(
                f"--subset must be >= 0 (0 = the whole training set), got {args.subset}"
            )
        for name in what:
            if "subset" in get_measure(name).options and name != "corruptions":
                options.setdefault(name, {}).setdefault("subset", args.subset)

    def report(name: str, result: dict[str, Any], seconds: float) -> None:
        numbers = [
            f"{k} {v:.4g}"
            for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        shown = ", ".join(numbers[:8]) + (", ..." if len(numbers) > 8 else "")
        print(f"{name} ({seconds:.1f}s): {shown or 'no numbers'}", flush=True)

    doc = measure_run(
        args.path,
        what,
        options=options,
        seed=args.seed,
        out=args.out,
        progress=not args.quiet,
        data_dir=args.data_dir,
        report=report,
    )
    out = Path(args.out) if args.out else Path(doc["checkpoint"]).parent
    print(f"wrote {out / 'measures.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from qatlab.errors import CheckpointError
    from qatlab.export import to_integer, to_onnx
    from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint

    source = Path(args.source)
    ckpt_path = source
    if source.is_dir():
        found = [source / n for n in ("best.pt", "ckpt.pt") if (source / n).is_file()]
        if not found:
            raise CheckpointError(
                f"{source} holds no best.pt or ckpt.pt; pass a run folder written by qatlab "
                "train, or a checkpoint file"
            )
        ckpt_path = found[0]
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path)
    spec = ckpt["model_spec"]
    suffix = ".onnx" if args.format == "onnx" else ".int.pt"
    out = Path(args.out) if args.out else ckpt_path.with_name(ckpt_path.stem + suffix)
    if args.format == "onnx":
        example = torch.zeros(1, *spec["input_shape"])
        report = to_onnx(model, example, out, integer_ops=not args.qdq_only)
        for line in report.lines():
            print(line)
        print(f"wrote {out}")
    else:
        tensors, manifest = to_integer(model, out, spec)
        print(f"wrote {tensors} and {manifest}")
    return 0


def _presets() -> list[str]:
    from importlib import resources

    folder = resources.files("qatlab.compare") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def cmd_compare(args: argparse.Namespace) -> int:
    from qatlab.compare.spec import load_grid

    grid = load_grid(args.grid, args.overrides)  # every cell checked before anything runs
    if args.device is not None:
        from qatlab.train.distributed import resolve_device

        resolve_device(args.device)  # cuda without a GPU: one line before anything runs
    out = Path(args.out) if args.out else Path("runs/compare") / grid.name
    if args.dry_run:
        from qatlab.compare.engine import cell_status, prepare_folder, waiting

        prepare_folder(out, grid, args.grid, create=False)
        waits = waiting(grid, out)
        for cell in grid.cells:
            if cell.name in waits:
                print(f"{'waits':8}{cell.name}  (for selection of stage {waits[cell.name]})")
                continue
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
        device=getattr(args, "device", None),
    )
    table = build_report(out)
    print(table)
    failed = f", {counts['failed']} failed (see the report)" if counts["failed"] else ""
    done = f"{counts['done']}/{len(grid.cells)} cells finished{failed}"
    print(f"{done}; report: {out / 'report.html'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qatlab.compare.report import PUBLISHED, build_report, publish

    if args.page:
        page = publish(args.dir, args.page, title=args.title)
        print(f"page: {page}; its data: {Path(args.page).with_suffix('')}")
        return 0
    if args.title:
        raise ConfigError("--title goes with --page (the title of a published page)")
    table = build_report(args.dir)
    if (Path(args.dir) / PUBLISHED).is_file():
        print(f"rebuilt the published folder {args.dir} and its page")
        return 0
    print(table)
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
    args = None
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
        print(f"qatlab: interrupted; {_how_to_continue(args)}", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


def _how_to_continue(args: argparse.Namespace | None) -> str:
    """What continues the interrupted command: --resume for a training run, the same command
    again for a comparison or the demo (finished cells are kept), nothing else to resume."""
    func = getattr(args, "func", None)
    if func is cmd_train:
        return "continue the run with the same command plus --resume"
    if func in (cmd_compare, cmd_demo):
        return "run the same command again to continue (finished cells are kept)"
    return "nothing was written; run the command again"


def _check_flag_bits(flag: str, bits: int | str | None) -> None:
    """A bit-width flag outside 2..8 is refused naming the flag (before QuantConfig sees it)."""
    if isinstance(bits, int) and not 2 <= bits <= 8:
        raise ConfigError(f"{flag} must be an integer from 2 to 8, got {bits}")


def _fail(message: str) -> None:
    print("qatlab: error: " + " ".join(message.split()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
