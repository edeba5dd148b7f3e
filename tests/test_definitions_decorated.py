"""Definitions of the decorated functions (``@torch.no_grad()``, ``@contextmanager``,
``@property``, the registries) on hand-made input with an answer worked out by hand.

mutmut 3.8 left these functions unmutated; ``tools/mutants.py`` mutates them, and these tests
kill the mutants the other ``tests/test_definitions*.py`` files let through
(docs/results/mutation.md).
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import qatlab
import qatlab.quant.quantizer as quantizer_module
from qatlab.data.corruptions import SIGNAL_CORRUPTIONS
from qatlab.data.loader import ArrayDataset
from qatlab.errors import ConfigError
from qatlab.measure import accuracy as accuracy_module
from qatlab.measure import bn as bn_module
from qatlab.measure import crossbit as crossbit_module
from qatlab.measure import ptq as ptq_module
from qatlab.measure import robustness
from qatlab.measure import talr as talr_measure
from qatlab.measure.accuracy import evaluate
from qatlab.measure.noise import quantization_noise
from qatlab.measure.qgen import _bound_label
from qatlab.methods import saq as saq_module
from qatlab.methods.oscillation import IterativeFreezing, OscillationDampening, OscillationTracker
from qatlab.methods.oscreg import OscillationRegularizer, PTQAccuracy
from qatlab.methods.registry import get_method
from qatlab.methods.saq import DEFAULT_BALL, DEFAULT_RHO, SAQ
from qatlab.methods.talr import TALRHook
from qatlab.quant.quantizer import Quantizer, mse_step
from qatlab.quant.transitions import TransitionCounter
from qatlab.quant.weights import keep_quantized_weights, perturbed_weights, quantized_weights
from qatlab.train.optim import LogAdam

_ALL_SAME = dict(first_layer="same", last_layer="same", weights_only=True)
# the module (``qatlab.measure.oscillation`` is also the name of the measure function there)
osc_measure = importlib.import_module("qatlab.measure.oscillation")


def _layer(weights: list[float], step: float = 1.0, bits: int = 4):
    """A quantized ``Linear(k, 1)`` with the given latent weights and a fixed step."""
    layer = qatlab.quantize(
        nn.Linear(len(weights), 1, bias=False), qatlab.QuantConfig(weight_bits=bits, **_ALL_SAME)
    )
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
        layer.weight_quantizer.step.fill_(step)
    return layer


def _set(layer, weights: list[float]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))


# ----------------------------------------------------------------------------- quantizer
def test_grid_range_of_an_undecided_sign_is_signed():
    assert Quantizer(4, signed="auto").grid_range == (-8, 7)
    assert Quantizer(4, signed=False).grid_range == (0, 15)
    assert Quantizer(3, signed=True, grid="restricted").grid_range == (-3, 3)


def test_initialize_decides_the_sign_from_negatives_only():
    q = Quantizer(2, signed="auto", scale="minmax")
    q.initialize(torch.tensor([0.0, 0.5, 3.0]))  # a zero is not negative: unsigned, p = 3
    assert q.signed is False
    assert q.step.item() == 1.0  # max |x| / 3
    assert bool(q.initialized) is True and q._ready is True
    q = Quantizer(2, signed="auto", scale="minmax")
    q.initialize(torch.tensor([-0.5, 2.0]))  # signed: p = 1
    assert q.signed is True and q.step.item() == 2.0


def test_initialize_of_a_dynamic_policy_only_marks_it_ready():
    q = Quantizer(2, scale="maxabs")
    q.initialize(torch.tensor([1.0, -3.0]))
    assert bool(q.initialized) is True and q._ready is True


def test_initialize_lsq_plus_from_min_and_max():
    q = Quantizer(2, scale="lsq+")  # unsigned grid 0..3
    q.initialize(torch.tensor([-1.0, 0.5, 2.0]))
    assert (q.step.item(), q.offset.item()) == (1.0, -1.0)  # (2 - -1) / 3, min
    assert bool(q.initialized) is True and q._ready is True
    q = Quantizer(2, scale="lsq+")
    q.initialize(torch.tensor([0.5, 0.5]))  # no range: the step floor 1e-8
    assert q.step.item() == pytest.approx(1e-8, rel=1e-6)
    assert q.offset.item() == 0.5


def test_initialize_uses_the_policy_or_lsqs_init_method():
    x = torch.tensor([1.0, -3.0])  # 2 bits: p = 1; mean |x| = 2
    q = Quantizer(2, scale="minmax", init="meanabs")
    q.initialize(x)
    assert q.step.item() == 3.0  # the policy (minmax), not the init method
    q = Quantizer(2, scale="lsq", init="meanabs")
    q.initialize(x)
    assert q.step.item() == 4.0  # 2 * mean|x| / sqrt(1)
    q = Quantizer(2, scale="lsq", init="percentile", percentile=50.0)
    q.initialize(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert q.step.item() == 3.0  # the median of |x|, over p = 1
    q = Quantizer(2, scale="lsq", init="minmax", channels=2)
    q.initialize(torch.tensor([[1.0, -2.0], [4.0, 0.5]]))
    assert q.step.tolist() == [2.0, 4.0]  # per channel
    x = torch.tensor([-3.5, 0.2, 0.4, -0.1])  # the search clips -3.5 at n = -4
    q = Quantizer(3, scale="lsq", init="mse")
    q.initialize(x)
    assert q.step.item() == mse_step(x, -4, 3).item() == 0.875  # 3.5 / 4


def test_from_integer_takes_the_dtype_of_like():
    q = Quantizer(4)
    with torch.no_grad():
        q.step.fill_(0.5)
    ints = torch.tensor([1, -2], dtype=torch.int8)
    out = q.from_integer(ints, torch.zeros(2, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.tolist() == [0.5, -1.0]


def test_observing_per_tensor_keeps_a_budget_and_the_extremes(monkeypatch):
    monkeypatch.setattr(quantizer_module, "_MAX_SAMPLES", 5)
    torch.manual_seed(0)
    q = Quantizer(2, scale="minmax", signed=True)
    q.start_observing()
    a = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    q._observe(a)  # 4 values, budget 5: all kept, flattened
    assert [s.tolist() for s in q._samples] == [[0.5, -1.0, 2.0, 0.25]]
    b = torch.tensor([3.0, -4.0, 1.0, 0.0])
    q._observe(b)  # budget 1: one random value, then min and max
    kept = q._samples[1].tolist()
    assert len(kept) == 3 and kept[0] in b.tolist() and kept[1:] == [-4.0, 3.0]
    q._observe(torch.tensor([9.0]))  # budget 0: nothing more
    assert len(q._samples) == 2
    q.finish_observing()
    assert q._observing is False and q._samples == []
    assert q.step.item() == 4.0  # max |x| over p = 1
    assert bool(q.initialized) is True


def test_observing_stops_at_the_budget_exactly(monkeypatch):
    monkeypatch.setattr(quantizer_module, "_MAX_SAMPLES", 5)
    q = Quantizer(2, scale="minmax")
    q.start_observing()
    q._observe(torch.tensor([1.0, 2.0, 3.0]))
    q._observe(torch.tensor([-5.0, 4.0]))  # exactly the budget left (2): kept as it is
    assert [s.tolist() for s in q._samples] == [[1.0, 2.0, 3.0], [-5.0, 4.0]]
    q._observe(torch.tensor([9.0]))  # budget 0: nothing more, not even the extremes
    assert len(q._samples) == 2


def test_observing_per_channel_counts_columns(monkeypatch):
    monkeypatch.setattr(quantizer_module, "_MAX_SAMPLES", 4)
    torch.manual_seed(0)
    q = Quantizer(2, scale="minmax", channels=2)
    q.start_observing()
    a = torch.tensor([[1.0, -2.0, 0.5], [0.25, 0.5, -1.0]])
    q._observe(a)  # 3 columns, budget 4: kept as [2, 3]
    assert q._samples[0].tolist() == a.tolist()
    b = torch.tensor([[6.0, -0.5, 0.0], [-3.0, 0.75, 8.0]])
    q._observe(b)  # budget 1 column: one column of b (the same for both rows), min, max
    kept = q._samples[1]
    assert kept.shape == (2, 3)
    assert kept[:, 0].tolist() in b.t().tolist()
    assert kept[:, 1:].tolist() == [[-0.5, 6.0], [-3.0, 8.0]]
    q.finish_observing()  # the samples joined along the columns: per channel max |x| / 1
    assert q.step.tolist() == [6.0, 8.0]


def test_finish_observing_without_samples_leaves_the_step():
    q = Quantizer(2, scale="minmax")
    with torch.no_grad():
        q.step.fill_(0.5)
    q.start_observing()
    q.finish_observing()
    assert q.step.item() == 0.5 and bool(q.initialized) is False and q._observing is False


# ----------------------------------------------------------------------------- transitions
def test_transitions_are_int8_and_do_not_overflow_at_8_bits():
    layer = _layer([-128.0, 5.0], bits=8)
    counter = TransitionCounter(layer, include_pinned=True)
    _set(layer, [127.0, 4.0])
    moves = counter.update(layer)
    (name,) = counter.layer_names
    assert moves.current[name].dtype == torch.int8
    assert moves.direction[name].dtype == torch.int8
    assert moves.current[name].tolist() == [[127, 4]]
    assert moves.direction[name].tolist() == [[1, -1]]  # 127 - (-128) = 255 is up


# ----------------------------------------------------------------------------- oscillations
def test_oscillating_share_and_stats_at_the_threshold():
    layer = _layer([0.0, 0.0])
    tracker = OscillationTracker(layer, momentum=0.5, threshold=0.25)
    (name,) = tracker.layer_names
    tracker.buffer(name, "freq").copy_(torch.tensor([[0.25, 0.5]]))
    assert tracker.oscillating_share() == 0.5  # 0.25 is not above 0.25
    stats = tracker.stats(bins=4)[name]
    assert set(stats) == {"share", "mean_freq", "hist", "hist_max"}
    assert stats["share"] == 0.5
    assert stats["mean_freq"] == 0.375
    assert stats["hist"] == [0.0, 0.0, 1.0, 1.0]  # bins of 0.125 from 0 to max f = 0.5
    assert stats["hist_max"] == 0.5
    assert len(tracker.stats()[name]["hist"]) == 20
    tracker.buffer(name, "freq").zero_()
    assert tracker.stats(bins=2)[name]["hist"] == [2.0, 0.0]  # range [0, 1e-6]


def test_frozen_share_of_a_single_weight():
    layer = _layer([0.0])
    fr = IterativeFreezing(layer)
    (name,) = fr.layer_names
    fr.buffer(name, "frozen").fill_(True)
    assert fr.frozen_share() == 1.0


def test_freezing_writes_back_before_tracking_and_logs_on_schedule():
    # as in test_definitions.test_freezing_at_a_known_step_and_integer: weight 0 freezes at
    # update 4 at the integer 2 with ema_int 2.4697265625
    layer = _layer([2.0, -5.0])
    fr = IterativeFreezing(
        layer, momentum=0.25, threshold_start=0.578125, threshold_end=0.578125, start=0.0,
        log_every=3,
    )
    (name,) = fr.layer_names
    logs = []
    for t, v in enumerate([3.0, 2.0, 3.0, 2.0, 3.0]):
        _set(layer, [v, -4.0 + t])
        logs.append(fr.after_step(layer, t, 1000))
    assert logs[:2] == [None, None] and logs[3:] == [None, None]
    assert logs[2] == {"osc_share": 0.0, "frozen_share": 0.0}
    # the optimizer moves the frozen weight to 6: written back to 2 before the update, so the
    # tracker sees the integer 2 (ema 0.75 * 2.4697265625 + 0.25 * 2), not 6
    _set(layer, [6.0, 1.0])
    fr.after_step(layer, 5, 1000)
    assert fr.buffer(name, "ema_int")[0, 0].item() == pytest.approx(2.352294921875)


def test_freezing_uses_a_shared_counters_cached_step():
    layer = _layer([0.0])
    fr = IterativeFreezing(layer, momentum=0.5, start=0.0)
    _set(layer, [1.0])
    fr.transitions.update(layer, 0)  # another user of the counter went first
    fr.after_step(layer, 0, 10)
    assert fr.buffer(fr.layer_names[0], "dir").tolist() == [[1]]


# ----------------------------------------------------------------------------- SAQ
def _fixed(model: nn.Module, weights: dict[int, list]) -> nn.Module:
    """Quantize ``model`` (weights only, 4 bit, step 1 held fixed) and set the given weights."""
    model = qatlab.quantize(model, qatlab.QuantConfig(**_ALL_SAME))
    with torch.no_grad():
        for i, w in weights.items():
            model[i].weight.copy_(torch.tensor(w))
            model[i].weight_quantizer.step.fill_(1.0)
            model[i].weight_quantizer.step.requires_grad_(False)
    return model


def _two_layers() -> nn.Module:
    # q(w0) = I, q(w1) = [1, 1]; x = [1, 2]: out = 3
    return _fixed(
        nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)),
        {0: [[1.0, 0.0], [0.0, 1.0]], 1: [[1.0, 1.0]]},
    )


def test_saq_perturbs_every_layer_of_e_until_restored():
    model = _two_layers()
    x = torch.tensor([[1.0, 2.0]])
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5, ball="raw")
    e = {"0": torch.tensor([[0.5, 0.0], [0.0, 0.0]]), "1": torch.tensor([[0.0, 0.25]])}
    opt.perturb(e)
    # (q(w1) + e1) (q(w0) + e0) x = [1, 1.25] . [1.5, 2] = 4
    assert model(x).item() == 4.0
    opt.restore()
    assert model(x).item() == 3.0
    assert all("qweight_delta" not in m.__dict__ for m in model)


def test_saq_perturb_freezes_bn_statistics_by_default():
    model = qatlab.quantize(
        nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2)),
        qatlab.QuantConfig(**_ALL_SAME),
    )
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, ball="raw")
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    opt.perturb({"0": torch.zeros(2, 2)})
    model(x)
    assert model[1].running_mean.tolist() == [0.0, 0.0] and int(model[1].num_batches_tracked) == 0
    opt.restore()
    model(x)
    assert int(model[1].num_batches_tracked) == 1


def test_saq_case_2_perturbs_latent_weights_and_extras_in_place():
    model = _fixed(nn.Sequential(nn.Linear(2, 1)), {0: [[0.25, 1.5]]})
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, case=2, bias=True, ball="raw")
    assert set(opt.extras) == {"0.bias"}
    opt.perturb({"0": torch.tensor([[1.0, -1.0]]), "0.bias": torch.tensor([2.0])})
    assert model[0].weight.tolist() == [[1.25, 0.5]] and model[0].bias.tolist() == [2.5]
    opt.restore()
    assert model[0].weight.tolist() == [[0.25, 1.5]] and model[0].bias.tolist() == [0.5]


def test_saq_perturbation_norm_guard_is_added():
    # a gradient of norm 3e-12: e = rho g / (3e-12 + 1e-12) = 0.375 (0.75 if it were subtracted)
    model = _fixed(nn.Sequential(nn.Linear(2, 1, bias=False)), {0: [[1.0, 2.0]]})
    model[0].weight.grad = torch.tensor([[3e-12, 0.0]])
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5, case=1, ball="raw")
    assert opt.perturbation()["0"].tolist() == [[pytest.approx(0.375, rel=1e-4), 0.0]]
    # adaptive: scale T = |w| + eta = [1.01, 2.01]; e = rho T^2 g / (||T g|| + 1e-12)
    ada = SAQ(
        torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5, case=1, ball="raw",
        adaptive=True, eta=0.01,
    )
    tg = 1.01 * 3e-12
    expected = 0.5 * 1.01 * tg / (tg + 1e-12)
    assert ada.perturbation()["0"].tolist() == [[pytest.approx(expected, rel=1e-4), 0.0]]


def test_saq_first_pass_twice_releases_the_first_kept_weights():
    model = _two_layers()
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, ball="raw")
    x = torch.tensor([[1.0, 2.0]])
    with opt.first_pass():
        model(x).sum().backward()
    first = opt._kept
    with opt.first_pass():
        model(x).sum().backward()
    assert opt._kept is not first and "0" in opt._kept.grads()


def test_saq_reduce_kept_averages_each_layers_slice(monkeypatch):
    # three layers with 4, 4 and 2 weights: the flat all-reduce buffer is cut back at 0, 4, 8
    model = _fixed(
        nn.Sequential(
            nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
        ),
        {0: [[1.0, 0.0], [0.0, 1.0]], 1: [[1.0, 0.0], [0.0, 1.0]], 2: [[1.0, 1.0]]},
    )
    other = torch.arange(10.0)  # the other rank's dL/dq(w), flat

    class FakeDist:
        @staticmethod
        def all_reduce(t):
            t.add_(other)

        @staticmethod
        def get_world_size():
            return 2

    monkeypatch.setattr(saq_module, "_distributed", lambda: True)
    monkeypatch.setattr(saq_module, "dist", FakeDist)
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, ball="raw")
    with opt.first_pass():
        model(torch.tensor([[1.0, 2.0]])).sum().backward()
    grads = opt._kept.grads()
    for g in grads.values():
        g.fill_(2.0)
    opt._reduce_kept()
    assert grads["0"].tolist() == [[1.0, 1.5], [2.0, 2.5]]  # (2 + [0, 1, 2, 3]) / 2
    assert grads["1"].tolist() == [[3.0, 3.5], [4.0, 4.5]]
    assert grads["2"].tolist() == [[5.0, 5.5]]


# ----------------------------------------------------------------------------- LogAdam
def test_logadam_returns_the_closures_loss_and_skips_groups_without_gradients():
    a, b = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor([-0.5, 2.0]))
    opt = LogAdam([{"params": [a]}, {"params": [b], "log": False}], lr=0.1, eps=1e-3)
    assert opt.step() is None
    b.grad = torch.tensor([2.0, -4.0])  # the first group has none: the second still steps
    assert opt.step(lambda: 7.0) == 7.0
    assert a.item() == 1.0 and a.grad is None
    assert b.tolist() == pytest.approx([-0.5 - 0.1 * 2 / 2.001, 2.0 + 0.1 * 4 / 4.001], rel=1e-6)


# ----------------------------------------------------------------------------- kept weights
def test_kept_weights_become_leaves_with_their_gradient():
    model = _two_layers()
    with keep_quantized_weights(model) as kept:
        assert model[0].keep_qweight is True and model[1].keep_qweight is True
        out = model[0](torch.tensor([[1.0, 2.0]]))  # only layer 0 runs
        (out * torch.tensor([[1.0, 3.0]])).sum().backward()
    assert "keep_qweight" not in model[0].__dict__ and "keep_qweight" not in model[1].__dict__
    assert model[0].keep_qweight is False
    w = model[0].kept_qweight
    assert w.is_leaf and w.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert w.grad.tolist() == [[1.0, 2.0], [3.0, 6.0]]  # dL/dq = c x^T
    assert model[1].kept_qweight is None
    assert set(kept.grads()) == {"0"}


def test_perturbed_weights_touch_only_the_named_layers():
    model = _two_layers()
    with perturbed_weights(model, {"1": torch.tensor([[0.0, 1.0]])}):
        assert model(torch.tensor([[1.0, 2.0]])).item() == 5.0  # [1, 2] . [1, 2]
        assert model[0].qweight_delta is None
    assert model(torch.tensor([[1.0, 2.0]])).item() == 3.0


def test_saq_perturb_closes_what_it_entered_when_it_fails(monkeypatch):
    model = _two_layers()
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, ball="raw")

    def broken(_model):
        raise RuntimeError("no BN freezing")

    monkeypatch.setattr(saq_module, "frozen_bn_stats", broken)
    with pytest.raises(RuntimeError) as failure:  # keeps perturb's frame (and its stack) alive
        opt.perturb({"1": torch.tensor([[0.0, 1.0]])})
    assert failure.value is not None
    assert "qweight_delta" not in model[1].__dict__  # perturbed_weights was left
    assert model(torch.tensor([[1.0, 2.0]])).item() == 3.0


def test_saq_units_skip_keys_outside_the_ball_whatever_their_order():
    model = _two_layers()
    opt = SAQ(torch.optim.SGD(model.parameters(), lr=0.1), model, ball="std")
    std = model[0].weight.detach().std()  # of [[1, 0], [0, 1]]: sqrt(1/3)
    for prefix in ("a", "b", "c"):  # a set's order depends on the strings' hashes
        keys = [f"{prefix}{i}" for i in range(20)] + ["0"]
        assert opt.units(keys) == {"0": std}


# ----------------------------------------------------------------------------- measures
class _Logits(nn.Module):
    """No parameters: the input's features are the logits."""

    def forward(self, x):
        return x.reshape(len(x), -1)


