"""QGen's registered measures (``qatlab/measure/qgen.py``): what each adapter passes to the
library function it wraps and how it names and converts the result.

The library functions (gap, noise, flatness searches, bounds, landscape, corruptions) are
pinned in ``tests/test_definitions_measure*.py``/``_flatness.py``; here they are replaced by
stubs that record their arguments, so the adapters' wiring is checked on exact values. They
are among the tests ``make mutants`` runs (docs/results/mutation.md).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import qatlab.data.corruptions
import qatlab.measure.crossbit
import qatlab.measure.flatness
import qatlab.measure.gap
import qatlab.measure.landscape
import qatlab.measure.noise
import qatlab.measure.ptq
import qatlab.measure.robustness
import qatlab.quant
from qatlab.data.loader import ArrayDataset
from qatlab.measure import qgen


def _ctx(**kw) -> SimpleNamespace:
    base = dict(
        data=SimpleNamespace(train_eval="tr", test="te", train=[0] * 50, name="mnist1d"),
        seed=7,
        progress=False,
        out_dir=Path("/nowhere"),
        results={},
        model=lambda: "model",
        init_state=lambda: None,
    )
    return SimpleNamespace(**{**base, **kw})


# ----------------------------------------------------------------------------- helpers
def test_dataset_tensors_all_or_a_seeded_sorted_subset():
    x, y = torch.arange(10.0).reshape(5, 2), torch.tensor([0, 1, 2, 3, 4])
    ds = ArrayDataset(x, y)
    ax, ay = qgen.dataset_tensors(ds)
    assert ax is x and ay is y
    assert qgen.dataset_tensors(ds, 5)[1] is y and qgen.dataset_tensors(ds, 0)[1] is y
    sx, sy = qgen.dataset_tensors(ds, 3, seed=4)
    idx = torch.randperm(5, generator=torch.Generator().manual_seed(4))[:3].sort().values
    assert sy.tolist() == idx.tolist() and sx.tolist() == x[idx].tolist()
    assert sy.tolist() == sorted(sy.tolist())
    assert qgen.dataset_tensors(ds, 3)[1].tolist() == (
        torch.randperm(5, generator=torch.Generator().manual_seed(0))[:3].sort().values.tolist()
    )

    class Pairs(torch.utils.data.Dataset):  # no x and y attributes: read through a loader
        x = "not the samples"

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.tensor([float(i), -float(i)]), torch.tensor(i)

    px, py = qgen.dataset_tensors(Pairs())
    assert px.tolist() == [[0.0, -0.0], [1.0, -1.0], [2.0, -2.0]] and py.tolist() == [0, 1, 2]


def test_small_helpers():
    assert qgen._given(a=None, b=0, c=False, d=2) == {"b": 0, "c": False, "d": 2}
    assert qgen._mean([{"k": 1}, {"k": None}, {"j": 5}, {"k": "3"}], "k") == 2.0
    assert qgen._mean([{"k": None}], "k") is None and qgen._mean([], "k") is None
    assert qgen._corr_label("fog_s3") is None
    assert qgen._corr_label("mean") == "mean %"
    assert qgen._corr_label("fog") == "fog %"
    assert qgen._corr_label("fog_s") == "fog_s %"
    assert qgen._corr_label("s3_fog") == "s3_fog %"
    assert qgen._plain(torch.tensor([1.0, 2.0])) == [1.0, 2.0]
    assert qgen._plain((torch.tensor(1.0), [torch.tensor([2.0])], "a")) == [1.0, [[2.0]], "a"]


def test_train_subset_passes_the_seed_and_zero_as_all(monkeypatch):
    seen = []
    monkeypatch.setattr(qatlab.measure.flatness, "training_subset", lambda *a: seen.append(a))
    qgen._train_subset(_ctx(), 0)
    qgen._train_subset(_ctx(), 64)
    assert seen == [("tr", None, 7), ("tr", 64, 7)]


def test_gap_measure(monkeypatch):
    seen = []

    def fake(*a):
        seen.append(a)
        return {"gap_acc": torch.tensor(0.25), "train_acc": 1}

    monkeypatch.setattr(qatlab.measure.gap, "generalization_gap", fake)
    out = qgen.gap(_ctx())
    assert out == {"gap_acc": 0.25, "train_acc": 1.0}
    assert all(type(v) is float for v in out.values())
    qgen.gap(_ctx(), batch_size=9)
    assert seen == [("model", "tr", "te", 512), ("model", "tr", "te", 9)]


# ----------------------------------------------------------------------------- noise
def test_noise_measure(monkeypatch):
    calls = []
    rows = {
        "model": [
            {"name": "a", "bits": 8, "noise_ratio": 1.0, "step": 0.5, "grid": [-1, 1]},
            {"name": "b", "bits": 4, "noise_ratio": 0.5, "step": 0.25, "clipped": 0.0},
        ],
        "ptq2": [{"noise_ratio": 2.0}],
        "ptq3": [{"noise_ratio": 3.0}, {"noise_ratio": 1.0}],
    }
    monkeypatch.setattr(qatlab.measure.noise, "quantization_noise", lambda m: rows[m])
    monkeypatch.setattr(
        qatlab.measure.noise, "plot_step_sizes", lambda by, path: calls.append((dict(by), path))
    )
    monkeypatch.setattr(qatlab.measure.crossbit, "ptq_config", lambda b: f"cfg{b}")
    monkeypatch.setattr(qatlab.quant, "is_quantized", lambda m: m == "model")
    monkeypatch.setattr(qatlab.quant, "dequantize", lambda m: f"float({m})")

    def fake_ptq(model, cfg, batches):
        calls.append(("ptq", model, cfg, batches))
        return "ptq" + cfg[-1]

    monkeypatch.setattr(qatlab.quant, "ptq", fake_ptq)
    out = qgen.noise(_ctx(), bits=[2, 3])
    assert out == {
        "noise_ratio": 0.75,
        "noise_step": 0.375,
        "noise_layers": [
            {"name": "a", "bits": 8, "noise_ratio": 1.0, "step": 0.5},
            {"name": "b", "bits": 4, "noise_ratio": 0.5, "step": 0.25, "clipped": 0.0},
        ],
        "noise_ratio_W2": 2.0,
        "noise_ratio_W3": 2.0,
    }
    assert calls == [
        ("ptq", "float(model)", "cfg2", []),
        ("ptq", "float(model)", "cfg3", []),
        (
            {"as trained (W8/4)": rows["model"], "W2": rows["ptq2"], "W3": rows["ptq3"]},
            Path("/nowhere/noise_steps.png"),
        ),
    ]
    calls.clear()
    rows["float"] = []
    out = qgen.noise(_ctx(model=lambda: "float"), bits=[2], plot=False)  # a float model
    assert out == {"noise_ratio_W2": 2.0} and calls == [("ptq", "float", "cfg2", [])]
    calls.clear()
    monkeypatch.setattr(qatlab.quant, "is_quantized", lambda m: True)
    rows["empty"] = []  # quantized without quantized layers: nothing as trained
    assert qgen.noise(_ctx(model=lambda: "empty"), bits=[]) == {}
    assert calls == []  # nothing to plot
    qgen.noise(_ctx(model=lambda: "empty"), bits=[2])
    assert calls[-1] == ({"W2": rows["ptq2"]}, Path("/nowhere/noise_steps.png"))
    assert qgen.noise(_ctx(model=lambda: "model"), bits=[])["noise_step"] == 0.375


# ----------------------------------------------------------------------------- searches
class _Searches:
    """Stub sigma/alpha searches and bounds that record what they were given."""

    def __init__(self, monkeypatch):
        self.calls: list = []
        fl = qatlab.measure.flatness
        monkeypatch.setattr(fl, "training_subset", self.subset)
        monkeypatch.setattr(fl, "sigma_search", self.search("sigma"))
        monkeypatch.setattr(fl, "alpha_search", self.search("alpha"))
        monkeypatch.setattr(fl, "perturbable_weights", lambda m, p: f"weights({m},{p})")
        monkeypatch.setattr(fl, "pac_bayes_bounds", self.bounds)

    def subset(self, ds, n, seed):
        self.calls.append(("subset", ds, n, seed))
        return "X", "Y"

    def search(self, kind):
        def run(model, x, y, **kw):
            self.calls.append((kind, model, x, y, kw))
            mag = kw["magnitude_aware"]
            return {kind: 0.5 if mag else 0.25, "drop": 0.1 if mag else 0.2,
                    "evals": 7.0 if mag else 5.0, "base_acc": 0.9 if mag else 0.8}  # fmt: skip

        return run

    def bounds(self, weights, init, m, **kw):
        self.calls.append(("bounds", weights, init, m, kw))
        return {"pacbayes_x": torch.tensor(1.5)}


def _sigma_opts(**kw):
    return dict(magnitude_aware=False, seed=7, progress=False, **kw)


def test_flatness_measure(monkeypatch):
    s = _Searches(monkeypatch)
    out = qgen.flatness(_ctx(progress=True))
    assert out == {
        "sigma": 0.25, "sigma_drop": 0.2, "sigma_evals": 5,
        "sigma_mag": 0.5, "sigma_mag_drop": 0.1, "sigma_mag_evals": 7,
        "sigma_base_acc": 0.9, "pacbayes_x": 1.5,
    }  # fmt: skip
    assert type(out["sigma_evals"]) is int and type(out["pacbayes_x"]) is float
    assert s.calls == [
        ("subset", "tr", 2048, 7),
        ("sigma", "model", "X", "Y", dict(magnitude_aware=False, seed=7, progress=True,
                                          perturb="q")),
        ("sigma", "model", "X", "Y", dict(magnitude_aware=True, seed=7, progress=True,
                                          perturb="q")),
        ("bounds", "weights(model,q)", None, 50,
         dict(sigma=0.25, sigma_mag=0.5, alpha=None, alpha_mag=None)),
    ]  # fmt: skip
    s.calls.clear()
    opts = dict(target=0.05, tol=0.01, steps=3, upper=2.0, draws=4, eps=0.1)
    out = qgen.flatness(_ctx(), subset=64, perturb="latent", alpha=True, **opts)
    assert [c for c in s.calls if c[0] == "subset"] == [("subset", "tr", 64, 7)] * 2
    s.calls[:] = [c for c in s.calls if c[0] != "subset"]
    assert s.calls[0][4] == _sigma_opts(perturb="latent", **opts)
    assert s.calls[2] == ("alpha", "model", "X", "Y",
                          _sigma_opts(perturb="latent", target=0.05, eps=0.1))  # fmt: skip
    assert s.calls[4] == (
        "bounds", "weights(model,latent)", None, 50,
        dict(sigma=0.25, sigma_mag=0.5, alpha=0.25, alpha_mag=0.5, eps=0.1),
    )  # fmt: skip
    assert out["alpha_mag"] == 0.5 and out["alpha_base_acc"] == 0.9


def test_sharpness_measure(monkeypatch):
    s = _Searches(monkeypatch)
    out = qgen.sharpness(_ctx())
    assert s.calls.pop(0) == ("subset", "tr", 2048, 7)
    assert out["alpha"] == 0.25 and out["alpha_mag_evals"] == 7 and out["pacbayes_x"] == 1.5
    assert s.calls[0][4] == _sigma_opts(perturb="q")
    assert s.calls[2][4] == dict(sigma=None, sigma_mag=None, alpha=0.25, alpha_mag=0.5)
    s.calls.clear()
    opts = dict(target=0.05, tol=0.01, steps=3, upper=2.0, ascent_steps=6, restarts=2, eps=0.1)
    qgen.sharpness(_ctx(), subset=32, perturb="float", **opts)
    assert s.calls.pop(0) == ("subset", "tr", 32, 7)
    assert s.calls[1][4] == dict(_sigma_opts(perturb="float", **opts), magnitude_aware=True)
    assert s.calls[2][1] == "weights(model,float)" and s.calls[2][4]["eps"] == 0.1


def test_bounds_measure_reuses_or_searches(monkeypatch):
    s = _Searches(monkeypatch)
    found = {"sigma": 1.0, "sigma_mag": 2.0, "alpha": 3.0, "alpha_mag": 4.0}
    starts = []

    class Net:
        def __str__(self):
            return "net"

        def load_state_dict(self, state):
            starts.append(state)

    init = {"w": 0}
    nets = iter([Net(), Net()])
    ctx = _ctx(results=dict(found), init_state=lambda: init, model=lambda: next(nets))
    out = qgen.bounds(ctx, sharpness=True)
    assert out == {"pacbayes_x": 1.5} and starts == [init]
    (call,) = s.calls
    assert call[0] == "bounds" and call[3] == 50 and call[4] == found
    assert call[1] == call[2] == "weights(net,q)"  # trained and step-0 weights
    s.calls.clear()
    out = qgen.bounds(_ctx(results={"sigma": 1.0}), subset=16, perturb="latent", eps=0.2)
    assert s.calls.pop(0) == ("subset", "tr", 16, 7)
    assert [c[0] for c in s.calls] == ["sigma", "sigma", "bounds"]
    assert s.calls[0][4] == _sigma_opts(perturb="latent", eps=0.2)
    assert s.calls[2][4] == dict(sigma=0.25, sigma_mag=0.5, alpha=None, alpha_mag=None, eps=0.2)
    assert out["sigma"] == 0.25 and out["pacbayes_x"] == 1.5
    s.calls.clear()
    qgen.bounds(_ctx(results={"sigma_mag": 1.0}), sharpness=True)
    assert [c[0] for c in s.calls] == ["subset", "sigma", "sigma", "subset", "alpha", "alpha",
                                       "bounds"]  # fmt: skip
    assert s.calls[0] == ("subset", "tr", 2048, 7)
    s.calls.clear()
    qgen.bounds(_ctx(results={"sigma": 1.0, "sigma_mag": 1.0, "alpha": 1.0}), sharpness=True)
    assert [c[0] for c in s.calls] == ["subset", "alpha", "alpha", "bounds"]
    s.calls.clear()
    qgen.bounds(_ctx(results={"sigma": 1.0, "sigma_mag": 1.0}))
    assert [c[0] for c in s.calls] == ["bounds"]
    s.calls.clear()
    found = {"sigma": 1.0, "sigma_mag": 1.0}
    qgen.bounds(_ctx(results=found), subset=8, perturb="float", eps=0.3, sharpness=True)
    assert s.calls[0] == ("subset", "tr", 8, 7)
    assert s.calls[1][4] == _sigma_opts(perturb="float", eps=0.3)


# ----------------------------------------------------------------------------- landscape
def test_landscape_measure(monkeypatch):
    seen = []

    def fake(model, x, y, **kw):
        seen.append((model, x, y, kw))
        if kw["points"] == 51:
            return {"loss": [i / 10 for i in range(51)], "coords": [], "acc": []}
        if kw["dims"] == 1:
            return {"loss": [0.3, 0.1, 0.2], "coords": torch.tensor([-1.0, 0.0, 1.0]),
                    "acc": (0.5, 0.75, 0.5)}  # fmt: skip
        return {"loss": [[1.0, 2.0, 3.0], [4.0, 0.5, 6.0], [7.0, 8.0, 9.0]], "coords": [],
                "acc": []}  # fmt: skip

    def subset(ds, n, seed):
        seen.append(("subset", ds, n, seed))
        return "X", "Y"

    monkeypatch.setattr(qatlab.measure.flatness, "training_subset", subset)
    monkeypatch.setattr(qatlab.measure.landscape, "loss_landscape", fake)
    monkeypatch.setattr(
        qatlab.measure.landscape, "plot_landscape", lambda res, path: seen.append((list(res), path))
    )
    out = qgen.landscape(_ctx(), subset=5, points=3)
    assert seen.pop(0) == ("subset", "tr", 5, 7)
    assert out.pop("land_rise") == pytest.approx(0.1, rel=1e-12)  # in float64
    assert out == {"land_loss0": 0.1, "land_coords": [-1.0, 0.0, 1.0],
                   "land_loss": [0.3, 0.1, 0.2], "land_acc": [0.5, 0.75, 0.5]}  # fmt: skip
    assert seen == [
        ("model", "X", "Y", dict(dims=1, points=3, span=1.0, seed=7, perturb="q")),
        (["trained"], Path("/nowhere/landscape.png")),
    ]
    seen.clear()
    out = qgen.landscape(_ctx(), dims=2, points=3, span=0.5, perturb="float")
    assert seen.pop(0) == ("subset", "tr", 2048, 7)
    assert out["land_loss0"] == 0.5 and out["land_rise"] == pytest.approx(40.5 / 9 - 0.5)
    assert seen[0][3] == dict(dims=2, points=3, span=0.5, seed=7, perturb="float")
    assert seen[1] == (["trained"], Path("/nowhere/landscape2d.png"))
    seen.clear()
    qgen.landscape(_ctx(), points=3, plot=False)
    assert len(seen) == 2  # the subset and the curve, no plot
    seen.clear()
    out = qgen.landscape(_ctx())  # the defaults
    assert seen[1:] == [
        ("model", "X", "Y", dict(dims=1, points=51, span=1.0, seed=7, perturb="q")),
        (["trained"], Path("/nowhere/landscape.png")),
    ]
    assert seen[0] == ("subset", "tr", 2048, 7)
    assert out["land_loss0"] == 2.5 and out["land_rise"] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- corruptions
def test_corruptions_measure(monkeypatch):
    seen = []
    x, y = torch.zeros(4, 1, 3), torch.tensor([0, 1, 0, 1])

    def fake(model, xs, ys, **kw):
        seen.append((model, kw))
        assert xs is x and ys is y
        return {"clean_acc": torch.tensor(0.5), "corr_mean": 0.25, "corr_a": 1}

    def tensors(ds, n, seed):
        seen.append(("tensors", ds, n, seed))
        return x, y

    monkeypatch.setattr(qgen, "dataset_tensors", tensors)
    monkeypatch.setattr(qatlab.measure.robustness, "corruption_accuracy", fake)
    monkeypatch.setattr(qatlab.data.corruptions, "dataset_pixel_range", lambda name: f"px({name})")
    monkeypatch.setattr(qatlab.measure.ptq, "calib_loader", lambda data, bs: ("calib", data, bs))
    monkeypatch.setattr(qatlab.quant, "is_quantized", lambda m: m == "model")
    monkeypatch.setattr(qatlab.quant, "dequantize", lambda m: f"float({m})")

    class Q:
        def __init__(self, tag):
            self.tag = tag

        def eval(self):
            return self.tag

    def fake_ptq(model, cfg, loader, batches):
        seen.append(("ptq", model, cfg.describe(), loader, batches))
        return Q(f"q{cfg.weight_bits}")

    monkeypatch.setattr(qatlab.quant, "ptq", fake_ptq)
    out = qgen.corruptions(_ctx())
    assert out == {"clean_acc": 0.5, "corr_mean": 0.25, "corr_a": 1.0}
    assert type(out["corr_a"]) is float
    base = dict(names=None, severities=(1, 2, 3, 4, 5), seed=7, batch_size=512,
                pixel_range="px(mnist1d)")  # fmt: skip
    assert seen == [("tensors", "te", None, 7), ("model", base)]
    seen.clear()
    out = qgen.corruptions(_ctx(), names=("fog",), severities=[2], batch_size=8, subset=2,
                           ptq_bits=[4, 3], calib_batches=2)  # fmt: skip
    kw = dict(base, names=["fog"], severities=(2,), batch_size=8)
    calib = ("calib", _ctx().data, 512)
    assert seen == [
        ("tensors", "te", 2, 7),
        ("model", kw),
        ("ptq", "float(model)", "W4A4", calib, 2),
        ("q4", kw),
        ("ptq", "float(model)", "W3A3", calib, 2),
        ("q3", kw),
    ]
    assert out["ptqclean_W4A4"] == 0.5 and out["ptqcorr_W3A3"] == 0.25
    seen.clear()
    qgen.corruptions(_ctx(model=lambda: "net"), ptq_bits=[2])
    assert seen[2] == ("ptq", "net", "W2A2", calib, 4)  # a float model as it is
