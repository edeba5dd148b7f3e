"""Never lose a user's run: exclusive run folders, honest resume, one-line refusals, no silent
misuse of the Python API, files that follow the umask."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import train_args
from torch import nn

import qatlab
from qatlab.cli import main
from qatlab.errors import ConfigError, TrainingDiverged
from qatlab.measure.crossbit import ptq_config
from qatlab.train.metrics import atomic_write, read_jsonl, write_json

ROOT = Path(__file__).parent.parent


def claim_run_dir(run_dir, **kwargs):
    """:func:`qatlab.train.rundir.claim_run_dir` (imported late: each test fails on its own)."""
    from qatlab.train.rundir import claim_run_dir as claim

    return claim(run_dir, **kwargs)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``folder`` with its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- 1: exclusive
def test_two_runs_with_one_name_started_together(tmp_path, small_data, capsys):
    """Both start at the same instant: one trains, the other is refused with one line and
    touches nothing (today both exit 0 and the folder ends mixed)."""
    start = threading.Barrier(2)
    codes: dict[int, int] = {}

    def launch(seed: int) -> None:
        args = train_args(tmp_path, "same", small_data, "--seed", str(seed))
        start.wait()
        codes[seed] = main(args)

    threads = [threading.Thread(target=launch, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    out, err = capsys.readouterr()
    assert sorted(codes.values()) == [0, 2]
    winner = next(seed for seed, code in codes.items() if code == 0)
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("qatlab: error: ")
    assert "in use by another training process" in lines[0]
    run = tmp_path / "same"
    # the winner's run is whole: its config, its summary, its checkpoints, nothing else
    assert {p.name for p in run.iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "ckpt.pt",
        "best.pt",
        "init.pt",
    }
    assert f"seed: {winner}" in (run / "config.yaml").read_text()
    assert json.loads((run / "summary.json").read_text())["config"]["train"]["seed"] == winner
    for ckpt in ("ckpt.pt", "best.pt"):
        saved = torch.load(run / ckpt, weights_only=True)
        assert saved["config"]["train"]["seed"] == winner


def test_a_held_folder_refuses_another_claim_until_released(tmp_path):
    run = tmp_path / "runs" / "r"
    refused: list[str] = []
    with claim_run_dir(run) as resuming:
        assert resuming is False and run.is_dir()
        with claim_run_dir(run):  # nested in the same thread (fit inside run): allowed
            pass

        def other() -> None:
            try:
                with claim_run_dir(run):
                    pass
            except ConfigError as exc:
                refused.append(str(exc))

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(refused) == 1 and "in use" in refused[0]
    with claim_run_dir(run):  # released: free again
        (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        with claim_run_dir(run):
            pass


def test_a_killed_process_releases_its_folder(tmp_path):
    """The lock is the kernel's: SIGKILL of the holder frees the folder."""
    run = tmp_path / "r"
    code = (
        "import sys, time\n"
        "from qatlab.train.rundir import claim_run_dir\n"
        f"with claim_run_dir({str(run)!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"held"
        with pytest.raises(ConfigError, match="in use"):
            with claim_run_dir(run):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with claim_run_dir(run) as resuming:
        assert resuming is False


def test_a_failed_build_leaves_no_folder_behind(tmp_path, small_data, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    out = tmp_path / "new-runs"
    code = main(train_args(out, "x", small_data, "--init-from", str(garbage)))
    assert code == 2 and len(error_lines(capsys.readouterr().err)) == 1
    assert not out.exists()  # the claim created runs/ and runs/x; both are gone again


# ----------------------------------------------------------------------------- 3: resume
def test_resume_of_a_mistyped_name_is_refused_and_creates_nothing(tmp_path, small_data, capsys):
    code = main(train_args(tmp_path / "runs", "typo", small_data, "--resume"))
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1
    assert "nothing to resume" in lines[0] and "--name" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_resume_without_a_checkpoint(tmp_path, small_data, capsys):
    """A finished run whose ckpt.pt is gone is refused and left byte for byte; a run killed
    before its first checkpoint (config.yaml and the epoch-0 record only) starts over."""
    args = train_args(tmp_path, "r", small_data)
    assert main(args) == 0
    run = tmp_path / "r"
    (run / "ckpt.pt").unlink()
    before = snapshot(run)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "ckpt.pt is missing" in lines[0] and "--name" in lines[0]
    assert snapshot(run) == before

    for name in ("best.pt", "summary.json", "curves.png"):  # as if killed in epoch 1
        (run / name).unlink()
    assert main([*args, "--resume"]) == 0
    assert (run / "ckpt.pt").is_file() and (run / "summary.json").is_file()
    epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if "val_acc" in r]
    assert epochs == [0, 1]


# ----------------------------------------------------------------------------- 4: divergence
def test_a_diverged_run_is_one_line_and_exit_3(tmp_path, small_data, capsys, monkeypatch):
    import qatlab.train.runner as runner

    def diverge(cfg, **kwargs):
        raise TrainingDiverged("training diverged at epoch 1 (loss nan); lower --lr")

    monkeypatch.setattr(runner, "run", diverge)
    assert main(train_args(tmp_path, "d", small_data)) == 3
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["qatlab: error: training diverged at epoch 1 (loss nan); lower --lr"]


@pytest.mark.parametrize(
    "optimizer, lr, boost, what",
    [("sgd", "1e-2", 1e5, "not finite"), ("adam", "3e-3", 1e4, "the first step's")],
)
def test_a_real_diverging_run_stops_with_exit_3_and_saves_nothing_non_finite(
    tmp_path, small_data, capsys, monkeypatch, optimizer, lr, boost, what
):
    """Epoch 1 trains normally and writes its checkpoints; from epoch 2 on the LR is ``boost``
    times larger (SGD at 1e3 gives NaN losses, Adam at 30 an exploding one): both stop with one
    line, exit 3, and leave epoch 1's best.pt and ckpt.pt, finite, as the last checkpoints."""
    import qatlab.train.loop as loop

    schedule = loop.lr_factor

    def boosted(cfg, step, steps_per_epoch, total_steps):
        factor = schedule(cfg, step, steps_per_epoch, total_steps)
        return factor if step < steps_per_epoch else factor * boost

    monkeypatch.setattr(loop, "lr_factor", boosted)
    args = train_args(tmp_path, "d", small_data, "--epochs", "3", "--lr", lr)
    args += ["--set", f"train.optimizer={optimizer}", "--set", "train.divergence_factor=20"]
    assert main(args) == 3
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("qatlab: error: training diverged")
    assert what in lines[0] and "epoch 2" in lines[0], lines[0]
    for name in ("best.pt", "ckpt.pt"):  # both written after epoch 1, neither after
        ckpt = torch.load(tmp_path / "d" / name, weights_only=True)
        assert ckpt["epoch"] == 1, name
        state = ckpt["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ----------------------------------------------------------------------------- 5: the API
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


BATCHES = [torch.randn(32, 8) for _ in range(2)]
W4A4 = qatlab.QuantConfig(weight_bits=4, act_bits=4)


@pytest.mark.parametrize(
    "misuse, names",
    [
        (lambda: qatlab.ptq(_net(), W4A4, []), ["calib_batches", "islice"]),
        (lambda: qatlab.calibrate(qatlab.quantize(_net(), W4A4), []), ["batches", "islice"]),
        (lambda: qatlab.calibrate(_net(), BATCHES), ["no quantizers", "qatlab.quantize"]),
        (lambda: qatlab.quantize(nn.Sequential(nn.ReLU())), ["no Conv1d", "Linear"]),
        (
            lambda: qatlab.quantize(qatlab.quantize(_net(), W4A4)),
            ["already quantized", "dequantize"],
        ),
        (
            lambda: qatlab.quantize(_net(), qatlab.QuantConfig(skip=["*"])),
            ["config.skip", "skip fewer"],
        ),
        (lambda: qatlab.QuantConfig(skip=3), ["skip must be", "skip=['fc'"]),
        (lambda: qatlab.quantize(None), ["model must be a torch.nn.Module", "got NoneType"]),
        (
            lambda: qatlab.quantize(_net(), {"weight_bits": 4}),
            ["config must be a qatlab.QuantConfig", "QuantConfig.from_dict"],
        ),
        (lambda: qatlab.ptq(_net(), W4A4, BATCHES, num_batches=-1), ["num_batches", "-1"]),
        (lambda: qatlab.calibrate(qatlab.quantize(_net()), BATCHES, 0), ["num_batches", "None"]),
    ],
    ids=[
        "ptq-empty",
        "calibrate-empty",
        "calibrate-float",
        "quantize-nothing",
        "quantize-twice",
        "quantize-all-skipped",
        "skip-int",
        "quantize-None",
        "quantize-dict",
        "ptq-num-batches",
        "calibrate-num-batches",
    ],
)
def test_api_misuse_is_a_qatlab_error_that_names_the_problem(misuse, names):
    with pytest.raises(qatlab.ConfigError) as info:
        misuse()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_weights_only_ptq_needs_no_batches():
    """measure/crossbit.py relies on it: nothing to calibrate, nothing asked for."""
    qmodel = qatlab.ptq(_net(), ptq_config(4), [])
    assert qatlab.quant.is_quantized(qmodel) and torch.isfinite(qmodel(BATCHES[0])).all()


def test_uncalibrated_activation_quantizer_refuses_eval_but_learns_from_training():
    qmodel = qatlab.quantize(_net(), W4A4)
    qmodel.eval()
    with pytest.raises(qatlab.ConfigError, match="qatlab.calibrate"):
        qmodel(BATCHES[0])  # its step would come from evaluation data
    acts = [q for _, q in qatlab.quant.quantizers(qmodel) if q.role != "weight"]
    assert acts and not any(bool(q.initialized) for q in acts)
    qmodel.train()
    qmodel(BATCHES[0])  # LSQ: the first training batch sets the step
    assert all(bool(q.initialized) for q in acts)
    qmodel.eval()
    assert torch.isfinite(qmodel(BATCHES[1])).all()


# ----------------------------------------------------------------------------- 6: smaller
def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "model.pt"
    config.write_bytes(bytes(range(256)) * 8)
    assert main(["train", "--config", str(config), "--out-dir", str(tmp_path / "runs")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "not a text (UTF-8) YAML file" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_resume_does_not_need_the_moved_init_checkpoint(tmp_path, small_data, capsys):
    """A QAT run started from a float checkpoint resumes after that checkpoint moved; stale
    temp files of a killed checkpoint write are cleaned when it does."""
    assert main(train_args(tmp_path, "float", small_data)) == 0
    init = tmp_path / "float" / "best.pt"
    qat = train_args(tmp_path, "qat", small_data, "--wbits", "4", "--init-from", str(init))
    assert main(qat) == 0
    init.rename(tmp_path / "moved.pt")
    stale = tmp_path / "qat" / ".ckpt.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--out-dir",
                str(tmp_path),
                "--name",
                "qat",
                "--resume",
                "--epochs",
                "2",
                "--quiet",
            ]
        )
        == 0
    ), capsys.readouterr().err
    summary = json.loads((tmp_path / "qat" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["config"]["init_from"] == str(init)
    assert not stale.exists()
    # a fresh run does need it: one line, nothing created
    assert main(train_args(tmp_path, "qat2", small_data, "--init-from", str(init))) == 2
    assert "--init-from: no checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "qat2").exists()


def test_a_claim_cleans_stale_temp_files_only(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".summary.json.abc.tmp").write_text("{")
    (run / ".ckpt.pt.xyz.tmp").write_bytes(b"\0")
    (run / "notes.tmp").write_text("mine")  # not one of ours: kept
    with claim_run_dir(run):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["notes.tmp"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_run_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "summary.json", {"a": 1})
        atomic_write(tmp_path / "ckpt.pt", b"x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() gives
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("summary.json", "ckpt.pt", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_import_qatlab_exposes_measure():
    """The README's ``qatlab.measure.crossbit.cross_bit`` after a bare ``import qatlab``."""
    code = "import qatlab; print(qatlab.measure.crossbit.cross_bit.__name__)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cross_bit"


def test_readme_init_from_points_at_a_run_of_the_same_model():
    """Every ``--init-from runs/NAME/best.pt`` in the README names a run trained earlier in the
    README with the same ``--model`` and dataset."""
    text = (ROOT / "README.md").read_text()
    commands = re.sub(r"\\\n\s*", " ", text).splitlines()
    runs: dict[str, tuple[str | None, str | None]] = {}
    checked = 0
    for line in commands:
        if "qatlab train" not in line and "qatlab.cli train" not in line:
            continue
        flags = dict(re.findall(r"--([\w-]+)\s+([^\s-][^\s]*)", line))
        model, dataset = flags.get("model"), flags.get("dataset")
        init = flags.get("init-from")
        if init is not None:
            name = init.removeprefix("runs/").removesuffix("/best.pt")
            assert name in runs, f"{init} is not trained earlier in the README"
            assert runs[name] == (model, dataset), f"{line.strip()} starts from {runs[name]}"
            checked += 1
        if "name" in flags:
            runs[flags["name"]] = (model, dataset)
    assert checked >= 3