def test_evaluate_a_model_without_parameters_in_float64():
    # batches of 1: per-sample losses 2^24, ln 2, ln 2; a float32 sum would stay at 2^24
    x = torch.tensor([[2.0**24, 0.0], [0.0, 0.0], [0.0, 0.0]])
    res = evaluate(_Logits(), ArrayDataset(x, torch.tensor([1, 0, 0])), batch_size=1)
    assert res["acc"] == pytest.approx(2 / 3)  # argmax of [0, 0] is class 0
    assert res["loss"] == pytest.approx((2.0**24 + 2 * math.log(2.0)) / 3, rel=1e-12)


def test_corruption_accuracy_checks_and_the_table_of_xs_rank(monkeypatch):
    seen = []

    def fake_corrupt(x, name, s, seed, pixel_range=None):
        seen.append(name)
        return x

    monkeypatch.setattr(robustness, "corrupt", fake_corrupt)
    x, y = torch.ones(3, 1, 2), torch.zeros(3, dtype=torch.long)  # signals: (N, C, L)
    out = robustness.corruption_accuracy(_Logits(), x, y, severities=[1])
    assert list(dict.fromkeys(seen)) == list(SIGNAL_CORRUPTIONS)
    assert out["clean_acc"] == 1.0 and out["corr_mean"] == 1.0
    for bad in (
        dict(names=["nope"]),
        dict(severities=[]),
        dict(severities=[6]),
        dict(y=y[:2]),
        dict(x=x[:0], y=y[:0]),
    ):
        kw = {"x": x, "y": y, **bad}
        with pytest.raises(ConfigError):
            robustness.corruption_accuracy(
                _Logits(), kw.pop("x"), kw.pop("y"), **{"severities": [1], **kw}
            )


