"""``qatlab compare`` / ``qatlab report``: grids, the resumable engine, failures, reports."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qatlab.cli import main
from qatlab.compare import markdown_table, mean_std
from qatlab.compare.spec import load_grid

ROOT = Path(__file__).resolve().parents[1]


def _grid(tmp_path: Path, data: dict, train: dict | None = None, **extra) -> Path:
    import yaml

    doc = {
        "name": "tiny",
        "base": {
            "data": data,
            "model": {"name": "mlp5", "width": 16},
            "train": {"epochs": 1, "batch_size": 64, **(train or {})},
        },
        "seeds": [0],
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- end to end
def test_grid_runs_with_two_workers_records_failure_and_report_reproduces(
    tmp_path, tiny_data_config, capsys
):
    axes = {"method.name": ["qat", "float"], "quant.weight_bits": [4, 2]}
    diverge = {"train.lr": 1e6, "train.optimizer": "sgd", "train.quant_optimizer": None}
    overrides = [{"when": {"method.name": "float", "train.seed": 1}, "set": diverge}]
    follow = [{"measure": "ptq", "bits": [4, 2], "when": {"quant": None}}]
    grid = _grid(
        tmp_path,
        tiny_data_config,
        train={"epochs": 3, "lr": 1e-2},  # enough to learn: see the accuracy bound below
        axes=axes,
        overrides=overrides,
        follow_ups=follow,
        seeds=[0, 1],
    )
    out = tmp_path / "cmp"
    assert main(["compare", str(grid), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    cells = load_grid(grid).cells
    assert len(cells) == 6  # float once (its quant axis collapses), 2 x 2 quantized
    failed = json.loads((out / "cells" / "float-float-s1" / "failed.json").read_text())
    assert "TrainingDiverged" in failed["reason"]  # one line: its reason
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and "float-float-s1" not in {r["cell"] for r in rows}
    # every cell learned: these runs reach 0.22-0.29 where chance is 0.10 (0.16 is 3.5 standard
    # errors of chance above it on the 300 test samples)
    assert all(0.16 < r["test_acc"] <= 1.0 for r in rows), [
        (r["cell"], r["test_acc"]) for r in rows
    ]
    # two workers trained at once: some two cells' runs overlap in time (config.yaml is written
    # when a run starts, result.json when its cell ends, both by the worker process)
    spans = {
        c.name: tuple(
            (out / "cells" / c.name / f).stat().st_mtime for f in ("config.yaml", "result.json")
        )
        for c in cells
        if (out / "cells" / c.name / "result.json").is_file()
    }
    assert len(spans) == 5
    assert any(
        a[0] < b[1] and b[0] < a[1] for x, a in spans.items() for y, b in spans.items() if x < y
    ), spans
    # and the driver kept exactly two cells running at its busiest, never more
    running, peak = 0, 0
    for event in _events(out):
        running += {"start": 1, "done": -1, "failed": -1}[event["event"]]
        peak = max(peak, running)
    assert peak == 2 and running == 0
    floats = [r for r in rows if r["method"] == "float"]
    assert len(floats) == 1 and "ptq_W4A4" in floats[0] and "ptq_W2A2" in floats[0]
    report = (out / "report.md").read_text()
    assert "## Failed cells" in report and "| float-float-s1 | TrainingDiverged" in report
    assert "| float | float |" in report and "(PTQ)" in report
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    assert (out / "results.csv").read_text().startswith("cell,stage,seed,method,bits")

    before = report.encode()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_bytes() == before  # byte for byte, from stored results
    table = capsys.readouterr().out.split("\nreport: ")[0]
    assert table in printed and table.startswith("| method | what it is | float | W4A")

    # a second run trains nothing: every cell finished or failed already
    n_events = len(_events(out))
    assert main(["compare", str(grid), "--out", str(out), "--quiet"]) == 0
    assert len(_events(out)) == n_events


def test_killed_comparison_resumes_without_rerunning_finished_cells(tmp_path, tiny_data_config):
    axes = {"method.name": ["qat"], "quant.weight_bits": [4, 3, 2]}
    grid = _grid(tmp_path, tiny_data_config, axes=axes, seeds=[0, 1])
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "qatlab.cli", "compare", str(grid), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [*cmd, "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list((out / "cells").glob("*/result.json")) if out.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # a real kill: no clean-up runs
    proc.wait()
    finished = {p.parent.name for p in (out / "cells").glob("*/result.json")}
    assert 2 <= len(finished) < 6
    stamps = {n: (out / "cells" / n / "result.json").stat().st_mtime_ns for n in finished}

    assert main(["compare", str(grid), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    starts: dict[str, int] = {}
    for e in _events(out):
        if e["event"] == "start":
            starts[e["cell"]] = starts.get(e["cell"], 0) + 1
    assert all(starts[n] == 1 for n in finished)  # finished cells never ran again
    for n in finished:
        assert (out / "cells" / n / "result.json").stat().st_mtime_ns == stamps[n]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # the report has every cell
    assert "| qat | W2A4 |" in (out / "report.md").read_text()


def test_stages_run_dependencies_first(tmp_path, tiny_data_config):
    stages = [
        {"name": "pre", "axes": {"model.width": [16]}},
        {
            "name": "ft",
            "init_from": "pre",
            "set": {"quant": {"weight_bits": 4, "act_bits": 4}},
            "axes": {"model.width": [16], "method.name": ["track", "freeze"]},
            "follow_ups": [{"measure": "oscillation"}, {"measure": "bn_reestimate"}],
        },
    ]
    grid = _grid(tmp_path, tiny_data_config, stages=stages)
    cells = load_grid(grid).cells
    assert [c.depends_on for c in cells] == [None, "pre-16-s0", "pre-16-s0"]
    out = tmp_path / "cmp"
    assert main(["compare", str(grid), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    order = [e["cell"] for e in _events(out) if e["event"] == "start"]
    assert order[0] == "pre-16-s0"
    cfg = json.loads((out / "cells" / "ft-freeze-16-s0" / "summary.json").read_text())["config"]
    assert cfg["init_from"].endswith("pre-16-s0/best.pt")
    row = json.loads((out / "cells" / "ft-freeze-16-s0" / "result.json").read_text())
    assert 0.0 <= row["osc_share"] <= 1.0 and row["frozen_share"] is not None
    assert "acc_bn" in row and "## Oscillations" in (out / "report.md").read_text()
    assert sum(row["osc_hist"]) > 0 and (out / "oscillation_hist.png").is_file()


def test_oscreg_preset_states_the_claims_from_its_own_rows(tmp_path, tiny_data_config):
    """The oscreg preset (shrunk: 1 seed, 2 epochs, tiny data) runs every arm with general grid
    features only: claim 2 is a contrast line (the regularized model's 2-bit PTQ accuracy
    minus LSQ's as trained, final epoch) equal to the stored cross-bit columns; the per-layer
    statistics are a logged reduction (last value of metrics.jsonl) and a plot per key."""
    from qatlab.train.metrics import read_jsonl

    out = tmp_path / "osc"
    sweep = {"method.lam": {"values": [100.0], "labels": ["λ=100"]}, "method.target_bits": [2]}
    sets = [
        "seeds=[0]",
        "base.train.epochs=2",
        f"base.data={json.dumps(tiny_data_config)}",
        "base.model.width=16",
        f"stages.4.axes={json.dumps(sweep)}",
        *(f"stages.{i}.set.method.stats_every=4" for i in (1, 2, 4)),
    ]
    args = ["compare", "oscreg", "--out", str(out), "--workers", "2"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {r["cell"]: r for r in rows}
    assert len(rows) == 19 and all("xbf_float" in r for r in rows)
    reg, lsq = by["reg-authors--gradient-λ=1-2-s0"], by["qat-lsq-w2a-s0"]
    assert reg["arm"] == "oscreg + PTQ authors' gradient λ=1 target_bits=2"
    with (out / "contrasts.csv").open() as fh:
        lines = list(csv.DictReader(fh))
    claim = [
        r
        for r in lines
        if r["arm"] == reg["arm"] and r["control"] == "QAT LSQ W2A-" and r["metric"] == "xbf_2"
    ]
    assert len(claim) == 1 and claim[0]["control_metric"] == "xbf_trained"
    assert float(claim[0]["mean_diff"]) == pytest.approx(reg["xbf_2"] - lsq["xbf_trained"])
    records = read_jsonl(out / "cells" / reg["cell"] / "metrics.jsonl")
    last = [r["max_std/3"] for r in records if "max_std/3" in r][-1]
    assert reg["logged_max_std.3_last"] == last and "logged_max_std.3_last" not in lsq
    text = (out / "report.md").read_text()
    assert "## Logged series\n" in text and (out / "logged_max_std_3.png").is_file()
    assert "## Paired contrasts" in text and "## The paper's claims" not in text


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "extra, message",
    [
        ({"axes": {"train.lrr": [1e-3]}}, "unknown key 'lrr' in train (did you mean 'lr'?)"),
        ({"axes": {"quant.weight_bits": []}}, "axis quant.weight_bits is empty"),
        ({"axes": {"method.name": ["qat", "dampn"]}}, "unknown method 'dampn'"),
        ({"axis": {}}, "unknown key 'axis' in the grid (did you mean 'axes'?)"),
        ({"follow_ups": [{"measure": "ptqq"}]}, "unknown follow-up measure 'ptqq'"),
        ({"sections": ["oscregg"]}, "unknown report section 'oscregg'"),
    ],
)
def test_bad_grid_is_one_line_before_anything_runs(tmp_path, capsys, extra, message):
    grid = _grid(tmp_path, {"name": "mnist1d"}, **extra)
    out = tmp_path / "cmp"
    assert main(["compare", str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qatlab: error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_foreign_or_other_grid_folder_is_refused(tmp_path, tiny_data_config, capsys):
    from qatlab.compare.engine import prepare_folder

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "float").mkdir()
    assert main(["demo", "--out", str(foreign), "--quick"]) == 2
    assert "is not a qatlab comparison folder" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["float"]  # untouched
    grid = _grid(tmp_path, tiny_data_config, axes={"method.name": ["float"]})
    out = tmp_path / "cmp"
    prepare_folder(out, load_grid(grid, ["seeds=[0]"]), str(grid))
    assert (out / "comparison.json").is_file()
    prepare_folder(out, load_grid(grid, ["seeds=[0]"]), str(grid))  # the same grid: fine
    prepare_folder(out, load_grid(grid, ["seeds=[0,1]"]), str(grid))  # grown: fine
    assert main(["compare", str(grid), "--out", str(out), "--set", "name=other"]) == 2
    assert "holds another comparison" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["cells.json", "comparison.json"]


def test_presets_expand():
    demo = load_grid("demo")
    methods = {c.labels["method"] for c in demo.cells}
    from qatlab.methods import METHODS

    assert methods == set(METHODS)  # every registered method, automatically
    float_only = [n for n, s in METHODS.items() if s.needs_quant is False]
    assert all(c.labels["bits"] == "float" for c in demo.cells if c.labels["method"] in float_only)
    osc = load_grid("oscillations")
    assert len(osc.cells) == 6 + 36 + 9  # float, qat, long (mobilenetv2 W3A3 x 3 methods x 3)
    assert all(c.depends_on for c in osc.cells if c.stage in ("qat", "long"))
    long = [c for c in osc.cells if c.stage == "long"]
    assert {c.depends_on for c in long} == {f"float-mobilenetv2-s{s}" for s in (0, 1, 2)}
    assert {c.config["train"]["epochs"] for c in long} == {24}  # 3x the qat stage's 8
    reg = load_grid("oscreg")  # the former study module's 63 runs (same configs, see oscreg.md)
    assert len(reg.cells) == 63
    for cell in reg.cells:  # every regularizer arm selects its epoch at its own target width
        target = (cell.config.get("method") or {}).get("target_bits")
        metric = cell.config["train"].get("early_stop_metric")
        assert metric == (f"val_ptq{target}_acc" if target else None)


# ----------------------------------------------------------------------------- ray
def test_ray_backend_matches_local(tmp_path, tiny_data_config):
    pytest.importorskip("ray")
    from qatlab.compare.engine import run_cell

    axes = {"method.name": ["qat", "float"], "quant.weight_bits": [4]}
    grid = _grid(tmp_path, tiny_data_config, axes=axes)
    common = ["--workers", "2", "--threads", "1", "--quiet", "--backend", "ray"]
    assert main(["compare", str(grid), "--out", str(tmp_path / "ray"), *common]) == 0
    lines = (tmp_path / "ray" / "results.jsonl").read_text().splitlines()
    ray_rows = {r["cell"]: r for r in map(json.loads, lines)}
    assert len(ray_rows) == 2
    for cell in load_grid(grid).cells:  # the same cell in this process (what a local worker runs)
        local = run_cell(cell.to_dict(), str(tmp_path / "local"), threads=1)
        assert local["status"] == "done"
        for key in ("test_acc", "test_loss", "val_acc"):
            assert local["row"][key] == ray_rows[cell.name][key]


# ----------------------------------------------------------------------------- helpers
def test_mean_std_groups_and_formats():
    rows = [
        {"m": "a", "acc": 0.5, "x": None},
        {"m": "a", "acc": 0.7, "x": None},
        {"m": "b", "acc": 0.9, "x": 0.1},
    ]
    table = mean_std(rows, ["m"], ["acc", "x"])
    a = next(r for r in table if r["m"] == "a")
    assert math.isclose(a["acc"][0], 0.6) and math.isclose(a["acc"][1], 0.1414213, rel_tol=1e-5)
    assert a["x"] is None and a["acc"][2] == 2
    text = markdown_table(table, [("m", "method"), ("acc", "acc %"), ("x", "x")])
    assert "| a | 60.0 ± 14.1 | – |" in text and "| b | 90.0 ± 0.0 | 10.0 ± 0.0 |" in text
