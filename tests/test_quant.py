"""Quantization core: agreement with PyTorch's LSQ reference, grid properties, quantize(), PTQ."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qatlab
from qatlab.quant import Quantizer, fake_quantize, grid_range, quant_layers, quantizers


# ----------------------------------------------------------------------------- grids
def test_grid_ranges():
    assert grid_range(4, True, "full") == (-8, 7)
    assert grid_range(4, True, "restricted") == (-7, 7)
    assert grid_range(2, True, "restricted") == (-1, 1)  # ternary
    assert grid_range(3, False) == (0, 7)
    assert grid_range(8, True) == (-128, 127)


@pytest.mark.parametrize("bits", [1, 9, 0, 3.0, "4", True])
def test_bad_bits_raise_one_clear_error(bits):
    with pytest.raises(ValueError, match="bit width must be an integer from 2 to 8"):
        Quantizer(bits)
    with pytest.raises(qatlab.ConfigError):
        qatlab.QuantConfig(weight_bits=bits)


# ----------------------------------------------------------------------------- LSQ vs reference
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_per_tensor_matches_pytorch_reference(bits, signed):
    torch.manual_seed(bits)
    n, p = grid_range(bits, signed)
    x = torch.randn(4, 3, 7, 5) * 2
    step = 3.0 / p
    grad_out = torch.randn_like(x)
    g = 0.37  # an LSQ gradient scale

    x1 = x.clone().requires_grad_()
    s1 = torch.tensor(step, requires_grad=True)
    y1 = fake_quantize(x1, s1, n, p, g)
    y1.backward(grad_out)

    x2 = x.clone().requires_grad_()
    s2 = torch.tensor([step], requires_grad=True)
    zp = torch.tensor([0.0], requires_grad=True)
    y2 = torch._fake_quantize_learnable_per_tensor_affine(x2, s2, zp, n, p, g)
    y2.backward(grad_out)

    assert torch.allclose(y1, y2, atol=1e-5)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.allclose(s1.grad, s2.grad[0], atol=1e-5, rtol=1e-5)
    # the clipped region must actually have been exercised
    assert (x.abs() / step > p).any()


@pytest.mark.parametrize("bits", range(2, 9))
def test_lsq_per_channel_matches_pytorch_reference(bits):
    torch.manual_seed(10 + bits)
    n, p = grid_range(bits, True)
    x = torch.randn(6, 4, 3, 3)
    step = torch.rand(6) * 0.5 + 0.05
    grad_out = torch.randn_like(x)

    x1 = x.clone().requires_grad_()
    s1 = step.clone().requires_grad_()
    fake_quantize(x1, s1, n, p, 0.5).backward(grad_out)

    x2 = x.clone().requires_grad_()
    s2 = step.clone().requires_grad_()
    zp = torch.zeros(6, requires_grad=True)
    y2 = torch._fake_quantize_learnable_per_channel_affine(x2, s2, zp, 0, n, p, 0.5)
    y2.backward(grad_out)

    assert torch.allclose(fake_quantize(x, step, n, p), y2, atol=1e-5)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-5, rtol=1e-5)


def test_step_gradient_matches_finite_differences():
    """LSQ's step gradient is the derivative of s*clamp(round(x/s)) with round held fixed."""
    torch.manual_seed(0)
    x = torch.randn(200, dtype=torch.float64)
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    q = Quantizer(3, grad_scale=False, role="weight")
    q.initialized.fill_(True)
    n, p = q.grid_range
    fake_quantize(x.float(), s.float(), n, p).sum().backward()
    # analytic: round is piecewise constant, so d/ds s*clamp(round(x/s)) = q - x/s inside
    xs = x / 0.3
    r = xs.round()
    inside = (r >= n) & (r <= p)
    expected = torch.where(inside, r - xs, r.clamp(n, p)).sum()
    assert abs(float(s.grad) - float(expected)) < 1e-4


