"""Grid features of ``qatlab compare`` (issue 21): selection stages, best and final
checkpoints, arm labels, monitors, logged-series reductions and plots, growing a comparison."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from helpers import InlineBackend

from qatlab.cli import main
from qatlab.compare.engine import run_grid
from qatlab.compare.report import build_report
from qatlab.compare.spec import expand, resolve, select_values
from qatlab.errors import ConfigError
from qatlab.train.metrics import read_jsonl


def _doc(data: dict, **extra) -> dict:
    return {
        "name": "g",
        "base": {
            "data": data,
            "model": {"name": "mlp5", "width": 16},
            "train": {"epochs": 1, "batch_size": 64},
        },
        "seeds": [0],
        **extra,
    }


def _run(grid, out: Path) -> dict:
    return run_grid(grid, out, workers=1, progress=False, make_backend=InlineBackend)


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _rows(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("cells/*/result.json")}


TUNE = {
    "name": "tune",
    "seeds": [10, 11],
    "axes": {"method.name": ["float"], "train.lr": [1e-5, 3e-3]},
    "select": {"axis": "train.lr", "metric": "val_acc"},
}
FINAL = {
    "name": "final",
    "seeds": [0],
    "axes": {"method.name": ["float"]},
    "use": {"train.lr": "tune"},
}


# ----------------------------------------------------------------------------- selection
class _Poisoned(dict):
    """A result row whose test numbers must not be read (raise on access)."""

    def __getitem__(self, key):
        if str(key).startswith("test"):
            raise AssertionError(f"the selection read {key}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if str(key).startswith("test"):
            raise AssertionError(f"the selection read {key}")
        return super().get(key, default)

    def items(self):
        raise AssertionError("the selection iterated over a whole row")

    keys = values = __iter__ = items


def test_selection_follows_validation_never_test(tiny_data_config):
    tune = {**TUNE, "axes": {"method.name": ["float", "qat"], "train.lr": [1e-3, 1e-2]}}
    tune["set"] = {"quant": {"weight_bits": 4, "act_bits": 4}}
    final = {**FINAL, "axes": {"method.name": ["float", "qat"]}}
    grid = expand(_doc(tiny_data_config, stages=[tune, final]))
    tune_cells = [c for c in grid.cells if c.stage == "tune"]
    final_cells = [c for c in grid.cells if c.stage == "final"]
    assert {c.seed for c in tune_cells} == {10, 11} and {c.seed for c in final_cells} == {0}
    assert all(c.pending for c in final_cells)  # expanded, but waiting for the selection
    # validation prefers lr 1e-2 for qat and 1e-3 for float; test says the opposite
    val = {("qat", "0.001"): 0.60, ("qat", "0.01"): 0.70, ("float", "0.001"): 0.80}
    val[("float", "0.01")] = 0.75
    rows = {}
    for cell in tune_cells:
        key = (cell.labels["method"], cell.labels["lr"])
        noise = 0.01 if cell.seed == 10 else -0.01  # the mean over seeds is what counts
        rows[cell.name] = _Poisoned(
            val_acc=val[key] + noise, test_acc=1.0 - val[key], test_loss=math.nan
        )
    chosen = select_values(tune_cells, rows, grid.selections["tune"])
    by_method = {json.loads(k)["method"]: v for k, v in chosen.items()}
    assert by_method["qat"]["value"] == 1e-2 and by_method["float"]["value"] == 1e-3
    assert by_method["qat"]["means"] == pytest.approx({"0.001": 0.60, "0.01": 0.70})
    for cell in final_cells:
        assert resolve(cell, {"tune": chosen}) and not cell.pending
        want = 1e-2 if cell.labels["method"] == "qat" else 1e-3
        assert cell.config["train"]["lr"] == want and cell.selected == {"train.lr": want}

    bad = {**tune, "select": {"axis": "train.lr", "metric": "test_acc"}}
    with pytest.raises(ConfigError, match="must be a validation metric"):
        expand(_doc(tiny_data_config, stages=[bad, final]))
    with pytest.raises(ConfigError, match="not an earlier stage with select"):
        expand(_doc(tiny_data_config, stages=[{**tune, "select": None}, final]))
    with pytest.raises(ConfigError, match="is not one of its axes"):
        expand(_doc(tiny_data_config, stages=[{**tune, "select": {"axis": "train.x"}}, final]))


def test_pooled_selection_picks_one_value_for_every_setting(tiny_data_config):
    tune = {**TUNE, "axes": {"method.name": ["float", "qat"], "train.lr": [1e-3, 1e-2]}}
    tune["set"] = {"quant": {"weight_bits": 4, "act_bits": 4}}
    tune["select"] = {"axis": "train.lr", "metric": "val_acc", "pool": ["method"]}
    final = {**FINAL, "axes": {"method.name": ["float", "qat"]}}
    grid = expand(_doc(tiny_data_config, stages=[tune, final]))
    assert grid.selections["tune"]["pool"] == ["method"]
    tune_cells = [c for c in grid.cells if c.stage == "tune"]
    # per method, validation prefers 1e-2 for qat and 1e-3 for float; pooled over both methods
    # (and seeds) 1e-3 wins: (0.60 + 0.90) / 2 = 0.75 > (0.70 + 0.75) / 2 = 0.725. Test
    # numbers (1 - val) would pick 1e-2 pooled.
    val = {("qat", "0.001"): 0.60, ("qat", "0.01"): 0.70, ("float", "0.001"): 0.90}
    val[("float", "0.01")] = 0.75
    rows = {}
    for cell in tune_cells:
        key = (cell.labels["method"], cell.labels["lr"])
        noise = 0.02 if cell.seed == 10 else -0.02
        rows[cell.name] = _Poisoned(val_acc=val[key] + noise, test_acc=1.0 - val[key])
    per_setting = select_values(tune_cells, rows, {**grid.selections["tune"], "pool": []})
    assert {json.loads(k)["method"]: v["value"] for k, v in per_setting.items()} == {
        "qat": 1e-2,
        "float": 1e-3,
    }
    chosen = select_values(tune_cells, rows, grid.selections["tune"])
    assert list(chosen) == ["{}"]  # one arm: every method
    assert chosen["{}"]["value"] == 1e-3 and chosen["{}"]["seeds"] == 4
    assert chosen["{}"]["means"] == pytest.approx({"0.001": 0.75, "0.01": 0.725})
    for cell in (c for c in grid.cells if c.stage == "final"):
        assert cell.uses["train.lr"]["arm"] == {}
        assert resolve(cell, {"tune": chosen}) and cell.config["train"]["lr"] == 1e-3

    for pool, message in ((["lr"], "other than the selected one"), (["model"], "'model' must")):
        bad = {**tune, "select": {**tune["select"], "pool": pool}}
        with pytest.raises(ConfigError, match=message):
            expand(_doc(tiny_data_config, stages=[bad, final]))


def test_selection_stage_runs_first_and_final_seeds_use_its_choice(tmp_path, tiny_data_config):
    grid = expand(_doc(tiny_data_config, stages=[TUNE, FINAL]))
    out = tmp_path / "cmp"
    assert _run(grid, out) == {"done": 5, "failed": 0, "ran": 5}
    rows = _rows(out)
    tune = {
        lr: [rows[f"tune-float-{lr}-s{s}"]["val_acc"] for s in (10, 11)]
        for lr in ("1e-05", "0.003")
    }
    means = {lr: sum(v) / 2 for lr, v in tune.items()}
    best = max(means, key=means.get)
    chosen = json.loads((out / "selections.json").read_text())["tune"]
    (pick,) = chosen.values()
    assert pick["label"] == best and pick["means"] == pytest.approx(means)
    final = rows["final-float-s0"]
    assert final["selected_lr"] == float(best) and final["arm"] == "final float"
    cfg = json.loads((out / "cells" / "final-float-s0" / "summary.json").read_text())["config"]
    assert cfg["train"]["lr"] == float(best) and cfg["train"]["seed"] == 0
    starts = [e["cell"] for e in _events(out) if e["event"] == "start"]
    assert starts[-1] == "final-float-s0" and len(starts) == 5
    build_report(out)
    report = (out / "report.md").read_text()
    row = f"| float | {best} | {means['1e-05'] * 100:.2f} | {means['0.003'] * 100:.2f} |"
    assert "## Selections" in report and row in report
    # rerun: nothing trains, the selection is made again from the stored rows
    assert _run(grid, out)["ran"] == 0
    cells = json.loads((out / "cells.json").read_text())
    assert cells["selections"]["tune"]["chosen"] == chosen


# ----------------------------------------------------------------------------- labels
def test_stage_and_axis_labels_name_the_arms(tmp_path, tiny_data_config):
    stages = [
        {"name": "a", "label": "SAQ rho=0.05", "axes": {"method.name": ["float"]}},
        {
            "name": "b",
            "axes": {"train.lr": {"values": [1e-3, 3e-3], "labels": ["slow", "fast"]}},
        },
        {"name": "c", "axes": {"train.lr": [1e-3]}},
    ]
    grid = expand(_doc(tiny_data_config, stages=stages))
    assert [c.arm for c in grid.cells] == ["SAQ rho=0.05 float", "b slow", "b fast", "c lr=0.001"]
    assert [c.name for c in grid.cells] == ["a-float-s0", "b-slow-s0", "b-fast-s0", "c-0.001-s0"]
    out = tmp_path / "cmp"
    _run(grid, out)
    rows = _rows(out)
    assert rows["b-fast-s0"]["arm"] == "b fast" and rows["b-fast-s0"]["lr"] == "fast"
    saved = json.loads((out / "cells.json").read_text())["cells"]
    assert [c["arm"] for c in saved] == [c.arm for c in grid.cells]
    build_report(out)
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["cell", "stage", "seed", "method"] and {"lr", "arm"} <= set(header)
    bad = {"name": "b", "axes": {"train.lr": {"values": [1e-3, 3e-3], "labels": ["x"]}}}
    with pytest.raises(ConfigError, match="one non-empty string per value"):
        expand(_doc(tiny_data_config, stages=[bad]))


# ----------------------------------------------------------------------------- checkpoints
def test_follow_up_on_best_and_final_weights(tmp_path, tiny_data_config):
    from qatlab.measure.accuracy import evaluate
    from qatlab.train.checkpoint import load_checkpoint, model_from_checkpoint
    from qatlab.train.config import DataConfig
    from qatlab.train.runner import load_data

    doc = _doc(
        tiny_data_config,
        axes={"method.name": ["float"]},
        follow_ups=[{"measure": "accuracy", "checkpoint": "both"}],
    )
    # "best" = the highest training loss (epoch 1 of 2): the best epoch is not the last one
    doc["base"]["train"].update(epochs=2, early_stop_metric="train_loss", early_stop_mode="max")
    grid = expand(doc)
    out = tmp_path / "cmp"
    _run(grid, out)
    row = _rows(out)["float-s0"]
    assert row["best_epoch"] == 1 and row["epochs_run"] == 2
    folder = out / "cells" / "float-s0"
    test = load_data(DataConfig.from_dict(tiny_data_config)).test
    accs = {}
    for name in ("best.pt", "ckpt.pt"):  # independently: each checkpoint's test accuracy
        ckpt = load_checkpoint(folder / name)
        accs[name] = evaluate(model_from_checkpoint(ckpt, folder / name).eval(), test)["acc"]
    assert load_checkpoint(folder / "ckpt.pt")["epoch"] == 2
    assert row["test_acc"] == pytest.approx(accs["best.pt"])
    assert row["final_test_acc"] == pytest.approx(accs["ckpt.pt"])
    assert 0.0 <= row["final_val_acc"] <= 1.0
    with pytest.raises(ConfigError, match="checkpoint must be one of best, final, both"):
        expand(_doc(tiny_data_config, follow_ups=[{"measure": "accuracy", "checkpoint": "last"}]))


# ----------------------------------------------------------------------------- monitors
def test_flips_monitor_logs_and_logged_reductions_and_plot(tmp_path, tiny_data_config):
    doc = _doc(
        tiny_data_config,
        axes={"method.name": ["qat"], "train.lr": [1e-3, 3e-3]},
        monitors=[{"name": "flips", "every": 2}],
        plots=[{"key": "tr", "scale": 100, "ylabel": "k_t (%)"}],
        follow_ups=[
            {
                "measure": "logged",
                "key": ["tr", "val_acc"],
                "reduce": ["last", "max", "tail"],
                "tail": 0.5,
            }
        ],
    )
    doc["base"]["quant"] = {"weight_bits": 2, "act_bits": 4}
    doc["base"]["train"]["epochs"] = 2
    grid = expand(doc)
    assert grid.cells[0].config["train"]["monitors"] == [{"name": "flips", "every": 2}]
    out = tmp_path / "cmp"
    _run(grid, out)
    name = "qat-0.001-s0"
    records = read_jsonl(out / "cells" / name / "metrics.jsonl")
    steps = [r for r in records if "tr" in r and "train_loss" not in r]
    assert steps and all(r["step"] % 2 == 0 for r in steps)  # every 2nd step
    per_epoch = [r for r in records if "flip_share_epoch" in r]
    assert len(per_epoch) == 2
    for r in per_epoch:  # a weight that moved at least once per epoch vs the mean per step
        assert 0.0 < r["tr_epoch"] <= r["flip_share_epoch"] <= 1.0
    tr = [r["tr"] for r in steps]
    half = tr[-max(1, round(len(tr) * 0.5)) :]
    row = _rows(out)[name]
    assert row["logged_tr_last"] == tr[-1] and row["logged_tr_max"] == max(tr)
    assert row["logged_tr_tail50"] == pytest.approx(sum(half) / len(half))
    vals = [r["val_acc"] for r in records if "val_acc" in r]  # epoch records (epoch 0 included)
    assert row["logged_val_acc_max"] == max(vals)
    build_report(out)
    assert (out / "logged_tr.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Logged series\n" in report and "## Logged series: reductions" in report
    assert "tr_tail50 (logged)" in report and "flip_share_epoch" not in report.split("## Logged")[1]


def test_plot_keeps_the_arms_it_names_on_a_log_axis(tmp_path, monkeypatch):
    """``plots: [{key, arms, log}]``: one line per kept arm (mean over seeds), log y axis;
    an arm filter that keeps no arm with the series draws nothing."""
    from qatlab.compare import report
    from qatlab.compare.engine import prepare_folder
    from qatlab.train import plots

    def grid(arms: dict) -> dict:
        doc = _doc({"name": "mnist1d"}, axes={"train.lr": [1e-3, 3e-3, 1e-2]}, seeds=[0, 1])
        return {**doc, "plots": [{"key": "k", "arms": arms, "log": True}]}

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append((fig, path)))
    for arms, lines in (({"lr": [0.003, 0.01]}, 2), ({"lr": [0.001]}, 0)):
        g = expand(grid(arms))
        out = tmp_path / str(len(drawn))
        prepare_folder(out, g, "test")
        for cell in g.cells:
            folder = out / "cells" / cell.name
            folder.mkdir(parents=True)
            row = {"cell": cell.name, "stage": cell.stage, "seed": cell.seed, **cell.labels}
            (folder / "result.json").write_text(json.dumps({**row, "arm": cell.arm}))
            if cell.labels["lr"] != "0.001":  # the series: 10^(seed + step), steps 1 and 2
                text = "".join(
                    json.dumps({"step": s, "k": 10.0 ** (cell.seed + s)}) + "\n" for s in (1, 2)
                )
                (folder / "metrics.jsonl").write_text(text)
        blocks = report._logged_plots(report.load_results(out))
        assert len(blocks) == (2 if lines else 0)
    ((fig, path),) = drawn
    ax = fig.axes[0]
    assert path.name == "logged_k.png" and ax.get_yscale() == "log"
    got = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert got == {"lr=0.003": [55.0, 550.0], "lr=0.01": [55.0, 550.0]}  # (10 + 100) / 2 ...


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"monitors": [{"name": "flipz"}]}, "unknown monitor 'flipz' (did you mean 'flips'?)"),
        ({"monitors": [{"name": "flips", "evry": 2}]}, "unknown option 'evry' of monitor flips"),
        ({"monitors": [{"name": "flips", "every": 0}]}, "every must be an integer >= 1"),
        ({"plots": [{"key": "tr", "scal": 1}]}, "unknown key 'scal' in a plot"),
        ({"follow_ups": [{"measure": "logged", "reduce": "median"}]}, "reduce must be among"),
        ({"stages": [{"name": "x", "seeds": []}]}, "seeds must be a non-empty list"),
        (
            {"axes": {"train.lr": [1e-3]}, "plots": [{"key": "tr", "arms": {"lr": [9]}}]},
            "plot tr arms: no cell has lr='9'",
        ),
        ({"plots": [{"key": "tr", "log": "yes"}]}, "plot tr: log must be true or false"),
    ],
)
def test_bad_new_keys_are_one_line_before_anything_runs(tmp_path, capsys, extra, message):
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(_doc({"name": "mnist1d"}, **extra)))
    out = tmp_path / "cmp"
    assert main(["compare", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qatlab: error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


# ----------------------------------------------------------------------------- growing
def test_growing_a_finished_grid_runs_only_what_is_new(tmp_path, tiny_data_config):
    doc = _doc(tiny_data_config, axes={"train.lr": [1e-3, 3e-3]})
    out = tmp_path / "cmp"
    assert _run(expand(doc), out)["ran"] == 2
    first = {n: (out / "cells" / n / "best.pt").stat().st_mtime_ns for n in _rows(out)}

    doc["seeds"] = [0, 1]  # a new seed: only its cells train
    assert _run(expand(doc), out) == {"done": 4, "failed": 0, "ran": 2}
    starts = [e["cell"] for e in _events(out) if e["event"] == "start"]
    assert starts[2:] == ["0.001-s1", "0.003-s1"]
    for name, stamp in first.items():
        assert (out / "cells" / name / "best.pt").stat().st_mtime_ns == stamp
    build_report(out)
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == 5 and {line.split(",")[2] for line in csv[1:]} == {"0", "1"}

    doc["follow_ups"] = [{"measure": "accuracy"}]  # a new follow-up: measured, not retrained
    n = len(_events(out))
    assert _run(expand(doc), out)["ran"] == 4
    new = [e for e in _events(out)[n:] if e["event"] == "start"]
    assert len(new) == 4 and not any(e["train"] for e in new)
    for name, stamp in first.items():
        assert (out / "cells" / name / "best.pt").stat().st_mtime_ns == stamp
    assert all("val_loss" in r for r in _rows(out).values())

    changed = copy.deepcopy(doc)  # a changed config trains again; the old folder is kept
    changed["base"]["train"]["batch_size"] = 32
    changed["seeds"] = [0]
    assert _run(expand(changed), out)["ran"] == 2
    assert len(list((out / "replaced").iterdir())) == 2
    build_report(out)
    assert len((out / "results.csv").read_text().splitlines()) == 3  # the seed-1 cells: ignored
    assert _run(expand(doc), out)["ran"] == 0  # back: the replaced seed-0 folders return
    assert sorted(p.name.split("@")[0] for p in (out / "replaced").iterdir()) == [
        "0.001-s0",
        "0.003-s0",
    ]
    for name, stamp in first.items():
        assert (out / "cells" / name / "best.pt").stat().st_mtime_ns == stamp
    assert sum(e["event"] == "start" for e in _events(out)) == 10


def test_talr_preset_selects_lambda_on_its_own_seeds():
    from qatlab.compare.spec import load_grid

    grid = load_grid("talr")
    by_stage: dict[str, list] = {}
    for cell in grid.cells:
        by_stage.setdefault(cell.stage, []).append(cell)
    assert {c.seed for c in by_stage["tune"]} == {100, 101}
    assert {c.seed for c in by_stage["talr"]} == {0, 1, 2}
    assert grid.selections["tune"]["axis"] == "method.lam"
    for cell in by_stage["talr"]:  # one tuned lambda per model and bits
        assert cell.pending and set(cell.uses["method.lam"]["arm"]) == {"model", "bits"}
        assert cell.depends_on == f"float-{cell.labels['model']}-s{cell.seed}"
    assert all(c.config["train"]["monitors"][0]["name"] == "flips" for c in by_stage["paper"])
    for stage in ("tune", "talr", "paper"):  # every TALR run says whether K_t followed R_t
        assert all("talr_tracking" in [f["measure"] for f in c.follow_ups] for c in by_stage[stage])
    lrs = {s: {c.config["train"].get("lr", 1e-3) for c in by_stage[s]} for s in ("plain", "half")}
    assert lrs == {"plain": {1e-3}, "half": {5e-4}}  # the fair arms: the LR halved (and doubled)
    assert {c.config["train"].get("schedule") for c in by_stage["const"]} == {"constant"}
    # the fair control: the plain cosine's LR chosen on the selection seeds, as lambda is
    assert {c.seed for c in by_stage["lrtune"]} == {100, 101} and len(by_stage["lrtune"]) == 48
    assert grid.selections["lrtune"]["axis"] == "train.lr"
    swept = {c.config["train"]["lr"] for c in by_stage["lrtune"]}
    assert swept == {k * 1e-3 for k in (1, 2, 4, 8, 16, 32)}  # the plain LR times 1-32
    for cell in by_stage["tuned"]:
        assert cell.seed in (0, 1, 2) and cell.config["method"]["name"] == "qat"
        assert cell.pending and set(cell.uses["train.lr"]["arm"]) == {"model", "bits"}
        assert cell.config["train"].get("schedule", "cosine") == "cosine"


def test_saq_preset_selects_one_value_per_arm_on_its_own_seeds():
    from qatlab.compare.spec import load_grid

    grid = load_grid("saq")
    by_stage: dict[str, list] = {}
    for cell in grid.cells:
        by_stage.setdefault(cell.stage, []).append(cell)
    assert {s: len(c) for s, c in by_stage.items()} == {
        "lsq_tune": 24,
        "saq_tune": 48,
        "lsq": 12,
        "saq": 12,
        "saq_paper": 12,
        "lsq2x": 12,
        "saq_lr": 12,
    }
    assert {c.seed for s in ("lsq_tune", "saq_tune") for c in by_stage[s]} == {100, 101}
    for name in ("lsq_tune", "saq_tune"):
        assert grid.selections[name]["pool"] == ["model", "bits"]
    for cell in by_stage["lsq"] + by_stage["saq"] + by_stage["lsq2x"] + by_stage["saq_lr"]:
        assert cell.seed in (0, 1, 2) and cell.pending
        assert all(use["arm"] == {} for use in cell.uses.values())  # one value for all settings
    assert set(by_stage["saq_lr"][0].uses) == {"method", "train.lr"}
    assert {c.config["train"]["epochs"] for c in by_stage["lsq2x"]} == {24}
    paper = by_stage["saq_paper"][0].config["method"]
    assert paper == {"name": "saq", "case": 3, "ball": "std", "rho": 0.3}


def test_a_cell_finished_before_cell_keys_is_adopted_not_retrained(tmp_path, tiny_data_config):
    old = {"measure": "logged", "key": "val_acc", "reduce": "max"}
    doc = _doc(tiny_data_config, follow_ups=[old])
    out = tmp_path / "cmp"
    _run(expand(doc), out)
    folder = out / "cells" / "s0"
    for name in ("cell.json", "followups.json"):  # what a folder of an older qatlab lacks
        (folder / name).unlink()
    stamp = (folder / "best.pt").stat().st_mtime_ns
    before = json.loads((folder / "result.json").read_text())
    doc["follow_ups"] = [old, {"measure": "accuracy"}]
    assert _run(expand(doc), out)["ran"] == 1
    assert [e["train"] for e in _events(out) if e["event"] == "start"] == [True, False]
    row = json.loads((folder / "result.json").read_text())
    assert row["logged_val_acc_max"] == before["logged_val_acc_max"] and "val_loss" in row
    assert (folder / "best.pt").stat().st_mtime_ns == stamp
    assert json.loads((folder / "cell.json").read_text())["key"]  # identified from now on


def test_load_grid_leaves_its_document_untouched():
    """A stage's ``use`` placeholder was written into the document's own ``set`` (merged by
    reference), so the grid stored in a comparison folder differed from its preset."""
    from qatlab.compare.spec import load_grid, read_grid

    for name in ("talr", "qat_recipe"):  # presets with a use: stage
        assert load_grid(name).source == read_grid(name), name
