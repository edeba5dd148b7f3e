"""qatlab.export: ONNX (checked in ONNX Runtime) and the integer format.

Matrix: every model (mlp5, cnn1d, resnet20 on CIFAR-shaped input, mobilenetv2 with depthwise
convs) at W4A4 per-channel and W8A8 per-tensor; W2A2 on all four (mixed granularity); W8A8
fused-kernel counts on all four. Random data, random BatchNorm statistics (10% negative
scales, so both BN paths run), tiny widths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import qatlab
from qatlab import models
from qatlab.quant import quant_layers, quantized_weights

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qatlab.export import (  # noqa: E402
    dequantize_weights,
    integer_kernels,
    load_integer,
    onnx_metadata,
    session,
    to_integer,
    to_onnx,
)

SPECS = {
    "mlp5": ((1, 40), {"width": 32}, 256),
    "cnn1d": ((1, 40), {"width": 8}, 256),
    "resnet20": ((3, 32, 32), {"width": 8}, 64),
    "mobilenetv2": ((3, 32, 32), {"width_mult": 0.25}, 64),
}


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            sign = torch.where(torch.rand(c, generator=gen) < 0.1, -1.0, 1.0)
            m.weight.data = (0.5 + torch.rand(c, generator=gen)) * sign
            m.bias.data = 0.1 * torch.randn(c, generator=gen)
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
            m.num_batches_tracked.fill_(1)


def _qmodel(name: str, bits: int, gran: str, seed: int = 0, **quant):
    shape, kwargs, n = SPECS[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = models.create(name, 10, shape, **kwargs)
    _randomize_bn(model, gen)
    cfg = qatlab.QuantConfig(weight_bits=bits, act_bits=bits, weight_granularity=gran, **quant)
    qmodel = qatlab.quantize(model, cfg)
    x = torch.randn(n, *shape, generator=gen)
    qatlab.calibrate(qmodel, [x[: n // 2]])
    return qmodel.eval(), x


def _qatlab_ints(qmodel: nn.Module, x: torch.Tensor):
    """Logits and, per layer with an input quantizer, the integers qatlab quantizes to."""
    ints, handles = {}, []
    for name, layer in quant_layers(qmodel):
        aq = layer.input_quantizer
        if aq is not None:
            handles.append(
                aq.register_forward_hook(
                    lambda mod, inp, out, name=name: ints.__setitem__(name, mod.integer(inp[0]))
                )
            )
    with torch.no_grad():
        logits = qmodel(x)
    for h in handles:
        h.remove()
    return logits.numpy(), {k: v.numpy() for k, v in ints.items()}


def _ort_ints(path, x: torch.Tensor):
    """ONNX Runtime (optimizations off): logits, and per layer the integers of its quantize
    node and the float tensor that node received."""
    model = onnx.load(str(path))
    rows = [row for row in onnx_metadata(model)["layers"] if row["input_int"]]
    fetch = ["output"]
    for row in rows:
        kind = onnx.TensorProto.INT8 if row["input_grid"][0] < 0 else onnx.TensorProto.UINT8
        model.graph.output.append(onnx.helper.make_tensor_value_info(row["input_int"], kind, None))
        fetch.append(row["input_int"])
        if row["input_float"] != "input":
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(row["input_float"], onnx.TensorProto.FLOAT, None)
            )
            fetch.append(row["input_float"])
    sess = session(model.SerializeToString(), "off", threads=1)
    out = dict(zip(fetch, sess.run(fetch, {"input": x.numpy()}), strict=True))
    out["input"] = x.numpy()
    ints = {row["name"]: out[row["input_int"]] for row in rows}
    floats = {row["name"]: out[row["input_float"]] for row in rows}
    return out["output"], ints, floats


def _check_weights(path, qmodel):
    """Exported weight integers equal qatlab's exactly and lie in each layer's grid."""
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = dict(quant_layers(qmodel))
    rows = onnx_metadata(model)["layers"]
    assert [r["name"] for r in rows] == list(layers)
    for row in rows:
        ints = inits[row["weight_int"]]
        assert ints.dtype == np.int8
        if row["weight_transposed"]:
            ints = ints.T
        expected = layers[row["name"]].weight_int().numpy()
        np.testing.assert_array_equal(ints.astype(np.float32), expected)
        n, p = layers[row["name"]].weight_quantizer.grid_range
        assert row["weight_grid"] == [n, p] and ints.min() >= n and ints.max() <= p


def _check_agreement(path, qmodel, x):
    """Every quantize node: on the float tensor it received in ONNX Runtime, its integers equal
    qatlab's quantizer's in >= 99.9% of elements and the rest differ by one step. End to end
    (each side on its own activations, so an early one-step flip can move later values): >= 99%
    of the integers at every node equal, and the predicted classes agree on >= 99.5%."""
    ref_logits, ref_ints = _qatlab_ints(qmodel, x)
    logits, ints, floats = _ort_ints(path, x)
    layers = dict(quant_layers(qmodel))
    assert set(ints) == set(ref_ints) and ref_ints
    for name, ref in ref_ints.items():
        got = ints[name].astype(np.int32)
        mine = layers[name].input_quantizer.integer(torch.from_numpy(floats[name])).numpy()
        diff = np.abs(got - mine.astype(np.int32))
        assert (diff == 0).mean() >= 0.999, (name, (diff == 0).mean())
        assert diff.max() <= 1, (name, diff.max())
        assert got.shape == ref.shape, name
        assert (got == ref).mean() >= 0.99, (name, (got == ref).mean())
    agree = (logits.argmax(1) == ref_logits.argmax(1)).mean()
    assert agree >= 0.995, agree
    return ref_logits


CASES = (
    [(m, 4, "channel") for m in SPECS]
    + [(m, 8, "tensor") for m in SPECS]
    + [("mlp5", 2, "tensor"), ("cnn1d", 2, "channel"), ("resnet20", 2, "tensor")]
    + [("mobilenetv2", 2, "channel")]
)


@pytest.mark.parametrize("name,bits,gran", CASES)
def test_onnx_integers_and_ort_agreement(tmp_path, name, bits, gran):
    qmodel, x = _qmodel(name, bits, gran)
    path = tmp_path / "m.onnx"
    report = to_onnx(qmodel, x[:1], path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    _check_weights(path, qmodel)
    ref_logits = _check_agreement(path, qmodel, x)
    if bits == 8:
        # ORT's CPU optimizer (extended) runs an integer kernel for every layer whose input is
        # quantized (the first layer has a float input by default: 8-bit weights only)
        quantized_inputs = sum(
            1 for _, layer in quant_layers(qmodel) if layer.input_quantizer is not None
        )
        assert quantized_inputs == len(report.layers) - 1
        assert integer_kernels(path) == quantized_inputs
        # and the fused graph still predicts what qatlab predicts
        fused = session(path, "extended", threads=1).run(None, {"input": x.numpy()})[0]
        assert (fused.argmax(1) == ref_logits.argmax(1)).mean() >= 0.98


def test_every_layer_fused_when_the_first_layer_quantizes_its_input(tmp_path):
    qmodel, x = _qmodel("cnn1d", 8, "channel", first_layer="same")
    path = tmp_path / "m.onnx"
    report = to_onnx(qmodel, x[:1], path)
    assert all(row["input_int"] for row in report.layers)
    assert integer_kernels(path) == len(report.layers) == 4
    _check_agreement(path, qmodel, x)


def test_qdq_only_keeps_negative_bn_in_float_and_still_agrees(tmp_path):
    qmodel, x = _qmodel("resnet20", 4, "channel", seed=1)
    path = tmp_path / "m.onnx"
    report = to_onnx(qmodel, x[:1], path, integer_ops=False)
    assert {row["form"] for row in report.layers} == {"qdq", "float-input"}
    negative = [
        n
        for n, m in qmodel.named_modules()
        if isinstance(m, nn.BatchNorm2d) and bool((m.weight < 0).any())
    ]
    assert negative and report.bn_kept  # with gamma < 0 the scale cannot take the fold...
    # ... except after the float-input stem, whose BN folds into float weights
    assert set(report.bn_kept) <= set(negative)
    assert len(report.bn_kept) + len(report.bn_folded) == 21
    _check_weights(path, qmodel)
    _check_agreement(path, qmodel, x)


def test_lsq_plus_offsets_are_exported_exactly(tmp_path):
    qmodel, x = _qmodel("mlp5", 4, "tensor", act_scale="lsq+")
    gen = torch.Generator().manual_seed(3)
    for _, layer in quant_layers(qmodel):
        if layer.input_quantizer is not None:  # after a ReLU calibration gives offset 0
            layer.input_quantizer.offset.data.uniform_(-0.5, 0.5, generator=gen)
    path = tmp_path / "m.onnx"
    to_onnx(qmodel, x[:1], path)
    _check_agreement(path, qmodel, x)


def test_frozen_weights_export_their_frozen_integers(tmp_path):
    from qatlab.methods.oscillation import IterativeFreezing

    qmodel, x = _qmodel("mlp5", 4, "tensor")
    freezer = IterativeFreezing(qmodel)
    name = freezer.layer_names[0]
    layer = dict(quant_layers(qmodel))[name]
    frozen = freezer.buffer(name, "frozen")
    frozen[::3] = True
    current = layer.weight_int().to(torch.int8)
    target = torch.where(current > 0, current - 1, current + 1)  # differs from the latent int
    freezer.buffer(name, "frozen_int").copy_(target)
    freezer.write_back(dict(quant_layers(qmodel)))
    path = tmp_path / "m.onnx"
    to_onnx(qmodel, x[:1], path)
    model = onnx.load(str(path))
    ints = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    row = next(r for r in onnx_metadata(model)["layers"] if r["name"] == name)
    exported = torch.from_numpy(ints[row["weight_int"]].copy())
    if row["weight_transposed"]:
        exported = exported.T
    assert torch.equal(exported[frozen], target[frozen])
    assert int((exported[frozen] != current[frozen]).sum()) > 0
    tensors_path, _ = to_integer(qmodel, tmp_path / "m.int.pt")
    manifest, tensors = load_integer(tensors_path)
    assert torch.equal(tensors[f"{name}.weight_int"][frozen], target[frozen])


@pytest.mark.parametrize("name,gran", [("cnn1d", "channel"), ("mobilenetv2", "tensor")])
def test_integer_format_reproduces_qw_exactly(tmp_path, name, gran):
    qmodel, _ = _qmodel(name, 3, gran)
    tensors_path, manifest_path = to_integer(qmodel, tmp_path / "m.int.pt", {"name": name})
    assert manifest_path.name == "m.int.json"
    manifest, tensors = load_integer(tensors_path)
    assert manifest["model_spec"] == {"name": name}
    reference = quantized_weights(qmodel)
    dequantized = dequantize_weights(manifest, tensors)
    assert set(dequantized) == set(reference)
    for layer, w in reference.items():
        assert torch.equal(dequantized[layer], w), layer  # bit for bit
    for row in manifest["layers"]:
        ints = tensors[f"{row['name']}.weight_int"]
        n, p = row["weight_grid"]
        assert ints.dtype == torch.int8 and n <= int(ints.min()) and int(ints.max()) <= p
        assert row["weight_bits"] in (3, 8)
    assert json.loads(manifest_path.read_text())["format"] == "qatlab-int-1"
    # float state for the rest of the model (BN, biases), never the latent weights
    assert any(k.endswith("running_var") for k in manifest["float_tensors"])
    assert not any(
        k.endswith(".weight") and k.rsplit(".", 1)[0] in reference
        for k in manifest["float_tensors"]
    )


# ----------------------------------------------------------------------------- refusals
def _no_files(folder) -> bool:
    return not any(folder.iterdir())


def test_uncalibrated_model_is_refused_naming_the_layers(tmp_path):
    model = models.create("cnn1d", 10, (1, 40), width=8)
    qmodel = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=4, act_bits=4)).eval()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(qatlab.ConfigError, match=r"never calibrated \(3, 6, 11\)"):
        to_onnx(qmodel, torch.randn(1, 1, 40), out / "m.onnx")
    with pytest.raises(qatlab.ConfigError, match="never calibrated"):
        to_integer(qmodel, out / "m.int.pt")
    assert _no_files(out)


def test_dynamic_activation_steps_are_refused(tmp_path):
    qmodel, x = _qmodel("mlp5", 4, "tensor", act_scale="maxabs")
    with pytest.raises(qatlab.ConfigError, match="max-abs policy"):
        to_onnx(qmodel, x[:1], tmp_path / "m.onnx")
    assert _no_files(tmp_path)


def test_unsupported_layer_is_named(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    qmodel = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=4, act_bits=4))
    qatlab.calibrate(qmodel, [torch.randn(32, 8)])
    with pytest.raises(qatlab.ConfigError, match=r"layer 1 \(GELU\)"):
        to_onnx(qmodel.eval(), torch.randn(1, 8), tmp_path / "m.onnx")
    assert _no_files(tmp_path)


def _checkpoint(tmp_path, name, shape, kwargs, quant):
    from qatlab.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = models.create(name, 10, shape, **kwargs)
    cfg = qatlab.QuantConfig(**quant)
    qmodel = qatlab.quantize(model, cfg)
    qatlab.calibrate(qmodel, [torch.randn(16, *shape)])
    run = tmp_path / "run"
    save_checkpoint(
        run / "best.pt",
        {
            "model": qmodel.state_dict(),
            "model_spec": {
                "name": name,
                "num_classes": 10,
                "input_shape": list(shape),
                "kwargs": kwargs,
            },
            "quant": cfg.to_dict(),
            "epoch": 1,
        },
    )
    return run, qmodel.eval()


def test_cli_export_onnx_and_int(tmp_path, capsys):
    from qatlab.cli import main

    run, qmodel = _checkpoint(tmp_path, "cnn1d", (1, 40), {"width": 8}, {"weight_bits": 4})
    assert main(["export", str(run)]) == 0
    assert (run / "best.onnx").is_file()
    x = torch.randn(32, 1, 40)
    got = session(run / "best.onnx", "extended", threads=1).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    out = tmp_path / "w" / "model.int.pt"
    assert main(["export", str(run / "best.pt"), "--format", "int", "--out", str(out)]) == 0
    manifest, tensors = load_integer(out)
    assert len(manifest["layers"]) == 4 and manifest["model_spec"]["name"] == "cnn1d"
    assert "wrote" in capsys.readouterr().out


def test_cli_unsupported_model_is_one_line_exit_2_no_file(tmp_path, capsys):
    from qatlab.cli import main

    run, _ = _checkpoint(
        tmp_path, "vit_tiny", (1, 40), {"dim": 16, "depth": 1, "heads": 2}, {"weight_bits": 4}
    )
    out = tmp_path / "exp"
    out.mkdir()
    code = main(["export", str(run), "--out", str(out / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("qatlab: error:") and "flatten(2, -1)" in err[0], err[0]
    assert "ViT.forward" in err[0]
    assert _no_files(out)
    code = main(["export", str(tmp_path / "nothing"), "--format", "onnx"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing" in err[0]