def test_quantization_noise_per_tensor_pools_the_rows_and_computes_max_abs_steps():
    layer = _fixed(nn.Sequential(nn.Linear(2, 2, bias=False)), {0: [[0.25, 0.25], [-0.25, -0.25]]})
    # q(w) = 0: errors -w, mean 0, variance 1/16 over all four (each row alone: 0); s = 1
    (row,) = quantization_noise(layer)
    assert row["noise_ratio"] == 0.75 and row["per_channel"] is False
    layer[0].weight_quantizer = Quantizer(2, scale="maxabs")  # step max|w| / 1 = 0.25
    (row,) = quantization_noise(layer)
    assert row["step"] == 0.25 and row["clipped"] == 0.0


def test_bound_labels():
    assert _bound_label("PAC-Bayes")("mag_init") == "PAC-Bayes mag init"


# ----------------------------------------------------------------------------- method builders
def _summary(hooks: list) -> list[dict]:
    """Each hook's type and the plain values it keeps (options, thresholds, layer names)."""
    out = []
    for h in hooks:
        d = {"type": type(h).__name__}
        for k, v in vars(h).items():
            if isinstance(v, (bool, int, float, str, tuple, dict, type(None))) and not k.startswith(
                "_"
            ):
                d[k] = v
        for k in ("layer_names",):
            if hasattr(h, k):
                d[k] = list(getattr(h, k))
        if hasattr(h, "transitions"):
            d["counted"] = list(h.transitions.layer_names)
        out.append(d)
    return out


