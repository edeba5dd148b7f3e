"""Per-step cost of any registered training method, as a ratio to plain ``qat``, in one run.

Every row is built through the method registry (``qatlab.methods.build_hooks``) on the
reference net of ``common.py`` (LSQ W4A4 via ``qatlab.quantize`` + ``calibrate``; a float net
for float-only methods), gets its optimizer from ``qatlab.train.loop.build_optimizer`` (so
optimizer-wrapper methods are wrapped as in training) and is stepped with
``qatlab.train.loop.train_step`` (loss terms, wrapper ``step(closure)``, after-step callbacks).
Optimizer: SGD lr 0.01 momentum 0.9 on every parameter (quantizer steps included), constant
LR written into the param groups before each step, as the trainer does. Rows are stepped
interleaved (ABCD DCBA ...) on the same batch; the ratio to ``qat`` comes with the IQR of the
step-by-step ratios to the ``qat`` step run next to it.

Warm-up fractions are set to 0 unless given: an option named ``start``/``warmup``/... (see
``WARMUP_OPTIONS``) would otherwise keep the method idle during a short timing (the dampening
ramp, the freezing threshold). Which options were zeroed is printed under the table.

Examples::

    python benchmarks/method_overhead.py                          # all quantized methods
    python benchmarks/method_overhead.py --methods track,dampen,freeze --steps 40
    python benchmarks/method_overhead.py --methods saq --variant saq-every4=saq:every=4
    python benchmarks/method_overhead.py --set freeze.momentum=0.01 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from common import data, finish, header, interleaved, machine_info, reference_net, summarize
from common import quantized_reference as quantized_net

import qatlab
from qatlab.errors import ConfigError
from qatlab.methods import Hook, build_hooks, check_options, get_method, list_methods
from qatlab.train.config import TrainConfig, parse_override
from qatlab.train.loop import build_optimizer, train_step, transition_counter

BASELINE = "qat"
# options that delay a method's work by a fraction of training (or a number of steps)
WARMUP_OPTIONS = ("start", "warmup", "start_fraction", "warmup_fraction", "warmup_steps")
QUANT = qatlab.QuantConfig(weight_bits=4, act_bits=4)
TRAIN = TrainConfig(  # SGD on every parameter, step sizes included (as step_overhead.py)
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    quant_optimizer=None,
    quant_lr=None,
    act_quant_optimizer=None,
    act_quant_lr=None,
    progress=False,
)


@dataclass
class Row:
    """One timed variant: a label, the registered method and the options given for it."""

    label: str
    method: str
    given: dict[str, Any] = field(default_factory=dict)
    zeroed: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


def _parse_variant(text: str) -> Row:
    """``LABEL=METHOD[:KEY=VALUE,KEY=VALUE]`` -> a Row (values parsed as YAML)."""
    label, sep, rest = text.partition("=")
    if not sep or not label.strip() or not rest.strip():
        raise ConfigError(f"--variant expects LABEL=METHOD[:KEY=VALUE,...], got {text!r}")
    method, _, opts = rest.partition(":")
    row = Row(label.strip(), method.strip())
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, value = parse_override(item)
        row.given[key] = value
    return row


def plan(methods: str | None, variants: list[str], sets: list[str], keep_warmup: bool) -> list[Row]:
    """The rows to time: ``qat`` first, then the methods (default: float and every method that
    may run quantized), then the labelled variants; ``--set`` options and zeroed warm-ups
    applied, every option checked against the registry."""
    if methods is None:
        names = ["float"] + [
            m for m in list_methods() if get_method(m).needs_quant is not False and m != "float"
        ]
    else:
        names = [m.strip() for m in methods.split(",") if m.strip()]
    rows = [Row(BASELINE, BASELINE)] + [Row(m, m) for m in names if m != BASELINE]
    rows += [_parse_variant(v) for v in variants]
    labels = [r.label for r in rows]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"row labels must be unique; repeated: {', '.join(dupes)}")
    for row in rows:
        get_method(row.method)  # unknown name: one-line error with a suggestion
    by_label: dict[str, dict[str, Any]] = {}
    by_method: dict[str, dict[str, Any]] = {}
    for item in sets:
        key, value = parse_override(item)
        name, dot, option = key.partition(".")
        if not dot or not option:
            raise ConfigError(f"--set expects METHOD.OPTION=VALUE (or LABEL.OPTION), got {item!r}")
        if name in {r.method for r in rows}:
            by_method.setdefault(name, {})[option] = value
        elif name in labels:
            by_label.setdefault(name, {})[option] = value
        else:
            raise ConfigError(f"--set {key}: no row or method {name!r} in this run")
    for row in rows:
        # precedence: --set METHOD.OPTION < --variant options < --set LABEL.OPTION
        row.given = {**by_method.get(row.method, {}), **row.given, **by_label.get(row.label, {})}
        spec = get_method(row.method)
        resolved_given = {spec.aliases.get(k, k) for k in row.given}
        if not keep_warmup:
            for option in WARMUP_OPTIONS:
                default = spec.options.get(option)
                is_number = isinstance(default, int | float) and not isinstance(default, bool)
                if is_number and default and option not in resolved_given:
                    row.given[option] = type(default)(0)
                    row.zeroed.append(option)
        row.options = check_options(row.method, row.given)
    return rows


def _hook_parts(hooks: list[Hook]) -> str:
    """Which parts of the Hook interface the method's hooks override (loss, wrapper, after)."""
    parts = []
    for name, short in (("loss_term", "loss"), ("wrap_optimizer", "wrapper")):
        if any(getattr(type(h), name) is not getattr(Hook, name) for h in hooks):
            parts.append(short)
    if any(type(h).after_step is not Hook.after_step for h in hooks):
        parts.append("after")
    return ", ".join(parts) or "-"


