"""Cross-bit evaluation on a tiny regression-free classifier: numbers, not just 'it ran'."""

from __future__ import annotations

import torch
from torch import nn

import qatlab
from qatlab.measure.crossbit import cross_bit, ptq_config


def _data_and_model():
    torch.manual_seed(0)
    x = torch.randn(400, 10)
    teacher = torch.randn(10, 4)
    y = (x @ teacher).argmax(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return x, y, model.eval()


def test_cross_bit_matrix_orders_bit_widths():
    x, y, model = _data_and_model()

    def acc(m):
        with torch.no_grad():
            return float((m.eval()(x).argmax(1) == y).float().mean())

    res = cross_bit(model, acc)
    assert set(res) == {"2", "3", "4", "8", "float"}
    assert res["float"] > 0.9
    assert abs(res["8"] - res["float"]) < 0.03  # 8-bit PTQ is nearly lossless
    assert res["2"] < res["8"]  # ternary costs accuracy
    q = qatlab.quantize(model, ptq_config(3))
    res_q = cross_bit(q, acc, bits=(3,))
    assert "trained" in res_q and abs(res_q["float"] - res["float"]) < 1e-9


def test_ptq_config_is_weights_only_restricted_maxabs_everywhere():
    cfg = ptq_config(2)
    assert cfg.weights_only and cfg.weight_grid == "restricted" and cfg.weight_scale == "maxabs"
    assert cfg.first_layer == cfg.last_layer == "same"
