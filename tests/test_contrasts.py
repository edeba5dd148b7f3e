"""Paired contrasts: the Student-t interval, the ``contrasts:`` grid key and report section,
and the per-seed table / results.csv link of report.html."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from qatlab.cli import main
from qatlab.compare.contrasts import contrast_blocks, contrast_lines, label_values, parse_contrasts
from qatlab.compare.engine import prepare_folder
from qatlab.compare.report import build_report, load_results
from qatlab.compare.spec import Grid, expand, load_grid
from qatlab.errors import ConfigError
from qatlab.measure.stats import paired_differences, t_quantile

# two-sided 95% Student-t quantiles from printed tables
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_printed_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=5e-4)


def test_t_quantile_other_levels_symmetry_and_normal_limit():
    assert t_quantile(0.95, 1) == pytest.approx(6.314, abs=5e-4)
    assert t_quantile(0.995, 10) == pytest.approx(3.169, abs=5e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=5e-4)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def _reference(diffs: list[float]) -> tuple[float, float, float]:
    """mean and 95% interval written out independently of qatlab.measure.stats."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def test_paired_interval_equals_reference_and_ignores_unpaired_seeds():
    arm = {0: 0.93, 1: 0.94, 2: 0.95, 3: 0.97, 7: 0.5}  # seed 7: no control
    control = {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.96, 5: 0.8, 6: None}  # 5: no arm; 6: no value
    p = paired_differences(arm, control)
    assert [s for s, _ in p.diffs] == [0, 1, 2, 3]
    assert p.unpaired == 2
    diffs = [0.03, 0.02, 0.04, 0.01]
    mean, lo, hi = _reference(diffs)
    assert p.n == 4 and p.mean == pytest.approx(mean, abs=1e-12)
    assert p.sd == pytest.approx(statistics.stdev(diffs), abs=1e-12)
    assert (p.lo, p.hi) == (pytest.approx(lo, abs=1e-5), pytest.approx(hi, abs=1e-5))
    # by hand: mean 0.025, sd 0.0129099, t(0.975, 3) = 3.182, half 3.182 * 0.0129099 / 2 = 0.0205397
    assert (p.lo, p.hi) == (pytest.approx(0.0044603, abs=1e-5), pytest.approx(0.0455397, abs=1e-5))
    assert (p.wins, p.ties, p.losses) == (4, 0, 0)
    assert p.verdict() == "better"
    assert p.verdict(higher_is_better=False) == "worse"


def test_ties_tolerance_verdicts_and_small_n():
    p = paired_differences({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0005, 1: 1.5, 2: 3.5}, tie=0.001)
    assert (p.wins, p.ties, p.losses) == (1, 1, 1)
    assert p.verdict() == "no detectable difference (n=3)"
    assert paired_differences({0: 1.0}, {0: 1.0}).ties == 1  # |d| <= 0 with the default tie
    worse = paired_differences({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 3.1, 2: 4.05})
    assert worse.hi < 0 and worse.verdict() == "worse"
    assert worse.verdict(higher_is_better=False) == "better"
    assert worse.verdict(higher_is_better=None) == "lower"  # a metric with no better side
    one = paired_differences({0: 0.5, 1: 0.7}, {0: 0.4})
    assert (one.n, one.unpaired, one.mean, one.lo, one.hi) == (1, 1, pytest.approx(0.1), None, None)
    assert one.verdict() == "no interval (n=1)"
    none = paired_differences({0: 0.5}, {1: 0.4})
    assert (none.n, none.unpaired, none.mean, none.verdict()) == (0, 2, None, "no paired seeds")


