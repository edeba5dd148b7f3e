"""A practitioner's first hour (issue 20): the optimizer for one's own loop, the step-size
guard, the inspection table, one-line messages, and a kill during the first checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import train_args
from torch import nn

import qatlab
from qatlab.cli import main
from qatlab.train.config import TrainConfig
from qatlab.train.metrics import read_jsonl
from qatlab.train.optim import LogAdam, OptimizerPair, make_optimizer

ROOT = Path(__file__).parent.parent


def small_qmodel(seed: int = 0, **quant) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    config = qatlab.QuantConfig(**{"weight_bits": 4, "act_bits": 4, **quant})
    qmodel = qatlab.quantize(model, config)
    qatlab.calibrate(qmodel, [(torch.randn(32, 6), torch.zeros(32, dtype=torch.long))])
    return qmodel


def ids(params) -> set[int]:
    return {id(p) for p in params}


# ----------------------------------------------------------------------------- optimizer
def test_public_optimizer_is_the_trainers_recipe():
    q = small_qmodel()
    wsteps = ids(q[i].weight_quantizer.step for i in (0, 2, 4))
    asteps = ids(q[i].input_quantizer.step for i in (2, 4))
    weights = ids(p for n, p in q.named_parameters() if not n.endswith("step"))
    opt = qatlab.optimizer(q, "sgd", lr=0.05, momentum=0.8)
    assert isinstance(opt, OptimizerPair)
    sgd, logadam, adam = opt.optimizers
    assert type(sgd) is torch.optim.SGD and type(logadam) is LogAdam
    assert type(adam) is torch.optim.Adam
    assert ids(sgd.param_groups[0]["params"]) == weights
    assert (sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"]) == (0.05, 0.8)
    assert ids(logadam.param_groups[0]["params"]) == wsteps
    assert logadam.param_groups[0]["lr"] == 5e-3 and logadam.param_groups[0]["log"] is True
    assert ids(adam.param_groups[0]["params"]) == asteps and adam.param_groups[0]["lr"] == 1e-5
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    # the trainer builds the very same groups (one implementation)
    trainer = make_optimizer(q, TrainConfig(optimizer="sgd", lr=0.05, momentum=0.8))
    assert [ids(g["params"]) for g in trainer.param_groups] == [
        ids(g["params"]) for g in opt.param_groups
    ]
    assert [g["lr"] for g in trainer.param_groups] == [g["lr"] for g in opt.param_groups]

    tuned = qatlab.optimizer(q, "sgd", lr=0.05, fine_tune=True)
    sgd, adam = tuned.optimizers
    assert set().union(*(ids(g["params"]) for g in adam.param_groups)) == wsteps | asteps
    assert [g["lr"] for g in adam.param_groups] == [1e-5, 1e-5]
    same = qatlab.optimizer(
        q,
        "adam",
        lr=1e-3,
        quant_optimizer=None,
        act_quant_optimizer=None,
        quant_lr="0.1x",
        act_quant_lr="0.1x",
    )
    assert type(same) is torch.optim.Adam
    assert [g["lr"] for g in same.param_groups] == pytest.approx([1e-3, 1e-4, 1e-4])
    with pytest.raises(qatlab.ConfigError, match="train.optimizer must be one of"):
        qatlab.optimizer(q, "rmsprop")


# ----------------------------------------------------------------------------- guard
def test_a_step_size_driven_negative_is_kept_positive_with_one_warning_naming_the_layer():
    q = small_qmodel()
    head = q[4].weight_quantizer.step
    other = q[2].weight_quantizer.step
    before_head, before_other = float(head.detach()), float(other.detach())
    opt = torch.optim.SGD([head, other], lr=1000.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head.grad = torch.tensor(1.0)  # one update would take it to ~ -1000
        other.grad = torch.tensor(1e-4 * before_other)  # an ordinary update: 10% smaller
        opt.step()
        assert float(head.detach()) == pytest.approx(0.1 * before_head, rel=1e-6)  # kept positive
        assert float(other.detach()) == pytest.approx(before_other * 0.9, rel=1e-5)  # untouched
        for _ in range(3):  # it keeps trying: still positive, no second warning
            opt.step()
    assert float(head.detach()) == pytest.approx(1e-4 * before_head, rel=1e-5)
    assert float(head.detach()) > 0
    guard = [w for w in caught if "step size" in str(w.message)]
    assert len(guard) == 1
    assert "weight step size of layer '4'" in str(guard[0].message)
    assert "qatlab.optimizer" in str(guard[0].message)

    # a deep copy (a reference model, an EMA copy...) is guarded alike
    import copy

    twin = copy.deepcopy(small_qmodel())
    step = twin[4].weight_quantizer.step
    start = float(step.detach())
    step.grad = torch.tensor(1.0)
    with pytest.warns(RuntimeWarning, match="weight step size of layer '4'"):
        torch.optim.SGD([step], lr=1000.0).step()
    assert float(step.detach()) == pytest.approx(0.1 * start, rel=1e-6)


def test_the_guard_leaves_qatlabs_own_recipe_bit_for_bit_alone():
    """Same updates with and without the guard for the trainer's optimizer (LogAdam moves a
    step by ~0.5% per update: never near the bound)."""
    from qatlab.quant import guard

    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    finals = []
    for active in (True, False):
        q = small_qmodel(seed=1)
        opt = qatlab.optimizer(q, "sgd", lr=0.1)
        saved = guard.FLOOR
        guard.FLOOR = 0.1 if active else 0.0
        try:
            for _ in range(20):
                opt.zero_grad()
                nn.functional.cross_entropy(q(x), y).backward()
                opt.step()
        finally:
            guard.FLOOR = saved
        finals.append([p.detach().clone() for p in q.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


# ----------------------------------------------------------------------------- inspect
def test_inspect_is_a_per_layer_table_with_clip_and_oscillating_shares():
    from qatlab.methods.oscillation import OscillationTracker

    q = small_qmodel(weight_granularity="channel")
    with torch.no_grad():
        q[2].weight_quantizer.step.copy_(torch.linspace(0.01, 0.08, 8))
        q[2].weight.zero_()
        q[2].weight[0, :5] = 100.0  # 5 of 64 weights at the clip (p), 3 at n
        q[2].weight[1, :3] = -100.0
    tracker = OscillationTracker(q)
    with torch.no_grad():
        tracker.frequency("2")[:2] = 0.5  # 16 of 64 weights above the 0.01 threshold
    info = qatlab.inspect(q, tracker=tracker)
    assert [i.name for i in info] == ["0", "2", "4"]
    row = info[1]
    assert row.granularity == "channel" and (row.weight_bits, row.act_bits) == (4, 4)
    assert row.step_min == pytest.approx(0.01) and row.step_max == pytest.approx(0.08)
    assert row.clip_share == 8 / 64 and row.osc_share == 16 / 64
    assert row.weight_int is None  # tensors only on request
    text = str(info)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "layer" and "oscillating" in lines[0]
    assert "12.5%" in lines[2] and "25.00%" in lines[2] and "tensor(" not in text
    full = qatlab.inspect(q, tensors=True)
    assert full[1].weight_int.dtype == torch.int8 and full[1].weight_int[0, 0] == 7
    assert "oscillating" not in str(full).splitlines()[0]


# ----------------------------------------------------------------------------- messages
def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


BITS = "must be an integer from 2 to 8"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["train", "--wbits", "4", "--abits", "16"], f"--abits {BITS}, got 16"),
        (["train", "--wbits", "9"], f"--wbits {BITS}, got 9"),
        (["ptq", "--checkpoint", "x.pt", "--bits", "4,12"], f"--bits {BITS}, got 12"),
        (["ptq", "--checkpoint", "x.pt", "--abits", "1"], f"--abits {BITS}, got 1"),
    ],
)
def test_bit_width_errors_name_the_flag(argv, expected, capsys):
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err) == f"qatlab: error: {expected}"


def test_eval_of_a_file_that_is_no_checkpoint_is_one_whole_line(tmp_path, capsys):
    page = tmp_path / "report.html"
    page.write_text("<html>not a checkpoint</html>")
    assert main(["eval", "--checkpoint", str(page)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == (
        f"qatlab: error: cannot read checkpoint {page}: not a PyTorch checkpoint; pass a "
        "best.pt or ckpt.pt written by qatlab train"
    )
    torn = tmp_path / "torn.pt"
    buf = torch.nn.Linear(2, 2).state_dict()
    torch.save(buf, torn)
    torn.write_bytes(torn.read_bytes()[:200])
    assert main(["eval", "--checkpoint", str(torn)]) == 2
    assert "truncated or damaged" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv,func,expected",
    [
        (["train"], "cmd_train", "continue the run with the same command plus --resume"),
        (["compare", "demo"], "cmd_compare", "run the same command again to continue"),
        (["demo"], "cmd_demo", "run the same command again to continue"),
    ],
)
def test_ctrl_c_says_how_this_command_continues(argv, func, expected, monkeypatch, capsys):
    import qatlab.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, func, interrupted)
    assert main(argv) == 130
    line = one_line(capsys.readouterr().err)
    assert line.startswith("qatlab: interrupted; ") and expected in line
    assert ("--resume" in line) == (func == "cmd_train")


# ----------------------------------------------------------------------------- kill, refusal
KILL_IN_FIRST_CKPT = """
import os, signal, sys
import qatlab.train.metrics as metrics
real = os.replace
def replace(src, dst):
    if str(dst).endswith("ckpt.pt"):  # the temp file is whole; the rename never happens
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
metrics.os = type(os)("os_with_a_kill")
metrics.os.__dict__.update(os.__dict__)
metrics.os.replace = replace
from qatlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_while_writing_the_first_checkpoint_resumes_in_place(tmp_path, small_data, capsys):
    argv = train_args(tmp_path, "r", small_data)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_IN_FIRST_CKPT, *argv], env=env)
    assert proc.returncode == -9  # really killed (SIGKILL), mid-write
    run = tmp_path / "r"
    assert (run / "best.pt").is_file() and not (run / "ckpt.pt").exists()
    assert list(run.glob(".ckpt.pt.*.tmp"))  # the whole temp file a kill leaves
    assert main([*argv, "--resume"]) == 0  # was: "train it again under a new --name"
    assert (run / "ckpt.pt").is_file() and (run / "summary.json").is_file()
    assert not list(run.glob(".*.tmp"))
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if "val_acc" in r] == [0, 1]
    # exactly the uninterrupted run
    assert main(train_args(tmp_path, "straight", small_data)) == 0
    resumed = torch.load(run / "best.pt", weights_only=True)["model"]
    straight = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)

    # an unfinished run past epoch 1 whose ckpt.pt was deleted is still refused, untouched
    capsys.readouterr()
    (run / "summary.json").unlink()
    (run / "ckpt.pt").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "val_acc": 0.5}\n')
    assert main([*argv, "--resume"]) == 2
    assert "ckpt.pt is missing" in one_line(capsys.readouterr().err)

    # a refused --init-from (another model) leaves no folder behind
    out = tmp_path / "new-runs"
    init = str(run / "best.pt")
    refused = train_args(out, "x", small_data, "--model", "cnn1d", "--init-from", init)
    assert main(refused) == 2
    assert "holds a mlp5 model" in one_line(capsys.readouterr().err)
    assert not out.exists()
