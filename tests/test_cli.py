"""The ``qatlab`` command: an end-to-end run, eval, ptq, demo, and every bad input's one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qatlab.cli import build_parser, config_from_args, main

EPOCHS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_config) -> Path:
    """A float cnn1d trained through the CLI; returns its run folder."""
    out = tmp_path_factory.mktemp("runs")
    code = main(
        [
            "train",
            "--out-dir",
            str(out),
            "--name",
            "float",
            "--dataset",
            "mnist1d",
            "--num-samples",
            str(tiny_data_config["num_samples"]),
            "--model",
            "cnn1d",
            "--epochs",
            str(EPOCHS),
            "--lr",
            "3e-3",
            "--batch-size",
            "64",
            "--quiet",
            "--set",
            f"data.cache_dir={tiny_data_config['cache_dir']}",
        ]
    )
    assert code == 0
    return out / "float"


def test_train_end_to_end_beats_chance_and_writes_results(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["test_acc"] > 0.4  # chance is 0.1
    assert summary["train_eval_acc"] > 0.4
    for key in ("test_loss", "train_eval_loss", "best_epoch", "wall_time_s", "config"):
        assert key in summary
    assert summary["config"]["quant"] is None and summary["config"]["method"]["name"] == "float"
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(EPOCHS + 1))
    assert all("val_acc" in r for r in records) and all("train_loss" in r for r in records[1:])
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"config.yaml", "ckpt.pt", "best.pt"} <= {p.name for p in trained.iterdir()}


def test_eval_reproduces_the_summary(trained, capsys):
    summary = json.loads((trained / "summary.json").read_text())
    out = trained.parent / "eval.json"
    assert main(["eval", "--checkpoint", str(trained / "best.pt"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["acc"] == summary["test_acc"] and result["bits"] == "float"
    assert f"test acc {summary['test_acc']:.4f}" in capsys.readouterr().out


def test_ptq_table(trained, capsys):
    summary = json.loads((trained / "summary.json").read_text())
    prefix = trained.parent / "ptq"
    code = main(
        [
            "ptq",
            "--checkpoint",
            str(trained / "best.pt"),
            "--bits",
            "2,8",
            "--calib-batches",
            "2",
            "--out",
            str(prefix),
        ]
    )
    assert code == 0
    rows = {r["bits"]: r for r in json.loads(prefix.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"float", "W2A2", "W8A8"}
    assert rows["float"]["acc"] == summary["test_acc"]
    assert abs(rows["W8A8"]["acc"] - rows["float"]["acc"]) < 0.05  # 8 bits ~ float
    assert rows["W2A2"]["acc"] < rows["W8A8"]["acc"]
    assert prefix.with_suffix(".csv").read_text().startswith("method,bits,weight_bits")
    assert "W8A8" in capsys.readouterr().out


def test_demo_quick(tmp_path, tiny_data_config, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--out", str(out), "--cache-dir", tiny_data_config["cache_dir"]]
    assert main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| method | what it is | float | W4A4 | W3A3 | W2A2 |")
    assert f"report: {out / 'report.html'}" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    from qatlab.methods import METHODS

    assert {r["method"] for r in rows} == set(METHODS)  # every registered method
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    for name in ("report.md", "results.csv", "curves.png", "acc_vs_bits.png"):
        assert (out / name).stat().st_size > 0


# ----------------------------------------------------------------------------- options
def test_flag_and_override_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train: {epochs: 7, lr: 0.5, batch_size: 32}\nmodel: {name: mlp5}\n")
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(cfg_file),
            "--epochs",
            "3",
            "--set",
            "train.epochs=5",
            "--wbits",
            "3",
            "--abits",
            "none",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.5 and cfg.train.batch_size == 32
    assert cfg.model.name == "mlp5" and cfg.quant.weight_bits == 3 and cfg.quant.act_bits is None
    assert cfg.method.name == "qat" and cfg.name == "mnist1d-mlp5-qat-w3a--s0"


def test_named_method_flags_reach_each_methods_own_options():
    parse = build_parser().parse_args
    cfg = config_from_args(
        parse(["train", "--method", "oscreg", "--lambda", "14", "--target-bits", "2"])
    )
    assert cfg.quant is None and cfg.method.options["lam"] == 14.0
    assert cfg.method.options["target_bits"] == 2
    cfg = config_from_args(
        parse(
            [
                "train",
                "--wbits",
                "4",
                "--method",
                "dampen",
                "--lambda",
                "0.2",
                "--set",
                "method.start=0.5",
            ]
        )
    )
    assert cfg.method.options["lambda_max"] == 0.2 and cfg.method.options["start"] == 0.5


@pytest.mark.parametrize("command", ["train", "eval", "ptq", "demo", "compare", "report"])
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert "usage: qatlab " + command in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _bad_inputs(run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    ckpt = str(run / "best.pt")
    return [
        (["train", "--dataset", "mnist2d"], "did you mean 'mnist1d'"),
        (["train", "--model", "resnet1000"], "model.name must be one of"),
        (["train", "--wbits", "1"], "--wbits must be an integer from 2 to 8, got 1"),
        (["train", "--wbits", "4", "--abits", "9"], "--abits must be an integer from 2 to 8"),
        (
            ["train", "--dataset", "cifar10", "--data-dir", str(tmp / "nowhere")],
            "CIFAR-10 not found",
        ),
        (["train", "--config", str(tmp / "typo.yaml")], "did you mean 'epochs'"),
        (["train", "--config", str(tmp / "broken.yaml")], "not valid YAML"),
        (["train", "--config", str(tmp / "missing.yaml")], "cannot read config file"),
        (["train", "--init-from", str(tmp / "truncated.pt")], "truncated"),
        (["train", "--init-from", str(tmp / "garbage.pt")], "not a PyTorch checkpoint; pass"),
        (["train", "--method", "dampn"], "unknown method 'dampn'"),
        (["train", "--set", "train.lr"], "--set expects key=value"),
        (["train", "--epoch", "3"], "unrecognized arguments"),
        (["train", "--abits", "4"], "--abits/--weights-only need --wbits"),
        (["train", "--out-dir", str(run.parent), "--name", run.name], "already holds a run"),
        (["eval", "--checkpoint", str(tmp / "truncated.pt")], "truncated"),
        (["eval", "--checkpoint", str(tmp / "nothing.pt")], "no checkpoint file"),
        (["eval", "--checkpoint", ckpt, "--split", "tset"], "split must be one of"),
        (["ptq", "--checkpoint", ckpt, "--bits", "1,4"], "--bits must be an integer from 2 to 8"),
        (["ptq", "--checkpoint", ckpt, "--bits", "four"], "comma-separated integers"),
        (["ptq", "--checkpoint", str(tmp / "garbage.pt")], "not a PyTorch checkpoint"),
        (["ptq", "--checkpoint", ckpt, "--set", "weight_grid=ful"], "weight_grid must be one"),
        (["compare", "nosuchgrid"], "neither a grid file nor a preset"),
        (["report", str(tmp)], "not a qatlab comparison folder"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_touches_nothing(
    trained, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # anything written to the default runs/ would show here
    (tmp_path / "typo.yaml").write_text("train:\n  epocs: 3\n")
    (tmp_path / "broken.yaml").write_text("train: {epochs: 3\n")
    data = (trained / "best.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    before = _snapshot(trained.parent)
    for argv, message in _bad_inputs(trained, tmp_path):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("qatlab: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
    assert _snapshot(trained.parent) == before
    assert not Path("runs").exists()


def test_resume_with_a_truncated_checkpoint_is_refused(trained, tmp_path, capsys):
    run = tmp_path / "float"
    shutil.copytree(trained, run)
    data = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(data[:1000])
    before = _snapshot(run)
    assert main(["train", "--out-dir", str(tmp_path), "--name", "float", "--resume"]) == 2
    assert "truncated" in capsys.readouterr().err
    assert _snapshot(run) == before