def _two_quantized() -> nn.Module:
    """Two layers; the first is pinned to 8 bits by the first-layer policy."""
    return qatlab.quantize(
        nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)),
        qatlab.QuantConfig(weight_bits=3, weights_only=True, last_layer="same"),
    )


def test_oscillation_method_builders_pass_each_option_on():
    m = _two_quantized()
    q3, q4 = qatlab.QuantConfig(weight_bits=3), qatlab.QuantConfig(weight_bits=4)
    build = {n: get_method(n).build for n in ("track", "dampen", "freeze")}
    # defaults (log_every 0: 1000 // 100 = 10 steps)
    assert _summary(build["track"](m, q3, 1000)) == _summary(
        [OscillationTracker(m, 0.001, 0.01, log_every=10)]
    )
    assert _summary(build["dampen"](m, q3, 1000)) == _summary(
        [
            OscillationDampening(0.1, "kernel_mean", 0.25, include_pinned=True),
            OscillationTracker(m, 0.001, 0.01, log_every=10),
        ]
    )
    assert _summary(build["freeze"](m, q3, 1000)) == _summary(
        [IterativeFreezing(m, 0.001, 0.1, 0.011, 0.25, 4, 10)]  # Nagel's 0.011 at 3 bits
    )
    assert build["freeze"](m, q4, 1000)[0].threshold_end == 0.01
    assert build["freeze"](m, None, 1000)[0].threshold_end == 0.01
    five = qatlab.quantize(
        nn.Sequential(nn.Linear(2, 1)), qatlab.QuantConfig(weight_bits=5, **_ALL_SAME)
    )
    assert build["freeze"](five, None, 1000)[0].layer_names == []  # max_bits 4
    # every option set
    assert _summary(build["track"](m, q3, 1000, momentum=0.5, threshold=0.2, log_every=7)) == (
        _summary([OscillationTracker(m, 0.5, 0.2, log_every=7)])
    )
    opts = dict(lambda_max=0.3, aggregation="sum", start=0.5, include_pinned=False,
                momentum=0.5, threshold=0.2, log_every=7)  # fmt: skip
    assert _summary(build["dampen"](m, q3, 1000, **opts)) == _summary(
        [
            OscillationDampening(0.3, "sum", 0.5, include_pinned=False),
            OscillationTracker(m, 0.5, 0.2, log_every=7),
        ]
    )
    opts = dict(momentum=0.5, threshold_start=0.3, threshold_end=0.02, start=0.5, max_bits=8,
                log_every=7)  # fmt: skip
    assert _summary(build["freeze"](m, q3, 1000, **opts)) == _summary(
        [IterativeFreezing(m, 0.5, 0.3, 0.02, 0.5, 8, 7)]
    )