# ----------------------------------------------------------------------------- a comparison
BASE = {"data": {"name": "mnist1d"}, "model": {"name": "mlp5", "width": 16}}
GRID = {
    "name": "paired",
    "base": BASE,
    "seeds": [0, 1, 2],
    "axes": {
        "method.name": ["qat", "dampen", "freeze"],
        "quant": [{"weight_bits": 4, "act_bits": 4}, {"weight_bits": 2, "act_bits": 2}],
    },
    "contrasts": [
        {"metric": "test_acc", "control": {"method": "qat"}},
        {"metric": "val_acc", "control": {"method": "qat"}, "arms": {"method": ["dampen"]}},
    ],
}
# test_acc per (method, bits) and seed; a missing seed is a cell that did not finish
ACC = {
    ("qat", "W4A4"): [0.90, 0.92, 0.91],
    ("dampen", "W4A4"): [0.93, 0.94, 0.95],  # d = .03 .02 .04: better
    ("freeze", "W4A4"): [0.89, 0.93, 0.90],  # d = -.01 .01 -.01: no detectable difference
    ("qat", "W2A2"): [0.50, 0.60, 0.55],
    ("dampen", "W2A2"): [0.52, 0.61, None],  # n = 2, seed 2 unpaired
    ("freeze", "W2A2"): [0.40, None, None],  # n = 1
}


def _folder(tmp_path: Path, grid: dict | Grid, acc: dict) -> Path:
    """A comparison folder as the engine leaves it, with hand-written result rows."""
    g = grid if isinstance(grid, Grid) else expand(grid)
    out = tmp_path / g.name
    prepare_folder(out, g, "test")
    for cell in g.cells:
        value = acc(cell) if callable(acc) else acc[tuple(cell.labels.values())][cell.seed]
        if value is None:
            continue
        row = {
            "cell": cell.name,
            "stage": cell.stage,
            "seed": cell.seed,
            **cell.labels,
            "bits_trained": cell.labels.get("bits", "float"),
            "method_name": cell.labels.get("method", "float"),
            "test_acc": value,
            "val_acc": value + 0.01 * cell.seed,
            "wall_time_s": 1.0,
        }
        if callable(acc):  # a preset's contrast metrics, and the arm's name as the engine writes it
            row.update({k: value for k in ("acc_bn", "osc_share")}, arm=cell.arm)
            for width in ("2", "3", "4", "8", "float", "trained"):
                row.update({f"xb_{width}": value, f"xbf_{width}": value})
            row.update({k: value for k in ("final_test_acc", "final_acc_bn")})
            row.update({k: value for k in ("logged_osc_share_max", "logged_osc_share_mean")})
        (out / "cells" / cell.name).mkdir(parents=True)
        (out / "cells" / cell.name / "result.json").write_text(json.dumps(row))
    return out


def _tables(blocks: list) -> list:
    return [b[1] for b in blocks if b[0] == "table"]


def test_contrast_section_rows_wtl_and_csv(tmp_path):
    out = _folder(tmp_path, GRID, ACC)
    blocks = contrast_blocks(load_results(out))
    first, second = _tables(blocks)
    assert first.headers == [
        "arm",
        "control",
        "metric",
        "n pairs",
        "mean diff (points)",
        "95% CI",
        "W/T/L",
        "verdict",
    ]
    mean, lo, hi = _reference([0.03, 0.02, 0.04])
    assert first.rows == [
        [
            "dampen W4A4",
            "qat W4A4",
            "test_acc",
            "3",
            "+3.00",
            f"[{lo * 100:+.2f}, {hi * 100:+.2f}]",
            "3/0/0",
            "better",
        ],
        [
            "dampen W2A2",
            "qat W2A2",
            "test_acc",
            "2 (+1 unpaired)",
            "+1.50",
            "[-4.85, +7.85]",
            "2/0/0",
            "no detectable difference (n=2)",
        ],
        [
            "freeze W4A4",
            "qat W4A4",
            "test_acc",
            "3",
            "-0.33",
            "[-3.20, +2.54]",
            "1/0/2",
            "no detectable difference (n=3)",
        ],
        [
            "freeze W2A2",
            "qat W2A2",
            "test_acc",
            "1 (+2 unpaired)",
            "-10.00",
            "– (n<2)",
            "0/0/1",
            "no interval (n=1)",
        ],
    ]
    assert f"[{lo * 100:+.2f}, {hi * 100:+.2f}]" == "[+0.52, +5.48]"
    # mean -1/3 point, sd 1.1547, half 4.303 * 1.1547 / sqrt(3) = 2.8687 points
    assert [r[0] for r in second.rows] == ["dampen W4A4", "dampen W2A2"]  # the arms filter
    assert second.rows[0][4] == "+3.00"  # val_acc = test_acc + seed/100 on both sides

    with (out / "contrasts.csv").open() as fh:
        records = list(csv.DictReader(fh))
    assert len(records) == 6
    r = records[0]
    assert (r["contrast"], r["metric"], r["arm"], r["control"]) == (
        "0",
        "test_acc",
        "dampen W4A4",
        "qat W4A4",
    )
    assert (r["arm_method"], r["arm_bits"], r["control_method"]) == ("dampen", "W4A4", "qat")
    assert float(r["mean_diff"]) == pytest.approx(mean)
    assert (float(r["ci_lo"]), float(r["ci_hi"])) == (
        pytest.approx(lo, abs=1e-5),
        pytest.approx(hi, abs=1e-5),
    )
    assert (r["wins"], r["ties"], r["losses"], r["seeds"]) == ("3", "0", "0", "0 1 2")
    assert records[3]["ci_lo"] == "" and records[3]["unpaired"] == "2"
    doc = json.loads((out / "contrasts.json").read_text())
    pair = doc[0]["lines"][1]["pairs"][1]
    assert pair == {
        "seed": 1,
        "arm_cell": "dampen-w2a2-s1",
        "control_cell": "qat-w2a2-s1",
        "arm_value": 0.61,
        "control_value": 0.60,
        "diff": pytest.approx(0.01),
    }


