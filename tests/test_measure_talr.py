"""The talr_tracking measure: how TALR's logged K_t followed R_t, on hand-made records."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qatlab.errors import ConfigError
from qatlab.measure import MEASURES, run_measure
from qatlab.measure.talr import tracking_stats


def _records() -> list[dict]:
    """10 logged TALR steps (5, 10, ..., 50) and two epoch records (steps 25 and 50). Steps
    after 20% of T = 50 (step > 10): 15..50, eight of them."""
    rows = [  # step, K, R, Rbar, U
        (5, 0.0, 1.0, 0.1, 0.001),  # early: not counted in the shares
        (10, 5.0, 1.0, 1.0, 0.004),  # step 10 = 20% of T: still early
        (15, 1.0, 1.0, 1.0, 0.002),  # K/R 1 in, K/Rbar 1 in
        (20, 1.9, 1.0, 1.0, 0.002),  # 1.9 in, in
        (25, 0.6, 1.0, 1.2, 0.0),  # 0.6 in; K/Rbar 0.5 in (the edge); U = 0 before T
        (30, 2.5, 1.0, 2.0, 0.003),  # 2.5 out: the first break, at 30/50 = 60%; K/Rbar 1.25
        (35, 0.5, 1.0, 0.2, 0.002),  # 0.5 in (the edge); K/Rbar 2.5 out
        (40, 0.3, 0.0, 1.0, 0.002),  # R = 0: never met; K/Rbar 0.3 out
        (45, 1.0, 0.4, 0.5, 0.002),  # 2.5 out; K/Rbar 2 in (the edge)
        (50, 0.5, 0.1, 0.625, 0.0),  # 5 out; K/Rbar 0.8 in; U = 0 at T: no step left
    ]
    recs = [
        {"epoch": 0, "step": s, "talr_k": 0.0, "talr_K": k, "talr_R": r, "talr_Rbar": rb,
         "talr_U": u}
        for s, k, r, rb, u in rows
    ]  # fmt: skip
    recs.insert(5, {"epoch": 0, "step": 25, "train_loss": 1.0, "val_acc": 0.5})
    recs.append({"epoch": 1, "step": 50, "train_loss": 0.9, "val_acc": 0.6, "tr": 0.01})
    return recs


def test_tracking_stats_on_hand_made_records():
    out = tracking_stats(_records(), skip=0.2, u0=0.002)
    assert out["talr_late_steps"] == 8
    assert out["talr_in2x_R"] == pytest.approx(4 / 8)  # steps 15, 20, 25, 35
    assert out["talr_in2x_R_until"] == pytest.approx(30 / 50)
    assert out["talr_in2x_Rbar"] == pytest.approx(6 / 8)  # all but 35 (2.5) and 40 (0.3)
    assert out["talr_K_Rbar_min"] == pytest.approx(0.3)
    assert out["talr_K_Rbar_max"] == pytest.approx(2.5)
    assert out["talr_U_zero_steps"] == 1  # step 25; step 50 is the last (U_T drives nothing)
    assert out["talr_U_max_ratio"] == pytest.approx(0.004 / 0.002)  # step 10 counts here


def test_tracking_stats_without_a_break_and_without_talr_records():
    recs = [
        {"step": s, "talr_K": 1.0, "talr_R": 1.5, "talr_Rbar": 1.0, "talr_U": 0.1}
        for s in range(10, 110, 10)
    ]
    out = tracking_stats(recs, skip=0.5)  # late: 60..100
    assert out["talr_late_steps"] == 5
    assert out["talr_in2x_R"] == 1.0 and out["talr_in2x_R_until"] == 1.0
    assert "talr_U_max_ratio" not in out  # no U_0 given
    assert tracking_stats([{"step": 5, "tr": 0.1, "train_loss": 1.0}]) == {}


def test_talr_tracking_measure_reads_the_run_records_and_its_lr():
    cfg = SimpleNamespace(
        method=SimpleNamespace(options={"u0": 0.0}), train=SimpleNamespace(lr=0.001)
    )
    ctx = SimpleNamespace(cfg=cfg, results={}, logged_records=_records)
    out = run_measure(ctx, "talr_tracking")
    assert out["talr_U_max_ratio"] == pytest.approx(4.0)  # U_0 = the LR, 0.001
    assert ctx.results["talr_in2x_R"] == pytest.approx(0.5)
    cfg.method.options["u0"] = 0.004  # a given method.u0 is U_0
    assert run_measure(ctx, "talr_tracking")["talr_U_max_ratio"] == pytest.approx(1.0)
    assert run_measure(ctx, "talr_tracking", u0=0.008)["talr_U_max_ratio"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match=r"^talr_tracking: skip must be a fraction in \[0, 1\)"):
        MEASURES["talr_tracking"].fn.check(skip=1.0)