def test_oscreg_saq_and_talr_builders_pass_each_option_on():
    m = _two_quantized()
    q3 = qatlab.QuantConfig(weight_bits=3)
    oscreg, saq, talr = (get_method(n).build for n in ("oscreg", "saq", "talr"))
    assert _summary(oscreg(m, q3, 100)) == _summary(
        [
            OscillationRegularizer(m, 3, 1.0, "restricted", step_grad=True, aggregation="mean",
                                   stats_every=0),  # fmt: skip
            PTQAccuracy(3),
        ]
    )
    opts = dict(target_bits=4, lam=0.5, grid="full", step_grad=False, aggregation="uniform",
                stats_every=3)  # fmt: skip
    assert _summary(oscreg(m, q3, 100, **opts)) == _summary(
        [
            OscillationRegularizer(m, 4, 0.5, "full", step_grad=False, aggregation="uniform",
                                   stats_every=3),  # fmt: skip
            PTQAccuracy(4),
        ]
    )
    saq_defaults = dict(rho=DEFAULT_RHO, case=3, every=1, adaptive=False, eta=0.01, bias=False,
                        norm=False, act_steps=False, weight_steps=False, ball=DEFAULT_BALL,
                        adaptive_bias=True, bn_update=False, per_replica=False)  # fmt: skip
    assert saq(m, q3, 100)[0].options == saq_defaults
    saq_opts = dict(rho=0.2, case=1, every=2, adaptive=True, eta=0.5, bias=True, norm=True,
                    act_steps=True, weight_steps=True, ball="raw", adaptive_bias=False,
                    bn_update=True, per_replica=True)  # fmt: skip
    assert saq(m, q3, 100, **saq_opts)[0].options == saq_opts
    assert _summary(talr(m, q3, 100)) == _summary([TALRHook(m, 100)])
    talr_opts = dict(lam=0.5, controller="paper", momentum=0.9, schedule="step", per_layer=True,
                     eta=0.2, u0=0.3, max_change=3.0, u_max=0.7, include_pinned=True,
                     milestones="0.25,0.5", gamma=0.5, log_every=9)  # fmt: skip
    assert _summary(talr(m, q3, 100, **talr_opts)) == _summary(
        [TALRHook(m, 100, 0.5, 0.9, "step", True, 0.2, 0.3, True, (0.25, 0.5), 0.5, 9, "paper",
                  3.0, 0.7)]  # fmt: skip
    )