def test_lsq_gradient_scale_is_applied():
    x = torch.randn(8, 16)
    q = Quantizer(4, role="weight", channels=1)
    q.initialize(x)
    q(x).sum().backward()
    with_scale = q.step.grad.clone()
    q2 = Quantizer(4, role="weight", grad_scale=False)
    q2.initialize(x)
    q2(x).sum().backward()
    _, p = q.grid_range
    assert torch.allclose(with_scale, q2.step.grad / (x.numel() * p) ** 0.5, atol=1e-7)


# ----------------------------------------------------------------------------- grid properties
_tensors = st.lists(
    st.floats(-50, 50, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=64
)


@settings(max_examples=60, deadline=None)
@given(values=_tensors, bits=st.integers(2, 8), step=st.floats(0.01, 5.0), signed=st.booleans())
def test_outputs_lie_on_grid_idempotent_and_error_bounded(values, bits, step, signed):
    x = torch.tensor(values, dtype=torch.float32)
    n, p = grid_range(bits, signed)
    s = torch.tensor(step, dtype=torch.float32)
    y = fake_quantize(x, s, n, p)
    levels = y / s
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.min() >= n - 1e-3 and levels.max() <= p + 1e-3
    assert torch.equal(fake_quantize(y, s, n, p), y)
    inside = (x >= n * s) & (x <= p * s)
    assert ((x - y).abs()[inside] <= s / 2 + 1e-5 * (1 + x.abs()[inside])).all()


def test_integer_view_matches_forward():
    torch.manual_seed(1)
    w = torch.randn(5, 7)
    q = Quantizer(3, role="weight", channels=5)
    q.initialize(w)
    w_int = q.integer(w)
    assert torch.equal(w_int * q.step[:, None], q(w).detach())
    n, p = q.grid_range
    assert w_int.min() >= n and w_int.max() <= p


# ----------------------------------------------------------------------------- scale policies
def test_mse_init_beats_other_candidates():
    torch.manual_seed(2)
    x = torch.randn(4000)
    q = Quantizer(3, scale="mse", role="weight")
    q.initialize(x)
    n, p = q.grid_range

    def err(s):
        return ((x / s).round().clamp(n, p) * s - x).pow(2).sum()

    best = err(q.step)
    for k in range(1, 101):  # the exact optimum over its 100 candidates
        assert best <= err(k / 100 * x.abs().max() / p) * (1 + 1e-5)
    fine = min(err(f * x.abs().max() / p) for f in torch.linspace(0.01, 1.0, 1000))
    assert best <= fine * 1.01  # and within 1% of a 10x finer search
    assert best < err(x.abs().max() / p) * 0.8  # far better than max-abs at 3 bits


def test_static_policies():
    x = torch.cat([torch.linspace(-1, 1, 9999), torch.tensor([100.0])])
    minmax = Quantizer(8, scale="minmax", role="weight")
    minmax.initialize(x)
    assert torch.isclose(minmax.step, torch.tensor(100.0 / 127))
    pct = Quantizer(8, scale="percentile", percentile=99.0, role="weight")
    pct.initialize(x)
    assert float(pct.step) < 1.0 / 127 * 1.01  # the outlier is ignored
    dyn = Quantizer(4, scale="maxabs", grid="restricted")
    assert torch.isclose(dyn(torch.tensor([-3.5, 1.0])), torch.tensor([-3.5, 1.0])).all()
    assert torch.isclose(dyn.current_step(torch.tensor([2.0, -7.0])), torch.tensor(1.0))


def test_maxabs_zero_tensor_is_safe():
    q = Quantizer(2, scale="maxabs", grid="restricted")
    y = q(torch.zeros(10))
    assert torch.isfinite(y).all() and (y == 0).all()


def _round_ste(x):
    return x + (torch.round(x) - x).detach()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_maxabs_ste_gradients_match_reference(bits, per_channel):
    """``maxabs_ste``: s = max|x|/p with gradient, STE rounding; against plain autograd."""
    torch.manual_seed(bits)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 5, dtype=torch.float64)
    p = 2 ** (bits - 1) - 1
    q = Quantizer(
        bits, grid="restricted", scale="maxabs_ste", role="weight", channels=6 if per_channel else 1
    )
    (q(x) * g).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    xr = x.detach().clone().requires_grad_(True)
    s = (xr.abs().amax(1, keepdim=True) if per_channel else xr.abs().max()) / p
    ref_out = _round_ste(xr / s) * s
    (ref_out * g).sum().backward()
    assert torch.allclose(q(x.detach()), ref_out.detach())
    assert torch.allclose(ours, xr.grad, atol=1e-12)
    # the step term is there: the largest weight's gradient differs from plain STE (= g)
    big = (
        (x.detach().abs() == x.detach().abs().amax(1, keepdim=True))
        if per_channel
        else (x.detach().abs() == x.detach().abs().max())
    )
    assert not torch.allclose(ours[big], g[big])
    assert torch.allclose(ours[~big], g[~big])
    # the detached max-abs policy gives plain STE everywhere
    xd = x.detach().clone().requires_grad_(True)
    Quantizer(bits, grid="restricted", scale="maxabs", role="weight")(xd).mul(g).sum().backward()
    assert torch.allclose(xd.grad, g)


