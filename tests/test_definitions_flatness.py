"""The flatness searches pinned on hand-made models (``make mutants``, docs/results/mutation.md).

What is perturbed (BatchNorm folded into the layer before it: ``a_c W`` and ``a_c (b - mu) +
beta`` with ``a_c = gamma / sqrt(var + eps)``, worked out by hand), how a perturbation of the
folded tensors reaches the model (``U / a_c`` on ``W``, noise on ``beta``), and every midpoint
of the sigma and alpha searches on a ``Linear(1, 2)`` classifier against the definition
written out with plain torch ops: the accuracy of the model at ``w + sigma z`` (the seeded
normals of ``_generator``, pinned in ``tests/test_definitions_measure.py``), and the worst
accuracy after projected sign-gradient ascent on the cross-entropy from seeded uniform starts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatlab
from qatlab.errors import ConfigError
from qatlab.measure.flatness import (
    _bn_scale,
    _fold_pairs,
    _generator,
    _loss_grad,
    _normal,
    _Perturbed,
    alpha_search,
    perturbable_weights,
    sigma_search,
    training_subset,
)


def _t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _near(t: torch.Tensor, v, atol: float = 1e-6) -> bool:
    """``t`` equals the hand value ``v`` (nested lists) to float32 rounding."""
    return t.shape == _t(v).shape and torch.allclose(t.float(), _t(v), rtol=0.0, atol=atol)


def _folded_net() -> nn.Sequential:
    """Linear(2, 2) -> BN (a = gamma / sqrt(var + 1) = [1.5, -0.5]) -> ReLU -> Linear -> LN."""
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, eps=1.0), nn.ReLU(), nn.Linear(2, 2),
                        nn.LayerNorm(2))  # fmt: skip
    with torch.no_grad():
        net[0].weight.copy_(_t([[1.0, 2.0], [3.0, -1.0]]))
        net[0].bias.copy_(_t([0.5, -1.0]))
        net[1].weight.copy_(_t([3.0, -1.0]))
        net[1].bias.copy_(_t([0.1, 0.2]))
        net[1].running_mean.copy_(_t([1.0, -1.0]))
        net[1].running_var.copy_(_t([3.0, 3.0]))
        net[3].weight.copy_(_t([[1.0, -1.0], [0.5, 2.0]]))
        net[3].bias.copy_(_t([0.0, 0.25]))
        net[4].weight.copy_(_t([2.0, 1.0]))
        net[4].bias.copy_(_t([0.0, -0.5]))
    return net


def test_bn_folding_by_hand():
    net = _folded_net()
    assert _fold_pairs(net) == {"1": ("0", net[0], net[1])}
    assert _bn_scale(net[1]).tolist() == [1.5, -0.5]
    plain = nn.BatchNorm1d(2, affine=False, eps=1.0)
    plain.running_var.fill_(3.0)
    assert _bn_scale(plain).tolist() == [0.5, 0.5]
    w = perturbable_weights(net)
    assert list(w) == ["0.weight", "0.bias", "3.weight", "3.bias", "4.weight", "4.bias"]
    assert w["0.weight"].tolist() == [[1.5, 3.0], [-1.5, 0.5]]  # a_c W
    # a (b - mu) + beta = [1.5 (0.5 - 1) + 0.1, -0.5 (-1 + 1) + 0.2]
    assert w["0.bias"].tolist() == pytest.approx([-0.65, 0.2])
    assert w["3.weight"].tolist() == [[1.0, -1.0], [0.5, 2.0]]
    assert w["4.bias"].tolist() == [0.0, -0.5]
    w["3.weight"].add_(1.0)  # copies
    assert net[3].weight[0, 0].item() == 1.0
    unfolded = perturbable_weights(net, fold_bn=False)
    assert list(unfolded) == ["0.weight", "0.bias", "3.weight", "3.bias", "1.weight", "1.bias",
                              "4.weight", "4.bias"]  # fmt: skip
    assert unfolded["0.weight"].tolist() == [[1.0, 2.0], [3.0, -1.0]]
    assert unfolded["1.weight"].tolist() == [3.0, -1.0]
    # a conv without bias: b = 0 -> a (0 - mu) + beta; a BN without affine: nothing to fold into
    conv = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2, eps=1.0))
    with torch.no_grad():
        conv[0].weight.copy_(_t([2.0, 4.0]).reshape(2, 1, 1, 1))
        conv[1].weight.copy_(_t([3.0, -1.0]))
        conv[1].bias.copy_(_t([0.1, 0.2]))
        conv[1].running_mean.copy_(_t([1.0, -1.0]))
        conv[1].running_var.copy_(_t([3.0, 3.0]))
    cw = perturbable_weights(conv)
    assert list(cw) == ["0.weight", "0.bias"]
    assert cw["0.weight"].flatten().tolist() == [3.0, -2.0]
    assert cw["0.bias"].tolist() == pytest.approx([-1.5 + 0.1, -0.5 + 0.2])
    bare = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2, affine=False))
    assert list(perturbable_weights(bare)) == ["0.weight"]


def test_fold_pairs_only_a_bn_right_after_its_layer():
    # channel mismatch, no running statistics, a transposed conv, a BN after a BN
    assert _fold_pairs(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(2))) == {}
    no_stats = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    assert _fold_pairs(no_stats) == {}
    assert _fold_pairs(nn.Sequential(nn.ConvTranspose2d(3, 2, 1), nn.BatchNorm2d(3))) == {}
    assert _fold_pairs(nn.Sequential(nn.ConvTranspose2d(2, 3, 1), nn.BatchNorm2d(3))) == {}
    twice = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.BatchNorm2d(2))
    assert list(_fold_pairs(twice)) == ["1"]
    first = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2))
    assert _fold_pairs(first) == {}


def test_perturbed_forward_applies_folded_noise_by_hand():
    net = _folded_net().train()
    pm = _Perturbed(net, "q", True)
    x = _t([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.0]])
    u_w, u_b = _t([[0.3, -0.6], [0.2, 0.4]]), _t([0.05, -0.1])
    u3 = _t([[0.1, 0.0], [0.0, -0.2]])
    deltas = {"0.weight": u_w, "0.bias": u_b, "3.weight": u3}
    over = pm.overrides(deltas)
    assert set(over) == {"0.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias"}
    # U on a_c W is U / a_c on W: rows / 1.5 and / -0.5; noise on the folded bias is on beta
    assert _near(over["0.weight"], [[1.2, 1.6], [2.6, -1.8]])
    assert over["1.bias"].tolist() == pytest.approx([0.15, 0.1])
    assert pm.overrides(None)["0.weight"].tolist() == [[1.0, 2.0], [3.0, -1.0]]
    assert pm.overrides({"3.bias": None})["3.bias"].tolist() == [0.0, 0.25]
    with pm.ready():
        assert not net.training and not net[1].training
        out = pm(x, deltas)
        base = pm(x)
    assert net.training and net[1].training
    # the folded network written out: h = (aW + U) x + a (b - mu) + beta + u_b, ReLU, Linear, LN
    aw = _t([[1.5, 3.0], [-1.5, 0.5]]) + u_w
    fb = _t([-0.65, 0.2]) + u_b
    h = torch.relu(x @ aw.T + fb)
    h = h @ (_t([[1.0, -1.0], [0.5, 2.0]]) + u3).T + _t([0.0, 0.25])
    expected = F.layer_norm(h, (2,), _t([2.0, 1.0]), _t([0.0, -0.5]))
    assert torch.allclose(out, expected, rtol=0.0, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(base, net.eval()(x), rtol=0.0, atol=1e-6)


def _qnet() -> nn.Sequential:
    """A quantized Linear(2, 1) with weight [[0.3, 1.2]] (step 1: q(w) = [[0, 1]]) and an
    input quantizer, inside a container."""
    net = qatlab.quantize(nn.Sequential(nn.Linear(2, 1, bias=False)),
                          qatlab.QuantConfig(first_layer="same", last_layer="same"))  # fmt: skip
    layer = net[0]
    with torch.no_grad():
        layer.weight.copy_(_t([[0.3, 1.2]]))
        layer.weight_quantizer.step.fill_(1.0)
        layer.weight_quantizer.initialized.fill_(True)
        layer.input_quantizer.step.fill_(0.5)
        layer.input_quantizer.initialized.fill_(True)
    for q in (layer.weight_quantizer, layer.input_quantizer):
        q._ready = None  # re-read ``initialized`` (as after a state-dict load)
    return net


def test_what_is_perturbed_in_a_quantized_model():
    net = _qnet()
    q = perturbable_weights(net, "q")
    assert list(q) == ["0.weight"] and _near(q["0.weight"], [[0.0, 1.0]])
    assert _near(perturbable_weights(net, "latent")["0.weight"], [[0.3, 1.2]])
    assert _near(perturbable_weights(net, "float")["0.weight"], [[0.3, 1.2]])
    net[0].weight_quantizer.enabled = False
    assert _near(perturbable_weights(net, "q")["0.weight"], [[0.3, 1.2]])
    net[0].weight_quantizer.enabled = True
    with pytest.raises(ConfigError):
        perturbable_weights(net, "int")
    wq, aq = net[0].weight_quantizer, net[0].input_quantizer
    seen = {}
    for perturb in ("q", "latent", "float"):
        with _Perturbed(net, perturb, True).ready():
            seen[perturb] = (wq.enabled, aq.enabled)
    assert seen == {"q": (False, True), "latent": (True, True), "float": (False, False)}
    assert (wq.enabled, aq.enabled) == (True, True)
    # x = [0.6, 0.9] -> input q = [0.5, 1.0]; q(w) = [0, 1]: 1.0; latent q(w + 0) the same
    x = _t([[0.6, 0.9]])
    pm = _Perturbed(net, "q", True)
    with pm.ready():
        assert pm(x).item() == pytest.approx(1.0)
        assert pm(x, {"0.weight": _t([[0.2, 0.0]])}).item() == pytest.approx(1.1)
    pm = _Perturbed(net, "latent", True)  # q(w + delta): [0.5, 1.2] -> [0, 1] (half to even)
    with pm.ready():
        assert pm(x, {"0.weight": _t([[0.2, 0.0]])}).item() == pytest.approx(1.0)
    pm = _Perturbed(net, "float", True)
    with pm.ready():
        assert pm(x).item() == pytest.approx(0.6 * 0.3 + 0.9 * 1.2)
    with pytest.raises(RuntimeError), _Perturbed(net, "float", True).ready():
        raise RuntimeError("inside")
    assert net.training and (wq.enabled, aq.enabled) == (True, True)


def test_accuracy_in_batches():
    net = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(_t([[1.0], [-1.0]]))
    pm = _Perturbed(net, "q", True)
    x = _t([[1.0], [2.0], [-1.0], [3.0], [-2.0]])
    y = torch.tensor([0, 0, 1, 1, 0])  # right: 0, 1, 2
    assert pm.accuracy(x, y, batch_size=2) == pytest.approx(3 / 5)
    assert pm.accuracy(x, y) == pytest.approx(3 / 5)
    assert pm.accuracy(x[:0], y[:0]) == 0.0


# ---------------------------------------------------------------------------- the searches
# Linear(1, 2): logits [w0 x + b0, w1 x + b1], w = [1, -1], b = [0, 0.1]; class 0 for x > 0
_X = _t([[-2.0], [-1.0], [-0.5], [0.25], [0.5], [1.0], [1.5]])
_Y = torch.tensor([1, 1, 1, 0, 0, 0, 0])


def _line() -> nn.Linear:
    net = nn.Linear(1, 2)
    with torch.no_grad():
        net.weight.copy_(_t([[1.0], [-1.0]]))
        net.bias.copy_(_t([0.0, 0.1]))
    return net.train()


def _acc(w: torch.Tensor, b: torch.Tensor) -> float:
    return float(((_X @ w.T + b).argmax(1) == _Y).float().mean())


def _sigma_drop(sigma: float, draws: int, seed: int, mag: bool, eps: float) -> float:
    """1 - mean_d acc(w + z_w std_w, b + z_b std_b), z from the seeded stream of draw d."""
    w, b = _t([[1.0], [-1.0]]), _t([0.0, 0.1])
    accs = []
    for d in range(draws):
        g = _generator(seed, d)
        zw, zb = _normal(w, g), _normal(b, g)
        sw = (sigma**2 * w**2 + eps**2).sqrt() if mag else sigma
        sb = (sigma**2 * b**2 + eps**2).sqrt() if mag else sigma
        accs.append(_acc(w + zw * sw, b + zb * sb))
    return 1.0 - sum(accs) / draws


@pytest.mark.parametrize(
    ("mag", "target", "tol", "upper"), [(False, 0.15, 0.02, 4.0), (True, 0.16, 0.01, 6.0)]
)
def test_sigma_search_every_midpoint_by_definition(mag, target, tol, upper):
    net = _line()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []
    out = sigma_search(net, _X, _Y, magnitude_aware=mag, target=target, tol=tol, steps=6,
                       upper=upper, draws=3, eps=0.2, seed=5, batch_size=3,
                       progress=lambda k, total, info: seen.append((k, total, info)))  # fmt: skip
    mids = [info["radius"] for _, _, info in seen]
    assert mids[0] == upper / 2 and [k for k, _, _ in seen] == list(range(len(seen)))
    assert all(total == 6 for _, total, _ in seen)
    for _, _, info in seen:
        assert info["drop"] == pytest.approx(_sigma_drop(info["radius"], 3, 5, mag, 0.2))
    assert out == {"sigma": mids[-1], "drop": seen[-1][2]["drop"], "base_acc": 1.0,
                   "evals": len(seen)}  # fmt: skip
    assert len(set(mids)) == len(mids) > 2  # a real search, not one midpoint
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_sigma_search_defaults_and_checks():
    net = _line()
    out = sigma_search(net, _X, _Y)  # target .1, tol .01, 15 steps on [0, 2], 10 draws, eps 1e-3
    seen = []
    again = sigma_search(net, _X, _Y, progress=lambda k, t, info: seen.append((t, info)))
    assert again == out and seen[0] == (15, {"radius": 1.0, "drop": seen[0][1]["drop"]})
    assert seen[0][1]["drop"] == pytest.approx(_sigma_drop(1.0, 10, 0, False, 1e-3))
    mag = sigma_search(net, _X, _Y, magnitude_aware=True, steps=1)
    assert mag["drop"] == pytest.approx(_sigma_drop(1.0, 10, 0, True, 1e-3))
    assert sigma_search(net, _X, _Y, steps=1, progress=True)["sigma"] == 1.0  # tqdm bar
    for kw in ({"draws": 0}, {"target": 0.0}, {"target": 1.0}, {"tol": 0.0}, {"tol": 0.1},
               {"steps": 0}, {"upper": 0.0}):  # fmt: skip
        with pytest.raises(ConfigError):
            sigma_search(net, _X, _Y, **kw)
    with pytest.raises(ConfigError):
        sigma_search(net, _X, _Y[:3])
    with pytest.raises(ConfigError):
        sigma_search(net, _X[:0], _Y[:0])
    assert (
        sigma_search(net, _X, _Y, draws=1, target=0.5, tol=0.49, steps=1, upper=1e-9)["evals"] == 1
    )


def _alpha_worst(alpha, restarts, ascent, seed, mag, eps, frac) -> float:
    """min over restarts of acc(w + u): u uniform in the box (seeded), then ``ascent`` steps
    u <- clip(u + frac r sign(d CE / du), -r, r) with the mean cross-entropy over (x, y)."""
    w, b = _t([[1.0], [-1.0]]), _t([0.0, 0.1])
    rw = alpha * w.abs() + eps if mag else torch.full_like(w, alpha)
    rb = alpha * b.abs() + eps if mag else torch.full_like(b, alpha)
    worst = 1.0
    for restart in range(restarts):
        g = _generator(seed, 1 << 20, restart)
        uw = (torch.rand(w.shape, generator=g) * 2 - 1) * rw
        ub = (torch.rand(b.shape, generator=g) * 2 - 1) * rb
        for _ in range(ascent):
            uw, ub = uw.requires_grad_(), ub.requires_grad_()
            loss = F.cross_entropy(_X @ (w + uw).T + b + ub, _Y)
            gw, gb = torch.autograd.grad(loss, [uw, ub])
            with torch.no_grad():
                uw = torch.clamp(uw + frac * rw * gw.sign(), -rw, rw)
                ub = torch.clamp(ub + frac * rb * gb.sign(), -rb, rb)
        worst = min(worst, _acc(w + uw.detach(), b + ub.detach()))
    return worst


@pytest.mark.parametrize(
    ("mag", "target", "tol", "upper"), [(False, 0.3, 0.02, 1.5), (True, 0.5, 0.05, 2.5)]
)
def test_alpha_search_every_midpoint_by_definition(mag, target, tol, upper):
    net = _line()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []
    out = alpha_search(net, _X, _Y, magnitude_aware=mag, target=target, tol=tol, steps=5,
                       upper=upper, ascent_steps=2, restarts=3, eps=0.05, seed=2, batch_size=3,
                       step_fraction=0.4,
                       progress=lambda k, total, info: seen.append(info))  # fmt: skip
    mids = [info["radius"] for info in seen]
    assert mids[0] == upper / 2
    for info in seen:
        worst = _alpha_worst(info["radius"], 3, 2, 2, mag, 0.05, 0.4)
        assert info["drop"] == pytest.approx(1.0 - worst)
    assert out == {"alpha": mids[-1], "drop": seen[-1]["drop"], "base_acc": 1.0,
                   "evals": len(seen)}  # fmt: skip
    assert len(set(mids)) == len(mids) > 2
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net.weight.grad is None


def test_alpha_search_defaults_and_checks():
    net = _line()
    seen = []
    alpha_search(net, _X, _Y, steps=2, progress=lambda k, t, info: seen.append((t, info)))
    # defaults: upper 2 (first midpoint 1), 5 ascent steps of 0.25 r, 2 restarts, seed 0
    assert [t for t, _ in seen] == [2, 2] and seen[0][1]["radius"] == 1.0
    assert seen[0][1]["drop"] == pytest.approx(1.0 - _alpha_worst(1.0, 2, 5, 0, False, 1e-3, 0.25))
    r = seen[1][1]["radius"]
    assert seen[1][1]["drop"] == pytest.approx(1.0 - _alpha_worst(r, 2, 5, 0, False, 1e-3, 0.25))
    none = alpha_search(net, _X, _Y, steps=1, ascent_steps=0, restarts=1, upper=0.2)
    assert none["drop"] == pytest.approx(1.0 - _alpha_worst(0.1, 1, 0, 0, False, 1e-3, 0.25))
    mag = alpha_search(net, _X, _Y, steps=1, magnitude_aware=True, upper=0.5)
    assert mag["drop"] == pytest.approx(1.0 - _alpha_worst(0.25, 2, 5, 0, True, 1e-3, 0.25))
    for kw in ({"restarts": 0}, {"ascent_steps": -1}, {"target": 0.0}, {"steps": 0}):
        with pytest.raises(ConfigError):
            alpha_search(net, _X, _Y, **kw)


def test_training_subset_by_hand():
    class _XY:
        def __init__(self, n: int) -> None:
            self.x, self.y = torch.arange(n * 2.0).reshape(n, 2), torch.arange(n) % 3

        def __len__(self) -> int:
            return len(self.y)

    class _Items:  # indexable only (no .x, .y)
        def __init__(self, n: int) -> None:
            self._data = _XY(n)

        def __len__(self) -> int:
            return len(self._data)

        def __getitem__(self, i):
            return self._data.x[i].tolist(), self._data.y[i].item()

    idx = torch.randperm(10, generator=torch.Generator().manual_seed(4))[:3].sort().values
    x, y = training_subset(_XY(10), 3, seed=4)
    assert x.tolist() == _XY(10).x[idx].tolist() and y.tolist() == (idx % 3).tolist()
    x, y = training_subset(_Items(10), 3, seed=4)
    assert x.tolist() == _XY(10).x[idx].tolist() and y.tolist() == (idx % 3).tolist()
    idx0 = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4].sort().values
    assert training_subset(_XY(10), 4)[1].tolist() == (idx0 % 3).tolist()  # default seed 0
    for size in (None, 10, 11):
        x, y = training_subset(_Items(10), size)
        assert y.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0] and x.shape == (10, 2)
    only_x = _Items(4)
    only_x.x = torch.zeros(4, 2)  # an indexable data set with an x but no y: read by item
    assert (
        training_subset(only_x, 2, seed=4)[1].tolist()
        == (
            torch.randperm(4, generator=torch.Generator().manual_seed(4))[:2].sort().values % 3
        ).tolist()
    )
    assert len(training_subset(_XY(3000))[1]) == 2048  # default size
    assert len(training_subset(_XY(5), 1)[1]) == 1
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ConfigError):
            training_subset(_XY(5), bad)


class _Unused(nn.Module):
    """``Linear(1, 2)`` plus a parameter the forward never reads (its gradient is None)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = _line()
        self.spare = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x)