# ----------------------------------------------------------------------------- measures' wiring
def test_accuracy_measure_evaluates_test_and_val(monkeypatch):
    calls = []

    def fake(model, dataset, batch_size):
        calls.append((model, dataset, batch_size))
        return {"acc": len(dataset) / 10, "loss": float(len(dataset))}

    monkeypatch.setattr(accuracy_module, "evaluate", fake)
    ctx = SimpleNamespace(data=SimpleNamespace(test=[1, 2, 3], val=[1]), model=lambda: "m")
    assert accuracy_module.accuracy(ctx) == {
        "test_acc": 0.3, "test_loss": 3.0, "val_acc": 0.1, "val_loss": 1.0}  # fmt: skip
    assert calls == [("m", [1, 2, 3], 512), ("m", [1], 512)]
    ctx.data = SimpleNamespace(test=[1], val=[])  # an empty split is left out, so is a missing one
    assert accuracy_module.accuracy(ctx, batch_size=7) == {"test_acc": 0.1, "test_loss": 1.0}
    assert calls[-1] == ("m", [1], 7)
    ctx.data = SimpleNamespace(test=[1, 2])
    assert list(accuracy_module.accuracy(ctx)) == ["test_acc", "test_loss"]


def test_bn_reestimate_measure_wiring(monkeypatch):
    import qatlab.data
    import qatlab.quant

    seen = {}
    def loader(ds, bs, shuffle, seed):
        return seen.setdefault("loader", (ds, bs, shuffle, seed))

    monkeypatch.setattr(qatlab.data, "make_loader", loader)
    monkeypatch.setattr(
        qatlab.quant,
        "reestimate_bn",
        lambda model, loader, batches: seen.setdefault("bn", (model, loader, batches))
        and {"a": {"mean": 0.1, "var": 0.4}, "b": {"mean": 0.3, "var": 0.2}},
    )
    monkeypatch.setattr(bn_module, "evaluate", lambda m, ds, bs: {"acc": (m, ds, bs)})
    ctx = SimpleNamespace(data=SimpleNamespace(train_eval="tr", test="te"), batch_size=32,
                          model=lambda: "m")  # fmt: skip
    out = bn_module.bn_reestimate(ctx)
    assert out == {"acc_bn": ("m", "te", 512), "bn_mean_err": pytest.approx(0.2),
                   "bn_var_err": pytest.approx(0.3)}  # fmt: skip
    assert seen == {"loader": ("tr", 32, True, 1), "bn": ("m", ("tr", 32, True, 1), 50)}
    seen.clear()
    bn_module.bn_reestimate(ctx, batches=3, seed=9)
    assert seen["bn"][2] == 3 and seen["loader"][3] == 9