def test_an_arm_label_names_the_arms_and_does_not_stop_the_matching(tmp_path):
    """Rows (and cells) may carry an explicit ``arm`` label: it names the table's rows."""
    out = _folder(tmp_path, GRID, ACC)
    doc = json.loads((out / "cells.json").read_text())
    for cell in doc["cells"]:
        cell["labels"]["arm"] = "{method}@{bits}".format(**cell["labels"])
        path = out / "cells" / cell["name"] / "result.json"
        if path.is_file():
            path.write_text(json.dumps({**json.loads(path.read_text()), **cell["labels"]}))
    doc["label_columns"].append("arm")
    (out / "cells.json").write_text(json.dumps(doc))
    first, _ = _tables(contrast_blocks(load_results(out)))
    assert [(r[0], r[1], r[6]) for r in first.rows] == [
        ("dampen@W4A4", "qat@W4A4", "3/0/0"),
        ("dampen@W2A2", "qat@W2A2", "2/0/0"),
        ("freeze@W4A4", "qat@W4A4", "1/0/2"),
        ("freeze@W2A2", "qat@W2A2", "0/0/1"),
    ]


def test_stage_contrast_matches_the_control_stage_on_shared_labels(tmp_path):
    grid = {
        "name": "staged",
        "base": BASE,
        "seeds": [0, 1],
        "stages": [
            {"name": "float", "axes": {"model.width": [16, 32]}},
            {
                "name": "qat",
                "init_from": "float",
                "set": {"quant": {"weight_bits": 4, "act_bits": 4}},
                "axes": {"model.width": [16, 32], "method.name": ["qat", "dampen"]},
            },
        ],
        "contrasts": [{"metric": "test_acc", "control": {"stage": "float"}, "tie": 0.005}],
    }
    acc = {
        ("16",): [0.80, 0.82],
        ("32",): [0.85, 0.86],
        ("16", "qat"): [0.79, 0.83],  # d = -.01 +.01
        ("16", "dampen"): [0.803, 0.822],  # d = .003 .002: ties at tie=0.005
        ("32", "qat"): [0.84, 0.85],
        ("32", "dampen"): [0.86, None],
    }
    out = _folder(tmp_path, grid, acc)
    (table,) = _tables(contrast_blocks(load_results(out)))
    got = [(r[0], r[1], r[3], r[6]) for r in table.rows]
    assert got == [
        ("qat 16 qat", "float 16", "2", "1/0/1"),
        ("qat 16 dampen", "float 16", "2", "0/2/0"),
        ("qat 32 qat", "float 32", "2", "0/0/2"),
        ("qat 32 dampen", "float 32", "1 (+1 unpaired)", "1/0/0"),
    ]