def make_stepper(row: Row, x: torch.Tensor, y: torch.Tensor, total: int, log_transitions: bool):
    """Build ``row``'s model, hooks and optimizer; return (step function, hook parts)."""
    spec = get_method(row.method)
    if spec.needs_quant is False:
        torch.manual_seed(0)
        model, quant = reference_net().to(x.device).train(), None
    else:
        model, quant = quantized_net(x), QUANT
    hooks = build_hooks(row.method, row.options, model, quant, total)
    optimizer = build_optimizer(model, TRAIN, hooks)
    counter = transition_counter(model, hooks) if log_transitions else None

    def step(i: int) -> None:
        for group in optimizer.param_groups:  # the loop owns the LR (constant here)
            group["lr"] = group["initial_lr"]
        train_step(model, x, y, optimizer, hooks, i, total)
        if counter is not None:
            counter.update(model, i)

    return step, _hook_parts(hooks)


def _fmt(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def table(rows: list[Row], res: dict[str, dict], parts: dict[str, str]) -> str:
    lines = [
        "| row | method | options (non-default) | hooks | median step (ms) | IQR (ms) "
        "| ratio to qat | ratio of means | paired ratio IQR |",
        "|---|---|---|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        r = res[row.label]
        defaults = get_method(row.method).options
        changed = {k: v for k, v in row.options.items() if v != defaults[k]}
        lines.append(
            f"| {row.label} | {row.method} | {_fmt(changed)} | {parts[row.label]} "
            f"| {r['median_ms']:.1f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} "
            f"| {r['ratio']:.3f}x | {r['mean_ratio']:.3f}x "
            f"| {r['paired_ratio_q1']:.3f}-{r['paired_ratio_q3']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Per-step cost of registered training methods as a ratio to plain qat "
        "(interleaved, same net and batch, stepped by qatlab.train.loop.train_step).",
        epilog=f"registered methods: {', '.join(list_methods())}",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (qat is always timed, as the baseline); default: float "
        "and every method that may run quantized",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=METHOD[:K=V,...]",
        help="an extra row, e.g. saq-every4=saq:every=4 (repeatable)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME.OPTION=VALUE",
        help="an option for every row of METHOD (a variant's own options win), or for the "
        "variant row LABEL (repeatable)",
    )
    parser.add_argument(
        "--keep-warmup",
        action="store_true",
        help=f"keep the methods' warm-up options ({', '.join(WARMUP_OPTIONS)}) instead of 0",
    )
    parser.add_argument(
        "--log-transitions",
        action="store_true",
        help="also update the trainer's transition counter every step, as fit() does",
    )
    parser.add_argument("--steps", type=int, default=20, help="measured steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per row")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (quartiles of the paired ratios)")
    try:
        rows = plan(args.methods, args.variant, args.set, args.keep_warmup)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    info = machine_info(device)
    wall0 = time.perf_counter()
    print(header(info))
    x, y = data(args.batch, device)
    total = args.warmup + args.steps
    steps, parts = {}, {}
    for row in rows:
        try:
            steps[row.label], parts[row.label] = make_stepper(
                row, x, y, total, args.log_transitions
            )
        except ConfigError as exc:
            parser.error(f"{row.label}: {exc}")
    times, _ = interleaved(steps, args.steps, args.warmup, device)
    res = summarize(times, BASELINE)
    print(
        f"## Method overhead (batch {args.batch}, {args.steps} measured + {args.warmup} warm-up "
        f"steps per row, interleaved; LSQ W4A4, SGD)\n"
    )
    print(table(rows, res, parts))
    zeroed = [f"{r.label}: {', '.join(r.zeroed)}" for r in rows if r.zeroed]
    print(
        "\nhooks: parts of the Hook interface the method uses (loss term, optimizer wrapper, "
        "after-step). "
        + (
            f"Warm-up options set to 0 so the method works from the first step ({'; '.join(zeroed)}"
            "; --keep-warmup keeps them)."
            if zeroed
            else "No warm-up option set to 0."
        )
        + (" The trainer's transition counter runs in every row." if args.log_transitions else "")
    )
    finish(info, wall0)
    if args.json:
        out = {
            "machine": info,
            "args": vars(args),
            "rows": [
                {"label": r.label, "method": r.method, "options": r.options,
                 "zeroed": r.zeroed, "hooks": parts[r.label], **res[r.label]}
                for r in rows
            ],
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