def test_crossbit_measure_wiring(monkeypatch):
    calls = []

    def fake_cross_bit(model, metric, bits):
        calls.append((model, bits, metric(SimpleNamespace(eval=lambda: "evald"))))
        return {"W2": 0.5, "float": 0.9}

    monkeypatch.setattr(crossbit_module, "cross_bit", fake_cross_bit)
    monkeypatch.setattr(crossbit_module, "evaluate", lambda m, ds, bs: {"acc": (m, ds, bs)})
    ctx = SimpleNamespace(data=SimpleNamespace(test="te"), model=lambda: "best",
                          final_model=lambda: SimpleNamespace(eval=lambda: "last"))  # fmt: skip
    assert crossbit_module.crossbit_measure(ctx) == {"xb_W2": 0.5, "xb_float": 0.9}
    assert calls == [("best", [2, 3, 4, 8], ("evald", "te", 512))]
    out = crossbit_module.crossbit_measure(ctx, bits=[4], final=True)
    assert out == {"xb_W2": 0.5, "xb_float": 0.9, "xbf_W2": 0.5, "xbf_float": 0.9}
    assert [c[:2] for c in calls[1:]] == [("best", [4]), ("last", [4])]
    ctx.final_model = lambda: None
    assert list(crossbit_module.crossbit_measure(ctx, final=True)) == ["xb_W2", "xb_float"]


def test_ptq_measure_wiring(monkeypatch):
    seen = []

    def fake_sweep(model, data, bits, **kw):
        seen.append((model, data, bits, kw))
        return [{"bits": "float", "acc": 0.9, "method": "float"},
                {"bits": "W4A4", "acc": 0.5, "method": "ptq"}]  # fmt: skip

    monkeypatch.setattr(ptq_module, "ptq_sweep", fake_sweep)
    ctx = SimpleNamespace(data="d", model=lambda: "m")
    assert ptq_module.ptq_measure(ctx) == {"ptq_W4A4": 0.5}
    assert seen[-1] == ("m", "d", [2, 3, 4, 8], dict(act_bits="same", calib_batches=4,
                        bn_reestimate=False, quant_options=None))  # fmt: skip
    ptq_module.ptq_measure(ctx, bits=[3], act_bits=8, bn_reestimate=True, calib_batches=2,
                           quant={"grid": "full"})  # fmt: skip
    assert seen[-1] == ("m", "d", [3], dict(act_bits=8, calib_batches=2, bn_reestimate=True,
                        quant_options={"grid": "full"}))  # fmt: skip


