"""The integer export pinned on a hand-made model (``make mutants``, docs/results/mutation.md).

A quantized ``Linear(2, 2) -> ReLU -> Linear(2, 1)`` with steps set by hand: the integers,
steps, offsets, manifest rows and float tensors :func:`qatlab.export.to_integer` writes, worked
out on paper, and ``weight_int * weight_step`` giving back ``q(w)``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qatlab
from qatlab.errors import CheckpointError, ConfigError
from qatlab.export.integer import (
    FORMAT,
    dequantize_weights,
    load_integer,
    manifest_path,
    to_integer,
)


def _net(act_scale: str = "lsq", channels: bool = False) -> nn.Sequential:
    """Layer 0: w = [[0.3, 1.2], [-0.6, 2.6]], step 0.5 -> ints [[1, 2], [-1, 5]] (4 bit);
    layer 2: w = [[1.0, -0.2]], step 0.25 -> [[4, -1]]; input steps 0.1 and 0.2."""
    cfg = qatlab.QuantConfig(
        first_layer="same",
        last_layer="same",
        act_scale=act_scale,
        act_signed=False,
        weight_granularity="channel" if channels else "tensor",
    )
    net = qatlab.quantize(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), cfg)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.3, 1.2], [-0.6, 2.6]]))
        net[0].bias.copy_(torch.tensor([0.5, -0.5]))
        net[2].weight.copy_(torch.tensor([[1.0, -0.2]]))
        net[2].bias.fill_(0.125)
        steps = ([0.5, 0.25], 0.25) if channels else (0.5, 0.25)  # one row: per tensor
        for layer, wstep, astep in ((net[0], steps[0], 0.1), (net[2], steps[1], 0.2)):
            layer.weight_quantizer.step.copy_(torch.tensor(wstep))
            layer.input_quantizer.step.fill_(astep)
            if act_scale == "lsq+":
                layer.input_quantizer.offset.fill_(-astep)
            for q in (layer.weight_quantizer, layer.input_quantizer):
                q.initialized.fill_(True)
                q._ready = None
    return net


def test_integer_export_by_hand(tmp_path):
    net = _net()
    path, mpath = to_integer(net, tmp_path / "m.int.pt", {"arch": "mlp"})
    assert (path, mpath) == (tmp_path / "m.int.pt", tmp_path / "m.int.json")
    manifest, t = load_integer(path)
    assert manifest == json.loads(mpath.read_text())
    assert mpath.read_text().endswith("}\n")
    assert manifest["format"] == FORMAT == "qatlab-int-1"
    assert manifest["tensors"] == "m.int.pt" and manifest["model_spec"] == {"arch": "mlp"}
    assert manifest["dequantize"] == (
        "weight = weight_int * weight_step (per output channel on axis 0 when weight_per_channel);"
        " input q(x) = input_step * clamp(round((x - offset) / input_step), *input_grid) + offset"
        " (offset 0 unless input_offset)"
    )
    row = {
        "kind": "QuantLinear",
        "weight_bits": 4,
        "weight_grid": [-8, 7],
        "weight_per_channel": False,
        "input_bits": 4,
        "input_grid": [0, 15],
        "input_offset": False,
    }
    assert manifest["layers"] == [
        {"name": "0", "weight_shape": [2, 2], **row},
        {"name": "2", "weight_shape": [1, 2], **row},
    ]
    assert sorted(t) == [
        "0.bias", "0.input_step", "0.weight_int", "0.weight_step",
        "2.bias", "2.input_step", "2.weight_int", "2.weight_step",
    ]  # fmt: skip
    assert manifest["float_tensors"] == ["0.bias", "2.bias"]
    assert t["0.weight_int"].dtype == torch.int8
    assert t["0.weight_int"].tolist() == [[1, 2], [-1, 5]]
    assert t["2.weight_int"].tolist() == [[4, -1]]
    assert t["0.weight_step"].item() == 0.5 and t["2.weight_step"].item() == 0.25
    assert t["0.input_step"].item() == pytest.approx(0.1) and t["2.bias"].tolist() == [0.125]
    deq = dequantize_weights(manifest, t)
    assert list(deq) == ["0", "2"]
    assert deq["0"].tolist() == [[0.5, 1.0], [-0.5, 2.5]] and deq["2"].tolist() == [[1.0, -0.25]]
    # the model is not changed, and nothing else is in the folder
    assert net[0].weight[0, 0].item() == pytest.approx(0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int.json", "m.int.pt"]


def test_integer_export_offsets_channels_and_float_input(tmp_path):
    net = _net("lsq+", channels=True)
    net[0].input_quantizer.enabled = False  # float input to the first layer
    manifest, t = load_integer(to_integer(net, tmp_path / "c.pt")[0])
    rows = manifest["layers"]
    assert manifest["model_spec"] is None
    assert [r["weight_per_channel"] for r in rows] == [True, False]
    assert (rows[0]["input_bits"], rows[0]["input_grid"], rows[0]["input_offset"]) == (
        None,
        None,
        False,
    )
    assert (rows[1]["input_bits"], rows[1]["input_grid"], rows[1]["input_offset"]) == (
        4,
        [0, 15],
        True,
    )
    assert "0.input_step" not in t and "0.input_offset" not in t
    assert t["2.input_offset"].item() == pytest.approx(-0.2)
    assert t["0.weight_step"].tolist() == [0.5, 0.25]
    # per channel: row 1 at 0.25 -> [-0.6, 2.6] / 0.25 = [-2.4, 10.4] -> [-2, 7] (clipped)
    assert t["0.weight_int"].tolist() == [[1, 2], [-2, 7]]
    assert dequantize_weights(manifest, t)["0"].tolist() == [[0.5, 1.0], [-0.5, 1.75]]
    assert manifest["float_tensors"] == ["0.bias", "2.bias"]


def test_a_bare_layer_exports_without_a_prefix(tmp_path):
    layer = _net()[2]
    manifest, t = load_integer(to_integer(layer, tmp_path / "l.pt")[0])
    assert manifest["layers"][0]["name"] == ""
    assert sorted(t) == ["bias", "input_step", "weight_int", "weight_step"]
    assert manifest["float_tensors"] == ["bias"]
    assert dequantize_weights(manifest, t) == {"": pytest.approx(torch.tensor([[1.0, -0.25]]))}


def test_a_max_abs_weight_step_is_computed_from_the_weight(tmp_path):
    net = qatlab.quantize(
        nn.Sequential(nn.Linear(2, 2)),
        qatlab.QuantConfig(first_layer="same", last_layer="same", weight_scale="maxabs",
                           act_bits=None),
    )  # fmt: skip
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.3, 1.2], [-0.6, 2.8]]))
    manifest, t = load_integer(to_integer(net, tmp_path / "m.pt")[0])
    assert t["0.weight_step"].item() == pytest.approx(0.4)  # max|w| / 7
    assert t["0.weight_int"].tolist() == [[1, 3], [-2, 7]]  # [.75, 3, -1.5, 7]: half to even
    assert manifest["layers"][0]["input_bits"] is None


class _Payload:
    """Not a tensor: a weights-only load must refuse to unpickle it."""


def test_integer_export_refusals(tmp_path):
    with pytest.raises(ConfigError):
        to_integer(nn.Linear(2, 1), tmp_path / "f.pt")
    net = _net()
    net[2].weight_quantizer.enabled = False
    with pytest.raises(ConfigError):
        to_integer(net, tmp_path / "w.pt")
    assert list(tmp_path.iterdir()) == []
    path = to_integer(_net(), tmp_path / "ok.pt")[0]
    manifest_path(path).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError):
        load_integer(path)
    with pytest.raises(CheckpointError):
        load_integer(tmp_path / "missing.pt")
    # a tensor file that holds an object: weights_only refuses it (no code runs on load)
    manifest_path(path).write_text(json.dumps({"format": FORMAT}))
    torch.save({"x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="[Ww]eights.only") as refused:
        load_integer(path)
    assert "\n" not in str(refused.value)  # one line, not torch's page of advice
    assert manifest_path("a/b.int.pt") == manifest_path("a/b.int.json")
    assert str(manifest_path("a/b.int.pt")) == "a/b.int.json"


def test_load_integer_names_an_exception_without_a_message(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    path.write_bytes(b"")
    path.with_suffix(".json").write_text("{}")

    def silent(*args, **kwargs):
        raise RuntimeError("")

    monkeypatch.setattr(torch, "load", silent)
    with pytest.raises(CheckpointError, match=r"cannot read integer export .*m\.pt: RuntimeError$"):
        load_integer(path)
