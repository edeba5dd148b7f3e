"""``torch.compile``: the traceable fake quantizer agrees with the eager kernel inside a model,
and ``train.compile`` runs resume into eager ones and back with the same state dict keys.

Compiling is slow on CPU (tens of seconds per graph on 2 cores), so these tests use tiny nets,
compile as few graphs as they can (one model holds the 2-, 4- and 8-bit layers) and those that
compile are marked ``compile``: ``pytest -m "not compile"`` skips them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qatlab
from qatlab.quant import quantizers
from qatlab.quant.layers import quant_layers
from qatlab.train import Hook, TrainConfig, fit
from qatlab.train.checkpoint import load_checkpoint
from qatlab.train.metrics import read_jsonl


def _net() -> nn.Module:
    """Three conv-BN-ReLU blocks and a linear layer: four quantized layers."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _quantized(granularity: str, x: torch.Tensor) -> nn.Module:
    """The net with its layers at 2, 4, 8 and 4 bits (weights and inputs), calibrated on x."""
    torch.manual_seed(0)
    cfg = qatlab.QuantConfig(
        weight_bits=4,
        act_bits=4,
        weight_granularity=granularity,
        first_layer="same",
        last_layer="same",
    )
    model = qatlab.quantize(_net(), cfg)
    for (_, layer), bits in zip(quant_layers(model), (2, 4, 8, 4), strict=True):
        layer.weight_quantizer.set_bits(bits, rescale=False)
        if layer.input_quantizer is not None:
            layer.input_quantizer.set_bits(bits, rescale=False)
    qatlab.calibrate(model, [x])
    return model.train()


def _forward_backward(run: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = run(x)
    nn.functional.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.compile
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_compiled_model_matches_eager(granularity):
    """Outputs, latent-weight and step-size gradients of the compiled model (the traceable
    quantizer, fused by inductor) equal the eager kernel's at 2, 4 and 8 bits."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    eager = _quantized(granularity, x)
    bits = sorted({q.bits for _, q in quantizers(eager)})
    assert bits == [2, 4, 8]
    steps = {n for n, _ in eager.named_parameters() if n.endswith(".step")}
    per_channel = [n for n, q in quantizers(eager) if q.per_channel]
    assert len(steps) == 8 and (len(per_channel) == 4) == (granularity == "channel")
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)  # fullgraph: no graph break anywhere

    out_c, grads_c = _forward_backward(compiled, twin, x, y)
    out_e, grads_e = _forward_backward(eager, eager, x, y)

    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name, ge in grads_e.items():
        assert ge.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(grads_c[name], ge, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.compile
def test_compiled_run_resumes_eager_and_back(tiny_data, tmp_path):
    """Epoch 1 compiled, epoch 2 eager (resumed), epoch 3 compiled again: same state dict keys
    (no ``_orig_mod.``) in every checkpoint, compile time logged, training goes on."""
    from qatlab import models

    def model() -> nn.Module:
        torch.manual_seed(0)
        net = models.create("mlp5", tiny_data.num_classes, tiny_data.input_shape)
        net = qatlab.quantize(net, qatlab.QuantConfig(weight_bits=4, act_bits=4))
        qatlab.calibrate(net, [tiny_data.train_eval[i][0][None] for i in range(64)])
        return net

    base = dict(batch_size=256, lr=3e-3, progress=False, eval_batch_size=1000, seed=0)
    run_dir = tmp_path / "run"
    keys = []
    for epochs, compile_ in ((1, True), (2, False), (3, True)):
        cfg = TrainConfig(**base, epochs=epochs, compile=compile_)
        fit(model(), tiny_data, cfg, run_dir=run_dir, resume=epochs > 1)
        ckpt = load_checkpoint(run_dir / "ckpt.pt")
        assert ckpt["epoch"] == epochs
        keys.append(list(ckpt["model"]))
        assert list(load_checkpoint(run_dir / "best.pt")["model"]) == keys[0]
    assert keys[0] == keys[1] == keys[2]
    assert not any("_orig_mod" in k for k in keys[0])
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in r]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert ["compile_s" in r for r in records] == [True, False, True]
    assert records[0]["compile_s"] > 0
    assert records[2]["train_loss"] < records[0]["train_loss"]


def test_fit_unwraps_a_compiled_model(tiny_data, tmp_path):
    """A model the user compiled before ``fit`` is saved as the bare module."""
    from qatlab import models

    torch.manual_seed(0)
    net = models.create("cnn1d", tiny_data.num_classes, tiny_data.input_shape)
    cfg = TrainConfig(epochs=1, batch_size=512, progress=False, eval_batch_size=1000)
    fit(torch.compile(net), tiny_data, cfg, run_dir=tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "ckpt.pt")["model"]
    assert list(saved) == list(net.state_dict())


class _EagerOnly(Hook):
    eager_only = True


def test_eager_only_method_is_not_compiled(tiny_data, tmp_path, capsys):
    """A method marked ``eager_only`` (SAQ) trains eagerly under train.compile, said once."""
    from qatlab import models
    from qatlab.methods.saq import SAQHook

    assert SAQHook.eager_only and not Hook.eager_only
    torch.manual_seed(0)
    net = models.create("mlp5", tiny_data.num_classes, tiny_data.input_shape)
    cfg = TrainConfig(epochs=1, batch_size=512, progress=False, eval_batch_size=1000, compile=True)
    fit(net, tiny_data, cfg, hooks=[_EagerOnly()], run_dir=tmp_path / "run", verbose=True)
    out = capsys.readouterr().out
    assert out.count("_EagerOnly runs eager only; not compiling") == 1
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert not any("compile_s" in r for r in records)