def test_loss_grad_is_the_mean_cross_entropy_gradient():
    net = _Unused()
    pm = _Perturbed(net, "q", True)
    keys = list(pm.weights)
    assert keys == ["fc.weight", "fc.bias", "spare"]
    u = {"fc.weight": _t([[0.3], [-0.2]]), "fc.bias": _t([0.1, 0.4]), "spare": torch.zeros(3)}
    # by definition: d/du of mean_i CE(x_i (w + u_w)^T + b + u_b, y_i), in batches of 3 of 7
    uw, ub = u["fc.weight"].clone().requires_grad_(), u["fc.bias"].clone().requires_grad_()
    loss = F.cross_entropy(_X @ (_t([[1.0], [-1.0]]) + uw).T + _t([0.0, 0.1]) + ub, _Y)
    gw, gb = torch.autograd.grad(loss, [uw, ub])
    with pm.ready():
        got = _loss_grad(pm, _X, _Y, u, keys, 3)
    assert torch.allclose(got[0], gw, atol=1e-6) and torch.allclose(got[1], gb, atol=1e-6)
    assert got[2].tolist() == [0.0, 0.0, 0.0]  # an unused parameter: zero, not an error
    assert net.fc.weight.grad is None and net.spare.grad is None


def _bn_data():
    net = _folded_net().eval()
    x = _t([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.0], [2.0, 0.5], [-0.5, -1.5], [0.0, 1.0]])
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def test_search_defaults_fold_bn_and_stay_quiet(capsys):
    net, x, y = _bn_data()
    sig = sigma_search(net, x, y, steps=1, draws=4, upper=0.6)
    assert sig == sigma_search(net, x, y, steps=1, draws=4, upper=0.6, fold_bn=True)
    assert sig != sigma_search(net, x, y, steps=1, draws=4, upper=0.6, fold_bn=False)
    kw = dict(steps=1, upper=2.0, ascent_steps=1, restarts=2)
    alp = alpha_search(net, x, y, **kw)
    assert alp == alpha_search(net, x, y, fold_bn=True, **kw)
    assert alp != alpha_search(net, x, y, fold_bn=False, **kw)
    assert capsys.readouterr().err == ""  # progress=False by default: no bar