def test_maxabs_ste_surrogate_matches_finite_differences():
    """With the rounding offsets frozen (the STE surrogate), the step gradient is exact."""
    torch.manual_seed(0)
    x0 = torch.randn(20, dtype=torch.float64)
    quant = Quantizer(3, grid="restricted", scale="maxabs_ste", role="weight")
    offset = (torch.round(x0 / (x0.abs().max() / 3)) - x0 / (x0.abs().max() / 3)).detach()
    weights = torch.randn(20, dtype=torch.float64)

    def surrogate(x):  # s(x) * (x/s(x) + frozen offset): what the STE differentiates
        s = x.abs().max() / 3
        return ((x / s + offset) * s * weights).sum()

    x = x0.clone().requires_grad_(True)
    (quant(x) * weights).sum().backward()
    eps = 1e-6
    fd = torch.stack(
        [
            (surrogate(x0 + eps * e) - surrogate(x0 - eps * e)) / (2 * eps)
            for e in torch.eye(20, dtype=torch.float64)
        ]
    )
    assert torch.allclose(x.grad, fd, atol=1e-6)


def test_maxabs_ste_in_quantize_config():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    cfg = qatlab.QuantConfig(
        weight_bits=2,
        weights_only=True,
        act_bits=None,
        weight_grid="restricted",
        weight_scale="maxabs_ste",
        first_layer="same",
        last_layer="same",
    )
    qmodel = qatlab.quantize(model, cfg)
    assert not [p for _, q in quantizers(qmodel) for p in q.parameters()]  # nothing learned
    qmodel(torch.randn(5, 4)).sum().backward()
    w = qmodel[0].weight
    assert set(qmodel[0].weight_int().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_lsq_plus_learns_offset_for_asymmetric_input():
    torch.manual_seed(3)
    x = torch.rand(1000) * 3 - 0.5  # in [-0.5, 2.5]
    q = Quantizer(4, scale="lsq+")
    q(x)
    assert q.grid_range == (0, 15)
    with torch.no_grad():  # start from a bad offset and step: learning must repair both
        q.offset.fill_(0.8)
        q.step.fill_(0.05)
    err0 = float((q(x) - x).pow(2).mean())
    opt = torch.optim.Adam(q.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    err = float((q(x) - x).pow(2).mean())
    assert err < err0 / 20
    assert -0.7 < float(q.offset) < -0.3  # the range's lower end, -0.5
    assert abs(float(q.step) * 15 - 3.0) < 0.5  # 16 levels spanning the 3-wide range


def test_signed_auto_becomes_unsigned_after_relu():
    q = Quantizer(4, signed="auto")
    q(torch.rand(100))
    assert q.grid_range == (0, 15)
    q2 = Quantizer(4, signed="auto")
    q2(torch.randn(100))
    assert q2.grid_range == (-8, 7)


# ----------------------------------------------------------------------------- quantize()
def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def test_quantize_swaps_layers_and_applies_first_last_policy():
    model = _net()
    q = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=3, act_bits=4))
    layers = dict(quant_layers(q))
    assert list(layers) == ["0", "3", "7"]
    assert layers["0"].weight_quantizer.bits == 8 and layers["0"].input_quantizer is None
    assert layers["3"].weight_quantizer.bits == 3 and layers["3"].input_quantizer.bits == 4
    assert layers["7"].weight_quantizer.bits == 8 and layers["7"].input_quantizer.bits == 8
    assert not any(isinstance(m, Quantizer) for m in model.modules())  # original untouched
    same = qatlab.quantize(model, qatlab.QuantConfig(first_layer="same", last_layer="float"))
    assert dict(quant_layers(same))["0"].input_quantizer is not None
    assert "7" not in dict(quant_layers(same))
    skipped = qatlab.quantize(model, qatlab.QuantConfig(skip=("3",)))
    assert "3" not in dict(quant_layers(skipped))
    w_only = qatlab.quantize(model, qatlab.QuantConfig(weights_only=True))
    assert all(layer.input_quantizer is None for _, layer in quant_layers(w_only))


