"""Study: transition-rate scheduling with TALR (Lee et al.) on MNIST-1D.

Float pre-training, then LSQ QAT at W2A2 and W3A3 for ``cnn1d`` and ``mlp5`` with four arms:
SGD (momentum) and Adam with a cosine LR, and their TALR versions (SGD-T, Adam-T: the latent
weights' LR is ``U_t``, driven by a cosine target rate; weight step sizes frozen); plus a
``lambda`` sweep of SGD-T and Adam-T on cnn1d W2A2. Every run logs the transition rate each
step and, per epoch, the share of weights that flipped at least once.
``python -m qatlab.compare talr --jobs 1``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatlab.compare.grid import run_jobs, train_job
from qatlab.compare.report import markdown_table, mean_std
from qatlab.methods.base import Hook
from qatlab.quant.transitions import TransitionCounter, _key
from qatlab.train.metrics import write_json

MODELS = ("cnn1d", "mlp5")
BITS = (2, 3)
ARMS = {  # name: (optimizer, method, LR)
    "SGD": ("sgd", "qat", 0.02),
    "SGD-T": ("sgd", "talr", 0.02),
    "Adam": ("adam", "qat", 1e-3),
    "Adam-T": ("adam", "talr", 1e-3),
}
LAMBDA = 5e-3  # the spec's default
SWEEP = (1e-3, 2e-2)  # besides LAMBDA, on SWEEP_SETTING (two more values: the time budget)
SWEEP_SETTING = ("cnn1d", 2)
FIGURE_SETTING = ("cnn1d", 2)
MOMENTUM = 0.99  # K_t momentum (the paper's)
ETA_MULT = 10.0  # an extra arm: the controller gain eta = 10 x the initial LR (short runs)


# ----------------------------------------------------------------------------- flip log
class FlipLog(nn.Module, Hook):
    """Logs the transition rate ``tr`` (k_t) every ``log_every`` steps and, at the end of each
    epoch, ``tr_epoch`` (mean k_t over the epoch) and ``flip_share_epoch`` (share of counted
    weights whose integer changed at least once in the epoch). Reuses a method's counter
    (``hook.transitions``) when there is one, so TALR and this log see the same k_t."""

    def __init__(
        self, model: nn.Module, hooks: list, steps_per_epoch: int, log_every: int = 1
    ) -> None:
        super().__init__()
        shared = [h.transitions for h in hooks if hasattr(h, "transitions")]
        if shared:
            self._shared = shared[:1]  # a list: not a submodule (its owner saves it)
        else:
            self._shared = []
            self.own = TransitionCounter(model)
        self.steps_per_epoch = steps_per_epoch
        self.log_every = log_every
        for name in self.counter.layer_names:
            shape = self.counter.previous(name).shape
            self.register_buffer(f"{_key(name)}__moved", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("k_sum", torch.zeros((), dtype=torch.float64))

    @property
    def counter(self) -> TransitionCounter:
        return self._shared[0] if self._shared else self.own

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict | None:
        moves = self.counter.update(model, step)
        for name, d in moves.direction.items():
            getattr(self, f"{_key(name)}__moved").logical_or_(d != 0)
        k = moves.rate()
        self.k_sum += k
        out = {"tr": k} if self.log_every and (step + 1) % self.log_every == 0 else {}
        if (step + 1) % self.steps_per_epoch == 0:
            masks = [getattr(self, f"{_key(n)}__moved") for n in self.counter.layer_names]
            moved = sum(int(m.sum()) for m in masks)
            out["flip_share_epoch"] = moved / max(sum(m.numel() for m in masks), 1)
            out["tr_epoch"] = float(self.k_sum) / self.steps_per_epoch
            for m in masks:
                m.zero_()
            self.k_sum.zero_()
        return out or None


# ----------------------------------------------------------------------------- configs
def float_config(model: str, seed: int, runs: Path, epochs: int) -> dict[str, Any]:
    return {
        "name": f"talr-{model}-float-s{seed}",
        "out_dir": str(runs),
        "data": {"name": "mnist1d"},
        "model": {"name": model},
        "train": {"epochs": epochs, "lr": 3e-3, "seed": seed, "progress": False},
    }


def qat_config(
    model: str,
    bits: int,
    arm: str,
    seed: int,
    runs: Path,
    epochs: int,
    lam: float = LAMBDA,
    eta_mult: float = 1.0,
) -> dict[str, Any]:
    optimizer, method, lr = ARMS[arm]
    tag = arm if method == "qat" else f"{arm}-l{lam:g}"
    if eta_mult != 1.0:
        tag += f"-eta{eta_mult:g}x"
    cfg: dict[str, Any] = {
        "name": f"talr-{model}-w{bits}a{bits}-{tag}-s{seed}",
        "out_dir": str(runs),
        "data": {"name": "mnist1d"},
        "model": {"name": model},
        "quant": {"weight_bits": bits, "act_bits": bits},
        "train": {
            "epochs": epochs,
            "optimizer": optimizer,
            "lr": lr,
            "momentum": 0.9,
            "seed": seed,
            "progress": False,
            "restore_best": False,  # final-epoch numbers in the summary; best.pt analysed apart
            "log_every": 5,  # the LR curve for the figure
        },
        "method": {"name": method},
        "init_from": str(runs / f"talr-{model}-float-s{seed}" / "best.pt"),
    }
    if method == "talr":
        cfg["method"].update(lam=lam, momentum=MOMENTUM, log_every=5)
        if eta_mult != 1.0:
            cfg["method"]["eta"] = eta_mult * lr
    return cfg


# ----------------------------------------------------------------------------- one run
def train_logged(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume, or read back) one QAT run with a :class:`FlipLog` next to its hooks."""
    from qatlab.train import RunConfig, fit
    from qatlab.train.loop import count_steps
    from qatlab.train.runner import build

    cfg = RunConfig.from_dict(cfg_dict)
    summary_path = cfg.run_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    resume = (cfg.run_dir / "ckpt.pt").is_file()
    if not resume:  # killed before its first checkpoint: start it again
        for name in ("metrics.jsonl", "best.pt", "config.yaml"):
            (cfg.run_dir / name).unlink(missing_ok=True)
    model, data, hooks = build(cfg, resume=resume)
    log = FlipLog(model, hooks, count_steps(data, cfg.train, 1))
    return fit(
        model,
        data,
        cfg.train,
        hooks=[*hooks, log],
        run_dir=cfg.run_dir,
        resume=resume,
        run_config=cfg,
    )


