"""The other measures' formulas pinned on hand-made input: accuracy and loss, the
generalization gap, the quantization noise, the loss landscape and the corruption accuracy.

Same rules as ``tests/test_definitions.py`` (expected values worked out by hand); part of the
tests ``make mutants`` runs (docs/results/mutation.md).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatlab
from qatlab.data.loader import ArrayDataset
from qatlab.errors import ConfigError
from qatlab.measure import robustness
from qatlab.measure.accuracy import evaluate
from qatlab.measure.flatness import _generator
from qatlab.measure.gap import generalization_gap
from qatlab.measure.landscape import (
    _loss_acc,
    filter_normalized_direction,
    landscape_directions,
    loss_landscape,
)
from qatlab.measure.noise import quantization_noise


def _t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _line() -> nn.Linear:
    """Linear(1, 2) without bias, w = [1, -1]: logits [x, -x], class 0 for x > 0."""
    net = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(_t([[1.0], [-1.0]]))
    return net


def _ce(x: float, y: int) -> float:
    """Cross-entropy of logits [x, -x] for label y, by hand: log(1 + e^(-+2x))."""
    return math.log1p(math.exp(-2 * x if y == 0 else 2 * x))


# ----------------------------------------------------------------------------- accuracy, gap
def test_evaluate_and_gap_by_hand():
    net = _line().train()
    # train: x = 1, 2, -1, 0.5, -3 with y = 0, 0, 0, 1, 1 -> right: 1, 2, -3 (3 of 5)
    xs, ys = [1.0, 2.0, -1.0, 0.5, -3.0], [0, 0, 0, 1, 1]
    train = ArrayDataset(_t([[v] for v in xs]), torch.tensor(ys))
    # test: x = 1, -2 with y = 1, 1 -> right: -2 (1 of 2)
    test = ArrayDataset(_t([[1.0], [-2.0]]), torch.tensor([1, 1]))
    loss_tr = sum(_ce(x, y) for x, y in zip(xs, ys, strict=True)) / 5
    loss_te = (_ce(1.0, 1) + _ce(-2.0, 1)) / 2
    res = evaluate(net, train, batch_size=2)  # batches 2, 2, 1
    assert res["acc"] == 0.6 and res["loss"] == pytest.approx(loss_tr, rel=1e-6)
    assert net.training  # restored
    assert evaluate(net, train) == pytest.approx(res, rel=1e-6)
    empty = evaluate(net.eval(), ArrayDataset(_t([[1.0]])[:0], torch.tensor([1])[:0]))
    assert math.isnan(empty["acc"]) and math.isnan(empty["loss"]) and not net.training
    net.train()
    gap = generalization_gap(net, train, test, batch_size=2)
    assert gap == pytest.approx(
        {
            "train_acc": 0.6,
            "test_acc": 0.5,
            "train_loss": loss_tr,
            "test_loss": loss_te,
            "gap_acc": 0.1,
            "gap_loss": loss_te - loss_tr,
        },
        rel=1e-6,
    )
    assert net.training
    assert generalization_gap(net, train, test) == pytest.approx(gap)
    # dropout would change the numbers in training mode: evaluated in eval mode
    drop = nn.Sequential(nn.Dropout(0.99), _line()).train()
    assert evaluate(drop, train)["acc"] == 0.6 and drop.training


# ----------------------------------------------------------------------------- noise
def _qlinear(shape: tuple[int, int], channel: bool) -> nn.Sequential:
    cfg = qatlab.QuantConfig(
        weight_bits=2,
        weight_granularity="channel" if channel else "tensor",
        first_layer="same",
        last_layer="same",
    )
    return qatlab.quantize(nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)), cfg)


def _set(layer, w, step) -> None:
    q = layer.weight_quantizer
    with torch.no_grad():
        layer.weight.copy_(_t(w))
        q.step.copy_(_t(step).reshape(q.step.shape))
        q.initialized.fill_(True)
    q._ready = None


def test_quantization_noise_per_tensor_by_hand():
    # 2-bit full grid [-2, 1], step 0.5
    # (0.5 -> 0: half to even)
    net = _qlinear((1, 6), False)
    w = [[0.15, 0.8, -1.3, 0.25, -1.0, 0.5]]  # w / s = [0.3, 1.6, -2.6, 0.5, -2, 1]
    _set(net[0], w, 0.5)
    # levels [0, 2, -3, 0, -2, 1]: 2 outside [-2, 1] (the edges -2 and 1 are inside)
    # q(w) = 0.5 * [0, 1, -2, 0, -2, 1]; err = q - w = [-.15, -.3, .3, -.25, 0, 0]
    err = [-0.15, -0.3, 0.3, -0.25, 0.0, 0.0]
    mean = sum(err) / 6
    var = sum((e - mean) ** 2 for e in err) / 6  # biased
    (row,) = quantization_noise(net)
    assert (row.pop("grid"), row.pop("name")) == ([-2, 1], "0")
    assert row == pytest.approx(
        {
            "bits": 2,
            "step": 0.5,
            "noise_var": 0.25 / 12,
            "noise_ratio": var / (0.25 / 12),
            "clipped": 2 / 6,
            "per_channel": False,
            "num_weights": 6,
        },
        rel=1e-5,
    )
    assert row["noise_ratio"] == pytest.approx(12 * (0.265 / 6 - (0.4 / 6) ** 2) / 0.25, rel=1e-5)


def test_quantization_noise_per_channel_by_hand():
    net = _qlinear((2, 3), True)
    # channel 0, s = 1: w = [0.3, 1.6, -2.6] -> levels [0, 2, -3] (both clipped), q = [0, 1, -2]
    #   err = [-0.3, -0.6, 0.6]: mean -0.1, var (0.04 + 0.25 + 0.49) / 3 = 0.26, ratio 3.12
    # channel 1, s = 0.5: w = [0.1, 0.4, 0.3] -> levels [0, 1, 1], q = [0, 0.5, 0.5]
    #   err = [-0.1, 0.1, 0.2]: var 0.06 / 3 - (0.2 / 3)^2, ratio var / (0.25 / 12)
    _set(net[0], [[0.3, 1.6, -2.6], [0.1, 0.4, 0.3]], [1.0, 0.5])
    var1 = 0.02 - (0.2 / 3) ** 2
    (row,) = quantization_noise(net)
    assert (row.pop("grid"), row.pop("name")) == ([-2, 1], "0")
    assert row == pytest.approx(
        {
            "bits": 2,
            "step": 0.75,
            "noise_var": (1 / 12 + 0.25 / 12) / 2,
            "noise_ratio": (3.12 + var1 / (0.25 / 12)) / 2,
            "clipped": 2 / 6,
            "per_channel": True,
            "num_weights": 6,
        },
        rel=1e-5,
    )


# ----------------------------------------------------------------------------- landscape
def test_filter_normalized_direction_by_hand():
    w = {"a.weight": _t([[3.0, 4.0], [0.0, 1.0]]), "a.bias": _t([1.0, 2.0])}
    g = torch.Generator().manual_seed(5)
    d = torch.randn((2, 2), generator=torch.Generator().manual_seed(5))
    out = filter_normalized_direction(w, g)
    assert list(out) == ["a.weight", "a.bias"]
    assert torch.equal(out["a.bias"], torch.zeros(2))
    # each row: d_f * ||w_f|| / (||d_f|| + 1e-10); norms 5 and 1
    want = torch.stack([d[0] * 5 / (d[0].norm() + 1e-10), d[1] * 1 / (d[1].norm() + 1e-10)])
    assert torch.allclose(out["a.weight"], want, rtol=1e-6, atol=0)
    assert out["a.weight"].norm(dim=1).tolist() == pytest.approx([5.0, 1.0], rel=1e-6)
    # a 4-D filter is one row; a zero filter stays zero (the 1e-10 keeps it finite)
    w4 = {"c": torch.cat([torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, 1, 2, 2)])}
    out4 = filter_normalized_direction(w4, torch.Generator().manual_seed(1))["c"]
    assert out4.shape == (2, 1, 2, 2) and torch.equal(out4[1], torch.zeros(1, 2, 2))
    assert out4[0].norm().item() == pytest.approx(1.0, rel=1e-6)
    # generator None: the global stream
    torch.manual_seed(3)
    a = filter_normalized_direction(w)["a.weight"]
    torch.manual_seed(3)
    assert torch.equal(a, filter_normalized_direction(w)["a.weight"])


def _bn_net() -> nn.Sequential:
    """Linear(1, 2) -> BatchNorm1d (eval: (z - 1) / sqrt(3 + 1) * [2, -1] + [0, 0.5]); the
    negative gamma makes folding matter (a filter-normalized direction loses its sign)."""
    net = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2, eps=1.0))
    with torch.no_grad():
        net[0].weight.copy_(_t([[1.0], [-1.0]]))
        net[0].bias.copy_(_t([0.0, 0.5]))
        net[1].running_mean.fill_(1.0)
        net[1].running_var.fill_(3.0)
        net[1].weight.copy_(_t([2.0, -1.0]))
        net[1].bias.copy_(_t([0.0, 0.5]))
    return net.train()


def _bn_forward(x, w):
    z = x @ w.T + _t([0.0, 0.5])
    return (z - 1.0) / 2.0 * _t([2.0, -1.0]) + _t([0.0, 0.5])


_LX = _t([[1.0], [-2.0], [0.5], [3.0], [-0.25]])
_LY = torch.tensor([0, 1, 1, 0, 0])


def test_landscape_directions_streams():
    net = _bn_net()
    w = {k: v.detach() for k, v in net.named_parameters()}
    dirs = landscape_directions(net, dims=2, seed=4)
    assert len(dirs) == 2
    for i in range(2):
        want = filter_normalized_direction(w, _generator(4, 2 << 20, i))
        assert list(dirs[i]) == list(want)
        for k in want:
            assert torch.equal(dirs[i][k], want[k])
    (d0,) = landscape_directions(net)  # dims 1, seed 0, BN not folded
    assert torch.equal(d0["0.weight"], filter_normalized_direction(w, _generator(0, 2 << 20, 0))[
        "0.weight"])  # fmt: skip
    # fold_bn: the weight is scaled by gamma / sqrt(var + eps) = [1, -0.5] -> norms 1, 0.5
    (f0,) = landscape_directions(net, fold_bn=True)
    assert f0["0.weight"].abs().flatten().tolist() == pytest.approx([1.0, 0.5], rel=1e-6)
    assert d0["0.weight"].abs().flatten().tolist() == pytest.approx([1.0, 1.0], rel=1e-6)


def test_loss_landscape_by_definition():
    net = _bn_net()
    w = net[0].weight.detach().clone()
    (d,) = landscape_directions(net, seed=2)
    dw = d["0.weight"]
    res = loss_landscape(net, _LX, _LY, points=5, span=2.0, seed=2, batch_size=2)
    assert res["coords"] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    for a, loss, acc in zip(res["coords"], res["loss"], res["acc"], strict=True):
        out = _bn_forward(_LX, w + a * dw)
        assert loss == pytest.approx(float(F.cross_entropy(out, _LY)), rel=1e-5)
        assert acc == int((out.argmax(1) == _LY).sum()) / 5
    assert net.training and torch.equal(net[0].weight, w)
    again = loss_landscape(net, _LX, _LY, points=5, span=2.0, seed=2)  # one batch
    assert again["loss"] == pytest.approx(res["loss"], rel=1e-6) and again["acc"] == res["acc"]
    default = loss_landscape(net, _LX, _LY)  # 51 points, seed 0, q, BN not folded
    assert len(default["coords"]) == 51 and default["coords"][25] == 0.0
    explicit = loss_landscape(net, _LX, _LY, seed=0, perturb="q", fold_bn=False, points=51)
    assert default == explicit
    assert default["loss"] != loss_landscape(net, _LX, _LY, seed=1)["loss"]
    assert default["loss"] != loss_landscape(net, _LX, _LY, fold_bn=True)["loss"]
    assert loss_landscape(net, _LX, _LY, points=2)["coords"] == [-1.0, 1.0]
    assert len(loss_landscape(net, _LX[:1], _LY[:1], points=2)["acc"]) == 2  # one sample is fine
    for bad in ({"points": 1}, {"span": 0.0}, {"span": -1.0}, {"dims": 3}):
        with pytest.raises(ConfigError):
            loss_landscape(net, _LX, _LY, **bad)
    for xb, yb in ((_LX, _LY[:4]), (_LX[:0], _LY[:0])):
        with pytest.raises(ConfigError):
            loss_landscape(net, xb, yb)
    assert loss_landscape(net, _LX, _LY, points=3)["coords"] == [-1.0, 0.0, 1.0]
    # 2-D: loss[i][j] at w + coords[i] d1 + coords[j] d2
    d1, d2 = landscape_directions(net, dims=2, seed=2)
    res2 = loss_landscape(net, _LX, _LY, dims=2, points=3, span=1.0, seed=2, batch_size=3)
    assert res2["coords"] == [-1.0, 0.0, 1.0]
    for i, a in enumerate(res2["coords"]):
        for j, b in enumerate(res2["coords"]):
            out = _bn_forward(_LX, w + a * d1["0.weight"] + b * d2["0.weight"])
            assert res2["loss"][i][j] == pytest.approx(float(F.cross_entropy(out, _LY)), rel=1e-5)
            assert res2["acc"][i][j] == int((out.argmax(1) == _LY).sum()) / 5
    # fold_bn: the folded weight is moved along the folded direction
    (f,) = landscape_directions(net, seed=2, fold_bn=True)
    resf = loss_landscape(net, _LX, _LY, points=3, span=1.0, seed=2, fold_bn=True)
    a_bn = _t([1.0, -0.5])  # gamma / sqrt(var + eps)
    for a, loss in zip(resf["coords"], resf["loss"], strict=True):
        wf = w * a_bn[:, None] + a * f["0.weight"]
        out = _LX @ wf.T + (_t([0.0, 0.5]) - 1.0) * a_bn + _t([0.0, 0.5])
        assert loss == pytest.approx(float(F.cross_entropy(out, _LY)), rel=1e-5)


def test_loss_landscape_without_weights():
    # nothing to perturb: the inputs are the logits at every point
    x, y = _t([[1.0, -1.0], [0.5, 0.0]]), torch.tensor([1, 0])
    res = loss_landscape(nn.Identity(), x, y, points=2)
    want = float(F.cross_entropy(x, y))
    assert res["loss"] == pytest.approx([want, want], rel=1e-6) and res["acc"] == [0.5, 0.5]


def test_filter_normalized_direction_in_float64():
    w = {"a": torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)}
    d = torch.randn((2, 2), generator=torch.Generator().manual_seed(5)).double()
    out = filter_normalized_direction(w, torch.Generator().manual_seed(5))["a"]
    wn = w["a"].norm(dim=1)
    assert out.dtype == torch.float64
    assert torch.equal(out, d * (wn / (d.norm(dim=1) + 1e-10)).reshape(-1, 1))


def test_loss_landscape_moves_q_of_w_by_default():
    net = qatlab.quantize(nn.Sequential(nn.Linear(1, 2, bias=False)),
                          qatlab.QuantConfig(first_layer="same", last_layer="same",
                                             weights_only=True))  # fmt: skip
    with torch.no_grad():
        net[0].weight.copy_(_t([[1.3], [-0.8]]))
        net[0].weight_quantizer.step.fill_(1.0)
        net[0].weight_quantizer.initialized.fill_(True)
    net[0].weight_quantizer._ready = None
    x, y = _t([[1.0], [-1.0], [0.2]]), torch.tensor([0, 1, 1])
    # q(w) = [1, -1]; at a = 0 the logits are [x, -x]
    res = loss_landscape(net, x, y, points=3)
    want = sum(_ce(v, c) for v, c in ((1.0, 0), (-1.0, 1), (0.2, 1))) / 3
    assert res["loss"][1] == pytest.approx(want, rel=1e-6) and res["acc"][1] == pytest.approx(2 / 3)
    lat = loss_landscape(net, x, y, points=3, perturb="latent")
    assert lat["loss"][1] == pytest.approx(want, rel=1e-6)
    flt = loss_landscape(net, x, y, points=3, perturb="float")
    want_f = (math.log1p(math.exp(-2.1)) + math.log1p(math.exp(-2.1))
              + math.log1p(math.exp(0.42))) / 3  # fmt: skip
    assert flt["loss"][1] == pytest.approx(want_f, rel=1e-6)


def test_loss_acc_in_batches():
    from qatlab.measure.flatness import _Perturbed

    pm = _Perturbed(_line(), "q", False)
    with pm.ready():
        loss, acc = _loss_acc(pm, _t([[2.0]]), torch.tensor([1]), {}, 4)
        assert (loss, acc) == (pytest.approx(_ce(2.0, 1), rel=1e-6), 0.0)
        loss, acc = _loss_acc(pm, _LX, _LY, {}, 2)
        want = sum(_ce(float(v), int(c)) for v, c in zip(_LX[:, 0], _LY, strict=True)) / 5
        assert loss == pytest.approx(want, rel=1e-6) and acc == pytest.approx(3 / 5)


# ----------------------------------------------------------------------------- robustness
def test_corruption_accuracy_by_hand(monkeypatch):
    """A stub corruption flips the sign of the first ``k * s`` samples of each chunk (k = 10 for
    "a", 100 for "b"); 2050 samples make chunks of 1024, 1024, 2."""
    net = _line().train()
    seen = []

    def fake_corrupt(x, name, s, seed, pixel_range=None):
        seen.append((name, s, seed, len(x), pixel_range, net.training))
        k = {"a": 10, "b": 100}[name] * s
        out = x.clone()
        out[:k] = -out[:k]
        return out

    monkeypatch.setattr(robustness, "corruption_table", lambda x: {"a": None, "b": None})
    monkeypatch.setattr(robustness, "corrupt", fake_corrupt)
    x, y = torch.ones(2050, 1), torch.zeros(2050, dtype=torch.long)
    out = robustness.corruption_accuracy(net, x, y, severities=[1, 3], seed=3, pixel_range="p")
    assert net.training
    # hits at severity s: 2050 - (2 k s + min(k s, 2)) = 2050 - 2 k s - 2
    want = {"clean_acc": 1.0}
    for name, k in (("a", 10), ("b", 100)):
        accs = [(2050 - 2 * k * s - 2) / 2050 for s in (1, 3)]
        want.update({f"corr_{name}_s1": accs[0], f"corr_{name}_s3": accs[1]})
        want[f"corr_{name}"] = sum(accs) / 2
    want["corr_mean"] = (want["corr_a"] + want["corr_b"]) / 2
    assert out == pytest.approx(want, rel=1e-12) and list(out) == list(want)
    seeds = [
        (n, s, ((3 * 1_000_003 + i) * 7 + s) * 100_003 + c, size, "p", False)
        for i, n in enumerate("ab")
        for s in (1, 3)
        for c, size in enumerate((1024, 1024, 2))
    ]
    assert seen == seeds
    # defaults: every corruption of the table, severities 1-5, seed 0; names picks and orders
    seen.clear()
    out = robustness.corruption_accuracy(net, x[:3], y[:3], names=["b"], batch_size=2)
    assert list(out) == ["clean_acc"] + [f"corr_b_s{s}" for s in range(1, 6)] + [
        "corr_b", "corr_mean"]  # fmt: skip
    assert out["corr_b_s1"] == 0.0 and out["corr_mean"] == 0.0 and out["clean_acc"] == 1.0
    assert [r[2] for r in seen] == [(1 * 7 + s) * 100_003 for s in range(1, 6)]
    assert all(r[4] is None for r in seen)
    seen.clear()
    out = robustness.corruption_accuracy(net, x[:3], y[:3])
    assert [r[:2] for r in seen] == [(n, s) for n in "ab" for s in range(1, 6)]
    assert out["corr_mean"] == 0.0
    # the clean accuracy counted in batches: x = [1, -1, 1] with y = 0 -> 2 of 3
    out = robustness.corruption_accuracy(net, _t([[1.0], [-1.0], [1.0]]), y[:3], batch_size=2,
                                         names=["a"], severities=[1])  # fmt: skip
    assert out["clean_acc"] == pytest.approx(2 / 3) and out["corr_a_s1"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- plumbing
def test_final_label():
    from qatlab.measure.accuracy import _final_label

    assert _final_label("test_acc") == "final: test acc %"
    assert _final_label("no_such_column") is None


def test_plots_are_written_atomically(tmp_path):
    from qatlab.measure.landscape import plot_landscape
    from qatlab.measure.noise import plot_step_sizes

    one = {"coords": [-1.0, 0.0, 1.0], "loss": [2.0, 1.0, 3.0], "acc": [0.5, 0.9, 0.4]}
    two = {"coords": [-1.0, 1.0], "loss": [[1.0, 2.0], [3.0, 4.0]], "acc": [[1, 1], [1, 1]]}
    rows = [{"name": "a", "step": 0.1}, {"name": "b", "step": 0.01}]
    paths = [
        plot_landscape({"x": one, "y": one}, tmp_path / "new" / "one.png"),
        plot_landscape({"x": one, "z": two}, tmp_path / "new2" / "deeper" / "mixed.png"),
        plot_step_sizes({"W4": rows, "W2": rows[1:]}, tmp_path / "steps.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["one.png"]
    assert [p.name for p in (tmp_path / "new2" / "deeper").iterdir()] == ["mixed.png"]
    with pytest.raises(ConfigError):
        plot_landscape({}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_plot_temp_file_sits_next_to_the_target(tmp_path, monkeypatch):
    import os

    from qatlab.measure.landscape import plot_landscape

    one = {"coords": [-1.0, 1.0], "loss": [2.0, 1.0], "acc": [0.5, 0.9]}
    real, moves = os.replace, []

    def replace(src, dst):
        moves.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    plot_landscape({"x": one}, tmp_path / "a.png")
    ((src, dst),) = moves
    src = os.fspath(src)
    assert os.path.dirname(src) == os.fspath(tmp_path) and dst == tmp_path / "a.png"
    assert os.path.basename(src).startswith(".a.png.") and src.endswith(".tmp")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        plot_landscape({"x": one}, tmp_path / "b.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no temp file left


def _figures(monkeypatch) -> list:
    from qatlab.measure import landscape

    figs = []
    monkeypatch.setattr(landscape, "_save_png", lambda fig, path: figs.append(fig) or path)
    return figs


def test_plot_contents(monkeypatch):
    from qatlab.measure.landscape import plot_landscape
    from qatlab.measure.noise import plot_step_sizes

    figs = _figures(monkeypatch)
    one = {"coords": [-1.0, 0.0, 1.0], "loss": [2.0, 1.0, 3.0], "acc": [0.5, 0.9, 0.4]}
    two = {"coords": [-1.0, 1.0], "loss": [[1.0, 2.0], [3.0, 4.0]], "acc": [[1, 1], [1, 1]]}
    plot_landscape({"x": one, "y": one}, "unused.png")  # 1-D only: loss and accuracy panels
    ax_l, ax_a = figs[-1].axes
    assert (
        [ln.get_label() for ln in ax_l.lines]
        == ["x", "y"]
        == [t.get_text() for t in ax_l.get_legend().texts]
    )
    assert list(ax_l.lines[0].get_xdata()) == [-1.0, 0.0, 1.0]
    assert list(ax_l.lines[0].get_ydata()) == [2.0, 1.0, 3.0]
    assert list(ax_a.lines[1].get_ydata()) == [0.5, 0.9, 0.4]
    assert list(ax_a.lines[1].get_xdata()) == [-1.0, 0.0, 1.0]
    assert [ln.get_label() for ln in ax_a.lines] == ["x", "y"]
    assert ax_a.get_position().x0 > ax_l.get_position().x1  # side by side
    assert [ax.get_ylabel() for ax in (ax_l, ax_a)] == ["training loss", "training accuracy"]
    assert ax_l.get_yscale() == "log" and ax_a.get_yscale() == "linear"
    assert ax_a.get_xlabel() == "step along filter-normalized direction"
    plot_landscape({"x": one, "z": two}, "unused.png")  # mixed: one panel each (+ colorbar)
    ax1, ax2, cbar = figs[-1].axes
    assert (ax1.get_title(), ax2.get_title()) == ("x", "z") and ax1.get_yscale() == "log"
    assert list(ax1.lines[0].get_xdata()) == [-1.0, 0.0, 1.0]
    assert list(ax1.lines[0].get_ydata()) == [2.0, 1.0, 3.0]
    assert (ax2.get_xlabel(), ax2.get_ylabel()) == ("direction 1", "direction 2")
    assert cbar.get_ylabel() == "log10 training loss"
    # a 2-D panel first: its colorbar takes its own panel's space, not the last panel's
    low = {"coords": [-1.0, 1.0], "loss": [[0.01, 2.0], [3.0, 4.0]], "acc": [[1, 1], [1, 1]]}
    plot_landscape({"z": low, "x": one}, "unused.png")
    axz, axx, cbar = figs[-1].axes
    assert axz.get_title() == "z" and axz.get_position().width < axx.get_position().width
    cs = cbar._colorbar.mappable
    assert cs.axes is axz and cs.cmap.name == "viridis" and len(cs.levels) > 15
    assert cs.zmin == pytest.approx(-2.0) and cs.zmax == pytest.approx(math.log10(4.0))
    assert len(axz.collections) > 0 and axz.get_xlabel() == "direction 1"
    plot_step_sizes({"W4": [{"name": "a", "step": 0.1}, {"name": "b", "step": 0.01}],
                     "W2": [{"name": "b", "step": 0.5}, {"name": "c", "step": 0.2}]},
                    "unused.png")  # fmt: skip
    (ax,) = figs[-1].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert [list(ln.get_xdata()) for ln in ax.lines] == [[0, 1], [1, 2]]
    assert [list(ln.get_ydata()) for ln in ax.lines] == [[0.1, 0.01], [0.5, 0.2]]
    assert [ln.get_label() for ln in ax.lines] == ["W4", "W2"]
    assert [ln.get_marker() for ln in ax.lines] == ["o", "o"]
    assert ax.get_yscale() == "log" and ax.get_legend().get_title().get_text() == "bit width"
    assert (ax.get_xlabel(), ax.get_ylabel()) == (
        "layer",
        "weight step size s (mean over channels)",
    )


# ----------------------------------------------------------------------------- cross-bit, BN
def test_cross_bit_by_hand():
    from qatlab.measure.crossbit import _xb_label, cross_bit, ptq_accuracy, ptq_config

    net = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(_t([[1.0, 0.3]]))

    def probe(m):  # q(w)[0, 1]: max-abs step 1 / p on the restricted grid [-p, p]
        return float(m(_t([[0.0, 1.0]])).detach())

    # p = 1, 3, 7, 127: round(0.3 p) / p = 0, 1/3, 2/7, 38/127
    res = cross_bit(net, probe)
    assert list(res) == ["2", "3", "4", "8", "float"]
    assert res == pytest.approx({"2": 0.0, "3": 1 / 3, "4": 2 / 7, "8": 38 / 127, "float": 0.3})
    assert cross_bit(net, probe, bits=[3], calib_batches=[]) == pytest.approx(
        {"3": 1 / 3, "float": 0.3}
    )
    q = qatlab.quantize(net, qatlab.QuantConfig(first_layer="same", last_layer="same",
                                                weights_only=True))  # fmt: skip
    with torch.no_grad():
        q[0].weight_quantizer.step.fill_(0.25)
        q[0].weight_quantizer.initialized.fill_(True)
    q[0].weight_quantizer._ready = None
    # its latent weights are PTQ'd; as trained: round(0.3 / 0.25) 0.25 = 0.25
    assert cross_bit(q, probe, bits=[4]) == pytest.approx({"4": 2 / 7, "float": 0.3,
                                                          "trained": 0.25})  # fmt: skip
    cfg = ptq_config(3)
    assert (cfg.weight_bits, cfg.act_bits, cfg.weights_only, cfg.weight_grid) == (
        3, None, True, "restricted")  # fmt: skip
    assert (cfg.weight_scale, cfg.first_layer, cfg.last_layer) == ("maxabs", "same", "same")
    cfg = ptq_config(4, act_bits=8, grid="full", scale="lsq", first_last="8bit")
    assert (cfg.act_bits, cfg.weights_only, cfg.weight_grid, cfg.weight_scale) == (
        8, False, "full", "lsq")  # fmt: skip
    assert (cfg.first_layer, cfg.last_layer) == ("8bit", "8bit")
    # accuracy after PTQ: w = [[1, 0.2], [0, 0.3]], x = [0, 1], y = 1: float [0.2, 0.3] right;
    # 2 bit [0, 0] and 3 bit [1/3, 1/3] tie -> class 0; 4 bit [1/7, 2/7] right
    net2 = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net2.weight.copy_(_t([[1.0, 0.2], [0.0, 0.3]]))
    ds = ArrayDataset(_t([[0.0, 1.0]]), torch.tensor([1]))
    assert [ptq_accuracy(net2, ds, b) for b in (2, 3, 4)] == [0.0, 0.0, 1.0]
    assert ptq_accuracy(net2, ds, 4, batch_size=1) == 1.0
    q2 = qatlab.quantize(net2, qatlab.QuantConfig(first_layer="same", last_layer="same",
                                                  weights_only=True, weight_bits=2))  # fmt: skip
    with torch.no_grad():
        q2.weight_quantizer.step.fill_(1.0)
        q2.weight_quantizer.initialized.fill_(True)
    q2.weight_quantizer._ready = None
    assert [ptq_accuracy(q2, ds, b) for b in (2, 3, 4)] == [0.0, 0.0, 1.0]  # its latent weights
    assert _xb_label("")("4") == "PTQ W4, weights only %"
    assert _xb_label("final: ")("float") == "final: float %"


def test_cross_bit_passes_the_calibration_batches(monkeypatch):
    from qatlab.measure import crossbit

    seen = []
    monkeypatch.setattr(crossbit, "ptq", lambda m, cfg, calib: seen.append(calib) or m)
    batches = iter([(_t([[1.0]]), torch.tensor([0]))])
    crossbit.cross_bit(nn.Linear(1, 1), lambda m: 0.0, bits=[2, 4], calib_batches=batches)
    assert len(seen) == 2 and seen[0] is seen[1] and len(seen[0]) == 1  # listed once, reused
    crossbit.cross_bit(nn.Linear(1, 1), lambda m: 0.0, bits=[2])
    assert seen[-1] == []


def test_bn_average():
    from qatlab.measure.bn import _avg

    assert _avg([0.1, 0.2, 0.6]) == pytest.approx(0.3) and _avg([]) is None


def test_ptq_sweep_by_hand():
    import types

    from qatlab.measure.ptq import calib_loader, ptq_sweep, split_dataset

    net = nn.Linear(2, 2, bias=False)  # logits at x = [0, 1]: the second column
    with torch.no_grad():
        net.weight.copy_(_t([[1.0, 0.2], [0.0, 0.3]]))
    right = ArrayDataset(_t([[0.0, 1.0]]), torch.tensor([1]))
    wrong = ArrayDataset(_t([[0.0, 1.0]]), torch.tensor([0]))
    data = types.SimpleNamespace(test=right, val=wrong, train_eval=right)
    assert [split_dataset(data, s) for s in ("test", "val", "train")] == [right, wrong, right]
    with pytest.raises(ConfigError):
        split_dataset(data, "train_eval")
    (xb, yb), *rest = list(calib_loader(data, 4))
    assert rest == [] and torch.equal(xb, right.x) and torch.equal(yb, right.y)
    qo = {"weight_scale": "maxabs", "weight_grid": "restricted", "first_layer": "same",
          "last_layer": "same"}  # fmt: skip
    # float [0.2, 0.3]; W2 (step 1) [0, 0]: class 0; W4 (step 1/7) [1/7, 2/7]
    rows = ptq_sweep(net, data, [2, 4], act_bits=None, quant_options=qo)
    keys = ["method", "bits", "weight_bits", "act_bits", "acc", "loss"]
    assert [[r[k] for k in keys] for r in rows] == [
        ["float", "float", None, None, 1.0, pytest.approx(math.log1p(math.exp(-0.1)))],
        ["ptq", "W2A-", 2, None, 0.0, pytest.approx(math.log(2.0))],
        ["ptq", "W4A-", 4, None, 1.0, pytest.approx(math.log1p(math.exp(-1 / 7)))],
    ]
    assert all(isinstance(r["time_s"], float) and 0 <= r["time_s"] < 60 for r in rows)
    assert all(round(r["time_s"], 3) == r["time_s"] for r in rows)
    rows = ptq_sweep(net, data, [4], quant_options=qo, split="val", batch_size=1)
    assert [(r["bits"], r["act_bits"], r["acc"]) for r in rows] == [("float", None, 0.0),
                                                                   ("W4A4", 4, 0.0)]  # fmt: skip
    assert rows[0]["loss"] == pytest.approx(math.log1p(math.exp(0.1)))
    rows = ptq_sweep(net, data, [4], act_bits=8, quant_options=qo, calib_batches=1,
                     bn_reestimate=True)  # fmt: skip
    assert [(r["bits"], r["acc"]) for r in rows] == [("float", 1.0), ("W4A8", 1.0)]
    q = qatlab.quantize(net, qatlab.QuantConfig(first_layer="same", last_layer="same",
                                                weights_only=True))  # fmt: skip
    with torch.no_grad():
        q.weight_quantizer.step.fill_(0.25)  # q(w) = [[1, 0.25], [0, 0.25]]: a tie, class 0
        q.weight_quantizer.initialized.fill_(True)
    q.weight_quantizer._ready = None
    rows = ptq_sweep(q, data, [4], act_bits=None, quant_options=qo)
    assert [(r["method"], r["bits"], r["acc"]) for r in rows] == [
        ("trained", "trained", 0.0), ("float", "float", 1.0), ("ptq", "W4A-", 1.0)]  # fmt: skip
    assert rows[0]["loss"] == pytest.approx(math.log(2.0))


def test_ptq_sweep_passes_its_options(monkeypatch):
    import types

    from qatlab.data import make_loader
    from qatlab.measure import ptq as ptq_mod

    ds = ArrayDataset(_t([[float(i), 0.0] for i in range(7)]), torch.arange(7) % 2)
    data = types.SimpleNamespace(test=ds, val=ds, train_eval=ds)
    # the calibration batches: shuffled with seed 0, epoch 0
    got = [yb.tolist() for _, yb in ptq_mod.calib_loader(data, 3)]
    want = [yb.tolist() for _, yb in make_loader(ds, 3, shuffle=True, seed=0, epoch=0)]
    assert got == want and got != [yb.tolist() for _, yb in make_loader(ds, 3, shuffle=False)]
    assert got != [yb.tolist() for _, yb in make_loader(ds, 3, shuffle=True, seed=1)]
    assert got != [yb.tolist() for _, yb in make_loader(ds, 3, shuffle=True, epoch=1)]
    calls = []
    monkeypatch.setattr(ptq_mod, "evaluate", lambda m, d, b: calls.append(("eval", b)) or
                        {"acc": 0.5, "loss": 1.0})  # fmt: skip
    monkeypatch.setattr(ptq_mod, "ptq", lambda m, cfg, loader, n: calls.append(
        ("ptq", cfg.weight_bits, n, [yb.tolist() for _, yb in loader])) or m)  # fmt: skip
    monkeypatch.setattr(ptq_mod, "reestimate_bn", lambda m, loader, n: calls.append(
        ("bn", n, [yb.tolist() for _, yb in loader])))  # fmt: skip
    ptq_mod.ptq_sweep(nn.Linear(2, 2), data, [3], act_bits=None)  # defaults: 4 batches, 512
    loader512 = [yb.tolist() for _, yb in make_loader(ds, 512, shuffle=True, seed=0)]
    assert calls == [("eval", 512), ("ptq", 3, 4, loader512), ("eval", 512)]
    calls.clear()
    ptq_mod.ptq_sweep(nn.Linear(2, 2), data, [3], act_bits=None, calib_batches=2, batch_size=3,
                      bn_reestimate=True)  # fmt: skip
    assert calls == [("eval", 3), ("ptq", 3, 2, want), ("bn", 50, want), ("eval", 3)]
    calls.clear()
    q = qatlab.quantize(nn.Linear(2, 2), qatlab.QuantConfig(first_layer="same",
                        last_layer="same", weights_only=True, weight_init="meanabs"))  # fmt: skip
    ptq_mod.ptq_sweep(q, data, [], batch_size=5)
    assert calls == [("eval", 5), ("eval", 5)]  # as trained, then its float model


# ----------------------------------------------------------------------------- TALR tracking
def _rec(step, k, r, rbar, u):
    return {"step": step, "talr_K": k, "talr_R": r, "talr_Rbar": rbar, "talr_U": u}


_TALR = [
    {"epoch": 0},
    _rec(2, 1.0, 1.0, 1.0, 0.0),  # not late: 2 is not > 0.2 * 10
    _rec(4, 1.0, 2.0, 0.5, 0.3),  # K/R = 0.5, K/Rbar = 2: both inside (edges)
    _rec(6, 1.0, 0.4, 1.0, 0.0),  # K/R = 2.5 outside; K/Rbar = 1
    _rec(8, 3.0, 1.0, 0.0, 0.6),  # K/R = 3 outside; Rbar = 0: never met, not in the range
    _rec(10, 0.0, 0.0, 4.0, 0.0),  # R = 0: never met; K/Rbar = 0; U = 0 at T not counted
    {"step": 10, "test_acc": 0.5},
    {"step": 7, "talr_K": 1.0, "talr_R": None, "talr_Rbar": 1.0, "talr_U": 0.0},  # incomplete
]


def test_talr_tracking_stats_by_hand():
    from qatlab.measure.talr import _within, tracking_stats

    assert _within(1.0, 2.0) and _within(2.0, 1.0) and _within(1.0, 1.0)
    assert not _within(0.99, 2.0) and not _within(2.01, 1.0) and not _within(0.0, 0.0)
    assert not _within(1.0, -1.0)
    assert tracking_stats(_TALR, u0=0.25) == pytest.approx(
        {
            "talr_U_zero_steps": 2,
            "talr_late_steps": 4,
            "talr_U_max_ratio": 0.6 / 0.25,
            "talr_in2x_R": 1 / 4,
            "talr_in2x_R_until": 6 / 10,
            "talr_in2x_Rbar": 2 / 4,
            "talr_K_Rbar_min": 0.0,
            "talr_K_Rbar_max": 2.0,
        }
    )
    assert tracking_stats(_TALR) == tracking_stats(_TALR, 0.2, None)
    assert "talr_U_max_ratio" not in tracking_stats(_TALR)
    # skip 0.5: late = 6, 8, 10
    out = tracking_stats(_TALR, skip=0.5)
    assert (out["talr_late_steps"], out["talr_in2x_R"], out["talr_in2x_R_until"]) == (3, 0.0, 0.6)
    assert out["talr_in2x_Rbar"] == pytest.approx(1 / 3)
    # every late step inside: unbroken until T; no Rbar above 0: no range
    good = [_rec(5, 1.0, 1.5, 0.0, 0.1), _rec(10, 1.0, 0.6, 0.0, 0.1)]
    out = tracking_stats(good)
    assert (out["talr_in2x_R"], out["talr_in2x_R_until"], out["talr_in2x_Rbar"]) == (1.0, 1.0, 0.0)
    assert out["talr_K_Rbar_min"] is None and out["talr_K_Rbar_max"] is None
    # T = 20 (a later record without TALR): none late at skip 0.9; U = 0 at step 10 counted
    late_t = [*_TALR, {"step": 20}]
    assert tracking_stats(late_t, skip=0.9, u0=0.3) == pytest.approx(
        {"talr_U_zero_steps": 3, "talr_late_steps": 0, "talr_U_max_ratio": 2.0}
    )
    assert tracking_stats([{"step": 3}, {"epoch": 1}]) == {}
    assert tracking_stats([]) == {}


def test_talr_initial_lr_and_checks():
    import types

    from qatlab.errors import ConfigError
    from qatlab.measure.talr import _check, initial_lr

    def ctx(options):
        method = types.SimpleNamespace(options=options)
        train = types.SimpleNamespace(lr=0.1)
        return types.SimpleNamespace(cfg=types.SimpleNamespace(method=method, train=train))

    assert initial_lr(ctx({"u0": 0.5})) == 0.5 and initial_lr(ctx({"u0": "0.5"})) == 0.5
    assert initial_lr(ctx({})) == 0.1 and initial_lr(ctx(None)) == 0.1
    assert initial_lr(ctx({"u0": 0})) == 0.1 and isinstance(initial_lr(ctx({"u0": 1})), float)
    assert initial_lr(types.SimpleNamespace()) is None
    bare = types.SimpleNamespace(
        method=types.SimpleNamespace(), train=types.SimpleNamespace(lr=0.2)
    )
    assert initial_lr(types.SimpleNamespace(cfg=bare)) == 0.2  # a method without options
    _check(0, 0)
    _check(0.999, 1e-9)
    _check()
    for bad in ({"skip": 1.0}, {"skip": -0.01}, {"skip": "0.2"}, {"u0": -1e-9}, {"u0": "1"}):
        with pytest.raises(ConfigError):
            _check(**bad)


# ----------------------------------------------------------------------------- logged series
def test_logged_series_and_reductions_by_hand():
    from qatlab.errors import ConfigError
    from qatlab.measure.oscillation import (
        _avg,
        _check_logged,
        _is_epoch_record,
        _key_name,
        _logged_label,
        logged_stats,
        reduce_series,
        series,
    )

    recs = [
        {"step": 1, "tr": 0.5, "osc_share": 0.1},
        {"epoch": 1, "train_loss": 1.0, "tr": 9.0, "val_acc": 0.5},
        {"step": 2, "tr": 0.25, "frozen_share": 0.2, "flag": True},
        {"step": 0, "tr": 2},  # step 0 is kept as 0
        {"step": 3, "tr": "n/a", "osc_share": 0.3},
        {"epoch": 2, "val_loss": 0.5, "val_acc": 0.75},
        {"step": 4, "tr": None, "frozen_share": 1},
    ]
    assert logged_stats(recs) == {"log_tr": 2, "log_osc_share": 0.3, "log_frozen_share": 1}
    assert logged_stats([{"tr": True}]) == {"log_tr": True}  # bool is an int here
    assert [_is_epoch_record(r) for r in recs] == [False, True, False, False, False, True, False]
    assert _is_epoch_record({"val_loss": 1}) and not _is_epoch_record({"loss": 1})
    assert _is_epoch_record({"train_loss": 1}) and _is_epoch_record({"val_acc": 1})
    assert series(recs, "tr") == [(1, 0.5), (2, 0.25), (0, 2.0)]
    assert series(recs, "tr", "step") == series(recs, "tr")
    assert series(recs, "tr", "epoch") == [(1, 9.0)]
    assert series(recs, "val_acc") == [(1, 0.5), (2, 0.75)]  # auto: no step record holds it
    assert series(recs, "val_acc", "step") == [] and series(recs, "flag") == []
    assert series([{"val_acc": 0.5}], "val_acc") == [(0, 0.5)]  # neither step nor epoch: 0
    assert series([{"step": None, "tr": 1.0}], "tr") == [(0, 1.0)]
    v = [1.0, 4.0, 2.0, 8.0, 5.0]
    assert [reduce_series(v, h) for h in ("last", "first", "max", "min", "mean")] == [
        5.0, 1.0, 8.0, 1.0, 4.0]  # fmt: skip
    assert reduce_series(v, "tail") == 5.0  # round(0.5) = 0 -> at least one value
    assert reduce_series(v, "tail", 0.4) == 6.5 and reduce_series(v, "tail", 1.0) == 4.0
    assert reduce_series(v, "tail", 0.5) == 6.5  # round(2.5) = 2 (half to even), not 3
    assert reduce_series(v, "tail", 0.7) == 4.75  # round(3.5) = 4: (4 + 2 + 8 + 5) / 4
    assert reduce_series([], "last") is None
    with pytest.raises(ValueError):
        reduce_series(v, "median")
    assert _key_name("val/acc/x") == "val.acc.x" and _logged_label("tr_last") == "tr_last (logged)"
    assert _avg([0.25, 0.75]) == 0.5 and _avg([]) is None
    _check_logged()
    _check_logged(["tr", "a"], "tail", 1.0, "epoch")
    for bad in ({"key": []}, {"key": [1]}, {"key": 3}, {"reduce": []}, {"reduce": "median"},
                {"reduce": 5}, {"series_kind": "all"}, {"tail": 0}, {"tail": 1.01},
                {"tail": "0.1"}):  # fmt: skip
        with pytest.raises(ConfigError):
            _check_logged(**bad)