def test_oscillation_measure_on_stub_hooks():
    class Tracker:
        def __init__(self, f):
            self.f = torch.tensor(f)

        def frequencies(self):
            return self.f

    class Freezer(Tracker):
        def __init__(self, f, share):
            super().__init__(f)
            self.share = share

        def frozen_share(self):
            return self.share

    hooks = [Tracker([0.005, 0.02, 0.05]), Freezer([0.01, 0.2], 0.5), Freezer([], 0.25), object()]
    ctx = SimpleNamespace(method_hooks=lambda: hooks)
    out = osc_measure.oscillation(ctx)
    assert out["osc_share"] == pytest.approx(0.6)  # 0.02, 0.05, 0.2 of 5 above 0.01 (not 0.01)
    assert out["frozen_share"] == 0.375
    hist = [0.0] * 25  # bins of 0.004 on [0, 0.1]; 0.2 is outside
    hist[1] = hist[2] = hist[5] = hist[12] = 1.0
    assert out["osc_hist"] == hist
    out = osc_measure.oscillation(ctx, threshold=0.03, bins=2, hist_max=0.04)
    assert out["osc_share"] == pytest.approx(0.4) and out["osc_hist"] == [2.0, 1.0]
    assert osc_measure.oscillation(SimpleNamespace(method_hooks=lambda: [object()])) == {}
    only = osc_measure.oscillation(SimpleNamespace(method_hooks=lambda: hooks[:1]))
    assert only["frozen_share"] is None and only["osc_share"] == pytest.approx(2 / 3)


def test_logged_measure_on_records():
    records = [
        {"step": 1, "tr": 0.5},
        {"step": 2, "tr": 0.25},
        {"epoch": 1, "train_loss": 2.0, "val_acc": 0.5},
        {"epoch": 2, "train_loss": 1.0, "val_acc": 0.7, "tr": 0.9},
    ]
    ctx = SimpleNamespace(logged_records=lambda: records)
    assert osc_measure.logged(ctx) == {"logged_tr_last": 0.25}
    out = osc_measure.logged(ctx, key=["tr", "val_acc"], reduce=["max", "tail"], tail=0.5)
    assert out == {"logged_tr_max": 0.5, "logged_tr_tail50": 0.25,
                   "logged_val_acc_max": 0.7, "logged_val_acc_tail50": 0.7}  # fmt: skip
    assert osc_measure.logged(ctx, reduce="first", series_kind="epoch") == {"logged_tr_first": 0.9}
    with pytest.raises(ConfigError):
        osc_measure.logged(ctx, series_kind="steps")
    five = [{"step": i, "tr": v} for i, v in enumerate([0.5, 0.25, 1.0, 0.75, 0.0])]
    out = osc_measure.logged(SimpleNamespace(logged_records=lambda: five), reduce="tail", tail=0.6)
    assert out == {"logged_tr_tail60": pytest.approx(0.5833333333333334)}  # the last 3 of 5


def test_talr_tracking_measure_wiring(monkeypatch):
    seen = []
    monkeypatch.setattr(talr_measure, "tracking_stats", lambda *a: seen.append(a) or {})
    cfg = SimpleNamespace(
        method=SimpleNamespace(options={"u0": 0.3}), train=SimpleNamespace(lr=0.1)
    )
    ctx = SimpleNamespace(logged_records=lambda: ["r"], cfg=cfg)
    talr_measure.talr_tracking(ctx)
    talr_measure.talr_tracking(ctx, skip=0.5, u0=0.7)
    assert seen == [(["r"], 0.2, 0.3), (["r"], 0.5, 0.7)]
    for bad in (dict(skip=1.0), dict(u0=-1.0)):
        with pytest.raises(ConfigError):
            talr_measure.talr_tracking(ctx, **bad)


def test_quantized_weights_of_enabled_and_disabled_quantizers():
    model = _fixed(
        nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)),
        {0: [[0.4, -1.6], [2.2, 0.0]], 1: [[0.6, 1.4]]},
    )
    model[1].weight_quantizer.enabled = False
    out = quantized_weights(model)
    assert list(out) == ["0", "1"]
    assert out["0"].tolist() == [[0.0, -2.0], [2.0, 0.0]]  # round(w / 1)
    assert out["1"].tolist() == [pytest.approx([0.6, 1.4])]  # the latent weight, a copy
    assert out["1"] is not model[1].weight and not out["1"].requires_grad
