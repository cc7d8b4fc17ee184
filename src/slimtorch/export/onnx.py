"""ONNX export: a quantized model as QDQ ONNX (QuantizeLinear/DequantizeLinear around each quantized layer)
that ONNX Runtime fuses into integer kernels (QLinearConv, QLinearAdd, MatMulIntegerToFloat) on the CPU.

What the file holds, per quantized layer:

* the weight as int8 codes (an initializer, our codes exactly) with its per-channel or per-tensor scale,
  behind a DequantizeLinear;
* the layer's input as QuantizeLinear -> DequantizeLinear with our calibrated static scale and zero-point.
  Our asymmetric int8 activation codes ``q`` become uint8 codes ``q + 128`` with zero-point ``z + 128``: the
  same real values, and the unsigned-activation / signed-weight pair that ONNX Runtime's x86 integer
  kernels (VNNI) are built for.

So the ONNX model computes what our reference path computes, up to float summation order. Exported: 8-bit
integer weights (symmetric, per channel or per tensor) with static per-tensor 8-bit activations (the
W8A8 preset) or without activation quantization. Other specs (4-bit groups, fp8, dynamic per-token
activations) have no QDQ form that ONNX Runtime runs fast: they are refused with a SlimError naming the
layer (the ``hf`` format carries them).

Written with PyTorch's TorchScript-based exporter (opset 17), whose fake-quantize symbolics are exactly
Q -> DQ; then, on the ONNX graph: the weights' Q nodes are folded into int8 initializers, batch norms into
the int8 convolutions (exact), and uint8 points are added where ONNX Runtime needs a quantized output to
use an integer kernel (``points_to_quantize``; calibrated in ONNX Runtime on the calibration set). Those
points are the one place where the ONNX model rounds where ours does not; the export job measures both.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import SlimError, shown
from slimtorch.io.checkpoint import atomic_write_bytes
from slimtorch.quant.modules import ActQuant, QuantConv2d, QuantLinear, QuantWeight, same_pads
from slimtorch.sequential import set_module
from slimtorch.spec import PerChannel, PerTensor, QuantSpec

OPSET = 17


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise SlimError("ONNX export needs the onnx package: pip install onnx onnxruntime") from None
    return onnx


def check_act(spec: QuantSpec, where: str) -> None:
    if spec.dynamic or spec.is_float or spec.bits != 8 or not isinstance(spec.granularity, PerTensor):
        raise SlimError(f"{where}: ONNX export needs static per-tensor 8-bit activations, this layer has "
                        f"{spec.dtype} {type(spec.granularity).__name__}{' dynamic' if spec.dynamic else ''} (the W8A8 "
                        f"preset exports; a language model's other specs go to --format hf)")


def check_weight(spec: QuantSpec, where: str) -> None:
    if spec.is_float or spec.bits != 8 or not spec.symmetric or \
            not isinstance(spec.granularity, PerTensor | PerChannel) or \
            (isinstance(spec.granularity, PerChannel) and spec.granularity.axis != 0):
        raise SlimError(f"{where}: ONNX export needs symmetric 8-bit weights per channel or per tensor, this layer "
                        f"has {spec.dtype} {type(spec.granularity).__name__} (the W8A8 preset exports; a language model's other "
                        f"specs go to --format hf)")


def _qdq_act(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """Our int8/uint8 static fake-quantization as one uint8 Q -> DQ pair (same real values)."""
    zero = int(q.zero.item()) + (128 if q.spec.dtype == "int8" else 0)
    return torch.fake_quantize_per_tensor_affine(x, float(q.scale.item()), zero, 0, 255)


def _qdq_weight(w: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``w`` (already dequantized: codes times scale) behind Q -> DQ; the Q is folded into codes later."""
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(w, float(scale.item()), 0, -128, 127)
    zeros = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale.reshape(-1).float(), zeros, axis, -128, 127)


