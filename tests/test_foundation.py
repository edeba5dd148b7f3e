"""The foundation every method stands on: layering, the registry-driven resume test, optimizer
wrappers with several passes, the quantized-weight handle and the transition counter."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import Killer
from torch import nn

import qatlab
from qatlab.cli import main
from qatlab.errors import ConfigError
from qatlab.methods import (
    METHODS,
    Hook,
    OptimizerWrapper,
    check_options,
    frozen_bn_stats,
    get_method,
)
from qatlab.quant import (
    TransitionCounter,
    keep_quantized_weights,
    perturbed_weights,
    quant_layers,
    quantized_weights,
)
from qatlab.train import RunConfig, TrainConfig, fit
from qatlab.train.checkpoint import load_checkpoint
from qatlab.train.loop import train_step
from qatlab.train.metrics import read_jsonl
from qatlab.train.runner import build

FAST = dict(epochs=2, batch_size=64, lr=3e-3, progress=False, eval_batch_size=1000)


# ----------------------------------------------------------------------------- layering
# The floors of the package, lowest first. A module may import its own package and anything on
# a lower floor, never a higher one; between two packages of one floor only the SIDEWAYS
# directions. Shared leaves are at the bottom. ``qatlab/__init__.py`` (unit "") is the public
# facade: it may import anything below the CLI, and nothing but the CLI may import it.
# Every import statement counts: module level, inside functions and methods, under
# ``if TYPE_CHECKING``, relative ones, and ``importlib.import_module("qatlab....")`` with a
# literal name (the facade's lazy ``__getattr__`` builds its names, so it is not seen).
FLOORS: list[tuple[str, ...]] = [
    ("errors",),
    ("checks",),
    ("quant", "data", "models"),
    ("measure", "methods"),
    ("train",),
    ("compare", "export"),
    ("",),
    ("cli",),
]
# methods.oscreg logs PTQ accuracy during training with measure.crossbit; measure never
# imports methods (a method is a training recipe, a measure only reads a model)
SIDEWAYS = {("methods", "measure")}
PACKAGE_ROOT = Path(qatlab.__file__).parent


def import_graph(root: Path) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """``{module: {imported module: [(file, line), ...]}}`` for every ``.py`` file under the
    package folder ``root``, parsed with ``ast`` (nothing is imported). ``from P import n``
    points at ``P.n`` if that is a module, else at ``P``; an ``X/__init__.py`` is module ``X``."""
    top = root.name
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, dict[str, list[tuple[str, int]]]] = {}

    def known(name: str) -> str:  # the module itself, or its nearest package that exists
        while name not in files and "." in name:
            name = name.rpartition(".")[0]
        return name

    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        out: dict[str, list[tuple[str, int]]] = {}
        where = str(path.relative_to(root.parent))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names if a.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] == top:
                    targets = [
                        f"{source}.{a.name}" if f"{source}.{a.name}" in files else known(source)
                        for a in node.names
                    ]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute | ast.Name)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] == top
            ):
                targets = [known(str(node.args[0].value))]
            for target in targets:
                if target != module:
                    out.setdefault(target, []).append((where, node.lineno))
        graph[module] = out
    return graph


def _unit(module: str) -> str:
    """The layering unit of a module: its top-level package below qatlab ("" = the facade)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layering_violations(
    graph: dict[str, dict[str, list[tuple[str, int]]]],
    floors: list[tuple[str, ...]] = FLOORS,
    sideways: set[tuple[str, str]] = SIDEWAYS,
) -> list[str]:
    """One line per import against the floor order (or sideways without leave), and per
    module whose unit is on no floor."""
    floor_of = {unit: i for i, units in enumerate(floors) for unit in units}
    out = []
    for module, targets in sorted(graph.items()):
        if _unit(module) not in floor_of:
            out.append(f"{module}: package {_unit(module)!r} is on no floor (add it to FLOORS)")
            continue
        for target, places in sorted(targets.items()):
            src, dst = _unit(module), _unit(target)
            if src == dst or dst not in floor_of:
                continue
            file, line = places[0]
            if floor_of[dst] > floor_of[src]:
                out.append(
                    f"{file}:{line}: {module} imports {target}, "
                    f"but {src or 'the facade'} is below {dst or 'the facade'}"
                )
            elif floor_of[dst] == floor_of[src] and (src, dst) not in sideways:
                out.append(
                    f"{file}:{line}: {module} imports {target} sideways "
                    f"({src} and {dst} share a floor; allow it in SIDEWAYS or move the code)"
                )
    return out


