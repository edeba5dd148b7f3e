"""``tools/mutants.py``: mutmut with decorated functions mutated (docs/results/mutation.md).

A small module with one function of each decorator kind the formula modules use is mutated
with the patch; the generated module, run with no mutant active, behaves like the original,
each kind has mutants that take effect when switched on, and mutmut's "fail" check reaches
every trampoline.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SOURCE = '''
import contextlib
import functools

import torch

REGISTRY = {}


def register_method(name):
    def wrap(fn):
        if name in REGISTRY:
            raise ValueError("registered twice")
        REGISTRY[name] = fn
        return fn

    return wrap


@torch.no_grad()
def double(x):
    return x * 2


@contextlib.contextmanager
def scaled(t, k):
    old = t.clone()
    t.mul_(k)
    try:
        yield t
    finally:
        t.copy_(old)


@functools.cache
def plus_one(v):
    return v + 1


@register_method("thing")
def thing(a, b=3):
    """Doc line."""
    return a - b


class P:
    def __init__(self, v):
        self.v = v

    @property
    def half(self):
        return self.v / 2

    @staticmethod
    @torch.no_grad()
    def square(x):
        return x * x

    @torch.no_grad()
    def counts(self, n):
        for i in range(n):
            yield i + 1, torch.is_grad_enabled()
'''


def _runner():
    pytest.importorskip("mutmut")
    path = ROOT / "tools" / "mutants.py"
    spec = importlib.util.spec_from_file_location("qatlab_mutants_runner", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def mutated(monkeypatch):
    """The generated module (no mutant active) and its mutant names; mutmut patched here only."""
    runner = _runner()
    for owner, name, replacement in runner.PATCHES:
        monkeypatch.setattr(owner, name, replacement)
    monkeypatch.chdir(ROOT)  # mutmut reads its configuration from pyproject.toml
    from mutmut.mutation import file_mutation
    from mutmut.mutation.trampoline import set_mutant_under_test

    result = file_mutation.mutate_file_contents("m.py", SOURCE)
    namespace = {"__name__": "m"}
    monkeypatch.delenv("MUTANT_UNDER_TEST", raising=False)
    set_mutant_under_test(None)
    exec(compile(result.code, "m.py", "exec"), namespace)
    yield namespace, list(result.mutant_names), set_mutant_under_test, result.code
    set_mutant_under_test(None)


def test_decorated_functions_get_mutants_and_undecorated_copies(mutated):
    ns, names, _, code = mutated
    prefixes = {n.rsplit("__mutmut_", 1)[0] for n in names}
    assert {"x_double", "x_scaled", "x_plus_one", "x_thing", "xǁPǁhalf", "xǁPǁsquare",
            "xǁPǁcounts"} <= prefixes  # fmt: skip
    tree = ast.parse(code)
    defs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for name, node in defs.items():
        if "__mutmut_" not in name:
            continue
        decorators = [ast.unparse(d) for d in node.decorator_list]
        # copies: no decorators, except a cache, which moves from the trampoline to them
        assert decorators == (["functools.cache"] if name.startswith("x_plus_one") else []), name
    assert [ast.unparse(d) for d in defs["plus_one"].decorator_list] == [
        "_mutmut_mutated(mutants_x_plus_one__mutmut)"
    ]
    assert [ast.unparse(d) for d in defs["double"].decorator_list][0] == "torch.no_grad()"


def test_the_generated_module_behaves_like_the_original(mutated):
    ns, _, _, _ = mutated
    w = torch.ones(2, requires_grad=True)
    out = ns["double"](w)
    assert out.tolist() == [2.0, 2.0] and not out.requires_grad  # inside no_grad
    t = torch.ones(2)
    with ns["scaled"](t, 3.0) as inside:
        assert inside.tolist() == [3.0, 3.0]
    assert t.tolist() == [1.0, 1.0]
    with pytest.raises(KeyError), ns["scaled"](t, 5.0):  # the exception reaches the generator
        raise KeyError("x")
    assert t.tolist() == [1.0, 1.0]
    assert ns["plus_one"](1.0) == 2.0
    assert list(ns["REGISTRY"]) == ["thing"] and ns["REGISTRY"]["thing"] is ns["thing"]
    assert ns["thing"](5) == 2 and ns["thing"].__doc__ == "Doc line."
    p = ns["P"](4.0)
    assert p.half == 2.0
    assert ns["P"].square(w).tolist() == [1.0, 1.0] and not ns["P"].square(w).requires_grad
    assert list(p.counts(2)) == [(1, False), (2, False)]


def test_mutants_take_effect_and_the_fail_check_reaches_every_trampoline(mutated):
    ns, names, switch, _ = mutated
    t = torch.ones(1)

    def outputs():
        try:
            with ns["scaled"](t, 3.0) as inside:
                scaled = inside.item()
            square = ns["P"].square(torch.full((1,), 3.0)).item()
            return (ns["double"](torch.ones(1)).item(), scaled, ns["plus_one"](2.0),
                    ns["REGISTRY"]["thing"](5), ns["P"](4.0).half, square,
                    list(ns["P"](1.0).counts(2)))  # fmt: skip
        except Exception as e:  # a mutant may break the function: also a change
            return repr(e)

    original = outputs()
    changed = set()
    for name in names:
        switch(f"m.{name}")
        if outputs() != original:
            changed.add(name.rsplit("__mutmut_", 1)[0])
    switch(None)
    assert {"x_double", "x_scaled", "x_plus_one", "x_thing", "xǁPǁhalf", "xǁPǁsquare",
            "xǁPǁcounts"} <= changed  # fmt: skip
    from mutmut.core import MutmutProgrammaticFailException

    switch("fail")
    calls = [
        lambda: ns["double"](t),
        lambda: ns["scaled"](t, 2.0).__enter__(),
        lambda: ns["plus_one"](7.0),
        lambda: ns["REGISTRY"]["thing"](1),
        lambda: ns["P"](2.0).half,
        lambda: ns["P"].square(t),
        lambda: next(ns["P"](2.0).counts(2)),
    ]
    for call in calls:
        with pytest.raises(MutmutProgrammaticFailException):
            call()


def test_every_decorator_of_the_mutated_modules_is_a_checked_kind():
    tomllib = pytest.importorskip("tomllib")
    runner = _runner()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    known = runner.KINDS | runner.CACHES | runner.NATIVE
    for path in config["only_mutate"]:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in node.decorator_list:
                    name = ast.unparse(d.func if isinstance(d, ast.Call) else d)
                    assert name in known, f"{path}: @{name} of {node.name} is not checked"
