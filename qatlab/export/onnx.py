"""``to_onnx``: a quantized model as an ONNX graph with QuantizeLinear/DequantizeLinear.

Exporter path (one, chosen for torch 2.13): the graph is written directly with ``onnx.helper``
from a ``torch.fx`` trace in which every quantized layer is a leaf. ``torch.onnx.export`` does
not work here: its default (dynamo) exporter needs ``onnxscript`` (not installed) and would
trace the quantizer's autograd Function into float arithmetic (round/clamp/mul), losing the
integers; the TorchScript exporter fails on the same Function. Writing the nodes ourselves means
every quantized layer becomes exactly the standard-op pattern we choose, from the integers the
quantizer computes (:meth:`Quantizer.integer`, the one integer view), and the result is checked
with ``onnx.checker`` (full check) before anything is written.

What each quantized layer becomes (opset 17):

- input: ``QuantizeLinear(x, s_a, 0)`` -> ``Clip`` to the grid when it is narrower than the
  8-bit type -> (uint8 for unsigned grids, int8 for signed); LSQ+ inputs subtract their offset
  before and add it back after (exact);
- weight: an int8 initializer holding ``w_int`` exactly (sub-8-bit grids inside int8),
  ``DequantizeLinear`` with the learned step as scale (per output channel on axis 0 when the
  layer is per-channel, or when a BatchNorm was folded into it), zero point 0;
- ``qdq`` form: ``DequantizeLinear`` on both, then float ``Conv``/``Gemm``. ONNX Runtime's CPU
  optimizer fuses this into ``QLinearConv``/``QGemm`` only when the layer's output goes (through
  a ReLU it can drop) straight into another quantize node;
- ``integer`` form, for quantized layers whose output is not re-quantized (before a residual
  add, a pool, the graph output, or a BatchNorm with a negative scale): ``ConvInteger`` /
  ``MatMulInteger`` on the same integers, then one float ``Mul`` by ``s_a * s_w`` and the bias.
  Same numbers up to float rounding, and an integer kernel in every runtime that runs standard
  ONNX. ``integer_ops=False`` writes every layer in the ``qdq`` form (what TensorRT/OpenVINO
  expect).

With optimizations off, ONNX Runtime computes what qatlab's fake-quant forward computes (up to
float rounding at ``.5`` ties). Its optimizer (already at the basic level) quantizes the float
bias of every ``qdq`` conv to int32 at scale ``s_x * s_w``, as ``QLinearConv`` needs; that moves
outputs by up to half an accumulator step, which is negligible at 8 bits and visible (a few
tenths of an output step) at 4 bits and below. The ``integer`` form keeps its bias in float.
On ONNX Runtime's CPU, ``ConvInteger`` is slower than a float conv, so ``integer_ops=False``
gives the faster graph there (see docs/results/export.md).

BatchNorm after a Conv/Linear (its only user) is folded in eval mode: into the dequantize scale
(``s_w * gamma / sigma``, so the integers stay the quantizer's) when every ``gamma / sigma > 0``,
into the float ``Mul`` of the integer form always, into the weights of float layers; anything
else is kept as a float ``BatchNormalization`` and named in :class:`ExportReport`.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qatlab.errors import ConfigError
from qatlab.quant.layers import QuantLayer
from qatlab.quant.quantizer import DYNAMIC_POLICIES, Quantizer

OPSET = 17
IR_VERSION = 8  # opset 17's IR version: readable by ONNX Runtime >= 1.12
_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d)  # QuantConv1d/2d subclass these
_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_POOL = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
SUPPORTED = (
    "Conv1d, Conv2d, Linear (quantized or float), BatchNorm (after a conv/linear, or alone), "
    "ReLU, ReLU6, Hardtanh, Flatten, AdaptiveAvgPool(1), Dropout, Identity, + and *"
)


@dataclass
class ExportReport:
    """What :func:`to_onnx` wrote: one row per quantized layer, and where BatchNorms went."""

    path: Path
    layers: list[dict] = field(default_factory=list)
    bn_folded: list[str] = field(default_factory=list)
    bn_kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # redundant ReLU/ReLU6 before a quantizer

    def lines(self) -> list[str]:
        """A short human summary (the CLI prints it)."""
        forms: dict[str, int] = {}
        for row in self.layers:
            forms[row["form"]] = forms.get(row["form"], 0) + 1
        shown = ", ".join(f"{k} {v}" for k, v in sorted(forms.items())) or "none"
        out = [f"{len(self.layers)} quantized layers ({shown})"]
        out.append(f"BatchNorm folded: {len(self.bn_folded)}; kept in float: {len(self.bn_kept)}")
        if self.bn_kept:
            out.append("kept: " + ", ".join(self.bn_kept))
        return out


def _onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - the export extra installs it
        raise ConfigError(
            "export to ONNX needs the onnx package; pip install 'qatlab[export]'"
        ) from None
    return onnx


# ----------------------------------------------------------------------------- checks
def check_exportable(qmodel: nn.Module) -> None:
    """Refuse, in one line, what cannot be exported exactly: activation quantizers without a
    step (never calibrated), steps recomputed from each batch (max-abs policies), per-channel
    activation steps, and quantized layers whose weight quantizer is off but input on."""
    uncalibrated, dynamic, odd = [], [], []
    for name, module in qmodel.named_modules():
        if not isinstance(module, QuantLayer):
            continue
        aq = module.input_quantizer
        if aq is None or not aq.enabled:
            continue
        if aq.policy in DYNAMIC_POLICIES:
            dynamic.append(name)
        elif not bool(aq.initialized) or aq.signed == "auto":
            uncalibrated.append(name)
        elif aq.per_channel:
            odd.append(name)
    if uncalibrated:
        raise ConfigError(
            f"cannot export: the input step sizes of {len(uncalibrated)} layers were never "
            f"calibrated ({', '.join(uncalibrated)}); run qatlab.calibrate(qmodel, "
            "train_batches) or train the model first"
        )
    if dynamic:
        raise ConfigError(
            f"cannot export: the input quantizers of {', '.join(dynamic)} recompute their step "
            "from every batch (max-abs policy), which a fixed graph cannot reproduce; use "
            "act_scale lsq, lsq+, mse, percentile or minmax"
        )
    if odd:
        raise ConfigError(
            f"cannot export: per-channel input quantizers in {', '.join(odd)} (ONNX Runtime "
            "quantizes activations per tensor); use one input step per layer"
        )


# ----------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """fx tracer that keeps quantized layers (and quantizers) as leaves and remembers the
    innermost module it was tracing when something failed."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantLayer, Quantizer)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _trace(model: nn.Module, example: Tensor) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = f" in {tracer.failed_in}" if tracer.failed_in else ""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ConfigError(
            f"cannot export {type(model).__name__}: torch.fx cannot trace it{where} ({reason}); "
            f"export supports models built from {SUPPORTED}"
        ) from None
    gm = fx.GraphModule(model, graph)
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return gm