def test_alpha_ascent_leaves_a_zero_gradient_alone():
    """A dead ReLU unit (pre-activation -1.5 + u_w + u_b < 0 in the box r = 0.8 from this
    start) has gradient 0 in all its weights: sign(0) = 0 moves nothing, so it stays dead and
    only the output bias is pushed (margin 3 - 2 * 0.8 > 0): no drop. Moving it to the box's
    edge instead would revive it (pre = 0.1, output weights 50: the class flips)."""
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.fill_(0.0)
        net[0].bias.fill_(-1.5)
        net[2].weight.copy_(_t([[50.0], [-50.0]]))
        net[2].bias.copy_(_t([0.0, 3.0]))
    out = alpha_search(net, _t([[1.0]]), torch.tensor([1]), steps=1, upper=1.6, restarts=1)
    assert out == {"alpha": 0.8, "drop": 0.0, "base_acc": 1.0, "evals": 1}


def test_alpha_search_default_steps():
    net = _line()
    d1 = 1.0 - _alpha_worst(1.0, 2, 5, 0, False, 1e-3, 0.25)  # the first midpoint's drop
    assert 0.0 < d1 < 1.0
    seen = []
    out = alpha_search(net, _X, _Y, target=d1, tol=min(0.01, d1 / 2),
                       progress=lambda k, total, info: seen.append(total))  # fmt: skip
    assert seen == [15] and out["evals"] == 1  # 15 midpoints at most; stopped at the first