class _OnnxLayer(nn.Module):
    """What a quantized layer's QDQ form keeps besides its weight: bias, SmoothQuant/AWQ input factor, and the
    input quantizer, applied in the order QuantWeight applies them."""

    def __init__(self, m: QuantWeight, weight: torch.Tensor, axis: int) -> None:
        super().__init__()
        self.register_buffer("w", weight)  # a buffer: the exporter would fold Q -> DQ of a plain tensor away
        self.register_buffer("w_scale", m.w_scale.reshape(-1).float())
        self.axis = None if isinstance(m.wspec.granularity, PerTensor) else axis
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float(), requires_grad=False)
        self.register_buffer("inv_smooth", None if m.inv_smooth is None else m.inv_smooth.float())
        self.act = m.act

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        return x if self.act is None else _qdq_act(x, self.act)

    def _weight(self) -> torch.Tensor:
        return _qdq_weight(self.w, self.w_scale, self.axis)


class _OnnxLinear(_OnnxLayer):
    """A QuantLinear in QDQ form: ``DQ(Q(x)) @ DQ(W^T) + b`` (weights stored transposed, per-column scales)."""

    def __init__(self, m: QuantLinear) -> None:
        super().__init__(m, m.weight().t().contiguous(), axis=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(self._input(x), self._weight())
        return y if self.bias is None else y + self.bias


class _OnnxConv(_OnnxLayer):
    """A QuantConv2d in QDQ form: ``conv(DQ(Q(x)), DQ(W)) + b``."""

    def __init__(self, m: QuantConv2d) -> None:
        super().__init__(m, m.weight(), axis=0)
        self.conv_args = (m.stride, m.padding, m.dilation, m.groups)
        self.same_padding = m.same_padding
        self.kernel_size = tuple(m.weight_shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_padding:
            pads = same_pads(tuple(x.shape[-2:]), self.kernel_size, tuple(self.conv_args[0]))
            x = F.pad(x, pads) if any(pads) else x
        return F.conv2d(self._input(x), self._weight(), self.bias, *self.conv_args)


class _OnnxPoint(nn.Module):
    def __init__(self, q: ActQuant) -> None:
        super().__init__()
        self.q = q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _qdq_act(x, self.q)


def onnx_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized layers and matmul input points are in QDQ form; SlimError naming
    the first layer whose specs have no QDQ form."""
    model = copy.deepcopy(model).eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantWeight):
            check_weight(m.wspec, f"layer {shown(name)}")
            if m.act is not None:
                check_act(m.act.spec, f"layer {shown(name)}")
            set_module(model, name, _OnnxLinear(m) if isinstance(m, QuantLinear) else _OnnxConv(m))
        elif isinstance(m, ActQuant) and not name.endswith(".act"):
            check_act(m.spec, f"matmul input {shown(name)}")
            set_module(model, name, _OnnxPoint(m))
    return model


class _Graph:
    """Producers, consumers and constant values of an ONNX graph, for the rewrites below."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self.g, self.np = graph, numpy_helper
        self.inits = {t.name: t for t in graph.initializer}
        self.consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.fresh = 0

    def value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self.np.to_array(self.inits[name])
        node = self.consts.get(name)
        if node is not None:
            return self.np.to_array(node.attribute[0].t)
        node = self.producer.get(name)  # the exporter writes a repeated constant as Identity of the first
        return self.value(node.input[0]) if node is not None and node.op_type == "Identity" else None

    def add_init(self, array: np.ndarray, hint: str) -> str:
        self.fresh += 1
        name = f"slimtorch_{hint}_{self.fresh}"
        self.g.initializer.append(self.np.from_array(array, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def prune(self) -> None:
        """Drop initializers and Constant nodes nothing reads any more."""
        used = {i for n in self.g.node for i in n.input} | self.outputs
        keep = [n for n in self.g.node if n.op_type != "Constant" or n.output[0] in used]
        del self.g.node[:]
        self.g.node.extend(keep)
        alive = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(alive)


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def fold_weight_quantization(graph) -> int:
    """Replace each QuantizeLinear whose input is a float initializer by an int8 initializer of its codes
    (round half to even, as ONNX specifies). Returns the number folded."""
    g = _Graph(graph)
    folded, keep = 0, []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in g.inits:
            w, scale, zero = g.value(node.input[0]), g.value(node.input[1]), g.value(node.input[2])
            shape = [1] * w.ndim
            if scale.ndim == 1 and scale.size > 1:
                shape[_axis(node)] = -1
            codes = np.clip(np.rint(w / scale.reshape(shape)) + zero.reshape(shape).astype(np.float32), -128, 127)
            graph.initializer.append(g.np.from_array(codes.astype(zero.dtype), node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    _Graph(graph).prune()
    return folded


def fold_batchnorm(graph) -> int:
    """Fold each BatchNormalization that alone reads a Conv with an int8 per-channel weight into that conv:
    ``BN(conv(x, W) + b) = conv(x, W * k) + (b - mean) * k + beta`` with ``k = gamma / sqrt(var + eps)``.
    The codes stay (their sign flips where k < 0); the per-channel scales take ``|k|``. Exact in real
    numbers, so the conv can be one integer kernel. Returns the number folded."""
    g = _Graph(graph)
    folded, drop = 0, set()
    for conv in list(graph.node):
        if conv.op_type != "Conv" or len(g.consumers.get(conv.output[0], [])) != 1 or conv.output[0] in g.outputs:
            continue
        bn = g.consumers[conv.output[0]][0]
        dq = g.producer.get(conv.input[1])
        if bn.op_type != "BatchNormalization" or dq is None or dq.op_type != "DequantizeLinear":
            continue
        codes, scale, zero = (g.value(i) for i in dq.input[:3])
        gamma, beta, mean, var = (g.value(i) for i in bn.input[1:5])
        if any(v is None for v in (codes, scale, zero, gamma, beta, mean, var)) or zero.any():
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        k = gamma / np.sqrt(var + eps)
        cout = codes.shape[0]
        scale = np.broadcast_to(scale.reshape(-1), (cout,)).astype(np.float32)
        sign = np.where(k < 0, -1, 1).astype(np.int8).reshape(-1, *[1] * (codes.ndim - 1))
        bias = g.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(cout, np.float32)
        dq.input[0] = g.add_init((codes * sign).astype(np.int8), "codes")
        dq.input[1] = g.add_init((scale * np.abs(k)).astype(np.float32), "scale")
        dq.input[2] = g.add_init(np.zeros(cout, np.int8), "zero")
        del dq.attribute[:]
        dq.attribute.extend([_int_attr("axis", 0)])
        new_bias = g.add_init(((bias - mean) * k + beta).astype(np.float32), "bias")
        if len(conv.input) > 2:
            conv.input[2] = new_bias
        else:
            conv.input.append(new_bias)
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        folded += 1
    keep = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    _Graph(graph).prune()
    return folded


def _int_attr(name: str, value: int):
    from onnx import helper

    return helper.make_attribute(name, value)


def points_to_quantize(graph) -> list[str]:
    """Tensors to quantize beyond our model's own points, so that ONNX Runtime runs integer kernels: the
    outputs of integer-weight convolutions, and of additions (residual joins) whose inputs are all quantized,
    each after a ReLU or ReLU6 that alone reads it, where no QuantizeLinear reads them already. ONNX Runtime fuses
    a QDQ convolution into QLinearConv, and an addition into QLinearAdd, only when the output is quantized
    too. (Matrix products need no such point: they become MatMulIntegerToFloat, with a float output.)
    A point after ReLU6 (Clip) sees only [0, 6], so its 8 bits cover what the next layer reads."""
    g = _Graph(graph)
    names: list[str] = []

    def after_relu(out: str) -> str:  # ReLU, or ReLU6 exported as Clip
        readers = g.consumers.get(out, [])
        if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") and out not in g.outputs:
            return readers[0].output[0]
        return out

    def quantized(t: str) -> bool:
        producer = g.producer.get(t)
        return t in names or (producer is not None and producer.op_type == "DequantizeLinear") or \
            any(r.op_type == "QuantizeLinear" for r in g.consumers.get(t, []))

    for node in graph.node:  # topological order: an addition sees its inputs' points
        if node.op_type == "Conv":
            dq = g.producer.get(node.input[1])
            wanted = dq is not None and dq.op_type == "DequantizeLinear"
        else:
            wanted = node.op_type == "Add" and all(quantized(i) for i in node.input) and \
                not any(i in g.inits or i in g.consts for i in node.input)
        if wanted:
            out = after_relu(node.output[0])
            readers = g.consumers.get(out, [])
            if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
                names.append(out)
    return names


def quantize_tensors(graph, ranges: dict[str, tuple[float, float]]) -> None:
    """Route every reader of each tensor in ``ranges`` through a uint8 QuantizeLinear -> DequantizeLinear
    for its (min, max); where a reader already quantizes the tensor, the others read that quantizer's
    dequantized output instead (one rounding, one scale)."""
    from onnx import helper

    g = _Graph(graph)
    new_nodes = []
    for name, (lo, hi) in ranges.items():
        readers = g.consumers.get(name, [])
        existing = next((r for r in readers if r.op_type == "QuantizeLinear"), None)
        if existing is not None:
            q_out, s_name, z_name = existing.output[0], existing.input[1], existing.input[2]
        else:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = max((hi - lo) / 255.0, float(np.finfo(np.float32).eps))
            zero = int(np.clip(np.rint(-lo / scale), 0, 255))
            s_name = g.add_init(np.array(scale, np.float32), "out_scale")
            z_name = g.add_init(np.array(zero, np.uint8), "out_zero")
            q_out = f"{name}_slimtorch_q"
            new_nodes.append(helper.make_node("QuantizeLinear", [name, s_name, z_name], [q_out]))
        dq_out = f"{name}_slimtorch_dq"
        new_nodes.append(helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out]))
        for r in readers:
            if r is existing:
                continue
            for j, i in enumerate(r.input):
                if i == name:
                    r.input[j] = dq_out
    graph.node.extend(new_nodes)
    _topological_sort(graph)


def _topological_sort(graph) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise SlimError("ONNX export: the graph has a cycle or reads an undefined tensor (a bug)")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def tensor_ranges(proto, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """Min and max of each named tensor over the calibration ``feeds``, run in ONNX Runtime."""
    import onnxruntime as ort
    from onnx import helper

    probe = type(proto)()
    probe.CopyFrom(proto)
    for n in names:
        probe.graph.output.append(helper.ValueInfoProto(name=n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for feed in feeds:
        for n, v in zip(names, sess.run(names, feed)):
            lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    return {n: (lo[n], hi[n]) for n in names}


def export_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                dynamic: dict[str, dict[int, str]], calib: list[tuple[torch.Tensor, ...]] = ()) -> dict:
    """Write ``model`` (quantized or float) as ONNX to ``path`` atomically.

    ``example``: forward arguments; ``dynamic``: per input, its dimensions left free (e.g.
    ``{"x": {0: "batch"}}``); ``calib``: forward arguments to calibrate the points that ONNX Runtime's integer
    kernels need beyond our model's own (:func:`points_to_quantize`; their number is returned as
    ``added_points``). Returns what was written."""
    onnx = _require_onnx()
    ready = onnx_ready(model)
    quantized = sum(isinstance(m, _OnnxLinear | _OnnxConv) for m in ready.modules())
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(ready, tuple(example), buf, dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=["output"], dynamic_axes={**dynamic, "output": {0: "batch"}},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    folded = fold_weight_quantization(proto.graph)
    if quantized and not folded:  # fewer is right where the forward never reaches a layer (BERT's pooler)
        raise SlimError(f"ONNX export found none of the {quantized} quantized layers' weights in the exported graph "
                        f"(an exporter change?); the file was not written")
    bn = fold_batchnorm(proto.graph)
    points = points_to_quantize(proto.graph)
    if points:
        if not calib:
            raise SlimError("ONNX export of quantized convolutions needs calibration inputs for their outputs")
        feeds = [{n: t.numpy() for n, t in zip(input_names, args)} for args in calib]
        quantize_tensors(proto.graph, tensor_ranges(proto, points, feeds))
    data = proto.SerializeToString()
    atomic_write_bytes(Path(path), data)
    return {"path": str(path), "quantized_layers": folded, "batchnorms_folded": bn, "added_points": len(points),
            "bytes": len(data), "opset": OPSET}