def import_cycles(graph: dict[str, dict[str, list[tuple[str, int]]]]) -> list[list[str]]:
    """The import cycles ``[a, b, ..., a]``: in every strongly connected set of modules, the
    shortest one through each of its members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    sccs: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package has ~100 modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc: set[str] = set()
            while v not in scc:
                scc.add(stack.pop())
            if len(scc) > 1:
                sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles: set[tuple[str, ...]] = set()
    for scc in sccs:
        for start in scc:  # the shortest cycle through each member (breadth first)
            paths = {start: [start]}
            queue = [start]
            while queue:
                v = queue.pop(0)
                if start in graph.get(v, {}):
                    cycle = paths[v]
                    i = cycle.index(min(cycle))  # one rotation per cycle
                    cycles.add(tuple(cycle[i:] + cycle[:i] + [min(cycle)]))
                    break
                for w in sorted(graph.get(v, {})):
                    if w in scc and w not in paths:
                        paths[w] = paths[v] + [w]
                        queue.append(w)
    return sorted(list(c) for c in cycles)


def test_the_package_imports_only_down_the_floors_and_has_no_import_cycle():
    graph = import_graph(PACKAGE_ROOT)
    # the parser sees function-level, relative-free and facade imports (it can find something)
    assert "qatlab.data" in graph["qatlab.measure.accuracy"]  # inside evaluate()
    assert "qatlab.train.rundir" in graph["qatlab.train.loop"]
    assert "qatlab.methods.registry" in graph["qatlab.methods.saq"]
    assert "qatlab.train.optim" in graph["qatlab"]  # inside qatlab.optimizer()
    assert sum(len(t) for t in graph.values()) > 200
    assert layering_violations(graph) == []
    cycles = import_cycles(graph)
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_layering_check_catches_up_imports_sideways_imports_and_cycles(tmp_path):
    """The same parser and checks on a small package tree with one of each fault in it."""
    files = {
        "__init__.py": "from qatlab.quant import q\n",
        "errors.py": "",
        "quant/__init__.py": "from qatlab.quant.core import q\n",
        # an up-import, relative and inside a method
        "quant/core.py": "class Q:\n    def f(self):\n        from ..train import loop\n",
        "data/__init__.py": "import qatlab.models as m\n",  # sideways: data and models
        "models/__init__.py": "",
        "train/__init__.py": "",
        "train/loop.py": "import qatlab.train.rundir as rd\n",
        # a cycle through an import inside a function
        "train/rundir.py": "def f():\n    from . import loop\n",
        # a submodule importing its package's __init__, which imports it back
        "methods/__init__.py": "from qatlab.methods import saq\n",
        "methods/saq.py": "from qatlab.methods import register_method\n",
        "measure/__init__.py": "import importlib\nimportlib.import_module('qatlab.cli')\n",
        "cli.py": "import qatlab\n",
        "extra/__init__.py": "",  # a package on no floor
    }
    for name, text in files.items():
        path = tmp_path / "qatlab" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    graph = import_graph(tmp_path / "qatlab")
    assert graph["qatlab.quant.core"] == {"qatlab.train.loop": [("qatlab/quant/core.py", 3)]}
    assert layering_violations(graph) == [
        "qatlab/data/__init__.py:1: qatlab.data imports qatlab.models sideways "
        "(data and models share a floor; allow it in SIDEWAYS or move the code)",
        "qatlab.extra: package 'extra' is on no floor (add it to FLOORS)",
        "qatlab/measure/__init__.py:2: qatlab.measure imports qatlab.cli, but measure is below cli",
        "qatlab/quant/core.py:3: qatlab.quant.core imports qatlab.train.loop, "
        "but quant is below train",
    ]
    assert import_cycles(graph) == [
        ["qatlab.methods", "qatlab.methods.saq", "qatlab.methods"],
        ["qatlab.train.loop", "qatlab.train.rundir", "qatlab.train.loop"],
    ]
    # and the real graph with one up-import and one cycle injected into a copy of it
    real = import_graph(PACKAGE_ROOT)
    assert layering_violations(real) == [] and import_cycles(real) == []
    bad = copy.deepcopy(real)
    bad["qatlab.quant.quantizer"]["qatlab.train.loop"] = [("qatlab/quant/quantizer.py", 1)]
    bad["qatlab.measure.registry"]["qatlab.measure.accuracy"] = [("x.py", 1)]
    assert layering_violations(bad) == [
        "qatlab/quant/quantizer.py:1: qatlab.quant.quantizer imports qatlab.train.loop, "
        "but quant is below train"
    ]
    assert ["qatlab.measure.accuracy", "qatlab.measure.registry", "qatlab.measure.accuracy"] in (
        import_cycles(bad)
    )


# ----------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    "method, option, value",
    [
        ("saq", "case", 4),
        ("saq", "ball", "unit"),
        ("talr", "schedule", "linear"),
        ("talr", "milestones", "half"),
        ("talr", "momentum", 1.0),
        ("oscreg", "aggregation", "sum"),
        ("oscreg", "grid", "odd"),
        ("dampen", "aggregation", "max"),
    ],
)
def test_a_bad_method_option_value_is_refused_when_the_config_is_read(method, option, value):
    """A method's options are declared once (its builder's signature) and checked in one place
    (check_options, which runs the method's registered check): an impossible value is one
    ConfigError line from the run config itself, before any model or hook exists."""
    assert check_options(method, {}) == get_method(method).options  # the defaults pass
    raw = {"model": {"name": "mlp5"}, "method": {"name": method, option: value}}
    if get_method(method).needs_quant:
        raw["quant"] = {"weight_bits": 4, "act_bits": 4}
    with pytest.raises(ConfigError, match=rf"^method\.{option} .*{value}"):
        RunConfig.from_dict(raw)


def _tensors_equal(a, b, where="") -> None:
    """Recursively compare checkpoint contents: tensors bit for bit, the rest by value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_resumes_to_identical_weights(name, tiny_data_config, tmp_path):
    """Built from the registry at its defaults: steps, a kill mid-epoch, a resume from the
    checkpoint (optimizer wrappers and hook states included) and an uninterrupted twin must end
    with the same weights, optimizer state and hook states."""
    spec = get_method(name)
    quant = None if spec.needs_quant is False else {"weight_bits": 3, "act_bits": 4}
    raw = {
        "data": tiny_data_config,
        "model": {"name": "cnn1d", "width": 8},
        "quant": quant,
        "method": {"name": name},
        "train": {**FAST, "epochs": 2, "batch_size": 128},
        "out_dir": str(tmp_path),
    }

    def go(run: str, kill_at: int | None, resume: bool = False):
        cfg = RunConfig.from_dict({**raw, "name": run})
        model, data, hooks = build(cfg, resume=resume)
        return fit(
            model,
            data,
            cfg.train,
            hooks=[*hooks, Killer(kill_at)],
            run_dir=cfg.run_dir,
            resume=resume,
            run_config=cfg,
        )

    summary = go("whole", None)
    per_epoch = summary["steps"] // 2
    with pytest.raises(KeyboardInterrupt):
        go("cut", per_epoch + per_epoch // 2)
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt")["epoch"] == 1
    go("cut", None, resume=True)
    a = load_checkpoint(tmp_path / "whole" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "cut" / "ckpt.pt")
    for key in ("model", "optimizer", "hooks", "step", "epoch", "best"):
        _tensors_equal(a[key], b[key], key)


# ----------------------------------------------------------------------------- wrappers
class TwoPass(OptimizerWrapper):
    """A toy two-pass wrapper (SAM's shape): pass 2 at weights moved by ``eps``, restored."""

    def __init__(self, base, model: nn.Module, eps: float = 1e-2) -> None:
        super().__init__(base)
        self.model, self.eps = model, eps
        self.passes = 0
        self.steps_taken = torch.zeros((), dtype=torch.long)

    def step(self, closure=None):
        loss = closure()
        self.passes += 1
        params = [p for p in self.model.parameters() if p.grad is not None]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(self.eps * p.grad.sign())
        try:
            with frozen_bn_stats(self.model):
                closure()
                self.passes += 1
        finally:
            with torch.no_grad():
                for p, value in zip(params, saved, strict=True):
                    p.copy_(value)
        self.base.step()
        self.steps_taken += 1
        return loss

    def wrapper_state(self) -> dict:
        return {"steps_taken": self.steps_taken.clone()}

    def load_wrapper_state(self, state: dict) -> None:
        self.steps_taken = state["steps_taken"].clone()


class TwoPassHook(Hook):
    def __init__(self) -> None:
        self.wrapper: TwoPass | None = None

    def wrap_optimizer(self, optimizer, model):
        self.wrapper = TwoPass(optimizer, model)
        return self.wrapper


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_two_pass_wrapper_runs_both_logs_the_first_and_updates_bn_once():
    net = _bn_net()
    hook = TwoPassHook()
    opt = hook.wrap_optimizer(torch.optim.SGD(net.parameters(), lr=0.1), net)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with torch.no_grad():  # the first pass, on a copy (train-mode BN updates its statistics)
        first_loss = F.cross_entropy(copy.deepcopy(net)(x), y)
    bn = net[1]
    out = train_step(net, x, y, opt, [hook])
    assert opt.passes == 2
    assert torch.allclose(out.loss, first_loss.detach(), atol=0)  # the first pass is logged
    assert int(bn.num_batches_tracked) == 1  # once per step, not per pass
    # the running statistics are those of the first pass alone
    torch.manual_seed(0)
    fresh = _bn_net()
    fresh.train()
    fresh(x)
    assert torch.allclose(bn.running_mean, fresh[1].running_mean)
    assert torch.allclose(bn.running_var, fresh[1].running_var)


def test_two_pass_wrapper_state_survives_resume(tiny_data, tmp_path):
    from qatlab import models

    def model():
        torch.manual_seed(0)
        return models.create("cnn1d", tiny_data.num_classes, tiny_data.input_shape, width=8)

    cfg = TrainConfig(**FAST)
    whole = TwoPassHook()
    summary = fit(model(), tiny_data, cfg, hooks=[whole, Killer(None)], run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        fit(
            model(),
            tiny_data,
            cfg,
            hooks=[TwoPassHook(), Killer(summary["steps"] // 2 + 3)],
            run_dir=tmp_path / "cut",
        )
    resumed = TwoPassHook()
    fit(
        model(),
        tiny_data,
        cfg,
        hooks=[resumed, Killer(None)],
        run_dir=tmp_path / "cut",
        resume=True,
    )
    assert int(resumed.wrapper.steps_taken) == int(whole.wrapper.steps_taken) == summary["steps"]
    a = load_checkpoint(tmp_path / "whole" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "cut" / "ckpt.pt")
    _tensors_equal(a["model"], b["model"], "model")
    _tensors_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert a["optimizer"]["wrapper"]["steps_taken"] == summary["steps"]


# ----------------------------------------------------------------------------- q(w) handle
def _qnet(act_bits: int | None = 4) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    cfg = qatlab.QuantConfig(weight_bits=2, act_bits=act_bits, weights_only=act_bits is None)
    q = qatlab.quantize(net, cfg)
    qatlab.calibrate(q, [torch.randn(32, 6)])
    return q


def test_kept_gradient_is_dl_dqw_not_the_ste_latent_gradient():
    q = _qnet(act_bits=None)
    layer = q[2]
    with torch.no_grad():  # push some weights far outside the clipping range
        layer.weight[:3] = 10.0
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with keep_quantized_weights(q) as kept:
        F.cross_entropy(q(x), y).backward()
    g = kept.grads()["2"]
    # reference: a float forward with the same q(w) substituted, as a leaf
    qw = {n: w.clone().requires_grad_(True) for n, w in quantized_weights(q).items()}
    h = F.relu(F.linear(x, qw["0"], q[0].bias))
    h = F.relu(F.linear(h, qw["2"], q[2].bias))
    F.cross_entropy(F.linear(h, qw["4"], q[4].bias), y).backward()
    assert torch.allclose(g, qw["2"].grad, atol=1e-6)
    n, p = layer.weight_quantizer.grid_range
    scaled = layer.weight.detach() / layer.weight_quantizer.broadcast_step(layer.weight).detach()
    clipped = (scaled > p + 0.5) | (scaled < n - 0.5)
    assert clipped[:3].all()
    assert (layer.weight.grad[clipped] == 0).all()  # STE: nothing where clipped...
    assert (g[clipped] != 0).any()  # ...while dL/dq(w) is not zero there


def test_perturbed_forward_equals_float_forward_at_qw_plus_delta():
    q = _qnet()
    x = torch.randn(8, 6)
    torch.manual_seed(1)
    deltas = {n: 0.05 * torch.randn_like(m.weight) for n, m in quant_layers(q)}
    latent = {k: v.clone() for k, v in q.state_dict().items() if torch.is_tensor(v)}
    with perturbed_weights(q, deltas):
        out = q(x)
    # reference: the same model with weight quantizers off and weights set to q(w) + delta
    ref = _qnet()
    qw = quantized_weights(ref)
    with torch.no_grad():
        for n, m in quant_layers(ref):
            m.weight.copy_(qw[n] + deltas[n])
    with qatlab.quantization_disabled(ref, weights=True, acts=False):
        expected = ref(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert all(torch.equal(latent[k], q.state_dict()[k]) for k in latent)  # nothing written
    assert torch.allclose(q(x), _qnet()(x))  # restored


def test_perturbation_and_keep_are_restored_after_an_exception():
    q = _qnet()
    x = torch.randn(8, 6)
    before = q(x).detach()
    deltas = {n: torch.ones_like(m.weight) for n, m in quant_layers(q)}
    with pytest.raises(RuntimeError, match="boom"):
        with keep_quantized_weights(q), perturbed_weights(q, deltas):
            q(x)
            raise RuntimeError("boom")
    assert torch.equal(q(x).detach(), before)
    assert all(not m.keep_qweight and m.qweight_delta is None for _, m in quant_layers(q))


# ----------------------------------------------------------------------------- transitions
def test_transition_count_of_a_known_weight_change_is_exact():
    q = _qnet()
    counter = TransitionCounter(q, include_pinned=True)
    layer = q[2]
    s = layer.weight_quantizer.broadcast_step(layer.weight).detach()
    ints = layer.weight_int()
    # move 5 weights exactly one level up (inside the grid), 3 one level down
    n, p = layer.weight_quantizer.grid_range
    flat = ints.reshape(-1)
    up = (flat < p).nonzero().reshape(-1)[:5]
    down = [i for i in (flat > n).nonzero().reshape(-1).tolist() if i not in up.tolist()][:3]
    with torch.no_grad():
        w = layer.weight.reshape(-1)
        w[up] = (flat[up] + 1) * s.reshape(-1)[0]
        w[down] = (flat[down] - 1) * s.reshape(-1)[0]
    moves = counter.update(q, step=0)
    assert moves.counts()["2"] == (8, 5, 3, layer.weight.numel())
    assert moves.counts()["0"][0] == 0 and moves.counts()["4"][0] == 0
    total = sum(m.weight.numel() for _, m in quant_layers(q))
    assert moves.rate() == pytest.approx(8 / total)
    assert counter.update(q, step=0) is moves  # shared within a step
    assert counter.update(q, step=1).rate() == 0.0  # nothing moved since


def test_trainer_logs_transition_rate_and_tracks_training_steps_only(tiny_data_config, tmp_path):
    """The tracker's counter is the trainer's too (one update per step), and neither
    evaluation nor BN re-estimation before each evaluation updates it."""
    raw = {
        "name": "tr",
        "out_dir": str(tmp_path),
        "data": tiny_data_config,
        "model": {"name": "cnn1d", "width": 8},
        "quant": {"weight_bits": 3, "act_bits": 4},
        "method": {"name": "track", "log_every": 0},
        "train": {**FAST, "log_every": 5, "bn_reestimate": True, "bn_batches": 3},
    }
    cfg = RunConfig.from_dict(raw)
    model, data, hooks = build(cfg)
    calls, results = [], []
    counter = hooks[0].transitions
    original = counter.update

    def spy(model, step=None):
        calls.append(step)
        results.append(original(model, step))
        return results[-1]

    counter.update = spy
    summary = fit(model, data, cfg.train, hooks=hooks, run_dir=cfg.run_dir, run_config=cfg)
    # training steps only, in order: the tracker and the trainer's log each ask once per step...
    assert calls == [step for step in range(summary["steps"]) for _ in ("tracker", "log")]
    # ...and share one count: the second call of a step returns the first one's result
    assert all(results[i] is results[i + 1] for i in range(0, len(results), 2))
    assert len({id(r) for r in results}) == summary["steps"]
    records = read_jsonl(tmp_path / "tr" / "metrics.jsonl")
    epochs = [r for r in records if "train_loss" in r]
    assert all(0 < r["tr"] < 1 for r in epochs)
    assert any(k.startswith("tr/") for k in epochs[0])
    assert sum(1 for r in records if "tr" in r and "train_loss" not in r) == summary["steps"] // 5


# ----------------------------------------------------------------------------- CLI
def test_train_help_lists_every_registered_method_with_its_description(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, spec in METHODS.items():
        assert name in out and " ".join(spec.description.split()) in out, name
