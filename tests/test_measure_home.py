"""One home for measures: the registry (a new measure reaches reports with no edit in compare/),
the step-0 weights a run keeps, and ``qatlab measure`` end to end on a run trained by the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import InlineBackend, train_args

from qatlab.cli import main
from qatlab.measure import registry
from qatlab.measure.registry import Column, Section, register_measure


def _train(out: Path, data: dict, name: str, *extra: str) -> Path:
    """A cnn1d trained 4 epochs (the measures need a model that has learned something)."""
    cnn = ["--model", "cnn1d", "--epochs", "4", "--lr", "3e-3", "--batch-size", "64"]
    assert main(train_args(out, name, data, *cnn, *extra)) == 0
    return out / name


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, tiny_data_config) -> Path:
    """A W4A4 cnn1d trained through the CLI for 4 epochs."""
    out = tmp_path_factory.mktemp("runs")
    return _train(out, tiny_data_config, "w4", "--wbits", "4", "--abits", "4")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.pt"))}


# ----------------------------------------------------------------------------- registry
@pytest.fixture
def dummy_measure():
    """A measure registered from outside compare/, removed again afterwards."""
    before = (dict(registry.MEASURES), list(registry.COLUMNS), dict(registry.SECTIONS))

    @register_measure(
        "dummy_width",
        columns=[Column("dummy_norm", "weight norm (dummy)", 1.0, 3, "min", "dummy")],
        section=Section("dummy", "A dummy section", "Norm of the first weight matrix."),
    )
    def dummy(ctx, scale: float = 1.0) -> dict:
        model = ctx.model()
        first = next(p for p in model.parameters() if p.dim() > 1)
        return {"dummy_norm": scale * float(first.detach().norm()), "dummy_hidden": [1.0, 2.0]}

    yield dummy
    registry.MEASURES.clear()
    registry.MEASURES.update(before[0])
    registry.COLUMNS[:] = before[1]
    registry.SECTIONS.clear()
    registry.SECTIONS.update(before[2])


def test_a_registered_measure_reaches_the_report_with_no_edit_in_compare(
    tmp_path, tiny_data_config, dummy_measure
):
    from qatlab.compare.engine import run_grid
    from qatlab.compare.report import build_report
    from qatlab.compare.spec import expand

    grid = expand(
        {
            "name": "dummy",
            "base": {
                "data": tiny_data_config,
                "model": {"name": "mlp5", "width": 16},
                "train": {"epochs": 1, "batch_size": 64},
            },
            "seeds": [0, 1],
            "axes": {"train.lr": [0.003, 0.01]},
            "follow_ups": [{"measure": "dummy_width", "scale": 2.0}],
        }
    )
    out = tmp_path / "cmp"
    counts = run_grid(grid, out, workers=1, progress=False, make_backend=InlineBackend)
    assert counts == {"done": 4, "failed": 0, "ran": 4}
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/result.json"))]
    for row in rows:  # the measure's number, computed independently from the cell's best.pt
        from qatlab.train.checkpoint import load_checkpoint

        state = load_checkpoint(out / "cells" / row["cell"] / "best.pt")["model"]
        first = next(v for k, v in state.items() if k.endswith("weight") and v.dim() > 1)
        assert row["dummy_norm"] == pytest.approx(2.0 * float(first.norm()), rel=1e-6)
    build_report(out)
    report = (out / "report.md").read_text()
    assert "## A dummy section" in report and "Norm of the first weight matrix." in report
    lines = report.splitlines()
    head = next(i for i, line in enumerate(lines) if "weight norm (dummy)" in line)
    assert lines[head].split(" | ")[:2] == ["| lr", "weight norm (dummy)"]
    body = [line for line in lines[head + 2 : head + 4]]
    for lr, line in zip(("0.003", "0.01"), body, strict=True):
        values = [r["dummy_norm"] for r in rows if r["cell"].startswith(f"{lr}-")]
        mean = sum(values) / 2
        assert line.startswith(f"| {lr} | ") and f"{mean:.3f} ± " in line.replace("**", "")
    assert "dummy_hidden" not in report  # a list: stored, not tabled
    csv = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "dummy_norm" in csv and "dummy_hidden" not in csv


def test_existing_column_keys_and_headers_unchanged():
    from qatlab.compare.measures import column_for

    assert column_for("ptq_W4A4")[1] == "PTQ W4A4 %"
    assert column_for("xb_4")[1] == "PTQ W4, weights only %"
    assert column_for("xb_float")[1] == "float %"
    assert column_for("xbf_trained")[1] == "final: trained %"
    assert column_for("xbf_2")[1] == "final: PTQ W2, weights only %"
    assert column_for("log_osc_share")[0].section == "oscillation"
    assert column_for("acc_bn")[0].section == "accuracy"
    assert column_for("corr_gauss_noise_s3") is None and column_for("corr_mean")[1] == "mean %"
    assert column_for("val_acc") is None


# ----------------------------------------------------------------------------- init weights
def test_a_run_keeps_its_step0_weights(qat_run, tiny_data_config):
    """``init.pt`` holds exactly the model that training started from (quantized and
    calibrated): rebuilding the run with its seed gives the same tensors bit for bit."""
    from qatlab.train.checkpoint import load_checkpoint
    from qatlab.train.config import RunConfig
    from qatlab.train.runner import build

    init = load_checkpoint(qat_run / "init.pt")
    assert init["epoch"] == 0 and init["quant"] is not None
    cfg = RunConfig.from_dict(load_checkpoint(qat_run / "ckpt.pt")["config"])
    model, _, _ = build(cfg)
    state = model.state_dict()
    assert state.keys() == init["model"].keys()
    tensors = [k for k in state if isinstance(state[k], torch.Tensor)]
    assert len(tensors) > 10 and all(torch.equal(state[k], init["model"][k]) for k in tensors)
    assert all(state[k] == init["model"][k] for k in state if k not in tensors)
    trained = load_checkpoint(qat_run / "ckpt.pt")["model"]
    moved = [k for k in tensors if k.endswith("weight") and not torch.equal(state[k], trained[k])]
    assert moved  # training moved the weights away from init


# ----------------------------------------------------------------------------- qatlab measure
def test_measure_cli_writes_and_merges_measures_json_and_leaves_the_model(
    qat_run, tmp_path, capsys
):
    before = _digest(qat_run)
    summary = json.loads((qat_run / "summary.json").read_text())
    out = tmp_path / "m"
    assert main(["measure", str(qat_run), "--what", "ptq", "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "measures.json").read_text())
    assert Path(doc["checkpoint"]).name == "best.pt"
    assert set(doc["results"]) == {"ptq_W2A2", "ptq_W3A3", "ptq_W4A4", "ptq_W8A8"}
    args = ["--what", "crossbit", "--set", "crossbit.bits=[4]", "--set", "crossbit.final=true"]
    assert main(["measure", str(qat_run), *args, "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "measures.json").read_text())
    assert {"ptq_W4A4", "xb_4", "xb_float", "xb_trained", "xbf_trained"} <= set(doc["results"])
    assert doc["measures"]["crossbit"]["options"] == {"bits": [4], "final": True}
    # the model as trained, measured independently of the run: its summary's test accuracy
    assert doc["results"]["xb_trained"] == summary["test_acc"]
    assert set(doc["measures"]) == {"ptq", "crossbit"}
    assert _digest(qat_run) == before  # nothing in the run changed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    printed = capsys.readouterr().out
    assert "ptq (" in printed and "crossbit (" in printed


def test_measure_cli_generalization_measures(qat_run, tmp_path):
    pytest.importorskip("qatlab.measure.gap")
    pytest.importorskip("qatlab.measure.noise")
    out = tmp_path / "g"
    what = "gap,noise"
    assert main(["measure", str(qat_run), "--what", what, "--bits", "4,2", "--out", str(out)]) == 0
    res = json.loads((out / "measures.json").read_text())["results"]
    summary = json.loads((qat_run / "summary.json").read_text())
    assert res["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    assert res["train_acc"] == pytest.approx(summary["train_eval_acc"], abs=1e-9)
    assert res["gap_acc"] == pytest.approx(res["train_acc"] - res["test_acc"], abs=1e-9)
    assert 0.5 < res["noise_ratio"] < 1.5  # rounding noise ~ uniform over a bin
    assert {"noise_ratio_W4", "noise_ratio_W2"} <= set(res)
    assert (out / "noise_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "make, args, message",
    [
        (None, ["--what", "gap"], "no run folder or checkpoint at"),
        ("empty_dir", ["--what", "gap"], "is not a run folder (no ckpt.pt or best.pt"),
        ("garbage", ["--what", "gap"], "not a PyTorch checkpoint"),
        ("run", ["--what", "gap,flatnes"], "unknown measure 'flatnes' (did you mean 'flatness'?)"),
        ("run", ["--what", "gap", "--set", "gap.batchsize=3"], "did you mean 'batch_size'"),
        ("run", ["--what", "gap", "--bits", "4"], "add noise to --what"),
        ("run", ["--what", "noise", "--bits", "4,x"], "--bits must be comma-separated"),
        ("run", ["--what", ","], "nothing to measure"),
    ],
)
def test_bad_input_to_measure_is_one_line_exit_2(qat_run, tmp_path, capsys, make, args, message):
    target = tmp_path / "thing"
    if make == "empty_dir":
        target.mkdir()
    elif make == "garbage":
        target = tmp_path / "x.pt"
        target.write_bytes(b"not a checkpoint")
    elif make == "run":
        target = qat_run
    before = sorted(p.name for p in qat_run.iterdir())
    out = tmp_path / "out"
    assert main(["measure", str(target), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qatlab: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and sorted(p.name for p in qat_run.iterdir()) == before


def test_measures_of_another_checkpoint_are_not_mixed_in(qat_run, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["measure", str(qat_run / "ckpt.pt"), "--what", "ptq", "--out", str(out)]) == 0
    assert main(["measure", str(qat_run), "--what", "ptq", "--out", str(out)]) == 2
    assert "holds the measures of" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the study
def test_generalization_preset_expands_and_validates():
    from collections import Counter

    from qatlab.compare.spec import load_grid

    grid = load_grid("generalization")
    assert len(grid.cells) == 2 * 5 * 2 * 3 + 5 * 2 * 3  # mnist1d x {cnn1d, mlp5}, digits
    assert Counter(c.labels["bits"] for c in grid.cells) == {
        b: 18 for b in ("float", "W8A8", "W4A4", "W3A3", "W2A2")
    }
    assert {c.seed for c in grid.cells} == {0, 1, 2}
    assert grid.source["sections"] == ["kendall", "landscapes"]
    wanted = {"gap", "noise", "flatness", "sharpness"}
    for cell in grid.cells:
        names = [f["measure"] for f in cell.follow_ups]
        assert wanted <= set(names)
        assert ("ptq" in names) == (cell.labels["bits"] == "float")
        # landscapes and corruptions at lr 3e-3 only (their cost)
        fast = cell.config["train"]["lr"] == 0.003
        assert ("landscape" in names) == fast and ("corruptions" in names) == fast
        if fast:
            corr = next(f for f in cell.follow_ups if f["measure"] == "corruptions")
            assert ("ptq_bits" in corr) == (cell.labels["bits"] == "float")
    shrunk = load_grid("generalization", ["seeds=[0]", "base.train.epochs=1"])
    assert len(shrunk.cells) == len(grid.cells) // 3


def test_kendall_tau_by_hand():
    from qatlab.measure.stats import kendall_tau

    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 C, 1 D
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)  # 4 C, 1+1 ties
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 1, 1], [1, 2, 3]) != kendall_tau([1, 1, 1], [1, 2, 3])  # NaN


def test_kendall_section_ranks_registered_measures_against_the_gap(tmp_path):
    from qatlab.compare.generalization_section import _kendall
    from qatlab.compare.report import Results

    rows = []
    for i in range(6):
        bits = "float" if i < 3 else "W4A4"
        gap = 0.01 * i
        rows.append(
            {
                "cell": f"c{i}",
                "bits": bits,
                "bits_trained": bits,
                "gap_acc": gap,
                "sigma_mag": 1.0 - gap,
                "pacbayes_mag_init": 2.0 + gap,
                "val_acc": gap,
                "wall_time_s": 1.0,
            }
        )
    res = Results(tmp_path, {"grid": {}}, [], ["bits"], rows, [])
    table = next(b[1] for b in _kendall(res) if b[0] == "table")
    assert table.headers == ["measure", "tau (all)", "n", "float", "W4A4"]
    got = {r[0]: r[1:] for r in table.rows}
    assert got["sigma' (sigma_mag)"] == ["-1.00", "6", "-1.00", "-1.00"]
    assert got["PAC-Bayes mag init (pacbayes_mag_init)"] == ["+1.00", "6", "+1.00", "+1.00"]
    assert len(got) == 2  # val_acc has no column, wall time is skipped


def test_measure_cli_flatness_then_bounds_reuse_the_search(qat_run, tmp_path):
    pytest.importorskip("qatlab.measure.flatness")
    before = _digest(qat_run)
    out = tmp_path / "f"
    fast = ["--set", "flatness.draws=2", "--set", "flatness.steps=6", "--subset", "300"]
    code = main(["measure", str(qat_run), "--what", "flatness,bounds", *fast, "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "measures.json").read_text())
    res = doc["results"]
    assert 0 < res["sigma"] < 2 and 0 < res["sigma_mag"] < 2
    assert res["sigma_evals"] <= 6 + 1 and res["sigma_base_acc"] > 0.3
    assert res["pacbayes_flatness"] == pytest.approx((1 / res["sigma"] ** 2 / 1080) ** 0.5)
    assert "pacbayes_init" in res and "pacbayes_mag_init" in res  # from the run's init.pt
    assert doc["measures"]["bounds"]["keys"] == sorted(  # no second search: bounds only
        k for k in res if k.startswith("pacbayes_")
    )
    assert _digest(qat_run) == before


def test_landscapes_section_overlays_the_bit_widths(tmp_path):
    from qatlab.compare.generalization_section import _landscapes
    from qatlab.compare.report import Results

    coords = [-1.0, 0.0, 1.0]
    rows = [
        {
            "cell": f"c{i}",
            "bits": b,
            "bits_trained": b,
            "land_coords": coords,
            "land_loss": [2.0, 0.5, 2.0 + i],
        }
        for i, b in enumerate(["float", "float", "W2A2"])
    ]
    rows.append(
        {
            "cell": "2d",
            "bits": "W4A4",
            "bits_trained": "W4A4",
            "land_coords": coords,
            "land_loss": [[1.0] * 3] * 3,
        }
    )  # a 2-D landscape: not overlaid
    blocks = _landscapes(Results(tmp_path, {"grid": {}}, [], ["bits"], rows, []))
    assert ("img", "landscapes.png", "loss landscapes by bit width") in blocks
    assert (tmp_path / "landscapes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _landscapes(Results(tmp_path, {"grid": {}}, [], ["bits"], rows[3:], [])) == []


def test_measure_help_lists_the_registry(capsys):
    assert main(["measure", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("gap", "noise", "flatness", "sharpness", "bounds", "landscape", "corruptions"):
        assert name in text