def test_quantized_model_trains_and_steps_get_gradients():
    q = qatlab.quantize(_net(), qatlab.QuantConfig())
    x = torch.randn(4, 3, 8, 8)
    qatlab.calibrate(q, [x])
    loss = q(x).logsumexp(1).mean()
    loss.backward()
    for name, param in q.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_unsupported_layers_are_named_in_one_warning():
    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.attn(self.proj(x), x, x)[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = qatlab.quantize(WithAttention())
    messages = [str(w.message) for w in caught if "stay float" in str(w.message)]
    assert len(messages) == 1 and "attn (MultiheadAttention)" in messages[0]
    assert isinstance(q.proj, qatlab.quant.QuantLinear)
    assert not isinstance(q.attn.out_proj, qatlab.quant.QuantLinear)


@pytest.mark.parametrize(
    "name,shape",
    [("resnet20", (3, 16, 16)), ("mobilenetv2", (3, 16, 16)), ("vit_tiny", (3, 16, 16))],
)
def test_disabled_quantization_reproduces_float_model(name, shape):
    models = pytest.importorskip("qatlab.models")
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, input_shape=shape)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        model.train()(torch.randn(16, *shape))  # give BatchNorm real running statistics
    model.eval()
    q = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=2, act_bits=2)).eval()
    qatlab.calibrate(q, [x])
    assert sum(1 for _ in quant_layers(q)) >= 5
    with torch.no_grad():
        ref = model(x)
        assert not torch.allclose(q(x), ref, atol=1e-3)  # 2-bit really changes the output
        with qatlab.quantization_disabled(q):
            assert torch.equal(q(x), ref)
    assert all(qz.enabled for _, qz in quantizers(q))  # restored


def test_state_dict_round_trip_restores_outputs():
    x = torch.randn(4, 3, 8, 8)
    q = qatlab.quantize(_net(), qatlab.QuantConfig(weight_bits=3, weight_granularity="channel"))
    qatlab.calibrate(q, [x])
    qatlab.set_bits(q, weight_bits=2)
    q.eval()
    fresh = qatlab.quantize(_net(), qatlab.QuantConfig(weight_bits=3, weight_granularity="channel"))
    fresh.load_state_dict(q.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x), q(x))
    assert dict(quant_layers(fresh))["3"].weight_quantizer.bits == 2


def test_set_bits_keeps_clip_range_and_pinned_layers():
    q = qatlab.quantize(_net(), qatlab.QuantConfig(weight_bits=4))
    mid = dict(quant_layers(q))["3"].weight_quantizer
    clip = float(mid.step) * mid.grid_range[1]
    qatlab.set_bits(q, weight_bits=8)
    assert mid.bits == 8 and abs(float(mid.step) * mid.grid_range[1] - clip) < 1e-6
    assert dict(quant_layers(q))["0"].weight_quantizer.bits == 8  # pinned, untouched
    with pytest.raises(qatlab.ConfigError):
        qatlab.set_bits(q, weight_bits=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight_bits": 9}, "weight_bits must be an integer from 2 to 8"),
        ({"act_bits": 1}, "act_bits must be an integer from 2 to 8"),
        ({"weight_grid": "symmetric"}, "weight_grid must be one of"),
        ({"act_scale": "magic"}, "act_scale must be one of"),
        ({"weight_scale": "lsq+"}, "weight_scale must be one of"),
        ({"first_layer": "int8"}, "first_layer must be one of"),
        ({"act_signed": "maybe"}, "act_signed"),
    ],
)
def test_invalid_configs_raise_config_error(kwargs, match):
    with pytest.raises(qatlab.ConfigError, match=match):
        qatlab.QuantConfig(**kwargs)


