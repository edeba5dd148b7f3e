"""Study reports: aggregation over seeds and markdown tables."""

from __future__ import annotations

import math

from qatlab.compare import markdown_table, mean_std
from qatlab.compare.oscreg import _claims


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


def test_oscreg_claims_read_the_table():
    def row(arm, target, b2, b3, b4, b8, bf, trained=None):
        vals = {"b2": b2, "b3": b3, "b4": b4, "b8": b8, "bfloat": bf, "btrained": trained}
        return {
            "arm": arm,
            "target": target,
            **{k: (v, 0.0, 3) if v is not None else None for k, v in vals.items()},
        }

    table = [row("qat", str(t), 0.6, 0.7, 0.7, 0.7, 0.7, 0.8) for t in (2, 3, 4)]
    table += [row("qatste", str(t), 0.6, 0.7, 0.7, 0.7, 0.7, 0.95) for t in (2, 3, 4)]
    table += [row("reg", str(t), 0.5, 0.85, 0.9, 0.9, 0.9) for t in (2, 3, 4)]
    claims = "\n".join(_claims({"final": table}))
    # 3- and 4-bit: +5/+10 points vs LSQ (0.8), -10/-5 vs max-abs STE (0.95)
    assert "3-bit vs LSQ +5.0; 3-bit vs max-abs STE -10.0" in claims
    assert "Within 1 point or better in 2/4" in claims
    assert "QAT ahead in 2/2" in claims
    assert "Regularized ahead in 4/4" in claims