def test_arms_of_a_stage_without_the_control_axis_and_metric_lists(tmp_path):
    """oscreg's ablation: constant step (a stage without the lam axis) vs the reg stage's λ=0
    at the same target bits, on two metrics; ``lam: 0`` names the label "0.0"."""
    reg = {"name": "oscreg", "stats_every": 0}
    grid = {
        "name": "ablation",
        "base": BASE,
        "seeds": [0, 1],
        "stages": [
            {
                "name": "reg",
                "set": {"method": reg},
                "axes": {"method.target_bits": [2, 3], "method.lam": [0.0, 1.0]},
            },
            {
                "name": "const",
                "set": {"method": {**reg, "lam": 1.0, "step_grad": False}},
                "axes": {"method.target_bits": [2, 3]},
            },
        ],
        "contrasts": [
            {"metric": ["test_acc", "val_acc"], "control": {"stage": "reg", "lam": 0}},
        ],
    }
    acc = {
        ("2", "0.0"): [0.50, 0.52],
        ("2", "1.0"): [0.60, 0.61],
        ("3", "0.0"): [0.70, 0.72],
        ("3", "1.0"): [0.71, 0.71],
        ("2",): [0.49, 0.53],
        ("3",): [0.75, 0.78],
    }
    out = _folder(tmp_path, grid, acc)
    (table,) = _tables(contrast_blocks(load_results(out)))
    got = [(r[0], r[1], r[2], r[4], r[6]) for r in table.rows]
    assert got == [
        ("reg 2 1.0", "reg 2 0.0", "test_acc", "+9.50", "2/0/0"),
        ("reg 2 1.0", "reg 2 0.0", "val_acc", "+9.50", "2/0/0"),
        ("reg 3 1.0", "reg 3 0.0", "test_acc", "+0.00", "1/0/1"),
        ("reg 3 1.0", "reg 3 0.0", "val_acc", "+0.00", "1/0/1"),
        ("const 2", "reg 2 0.0", "test_acc", "+0.00", "1/0/1"),
        ("const 2", "reg 2 0.0", "val_acc", "+0.00", "1/0/1"),
        ("const 3", "reg 3 0.0", "test_acc", "+5.50", "2/0/0"),
        ("const 3", "reg 3 0.0", "val_acc", "+5.50", "2/0/0"),
    ]


@pytest.mark.parametrize("preset", ["oscreg", "oscillations", "full"])
def test_preset_contrasts_find_every_control(tmp_path, preset):
    out = _folder(tmp_path, load_grid(preset), lambda cell: 0.5)
    res = load_results(out)
    pairs = {}
    for contrast in parse_contrasts(res.meta["grid"]["contrasts"], label_values(res.cells)):
        lines, notes = contrast_lines(res, contrast)
        assert notes == [] and lines and all(line.paired.n == 3 for line in lines)
        for line in lines:
            pairs.setdefault(line.arm.name, set()).add(line.control.name)
    if preset == "oscreg":  # each against the same target's control, float + PTQ, and QAT
        reg, qat = "oscreg + PTQ", "QAT"
        control, authors = f"{reg} λ=0 control", f"{reg} authors' gradient"
        assert pairs[f"{reg} constant step target_bits=3"] == {
            f"{control} target_bits=3",
            "float + PTQ",
        }
        assert pairs[f"{reg} uniform agg. target_bits=2"] == {
            f"{control} target_bits=2",
            f"{authors} λ=1 target_bits=2",
            "float + PTQ",
        }
        assert pairs[f"{authors} λ=100 target_bits=2"] == {
            f"{control} target_bits=2",
            "float + PTQ",
        }
        assert pairs[f"{authors} λ=1 target_bits=3"] == {
            f"{control} target_bits=3",
            "float + PTQ",
            f"{qat} LSQ W3A-",
            f"{qat} max-abs STE W3A-",
        }
        assert pairs[f"{control} target_bits=4"] == {"float + PTQ"}
        assert len(pairs) == 3 + 3 + 3 + 2 + 3  # λ=0, λ=1, const, uniform, sweep
    elif preset == "oscillations":
        assert pairs["qat model=mlp5 W3A3 freeze"] == {"qat model=mlp5 W3A3 track"}
        long = "long model=mobilenetv2 W3A3"
        assert pairs[f"{long} freeze"] == {f"{long} track", f"{long} freeze"}  # + BN: itself
        # control: self (BN re-estimation): the mobilenetv2 track arms are their own control
        assert pairs[f"{long} track"] == {f"{long} track"}
        assert pairs["qat model=mobilenetv2 W4A4 track"] == {"qat model=mobilenetv2 W4A4 track"}
        assert "qat model=mlp5 W4A4 track" not in pairs
        assert len(pairs) == 8 + 2 + 3  # qat dampen/freeze, qat mobilenetv2 track, long
    else:
        assert pairs["digits saq W2A2"] == {"digits qat W2A2"} and len(pairs) == 5 * 3 * 3