# ----------------------------------------------------------------------------- builder
class _Graph:
    """Nodes and initializers of the ONNX graph being written."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.inits: list = []
        self.used: set[str] = set()

    def name(self, base: str) -> str:
        base = base or "t"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(self.numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def op(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.name(base)
        self.nodes.append(
            self.helper.make_node(op, inputs, [out], name=self.name(f"{base}/{op}"), **attrs)
        )
        return out


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _bn_affine(bn: _BN, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BatchNorm as ``y = g * x + h`` per channel (float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(
            f"cannot export BatchNorm {where}: it has no running statistics "
            "(track_running_stats=False uses batch statistics even in eval mode)"
        )
    var = bn.running_var.detach().double().numpy()
    mean = bn.running_mean.detach().double().numpy()
    g = 1.0 / np.sqrt(var + bn.eps)
    if bn.weight is not None:
        g = g * bn.weight.detach().double().numpy()
    h = -mean * g
    if bn.bias is not None:
        h = h + bn.bias.detach().double().numpy()
    return g, h


def _int_type(signed: bool):
    return (np.int8, (-128, 127)) if signed else (np.uint8, (0, 255))


def _conv_attrs(conv: nn.Module, name: str) -> dict:
    if conv.padding_mode != "zeros":
        raise ConfigError(
            f"cannot export {name}: padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
        )
    k, dil = list(conv.kernel_size), list(conv.dilation)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            begin = end = [0] * len(k)
        else:  # "same": PyTorch puts the odd extra padding at the end
            total = [d * (kk - 1) for d, kk in zip(dil, k, strict=True)]
            begin = [t // 2 for t in total]
            end = [t - b for t, b in zip(total, begin, strict=True)]
    else:
        begin = end = list(conv.padding)
    return {
        "kernel_shape": k,
        "strides": list(conv.stride),
        "dilations": dil,
        "pads": list(begin) + list(end),
        "group": conv.groups,
    }


# ----------------------------------------------------------------------------- export
def to_onnx(
    qmodel: nn.Module,
    example_input: Tensor,
    path: str | Path,
    *,
    integer_ops: bool = True,
) -> ExportReport:
    """Write ``qmodel`` (quantized by :func:`qatlab.quantize`, or float) to ``path`` as ONNX.

    ``example_input`` is one batch of inputs (its batch size is exported as a dynamic
    dimension). The graph's input is ``input``, its output ``output``; each quantized input's
    integer tensor is named ``<layer>.input_int`` and each layer's integer weight
    ``<layer>.weight_int`` (listed, with grids and forms, in the model's ``qatlab`` metadata).
    The file is checked with ``onnx.checker`` (full check) and written atomically; anything that
    cannot be exported exactly is a :class:`qatlab.ConfigError` naming the layer, and no file
    is written.
    """
    onnx = _onnx()
    if not isinstance(qmodel, nn.Module):
        raise ConfigError(f"to_onnx: qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise ConfigError(
            "to_onnx: example_input must be a batch tensor shaped (N, ...), e.g. x[:1]"
        )
    check_exportable(qmodel)
    path = Path(path)
    was_training = qmodel.training
    qmodel.eval()
    try:
        example = example_input.detach().float().cpu()
        gm = _trace(qmodel, example)
        graph, report = _Emitter(gm, type(qmodel).__name__, integer_ops, path).run(example)
    finally:
        qmodel.train(was_training)
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="qatlab"
    )
    model.ir_version = IR_VERSION
    meta = {"layers": report.layers, "bn_folded": report.bn_folded, "bn_kept": report.bn_kept}
    onnx.helper.set_model_props(model, {"qatlab": json.dumps(meta)})
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # pragma: no cover - a bug in the emitter, not the user's
        raise ConfigError(f"the exported ONNX graph fails onnx.checker: {exc}") from None
    from qatlab.train.metrics import atomic_write

    atomic_write(path, model.SerializeToString())
    return report


def onnx_metadata(model) -> dict:
    """The ``qatlab`` metadata :func:`to_onnx` stores in a model (an ``onnx.ModelProto``)."""
    for prop in model.metadata_props:
        if prop.key == "qatlab":
            return json.loads(prop.value)
    raise ConfigError("this ONNX model was not written by qatlab.export.to_onnx")


class _Emitter:
    """Walks the fx graph once and writes the ONNX nodes."""

    def __init__(self, gm: fx.GraphModule, root: str, integer_ops: bool, path: Path) -> None:
        self.gm = gm
        self.root = root
        self.modules = dict(gm.named_modules())
        self.integer_ops = integer_ops
        self.g = _Graph()
        self.env: dict[fx.Node, str] = {}
        self.report = ExportReport(path)
        self.fold: dict[fx.Node, fx.Node] = {}  # conv/linear node -> the BN node folded into it
        self.folded_bn: set[fx.Node] = set()
        self.dropped: set[fx.Node] = set()

    # ---------------------------------------------------------------- helpers
    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def is_relu(self, node: fx.Node) -> bool:
        m = self.module(node)
        return (
            isinstance(m, nn.ReLU)
            or (node.op == "call_function" and node.target in (F.relu, torch.relu))
            or (node.op == "call_method" and node.target == "relu")
        )

    def quant_input(self, node: fx.Node) -> Quantizer | None:
        """The active input quantizer of a quantized-layer node (None if float input)."""
        m = self.module(node)
        if isinstance(m, QuantLayer) and m.input_quantizer is not None:
            return m.input_quantizer if m.input_quantizer.enabled else None
        return None

    # ---------------------------------------------------------------- planning
    def plan_bn(self) -> None:
        for node in self.gm.graph.nodes:
            bn = self.module(node)
            if not isinstance(bn, _BN) or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            src = node.args[0]
            if isinstance(self.module(src), (*_CONV, nn.Linear)) and len(src.users) == 1:
                self.fold[src] = node

    def redundant(self, node: fx.Node) -> bool:
        """A ReLU / ReLU6 (Hardtanh from 0) whose only user quantizes on an unsigned grid that
        it cannot exceed: dropping it gives the same integers (what ONNX Runtime's own
        Relu/Clip-into-QuantizeLinear fusion does, which it does not do for every Clip)."""
        m = self.module(node)
        hardtanh = isinstance(m, nn.Hardtanh)
        if not (self.is_relu(node) or (hardtanh and m.min_val == 0.0)) or len(node.users) != 1:
            return False
        aq = self.quant_input(next(iter(node.users)))
        if aq is None or aq.policy == "lsq+":
            return False
        n, p = aq.grid_range
        if n != 0:
            return False
        return not hardtanh or p * float(aq.current_step().detach()) <= m.max_val

    def fusible(self, node: fx.Node, bn_in_scale: bool) -> bool:
        """Whether ONNX Runtime fuses this layer's qdq form into QLinearConv/QGemm: its output
        (after a folded BN, and a dropped redundant ReLU) must feed exactly one quantize node
        of the same signedness as its own input."""
        own = self.quant_input(node)
        if own is None or (node in self.fold and not bn_in_scale):
            return False
        out = self.fold.get(node, node)
        if len(out.users) != 1:
            return False
        nxt = next(iter(out.users))
        if nxt in self.dropped:
            nxt = next(iter(nxt.users))
        aq = self.quant_input(nxt)
        if aq is None or aq.policy == "lsq+":
            return False
        return (aq.grid_range[0] < 0) == (own.grid_range[0] < 0)

    # ---------------------------------------------------------------- run
    def run(self, example: Tensor):
        h = self.g.helper
        from onnx import TensorProto

        self.plan_bn()
        self.dropped = {n for n in self.gm.graph.nodes if self.redundant(n)}
        self.report.dropped = [n.name for n in self.dropped]
        inputs, output = [], None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if inputs:
                    raise ConfigError("cannot export a model with more than one input")
                self.g.used.add("input")
                self.env[node] = "input"
                shape = ["batch", *example.shape[1:]]
                inputs.append(h.make_tensor_value_info("input", TensorProto.FLOAT, shape))
            elif node.op == "output":
                res = node.args[0]
                if not isinstance(res, fx.Node):
                    raise ConfigError("cannot export: the model must return one tensor")
                self.g.used.add("output")
                self.g.nodes.append(
                    h.make_node("Identity", [self.env[res]], ["output"], name="output/Identity")
                )
                rank = len(self.shape(res)) or 2
                output = h.make_tensor_value_info(
                    "output", TensorProto.FLOAT, ["batch", *self.shape(res)[1:]][:rank]
                )
            elif node in self.folded_bn or node in self.dropped:
                self.env[node] = self.env[node.args[0]]
            else:
                self.env[node] = self.emit(node)
        graph = h.make_graph(self.g.nodes, "qatlab", inputs, [output], self.g.inits)
        return graph, self.report

    def arg(self, node: fx.Node, i: int = 0) -> str:
        a = node.args[i]
        if not isinstance(a, fx.Node):
            raise ConfigError(f"cannot export {node.name}: argument {i} is not a tensor")
        return self.env[a]

    def emit(self, node: fx.Node) -> str:
        name = str(node.target) if node.op == "call_module" else node.name
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, (*_CONV, nn.Linear)):
                return self.emit_layer(node, name, m)
            if isinstance(m, _BN):
                _bn_affine(m, name)  # refuses BN without running statistics
                self.report.bn_kept.append(name)
                c = m.running_mean.numel()
                gamma = m.weight.detach() if m.weight is not None else torch.ones(c)
                beta = m.bias.detach() if m.bias is not None else torch.zeros(c)
                params = [
                    self.g.const(f"{name}.weight", _f32(gamma.numpy())),
                    self.g.const(f"{name}.bias", _f32(beta.numpy())),
                    self.g.const(f"{name}.running_mean", _f32(m.running_mean.numpy())),
                    self.g.const(f"{name}.running_var", _f32(m.running_var.numpy())),
                ]
                return self.g.op(
                    "BatchNormalization", [self.arg(node), *params], name, epsilon=float(m.eps)
                )
            if isinstance(m, nn.ReLU):
                return self.g.op("Relu", [self.arg(node)], name)
            if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
                lo = self.g.const(f"{name}.min", _f32(m.min_val))
                hi = self.g.const(f"{name}.max", _f32(m.max_val))
                return self.g.op("Clip", [self.arg(node), lo, hi], name)
            if isinstance(m, nn.Flatten):
                return self.flatten(node, name, m.start_dim, m.end_dim)
            if isinstance(m, _POOL):
                size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,)
                if any(s != 1 for s in size):
                    raise ConfigError(
                        f"cannot export {name} ({type(m).__name__}): only output_size=1 "
                        "(global average pooling) is supported"
                    )
                return self.g.op("GlobalAveragePool", [self.arg(node)], name)
            if isinstance(m, _IDENTITY) or (isinstance(m, nn.Sequential) and len(m) == 0):
                return self.arg(node)
            raise ConfigError(
                f"cannot export layer {name} ({type(m).__name__}): not supported; export "
                f"supports {SUPPORTED}"
            )
        if node.op == "call_function":
            if node.target in (operator.add, torch.add, operator.mul, torch.mul):
                op = "Add" if node.target in (operator.add, torch.add) else "Mul"
                ins = []
                for a in node.args[:2]:
                    if isinstance(a, fx.Node):
                        ins.append(self.env[a])
                    elif isinstance(a, (int, float)):
                        ins.append(self.g.const(f"{name}.c", _f32(a)))
                    else:
                        break
                if len(ins) == 2 and not node.kwargs:
                    return self.g.op(op, ins, name)
            if node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace"):
                return self.g.op("Relu", [self.arg(node)], name)
            if node.target is torch.flatten:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                return self.flatten(node, name, start, end)
            what = getattr(node.target, "__name__", str(node.target))
        elif node.op == "call_method":
            if node.target == "relu":
                return self.g.op("Relu", [self.arg(node)], name)
            if node.target == "flatten":
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                return self.flatten(node, name, start, end)
            what = f"Tensor.{node.target}"
        else:
            what = f"{node.op} {node.target}"
        raise ConfigError(
            f"cannot export operation {what} (node {node.name} in {self.where(node)}): not "
            f"supported; export supports {SUPPORTED}"
        )

    def where(self, node: fx.Node) -> str:
        """The module whose forward holds ``node`` (for error messages)."""
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, kind = list(stack.items())[-1]
            kind = kind[1] if isinstance(kind, tuple) else kind
            return f"{path} ({getattr(kind, '__name__', kind)})"
        return f"{self.root}.forward"

    def flatten(self, node: fx.Node, name: str, start: int, end: int) -> str:
        rank = len(self.shape(node.args[0])) if isinstance(node.args[0], fx.Node) else 0
        if start != 1 or end not in (-1, rank - 1):
            where = name if node.op == "call_module" else f"{node.name} in {self.where(node)}"
            raise ConfigError(
                f"cannot export {where}: flatten({start}, {end}) is not supported, only "
                "flatten from dim 1 to the end"
            )
        return self.g.op("Flatten", [self.arg(node)], name, axis=1)

    # ---------------------------------------------------------------- layers
    def emit_layer(self, node: fx.Node, name: str, m: nn.Module) -> str:
        g = self.g
        x = self.arg(node)
        is_conv = isinstance(m, _CONV)
        if not is_conv and len(self.shape(node.args[0])) != 2:
            raise ConfigError(
                f"cannot export {name} (Linear): only (N, features) inputs are supported, got "
                f"rank {len(self.shape(node.args[0]))}"
            )
        cout = m.weight.shape[0]
        bias = (
            m.bias.detach().double().numpy() if m.bias is not None else np.zeros(cout, np.float64)
        )
        bn_node = self.fold.get(node)
        bn_g = bn_h = None
        if bn_node is not None:
            bn = self.modules[bn_node.target]
            bn_g, bn_h = _bn_affine(bn, str(bn_node.target))
            bias = bias * bn_g + bn_h
        attrs = _conv_attrs(m, name) if is_conv else {}
        quant = isinstance(m, QuantLayer) and m.weight_quantizer.enabled
        if not quant:  # a float layer (kept float, or quantizers off): fold BN into its weights
            w = m.weight.detach().double().numpy()
            if bn_g is not None:
                w = w * bn_g.reshape(-1, *([1] * (w.ndim - 1)))
                self.fold_done(bn_node)
            wn, bn_ = g.const(f"{name}.weight", _f32(w)), g.const(f"{name}.bias", _f32(bias))
            aq = m.input_quantizer if isinstance(m, QuantLayer) else None
            xin = self.input_qdq(name, aq, x)[0]
            if is_conv:
                return g.op("Conv", [xin, wn, bn_], name, **attrs)
            return g.op("Gemm", [xin, wn, bn_], name, transB=1)

        wq = m.weight_quantizer
        w_int = m.weight_int().to(torch.int8).numpy()
        n_w, p_w = wq.grid_range
        step = wq.current_step(m.weight).detach().double().numpy()
        aq = self.quant_input(node)
        bn_in_scale = bn_g is None or bool((bn_g > 0).all())
        integer = (
            self.integer_ops
            and aq is not None
            and aq.policy != "lsq+"
            and not self.fusible(node, bn_in_scale)
        )
        row = {
            "name": name,
            "kind": type(m).__name__,
            "form": "integer" if integer else ("qdq" if aq is not None else "float-input"),
            "weight_int": f"{name}.weight_int",
            "weight_transposed": bool(integer and not is_conv),
            "weight_bits": wq.bits,
            "weight_grid": [n_w, p_w],
            "weight_per_channel": bool(wq.per_channel),
            "input_int": None,
            "input_float": None,
            "input_bits": None if aq is None else aq.bits,
            "input_grid": None if aq is None else list(aq.grid_range),
            "bn": None if bn_node is None else str(bn_node.target),
        }
        self.report.layers.append(row)
        if integer:
            xq, s_a, zp = self.input_qdq(name, aq, x, dequantize=False)
            row["input_int"], row["input_float"] = xq, self.last_float
            scale = np.broadcast_to(step, (cout,)) * s_a
            if bn_g is not None:
                scale = scale * bn_g
                self.fold_done(bn_node)
            w_zp = g.const(f"{name}.weight_zero_point", np.array(0, np.int8))
            shape = (1, cout, *([1] * (len(self.shape(node)) - 2)))
            if is_conv:
                w_name = g.const(f"{name}.weight_int", w_int)
                acc = g.op("ConvInteger", [xq, w_name, zp, w_zp], f"{name}.acc", **attrs)
            else:
                w_name = g.const(f"{name}.weight_int", np.ascontiguousarray(w_int.T))
                acc = g.op("MatMulInteger", [xq, w_name, zp, w_zp], f"{name}.acc")
                shape = (cout,)
            from onnx import TensorProto

            accf = g.op("Cast", [acc], f"{name}.acc_float", to=TensorProto.FLOAT)
            y = g.op("Mul", [accf, g.const(f"{name}.scale", _f32(scale).reshape(shape))], name)
            return g.op("Add", [y, g.const(f"{name}.bias", _f32(bias).reshape(shape))], name)

        if aq is not None:
            x, _, _ = self.input_qdq(name, aq, x)
            row["input_int"], row["input_float"] = self.last_int, self.last_float
        scale, axis = step, 0
        if bn_g is not None and bn_in_scale:
            scale = np.broadcast_to(step, (cout,)) * bn_g
            self.fold_done(bn_node)
        w_name = g.const(f"{name}.weight_int", w_int)
        zp_shape = () if np.ndim(scale) == 0 else (cout,)
        w_deq = g.op(
            "DequantizeLinear",
            [
                w_name,
                g.const(f"{name}.weight_scale", _f32(scale)),
                g.const(f"{name}.weight_zero_point", np.zeros(zp_shape, np.int8)),
            ],
            f"{name}.weight",
            axis=axis,
        )
        if bn_g is not None and not bn_in_scale:  # negative gamma: BN stays a float op
            bias = m.bias.detach().double().numpy() if m.bias is not None else np.zeros(cout)
        b_name = g.const(f"{name}.bias", _f32(bias))
        if bn_g is not None and not bn_in_scale:
            row["bn"] = None  # the BN node is then written by itself, in float
        if is_conv:
            return g.op("Conv", [x, w_deq, b_name], name, **attrs)
        return g.op("Gemm", [x, w_deq, b_name], name, transB=1)

    def fold_done(self, bn_node: fx.Node) -> None:
        self.folded_bn.add(bn_node)
        self.report.bn_folded.append(str(bn_node.target))

    def input_qdq(self, name: str, aq: Quantizer | None, x: str, dequantize: bool = True):
        """QuantizeLinear -> Clip (grid narrower than the type) [-> DequantizeLinear]."""
        if aq is None or not aq.enabled:
            return x, None, None
        g = self.g
        self.last_float = x
        n, p = aq.grid_range
        dtype, (lo, hi) = _int_type(n < 0)
        s = float(aq.current_step().detach())
        s_name = g.const(f"{name}.input_scale", _f32(s))
        zp = g.const(f"{name}.input_zero_point", np.array(0, dtype))
        offset = None
        if aq.policy == "lsq+":
            offset = g.const(f"{name}.input_offset", _f32(float(aq.offset)))
            x = g.op("Sub", [x, offset], f"{name}.input_shifted")
        base = f"{name}.input_int"
        if (n, p) != (lo, hi):
            q = g.op("QuantizeLinear", [x, s_name, zp], f"{name}.input_q")
            q = g.op(
                "Clip",
                [
                    q,
                    g.const(f"{name}.grid_min", np.array(n, dtype)),
                    g.const(f"{name}.grid_max", np.array(p, dtype)),
                ],
                base,
            )
        else:
            q = g.op("QuantizeLinear", [x, s_name, zp], base)
        self.last_int = q
        if not dequantize:
            return q, s, zp
        d = g.op("DequantizeLinear", [q, s_name, zp], f"{name}.input")
        if offset is not None:
            d = g.op("Add", [d, offset], f"{name}.input")
        return d, s, zp