def test_config_from_dict_suggests_close_key():
    with pytest.raises(qatlab.ConfigError, match="did you mean 'weight_bits'"):
        qatlab.QuantConfig.from_dict({"weight_bit": 4})
    cfg = qatlab.QuantConfig.from_dict({"weight_bits": 3, "skip": ["fc"]})
    assert cfg.skip == ("fc",) and cfg.describe() == "W3A4"


# ----------------------------------------------------------------------------- PTQ, calibration, BN
def test_ptq_leaves_original_untouched_and_tracks_float_at_8_bits():
    model = _net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    q8 = qatlab.ptq(model, qatlab.QuantConfig(weight_bits=8, act_bits=8), batches)
    q2 = qatlab.ptq(model, qatlab.QuantConfig(weight_bits=2, act_bits=2), batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        err8 = (q8(x) - ref).abs().mean()
        err2 = (q2(x) - ref).abs().mean()
    assert err8 < 0.05 * ref.abs().mean() and err8 < err2
    assert not q8.training


def test_calibrate_sets_activation_steps_from_data():
    q = qatlab.quantize(_net(), qatlab.QuantConfig(act_scale="minmax"))
    x = torch.randn(8, 3, 8, 8)
    qatlab.calibrate(q, [(x, torch.zeros(8))])
    layer = dict(quant_layers(q))["3"]
    with torch.no_grad():
        h = copy.deepcopy(q).train()[:3](x)  # a fresh BN calibrates on batch statistics
    _, p = layer.input_quantizer.grid_range
    assert layer.input_quantizer.grid_range[0] == 0  # post-ReLU: unsigned
    assert torch.isclose(layer.input_quantizer.step, h.max() / p, rtol=1e-5)


def test_reestimate_bn_recovers_true_statistics():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Dropout(0.5))
    batches = [torch.randn(32, 5) * 3 + 1 for _ in range(10)]
    model.train()
    report = qatlab.reestimate_bn(model, batches, n=10)
    with torch.no_grad():
        h = torch.cat([model[0](b) for b in batches])
    bn = model[1]
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-4)
    per_batch_var = torch.stack([model[0](b).var(0) for b in batches]).mean(0).detach()
    assert torch.allclose(bn.running_var, per_batch_var, atol=1e-3)
    assert report["1"]["mean"] > 0.1  # the defaults (0, 1) were far off
    assert model.training and bn.momentum == 0.1  # state restored


def test_dequantize_returns_float_layers_with_latent_weights():
    model = _net().eval()
    q = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=2, act_bits=2))
    back = qatlab.quant.dequantize(q).eval()
    assert not qatlab.quant.is_quantized(back)
    assert type(back[3]) is nn.Conv2d and type(back[7]) is nn.Linear
    assert not any(isinstance(m, Quantizer) for m in back.modules())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(back(x), model(x))
    assert qatlab.quant.is_quantized(q)  # the input is untouched


def test_calibrate_uses_batch_statistics_for_untrained_batchnorm():
    """A fresh net's BN (running stats 0/1) must not shrink activations during calibration."""
    torch.manual_seed(5)
    layers = []
    for _ in range(6):
        layers += [nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *layers, nn.Flatten(), nn.Linear(512, 4))
    q = qatlab.quantize(model, qatlab.QuantConfig())
    x = torch.randn(16, 3, 8, 8)
    qatlab.calibrate(q, [x])
    bns = [m for m in q.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == 0 for m in bns)
    q.train()
    q(x).sum().backward()
    first = dict(quant_layers(q))["1"]
    assert first.weight.grad.abs().sum() > 0  # gradient reaches the early convs
    last = dict(quant_layers(q))["20"]
    assert last.input_quantizer.step > 1e-3  # not collapsed to clip everything