def test_report_html_has_per_seed_rows_csv_link_and_contrasts(tmp_path):
    out = _folder(tmp_path, GRID, ACC)
    build_report(out)
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert '<a href="results.csv">results.csv</a>' in page
    assert "[results.csv](results.csv)" in md
    assert page.index("results.csv") < page.index("<h2>")  # near the top, before any section
    details = page[page.index("<details>") : page.index("</details>")]
    assert details.count("<tr>") == 1 + 15  # header + the 15 finished cells
    assert (
        "<td>dampen-w2a2-s1</td><td>dampen W2A2</td><td>dampen</td><td>W2A2</td><td>1</td>"
        in details
    )
    assert "<td>61.00</td><td>62.00</td>" in details  # test and val acc of that cell, in %
    assert "<details>" not in md  # the per-seed table is HTML only
    assert (
        "| dampen W4A4 | qat W4A4 | test_acc | 3 | +3.00 | [+0.52, +5.48] | 3/0/0 | better |" in md
    )
    assert (out / "results.csv").is_file() and (out / "contrasts.csv").is_file()


def test_contrasts_do_not_change_the_fingerprint():
    plain = {k: v for k, v in GRID.items() if k != "contrasts"}
    assert expand(GRID).fingerprint == expand(plain).fingerprint