def analyse(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Train if needed; final-epoch and early-stopped (best val) test accuracy, last-epoch
    flip share and mean transition rate."""
    from qatlab.measure.accuracy import evaluate
    from qatlab.train import RunConfig
    from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint
    from qatlab.train.metrics import read_jsonl
    from qatlab.train.runner import load_data

    summary = train_logged(cfg_dict)
    cfg = RunConfig.from_dict(cfg_dict)
    path = cfg.run_dir / "analysis.json"
    if path.is_file():
        return json.loads(path.read_text())
    best = model_from_checkpoint(load_checkpoint(cfg.run_dir / "best.pt")).eval()
    early = evaluate(best, load_data(cfg.data).test, 512)
    recs = read_jsonl(cfg.run_dir / "metrics.jsonl")
    epochs = [r for r in recs if "flip_share_epoch" in r]
    optimizer = cfg.train.optimizer
    arm = ("SGD" if optimizer == "sgd" else "Adam") + ("-T" if cfg.method.name == "talr" else "")
    row = {
        "model": cfg.model.name,
        "bits": f"W{cfg.quant.weight_bits}A{cfg.quant.act_bits}",
        "arm": arm,
        "lam": cfg.method.options.get("lam"),
        "seed": cfg.train.seed,
        "acc": summary["test_acc"],
        "acc_early": early["acc"],
        "best_epoch": summary["best_epoch"],
        "flip_last": epochs[-1]["flip_share_epoch"] if epochs else None,
        "tr_last": epochs[-1]["tr_epoch"] if epochs else None,
        "tr_first": epochs[0]["tr_epoch"] if epochs else None,
        "wall_time_s": summary["wall_time_s"],
    }
    write_json(path, row)
    return row


def _eta_label(cfg: dict[str, Any]) -> str | None:
    """``= LR`` (the default eta) or ``<k> x LR`` for a TALR run's config; None otherwise."""
    if cfg["method"]["name"] != "talr":
        return None
    eta = cfg["method"].get("eta") or cfg["train"]["lr"]
    return "= LR" if eta == cfg["train"]["lr"] else f"{eta / cfg['train']['lr']:g} x LR"


# ----------------------------------------------------------------------------- main
def main(out: Path, runs: Path, seeds: int = 3, processes: int = 1, quick: bool = False) -> str:
    start = time.perf_counter()
    float_epochs, qat_epochs = (2, 2) if quick else (15, 20)
    seed_list = list(range(seeds))
    floats = [float_config(m, s, runs, float_epochs) for m in MODELS for s in seed_list]
    float_summaries = run_jobs([(train_job, c) for c in floats], processes, "float")
    main_cfgs = [
        qat_config(m, b, arm, s, runs, qat_epochs)
        for m in MODELS
        for b in BITS
        for arm in ARMS
        for s in seed_list
    ]
    sweep_cfgs = [
        qat_config(*SWEEP_SETTING, arm, s, runs, qat_epochs, lam)
        for lam in SWEEP
        for arm in ("SGD-T", "Adam-T")
        for s in seed_list
    ] + [
        qat_config(*SWEEP_SETTING, arm, s, runs, qat_epochs, LAMBDA, ETA_MULT)
        for arm in ("SGD-T", "Adam-T")
        for s in seed_list
    ]
    rows = run_jobs([(analyse, c) for c in main_cfgs + sweep_cfgs], processes, "qat")
    rows = [{**r, "eta": _eta_label(c)} for r, c in zip(rows, main_cfgs + sweep_cfgs, strict=True)]
    wall = time.perf_counter() - start
    main_rows = rows[: len(main_cfgs)]
    metrics = ["acc", "acc_early", "flip_last", "tr_last", "tr_first"]
    table = mean_std(main_rows, ["model", "bits", "arm"], metrics)
    sweep_rows = [r for r in rows if r["lam"] is not None]
    sweep_setting = [r for r in sweep_rows if (r["model"], r["bits"]) == (SWEEP_SETTING[0], "W2A2")]
    sweep = sorted(
        mean_std(sweep_setting, ["arm", "lam", "eta"], metrics),
        key=lambda r: (r["arm"], r["eta"] != "= LR", r["lam"]),
    )
    floats_table = mean_std(
        [
            {"model": c["model"]["name"], "acc": s["test_acc"]}
            for c, s in zip(floats, float_summaries, strict=True)
        ],
        ["model"],
        ["acc"],
    )
    out.mkdir(parents=True, exist_ok=True)
    figure(runs, qat_epochs, out / "talr_rates.png")
    train_s = sum(r["wall_time_s"] for r in rows) + sum(s["wall_time_s"] for s in float_summaries)
    talr_main = [c for c in main_cfgs if c["method"]["name"] == "talr"]
    eta_cfgs = [c for c in sweep_cfgs if "eta" in c["method"]]
    ctrl = {f"TALR (lambda {LAMBDA:g}, eta = LR), all main runs": controller(talr_main)}
    if eta_cfgs:
        tag = f"talr-{SWEEP_SETTING[0]}-w{SWEEP_SETTING[1]}a{SWEEP_SETTING[1]}-"
        same = [c for c in talr_main if c["name"].startswith(tag)]
        ctrl[f"TALR eta = LR, {model_bits()}"] = controller(same)
        ctrl[f"TALR eta = {ETA_MULT:g} x LR, {model_bits()}"] = controller(eta_cfgs)
    text = report(
        table, sweep, floats_table, seeds, float_epochs, qat_epochs, wall, train_s, quick, ctrl
    )
    (out / "talr.md").write_text(text)
    write_json(out / "talr.json", {"rows": rows, "wall_time_s": wall})
    return text


# ----------------------------------------------------------------------------- figure
def _ema(values: list[float], m: float = MOMENTUM) -> list[float]:
    out, k = [], 0.0
    for v in values:
        k = m * k + (1 - m) * v
        out.append(k)
    return out


def figure(runs: Path, epochs: int, path: Path) -> None:
    """The paper's Figure-3 picture for our runs (seed 0, FIGURE_SETTING): per optimizer, the
    target rate R_t, the measured rate (k_t and its running mean K_t) and the LR (U_t under
    TALR, the cosine LR without), with and without TALR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qatlab.train.metrics import read_jsonl

    model, bits = FIGURE_SETTING
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for col, opt in enumerate(("SGD", "Adam")):
        for talr in (False, True):
            arm = f"{opt}-T" if talr else opt
            cfg = qat_config(model, bits, arm, 0, runs, epochs)
            recs = read_jsonl(Path(cfg["out_dir"]) / cfg["name"] / "metrics.jsonl")
            tr = [(r["step"], r["tr"]) for r in recs if "tr" in r]
            steps, ks = zip(*tr, strict=True) if tr else ((), ())
            color = "tab:red" if talr else "tab:blue"
            ax = axes[0][col]
            ax.plot(steps, [100 * k for k in ks], color=color, alpha=0.15, lw=0.6)
            ax.plot(steps, [100 * k for k in _ema(list(ks))], color=color, label=f"{arm}: K_t")
            lr_ax = axes[1][col]
            if talr:
                tal = [r for r in recs if "talr_R" in r]
                ax.plot(
                    [r["step"] for r in tal],
                    [100 * r["talr_R"] for r in tal],
                    "k--",
                    label="target R_t",
                )
                lr_ax.plot([r["step"] for r in tal], [r["talr_U"] for r in tal], color=color,
                           label=f"{arm}: U_t (latent weights)")  # fmt: skip
            else:
                lrs = [r for r in recs if "lr" in r and "val_loss" not in r]
                lrs = lrs or [r for r in recs if "lr" in r]
                lr_ax.plot([r["step"] for r in lrs], [r["lr"] for r in lrs], color=color,
                           label=f"{arm}: cosine LR")  # fmt: skip
        axes[0][col].set_title(f"{model} W{bits}A{bits}, {opt} vs {opt}-T (seed 0)")
        axes[0][col].set_ylabel("transition rate (%)")
        axes[0][col].set_yscale("log")
        axes[1][col].set_ylabel("learning rate")
        axes[1][col].set_xlabel("training step")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- report
def model_bits() -> str:
    return f"{SWEEP_SETTING[0]} W{SWEEP_SETTING[1]}A{SWEEP_SETTING[1]}"


def controller(cfgs: list[dict[str, Any]]) -> dict[str, Any]:
    """How well TALR tracked its target in the runs ``cfgs``: mean over runs of U at the end
    relative to U_0, and of K_t and R_t averaged over the last 10% of the logged steps."""
    from qatlab.train.metrics import read_jsonl

    u_ratio, k_end, r_end = [], [], []
    for c in cfgs:
        recs = [
            r for r in read_jsonl(Path(c["out_dir"]) / c["name"] / "metrics.jsonl") if "talr_U" in r
        ]
        if not recs:
            continue
        tail = recs[-max(1, len(recs) // 10) :]
        u_ratio.append(recs[-1]["talr_U"] / recs[0]["talr_U"])
        k_end.append(sum(r["talr_K"] for r in tail) / len(tail))
        r_end.append(sum(r["talr_R"] for r in tail) / len(tail))
    n = max(len(u_ratio), 1)
    return {"u_ratio": sum(u_ratio) / n, "k_end": sum(k_end) / n, "r_end": sum(r_end) / n}


def reading(table: list[dict], ctrl: dict[str, dict]) -> list[str]:
    """What the controller did, from the numbers: where TALR still flips more weights than the
    plain optimizer at the end, and where U reached 0."""
    cell = {(r["model"], r["bits"], r["arm"]): r for r in table}
    more, none, total = [], [], 0
    for (model, bits, arm), r in cell.items():
        plain = cell.get((model, bits, arm.removesuffix("-T")))
        if not arm.endswith("-T") or plain is None or r["flip_last"] is None:
            continue
        total += 1
        if r["flip_last"][0] < 1e-6:
            none.append(f"{arm} {model} {bits}")
        elif r["flip_last"][0] > plain["flip_last"][0]:
            more.append(f"{arm} {model} {bits}")
    eta = [c for name, c in ctrl.items() if "x LR" in name]
    lines = [
        "The controller is an integrator: U changes by eta * (R_t - K_t) per step and "
        "|R_t - K_t| is a few 1e-3 here, so with eta = U_0 it takes a few hundred steps to move U "
        "by U_0, while K_t (m = 0.99, K_0 = 0) averages over ~100 steps. Early on K_t < R_t and "
        "U climbs to about twice U_0 (figure); when the cosine target falls, U follows with a "
        "lag of several hundred steps, which in these "
        "short runs is a large part of training (the paper's runs are ~100x longer).",
        "",
        f"With eta = LR, TALR still flips more weights than the plain cosine LR in the last "
        f"epoch in {len(more)}/{total} settings ({', '.join(more) or 'none'}); in "
        f"{len(none)}/{total} ({', '.join(none) or 'none'}) U reached 0 before the end and "
        "no counted weight moved in the last epoch.",
    ]
    if eta:
        lines[-1] += (
            f" With eta = {ETA_MULT:g} x LR the running rate ends close to the target "
            f"(K_t {eta[0]['k_end'] * 100:.3f}% vs R_t {eta[0]['r_end'] * 100:.3f}%, U at "
            f"{eta[0]['u_ratio']:.2f} x U_0): the scheduled rate is then actually followed."
        )
    return lines


def sweep_notes(table: list[dict], sweep: list[dict]) -> list[str]:
    """The best lambda per optimizer and the eta arm, against the plain optimizer."""
    model, bits = SWEEP_SETTING[0], f"W{SWEEP_SETTING[1]}A{SWEEP_SETTING[1]}"
    plain = {r["arm"]: r for r in table if (r["model"], r["bits"]) == (model, bits)}
    lines = []
    for opt in ("SGD", "Adam"):
        base = plain.get(opt)
        rows = [r for r in sweep if r["arm"] == f"{opt}-T" and r["eta"] == "= LR" and r["acc"]]
        if base is None or not rows or base["acc"] is None:
            continue
        best = max(rows, key=lambda r: r["acc"][0])
        delta, noise = _delta(best["acc"], base["acc"])
        eta = [r for r in sweep if r["arm"] == f"{opt}-T" and r["eta"] != "= LR" and r["acc"]]
        text = (
            f"- **{opt}-T**: best lambda {best['lam']:g} gives {best['acc'][0] * 100:.1f}% "
            f"(final), {delta * 100:+.1f} pts vs {opt} (larger seed std {noise * 100:.1f})"
        )
        if eta:
            d, nz = _delta(eta[0]["acc"], base["acc"])
            text += (
                f"; with eta = {eta[0]['eta']}: {eta[0]['acc'][0] * 100:.1f}% ({d * 100:+.1f} pts, "
                f"std {nz * 100:.1f}), weights flipping in the last epoch "
                f"{eta[0]['flip_last'][0] * 100:.2f}% (plain {base['flip_last'][0] * 100:.2f}%)"
            )
        lines.append(text + ".")
    return lines


def _delta(a: Any, b: Any) -> tuple[float, float] | None:
    if a is None or b is None:
        return None
    return a[0] - b[0], max(a[1], b[1])


def _mean(pairs: list[tuple[float, float]]) -> float:
    return sum(d for d, _ in pairs) / len(pairs)


def verdict(table: list[dict]) -> list[str]:
    """One sentence per (model, bits, optimizer): TALR minus plain, against the seed spread."""
    cell = {(r["model"], r["bits"], r["arm"]): r for r in table}
    lines, wins, losses, ties = [], 0, 0, 0
    for model in MODELS:
        for bits in (f"W{b}A{b}" for b in BITS):
            for opt in ("SGD", "Adam"):
                plain, talr = cell.get((model, bits, opt)), cell.get((model, bits, f"{opt}-T"))
                if plain is None or talr is None:
                    continue
                parts = []
                for key, label in (("acc", "final"), ("acc_early", "early-stopped")):
                    d = _delta(talr[key], plain[key])
                    if d is None:
                        continue
                    delta, noise = d
                    word = "better" if delta > noise else "worse" if -delta > noise else "tie"
                    if key == "acc":
                        wins += word == "better"
                        losses += word == "worse"
                        ties += word == "tie"
                    parts.append(
                        f"{label} {delta * 100:+.1f} pts (seed std {noise * 100:.1f}: {word})"
                    )
                flips = ""
                if plain["flip_last"] and talr["flip_last"]:
                    flips = (
                        f"; weights flipping in the last epoch {plain['flip_last'][0] * 100:.2f}% "
                        f"-> {talr['flip_last'][0] * 100:.2f}%"
                    )
                lines.append(f"- **{model} {bits}, {opt}-T vs {opt}**: " + ", ".join(parts) + flips)
    total = wins + losses + ties
    for model in MODELS:
        deltas = {
            key: [
                _delta(cell[(model, b, f"{o}-T")][key], cell[(model, b, o)][key])
                for b in (f"W{x}A{x}" for x in BITS)
                for o in ("SGD", "Adam")
                if (model, b, o) in cell and (model, b, f"{o}-T") in cell
            ]
            for key in ("acc", "acc_early")
        }
        d_final = [d for d in deltas["acc"] if d is not None]
        d_early = [d for d in deltas["acc_early"] if d is not None]
        if d_final and d_early:
            lines.append(
                f"- **{model} overall**: TALR minus plain {_mean(d_final) * 100:+.1f} pts final, "
                f"{_mean(d_early) * 100:+.1f} pts early-stopped (mean over bits and optimizers; "
                f"seed stds {min(n for _, n in d_final) * 100:.1f}-"
                f"{max(n for _, n in d_final) * 100:.1f})."
            )
    lines += [
        "",
        f"**Summary (final-epoch accuracy):** TALR is better than its plain optimizer by more than "
        f"the seed spread in {wins}/{total} settings, worse in {losses}/{total}, and within the "
        f"spread in {ties}/{total}.",
    ]
    return lines


def report(table, sweep, floats_table, seeds, float_epochs, qat_epochs, wall, train_s, quick, ctrl):
    cols = [
        ("model", "model"),
        ("bits", "bits"),
        ("arm", "optimizer"),
        ("acc", "test acc % (final)"),
        ("acc_early", "test acc % (early-stopped)"),
        ("flip_last", "flipped in last epoch %"),
        ("tr_last", "mean TR last epoch %"),
        ("tr_first", "mean TR first epoch %"),
    ]
    scales = {"tr_last": (100.0, 3), "tr_first": (100.0, 3), "flip_last": (100.0, 2)}
    sweep_cols = [("arm", "optimizer"), ("lam", "lambda"), ("eta", "eta")] + cols[3:]
    notes = sweep_notes(table, sweep)
    sweep = [{**r, "lam": f"{r['lam']:g}"} for r in sweep]
    lines = [
        "# Transition-rate scheduling (TALR) on MNIST-1D (Lee et al.)",
        "",
        f"Regenerate: `python -m qatlab.compare talr --jobs 1` ({'--quick, ' if quick else ''}"
        f"seeds 0..{seeds - 1}; training time summed over all runs {train_s / 60:.1f} min; this "
        f"invocation {wall / 60:.1f} min on 1 worker process of 1 thread, 2 shared CPU cores, "
        "reusing finished runs).",
        "",
        f"Setup: float pre-training ({float_epochs} epochs, Adam 3e-3, cosine), then LSQ QAT from "
        f"the best float checkpoint for {qat_epochs} epochs (56 steps each, batch 128), MNIST-1D "
        "10,000 samples (7,200 train / 800 val / 2,000 test); first/last layers pinned to 8-bit "
        "weights (they keep the normal LR under TALR and are not counted). Plain arms: SGD "
        "(momentum 0.9, LR 0.02) or Adam (LR 1e-3) with a cosine LR to 0 for all weights; step "
        "sizes with Adam 1e-5 (the trainer's default). TALR arms (`--method talr`): the same "
        "optimizer, but the latent weights of the counted layers move with U_t "
        f"(U_0 = eta = the initial LR, m = {MOMENTUM}, cosine target from R_0 = lambda*sqrt(b_w) "
        f"to 0, lambda = {LAMBDA:g}, one global U), weight step sizes frozen, activation step "
        "sizes trained as in the plain arm; other parameters (biases, BN, pinned layers) keep the "
        "cosine LR. 'final' = the last epoch's model; 'early-stopped' = the best-validation "
        "epoch's model (`best.pt`), the same rule for every arm. 'flipped in last epoch' = share "
        "of counted weights whose integer changed at least once in the last epoch; TR = mean "
        "per-step transition rate k_t. Mean ± std over seeds.",
        "",
        "Float baselines: "
        + ", ".join(
            f"{r['model']} {r['acc'][0] * 100:.1f} ± {r['acc'][1] * 100:.1f}%" for r in floats_table
        ),
        "",
        markdown_table(table, cols, scales),
        "",
        "## Does TALR help here?",
        "",
        *verdict(table),
        "",
        f"## lambda sweep ({SWEEP_SETTING[0]} W{SWEEP_SETTING[1]}A{SWEEP_SETTING[1]})",
        "",
        markdown_table(sweep, sweep_cols, scales),
        "",
        *notes,
        "",
        "## Did TALR hit its target?",
        "",
        *[
            f"- {name}: over the last 10% of training the running rate K_t was "
            f"{c['k_end'] * 100:.3f}% against a target R_t of {c['r_end'] * 100:.3f}%; U ended at "
            f"{c['u_ratio']:.2f} x U_0 (mean over runs)."
            for name, c in ctrl.items()
        ],
        "",
        *reading(table, ctrl),
        "",
        "## What was cut to fit ~25 minutes",
        "",
        f"- {qat_epochs} QAT epochs ({qat_epochs * 56} steps) instead of the paper's long "
        "ImageNet/CIFAR schedules; no LR tuning per arm (SGD 0.02, Adam 1e-3 for plain and TALR "
        "alike, as U_0 = eta = the initial LR).",
        f"- lambda sweep only on {model_bits()} and only lambda in "
        f"{{{', '.join(f'{v:g}' for v in sorted((*SWEEP, LAMBDA)))}}}; per-layer U, step and "
        "constant targets are implemented and tested but not studied.",
        f"- {seeds} seeds; ResNet/CIFAR, binary networks and detection (the paper's other "
        "claims) not attempted.",
        "",
        "## Target rate, measured rate and U over training (the paper's Figure 3, our runs)",
        "",
        "![rates](talr_rates.png)",
        "",
        "Top: per-step transition rate k_t (faint) and its running mean K_t (m = 0.99), "
        "with the target R_t of the TALR run (dashed); bottom: the latent weights' LR (U_t for "
        "TALR, the cosine LR for the plain optimizer).",
        "",
    ]
    return "\n".join(lines)
