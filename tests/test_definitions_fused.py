"""qatlab/quant/fused.py's Python side on hand-made input, without building anything.

Which calls take the C++ kernels, how they are built and how a failed build falls back, with
``_build`` stubbed: fast, so mutmut can run them (``make mutants``). ``tests/test_fused.py``
builds the real kernels and checks them against the ATen passes.
"""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch

from qatlab.quant import fused
from qatlab.quant.quantizer import _FakeQuant, _per_tensor_quantize, fake_quantize

# s = 0.5 on the signed 2-bit grid [-2, 1]: levels round(2x) clamped, in range (-1.25, 0.75)
X = torch.tensor([-2.0, -1.3, -0.76, -0.25, 0.0, 0.24, 0.26, 0.74, 0.76, 3.0])
LEVELS = torch.tensor([-2.0, -2.0, -2.0, -0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
INSIDE = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
G = torch.arange(1.0, 11.0)


@pytest.fixture
def stub_kernels(monkeypatch):
    """A stub extension that records its calls and answers with the ATen kernel."""
    calls: list[tuple] = []

    def quantize(x, step, n, p, grad_scale, floor):
        calls.append((x, step, n, p, grad_scale, floor))
        floor = None if math.isnan(floor) else floor
        if floor is None:
            return _FakeQuant.apply(x, step, n, p, grad_scale)
        return _FakeQuant.apply(x, step, n, p, grad_scale, floor)

    module = types.SimpleNamespace(fake_quantize=quantize)
    monkeypatch.setattr(fused, "_module", module)
    monkeypatch.setattr(fused, "_broken", False)
    monkeypatch.delenv(fused.ENV, raising=False)
    return calls


def test_applies_condition_by_condition(monkeypatch):
    monkeypatch.setattr(fused, "_broken", False)
    monkeypatch.delenv(fused.ENV, raising=False)
    s = torch.tensor(0.1)
    assert fused.applies(torch.zeros(8), s) and fused.applies(torch.nn.Parameter(torch.zeros(8)), s)
    assert fused.applies(torch.zeros(2, 4), torch.tensor(0.1, requires_grad=True))
    assert fused.applies(torch.zeros(1), s) and fused.applies(torch.zeros(0), s)
    assert not fused.applies(torch.zeros(8, dtype=torch.float64), s)
    assert not fused.applies(torch.zeros(16)[::2], s)
    assert not fused.applies(torch.zeros(2, 4), torch.full((2,), 0.1))  # per channel

    class Sub(torch.Tensor):
        pass

    assert not fused.applies(torch.zeros(8).as_subclass(Sub), s)
    seen = []
    torch.func.vmap(lambda row: seen.append(fused.applies(row, s)) or row)(torch.zeros(3, 8))
    assert seen == [False]  # a torch.func wrapper
    for off in ("0", "false", "no", "off"):
        monkeypatch.setenv(fused.ENV, off)
        assert not fused.enabled() and not fused.applies(torch.zeros(8), s)
    monkeypatch.setenv(fused.ENV, "1")
    assert fused.enabled()
    monkeypatch.setattr(fused, "_broken", True)
    assert not fused.enabled()


def test_fake_quantize_dispatch_and_floor_sentinel(stub_kernels, monkeypatch):
    step = torch.tensor(0.5, requires_grad=True)
    leaf = X.clone().requires_grad_()
    out = fake_quantize(leaf, step, -2, 1, 0.1, 1e-8)
    assert len(stub_kernels) == 1
    x, s, n, p, grad_scale, floor = stub_kernels[0]
    assert x is leaf and s is step and (n, p, grad_scale, floor) == (-2, 1, 0.1, 1e-8)
    assert torch.equal(out, LEVELS * 0.5)
    out.backward(G)
    assert torch.equal(leaf.grad, G * INSIDE)
    assert float(step.grad) == pytest.approx(1.02, abs=1e-5)  # 0.1 * (22 - 5.90 / 0.5)
    fake_quantize(X, step, -2, 1)
    assert math.isnan(stub_kernels[1][5]) and stub_kernels[1][4] == 1.0  # no floor: NaN
    fake_quantize(X[:1], step, -2, 1)  # one element: the kernels too
    fake_quantize(X.double(), step, -2, 1)  # float64: the ATen passes
    fake_quantize(X.reshape(2, 5), torch.tensor([0.5, 0.5]), -2, 1)  # per channel
    monkeypatch.setenv(fused.ENV, "0")
    fake_quantize(X, step, -2, 1)
    assert len(stub_kernels) == 3


def test_a_failed_build_falls_back_to_the_aten_passes(stub_kernels, monkeypatch):
    monkeypatch.setattr(fused, "_module", None)
    monkeypatch.setattr(fused, "_build", lambda: (_ for _ in ()).throw(OSError()))
    with pytest.warns(RuntimeWarning, match=r"unavailable \(OSError\); using ATen ops"):
        out = fake_quantize(X, torch.tensor(0.5), -2, 1)
    assert torch.equal(out, LEVELS * 0.5) and fused._broken
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second build, no second warning
        assert fused.fake_quantize(X, torch.tensor(0.5), -2, 1, 1.0, None) is None


def test_load_builds_once_and_keeps_the_module(monkeypatch):
    built = []
    module = types.SimpleNamespace()
    monkeypatch.setattr(fused, "_module", None)
    monkeypatch.setattr(fused, "_broken", False)
    monkeypatch.setattr(fused, "_build", lambda: built.append(1) or module)
    assert fused._load() is module and fused._load() is module
    assert built == [1] and not fused._broken


def test_build_pins_source_and_flags_in_the_name(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    seen = {}

    def load(**options):
        seen.update(options)
        return types.SimpleNamespace()

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(fused, "_built", lambda name: True)  # no directory in the real cache
    fused._build()
    assert seen["sources"] == [str(fused.SOURCE)] and fused.SOURCE.name == "fused.cpp"
    assert seen["extra_cflags"] == fused.compiler_flags()
    assert seen["extra_ldflags"] == ["-fopenmp"] and seen["verbose"] is False
    name = seen["name"]
    assert name.startswith("qatlab_fused_") and len(name) == len("qatlab_fused_") + 12
    monkeypatch.setattr(fused, "compiler_flags", lambda: ["-O0"])
    fused._build()
    assert seen["name"] != name  # other flags, another extension


def test_compiler_flags(monkeypatch):
    base = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    monkeypatch.setattr(fused.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(fused, "_cpu_has", lambda *f: f == ("avx2", "fma"))
    assert fused.compiler_flags() == [*base, "-mavx2", "-mfma"]
    monkeypatch.setattr(fused, "_cpu_has", lambda *f: False)
    assert fused.compiler_flags() == base
    monkeypatch.setattr(fused, "_cpu_has", lambda *f: True)
    monkeypatch.setattr(fused.platform, "machine", lambda: "AMD64")  # x86-64 as Windows says it
    assert fused.compiler_flags() == [*base, "-mavx2", "-mfma"]
    monkeypatch.setattr(fused.platform, "machine", lambda: "aarch64")
    assert fused.compiler_flags() == base


def test_cpu_has_reads_whole_words(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse4_1 avx avx2 fma\n")
    real_path = fused.Path
    monkeypatch.setattr(fused, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    assert fused._cpu_has("avx2", "fma") and fused._cpu_has("avx")
    assert not fused._cpu_has("avx512f") and not fused._cpu_has("sse4")
    monkeypatch.setattr(fused, "Path", lambda p: real_path(tmp_path / "missing"))
    assert not fused._cpu_has("avx2")


def test_fake_quant_backward_honours_needs_input_grad():
    class Ctx:
        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    for needs, want_dx in (((False, True), False), ((True, True), True)):
        ctx = Ctx()
        _FakeQuant.forward(ctx, X, torch.tensor(0.5), -2, 1, 0.1)
        ctx.needs_input_grad = (*needs, False, False, False)
        grad_x, grad_step, *tail = _FakeQuant.backward(ctx, G)
        assert tail == [None, None, None]
        assert float(grad_step) == pytest.approx(1.02, abs=1e-5)
        assert (grad_x is not None) == want_dx
        if want_dx:
            assert torch.equal(grad_x, G * INSIDE)


def test_per_tensor_quantize_by_hand():
    assert torch.equal(_per_tensor_quantize(X, 0.5, -2, 1), LEVELS * 0.5)
    y = torch.tensor([-0.3, 0.7, 1.6, 9.0])
    assert _per_tensor_quantize(y, 0.5, 0, 3).tolist() == [0.0, 0.5, 1.5, 1.5]
    # s = 0: 1/s = inf, x * inf clamps to the ends, times 0; the sign of zero kept
    assert _per_tensor_quantize(torch.tensor([-1.0, 1.0]), 0.0, -2, 1).tolist() == [-0.0, 0.0]
    z = _per_tensor_quantize(torch.tensor([1.0]), -0.0, -2, 1)  # 1 * -inf -> -2 * -0 = +0
    assert z.item() == 0.0 and math.copysign(1.0, z.item()) == 1.0
    assert torch.equal(y, torch.tensor([-0.3, 0.7, 1.6, 9.0]))  # x itself untouched


def test_a_build_is_announced_a_cached_load_is_not(monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp_extension

    module = types.SimpleNamespace()
    loaded = []
    monkeypatch.setattr(cpp_extension, "load", lambda **options: loaded.append(options) or module)
    asked = []
    monkeypatch.setattr(fused, "_built", lambda name: asked.append(name) or False)
    assert fused._build() is module
    assert asked == [loaded[0]["name"]]
    err = capsys.readouterr().err
    assert err.startswith("qatlab: building the fused fake-quant kernels (once per machine")
    assert err.endswith("...\n")
    monkeypatch.setattr(fused, "_built", lambda name: True)
    fused._build()
    assert capsys.readouterr().err == ""


def test_built_looks_in_torchs_extension_cache(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    asked = []
    monkeypatch.setattr(
        cpp_extension,
        "_get_build_directory",
        lambda name, verbose: asked.append((name, verbose)) or tmp_path,
    )
    assert not fused._built("qatlab_fused_abc")
    assert asked == [("qatlab_fused_abc", False)]
    (tmp_path / "qatlab_fused_abc.so").write_bytes(b"")
    assert fused._built("qatlab_fused_abc") and not fused._built("qatlab_fused_abd")

    def broken(name, verbose):
        raise AttributeError("gone in this torch")

    monkeypatch.setattr(cpp_extension, "_get_build_directory", broken)
    assert fused._built("qatlab_fused_abc")  # unknown: no message rather than a wrong one


def test_built_with_torchs_helper_prints_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not fused._built("qatlab_fused_none")
    assert capsys.readouterr().out == ""  # torch's helper asked not to be verbose


def test_a_failed_build_names_the_first_line_of_the_error(monkeypatch):
    monkeypatch.setattr(fused, "_module", None)
    monkeypatch.setattr(fused, "_broken", False)

    def broken():
        raise RuntimeError("\n  Error building extension 'qatlab_fused'  \nsecond line\n")

    monkeypatch.setattr(fused, "_build", broken)
    with pytest.warns(RuntimeWarning) as record:
        assert fused._load() is None
    assert str(record[0].message).startswith(
        "qatlab: fused fake-quant kernels unavailable (Error building extension 'qatlab_fused');"
    )