@pytest.mark.parametrize(
    ("contrasts", "message"),
    [
        ({"metric": "test_acc"}, "contrasts must be a list"),
        ([{"metric": "test_acc"}], "contrasts[0] needs control: {label: value}"),
        ([{"control": {"method": "qat"}}], "contrasts[0] needs metric: a result column"),
        ([{"metric": "test_acc", "controls": {}}], "unknown key 'controls' in contrasts[0] (did"),
        (
            [{"metric": "test_acc", "control": {"methd": "qat"}}],
            "contrasts[0] control: 'methd' is not a label column of this grid",
        ),
        (
            [{"metric": "test_acc", "control": {"method": "lsq"}}],
            "contrasts[0] control: no cell has method='lsq' (method values: 'qat', 'dampen'",
        ),
        (
            [{"metric": "test_acc", "control": {"bits": "W4A4"}, "arms": {"bits": [4]}}],
            "contrasts[0] arms: no cell has bits='4'",
        ),
        ([{"metric": "test_acc", "control": {"bits": "W4A4"}, "tie": -1}], "tie must be"),
        ([{"metric": "test_acc", "control": {"bits": "W4A4"}, "better": "up"}], "better must"),
    ],
)
def test_bad_contrasts_are_one_config_error(contrasts, message):
    with pytest.raises(ConfigError) as err:
        expand({**GRID, "contrasts": contrasts})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_contrasts_stop_the_cli_in_one_line(tmp_path, capsys):
    import yaml

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "contrasts": [{"metric": "test_acc", "control": {}}]}))
    out = tmp_path / "cmp"
    assert main(["compare", str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "qatlab: error: contrasts[0] needs control: {label: value}, e.g. {method: qat}\n"
    assert not out.exists()



def test_templates_pair_each_arm_with_the_control_its_labels_name(tmp_path):
    """oscreg's claim 1 by the general contrasts: a model regularized for target width t and
    quantized after training to t bits (metric ``x_{target_bits}``) against the QAT model
    trained at t bits (control ``bits: "W{target_bits}A4"``, its own column ``x_trained``);
    the stage without target_bits (float) is not part of the contrast."""
    grid = {
        "name": "claims",
        "base": BASE,
        "seeds": [0, 1, 2],
        "stages": [
            {"name": "float"},
            {
                "name": "reg",
                "set": {"method": {"name": "oscreg", "stats_every": 0}},
                "axes": {"method.target_bits": [2, 3]},
            },
            {"name": "qat", "axes": {"quant": [{"weight_bits": b, "act_bits": 4} for b in (2, 3)]}},
        ],
        "contrasts": [
            {
                "metric": ["x_{target_bits}", "y_{target_bits}"],
                "control": {"stage": "qat", "bits": "W{target_bits}A4"},
                "control_metric": ["x_trained", "y_trained"],
            }
        ],
    }
    g = expand(grid)
    out = _folder(tmp_path, g, lambda cell: 0.5)
    ptq = {"2": [0.40, 0.42, 0.47], "3": [0.85, 0.86, 0.84]}  # regularized + PTQ at its target
    trained = {"W2A4": [0.60, 0.61, 0.62], "W3A4": [0.80, 0.80, 0.81]}  # QAT as trained
    for cell in g.cells:
        path = out / "cells" / cell.name / "result.json"
        row = json.loads(path.read_text())
        if cell.stage == "reg":
            t = cell.labels["target_bits"]
            row.update({f"x_{t}": ptq[t][cell.seed], f"y_{t}": 1.0})
        elif cell.stage == "qat":
            row.update(x_trained=trained[cell.labels["bits"]][cell.seed], y_trained=1.0)
        path.write_text(json.dumps(row))
    (table,) = _tables(contrast_blocks(load_results(out)))
    got = [(r[0], r[1], r[2], r[4], r[6]) for r in table.rows]
    assert got == [
        ("reg target_bits=2", "qat W2A4", "x_2 vs x_trained", "-18.00", "0/0/3"),
        ("reg target_bits=2", "qat W2A4", "y_2 vs y_trained", "+0.00", "0/3/0"),
        ("reg target_bits=3", "qat W3A4", "x_3 vs x_trained", "+4.67", "3/0/0"),
        ("reg target_bits=3", "qat W3A4", "y_3 vs y_trained", "+0.00", "0/3/0"),
    ]
    mean, lo, hi = _reference([0.05, 0.06, 0.03])
    assert table.rows[2][5] == f"[{lo * 100:+.2f}, {hi * 100:+.2f}]" == "[+0.87, +8.46]"
    doc = json.loads((out / "contrasts.json").read_text())
    pairs = doc[0]["lines"][2]["pairs"]
    assert [(p["arm_value"], p["control_value"]) for p in pairs] == [
        (0.85, 0.8),
        (0.86, 0.8),
        (0.84, 0.81),
    ]
    assert doc[0]["lines"][2]["control_metric"] == "x_trained"
    bad = [
        ({"metric": "x_{bitz}", "control": {"stage": "qat"}}, "contrasts[0] metric 'x_{bitz}'"),
        ({"metric": "x", "control": {"bits": "W{nope}A4"}}, "{'nope'} is not a label column"),
        ({"metric": ["a", "b"], "control": {"stage": "qat"}, "control_metric": "c"}, "one column"),
    ]
    for contrast, message in bad:
        with pytest.raises(ConfigError) as err:
            expand({**grid, "contrasts": [contrast]})
        assert message in str(err.value)


def test_control_metric_reads_the_controls_value_from_a_template_column(tmp_path):
    """QAT at W4 against the float model post-training quantized to W4 (another column of the
    float row): ``control_metric: "ptqcorr_{bits}"`` is filled with the arm's labels."""
    grid = {
        "name": "qat-vs-ptq",
        "base": BASE,
        "seeds": [0, 1],
        "axes": {"quant": [None, {"weight_bits": 4, "act_bits": 4}]},
        "contrasts": [
            {
                "metric": "corr_mean",
                "control": {"bits": "float"},
                "control_metric": "ptqcorr_{bits}",
            }
        ],
    }
    g = expand(grid)
    out = _folder(tmp_path, g, lambda cell: 0.5)
    for cell in g.cells:  # QAT: 0.80/0.82 corrupted; float+PTQ W4: 0.70/0.75 (float: 0.9)
        path = out / "cells" / cell.name / "result.json"
        row = json.loads(path.read_text())
        if cell.labels["bits"] == "float":
            row.update(corr_mean=0.9, ptqcorr_W4A4=[0.70, 0.75][cell.seed])
        else:
            row.update(corr_mean=[0.80, 0.82][cell.seed])
        path.write_text(json.dumps(row))
    (table,) = _tables(contrast_blocks(load_results(out)))
    assert [r[:5] for r in table.rows] == [
        ["W4A4", "float", "corr_mean vs ptqcorr_W4A4", "2", "+8.50"]  # (10 + 7) / 2 points
    ]
    doc = json.loads((out / "contrasts.json").read_text())
    assert [p["control_value"] for p in doc[0]["lines"][0]["pairs"]] == [0.70, 0.75]
    with pytest.raises(ConfigError, match="control_metric"):
        expand({**grid, "contrasts": [{**grid["contrasts"][0], "control_metric": "x_{nope}"}]})


def test_pool_merges_arms_that_differ_only_in_the_pooled_columns(tmp_path):
    """``pool: [bits]`` over dampen/freeze vs qat: one line per method whose pairs are
    (bits, seed); the mean is over every pair of both widths."""
    contrast = {"metric": "test_acc", "control": {"method": "qat"}, "pool": ["bits"]}
    out = _folder(tmp_path, {**GRID, "contrasts": [contrast]}, ACC)
    res = load_results(out)
    (parsed,) = parse_contrasts([contrast], label_values(res.cells))
    lines, _ = contrast_lines(res, parsed)
    dampen, freeze = lines
    assert dampen.arm.name == "dampen (pooled over bits)" and dampen.control.name == "qat"
    # W4A4: .03 .02 .04, W2A2: .02 .01 (seed 2 unpaired)
    assert [d for _, d in dampen.paired.diffs] == pytest.approx([0.02, 0.01, 0.03, 0.02, 0.04])
    assert [k for k, _ in dampen.paired.diffs][0] == ("W2A2", 0)
    assert dampen.paired.unpaired == 1
    assert freeze.paired.n == 4  # W4A4 x3 + W2A2 seed 0
    with pytest.raises(ConfigError, match="pool"):
        parse_contrasts([{**contrast, "pool": ["method"]}], label_values(res.cells))


def test_control_self_pairs_two_columns_of_each_arms_own_rows(tmp_path):
    """``control: self`` (BN re-estimation's gain: acc_bn vs test_acc of the same cells): each
    chosen arm is its own control, seed by seed; without control_metric it is refused."""
    own = {"metric": "val_acc", "control": "self", "control_metric": "test_acc"}
    grid = {**GRID, "contrasts": [{**own, "arms": {"method": ["qat", "freeze"]}}]}
    out = _folder(tmp_path, grid, ACC)
    (table,) = _tables(contrast_blocks(load_results(out)))
    # val_acc = test_acc + 0.01 * seed: d = 0, .01, .02 (freeze W2A2: seed 0 only, d = 0)
    assert [r[:6] for r in table.rows] == [
        ["qat W4A4", "qat W4A4", "val_acc vs test_acc", "3", "+1.00", "[-1.48, +3.48]"],
        ["qat W2A2", "qat W2A2", "val_acc vs test_acc", "3", "+1.00", "[-1.48, +3.48]"],
        ["freeze W4A4", "freeze W4A4", "val_acc vs test_acc", "3", "+1.00", "[-1.48, +3.48]"],
        ["freeze W2A2", "freeze W2A2", "val_acc vs test_acc", "1", "+0.00", "– (n<2)"],
    ]
    doc = json.loads((out / "contrasts.json").read_text())
    assert doc[0]["control"] == "self"
    pairs = doc[0]["lines"][0]["pairs"]
    assert [(p["arm_cell"] == p["control_cell"], p["arm_value"]) for p in pairs] == [
        (True, 0.90),
        (True, 0.92 + 0.01),
        (True, 0.91 + 0.02),
    ]
    assert [p["control_value"] for p in pairs] == [0.90, 0.92, 0.91]
    with pytest.raises(ConfigError, match="control: self .* needs control_metric"):
        expand({**GRID, "contrasts": [{"metric": "acc_bn", "control": "self"}]})
