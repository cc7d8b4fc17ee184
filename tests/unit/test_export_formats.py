"""Exports to other runtimes, checked against oracles: our own quantized model (the QDQ ONNX graph and the
compressed-tensors tensors hold our codes exactly), compressed-tensors' own packing, and exact algebra
(batch-norm folding)."""

import copy
import io
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from slimtorch.calib.data import calibration_set
from slimtorch.errors import SlimError
from slimtorch.export.hf import layer_tensors, pack_int32, quantization_config
from slimtorch.export.onnx import export_onnx, fold_batchnorm, fold_weight_quantization
from slimtorch.quant.modules import QuantConv2d
from slimtorch.quantize import quantize_
from slimtorch.spec import PerGroup, QuantSpec
from slimtorch.zoo import data, load_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _optimized_ops(path) -> Counter:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path) + ".opt"
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(path) + ".opt").graph.node)


@pytest.fixture(scope="module")
def cnn_w8a8():
    fp = load_model("fmnist-cnn")
    q = copy.deepcopy(fp)
    calib = calibration_set("fmnist-cnn", 256)
    quantize_(q, "W8A8", calib, "rtn")
    return fp, q, calib


def test_onnx_int8_weights_are_our_codes_and_onnx_runtime_runs_integer_kernels(tmp_path, cnn_w8a8):
    _, q, calib = cnn_w8a8
    x = data.fashion_mnist("test").normalized()[:500]
    path = tmp_path / "m.onnx"
    info = export_onnx(q, (x[:2],), path, ["x"], {"x": {0: "batch"}}, calib=calib)
    assert info["quantized_layers"] == 10 and info["batchnorms_folded"] == 9
    # the weight codes in the file (before batch-norm folding rescales them) are our qweight codes
    proto = onnx.load(str(path))
    int8 = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8
            and len(t.dims) > 1]
    fc = q.get_submodule("fc")
    assert any(a.shape == tuple(fc.qweight.t().shape) and np.array_equal(a, fc.qweight.t().numpy()) for a in int8)
    ops = _optimized_ops(path)
    assert ops["QLinearConv"] == 9 and ops["QLinearAdd"] == 3, ops  # every conv and residual join in int8
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        want = q(x)
    # the ONNX model adds output quantization at 9 points: close to ours, not equal
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.99
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_a_float_model_exports_without_quantize_nodes(tmp_path, cnn_w8a8):
    fp, _, _ = cnn_w8a8
    path = tmp_path / "fp.onnx"
    x = data.fashion_mnist("test").normalized()[:64]
    export_onnx(fp, (x[:2],), path, ["x"], {"x": {0: "batch"}})
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["QuantizeLinear"] == 0
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, fp(x).numpy(), atol=1e-4)


def _qdq_conv_bn_graph(gamma: torch.Tensor):
    """conv (int8 per-channel weights) -> BN, exported; returns (proto, input)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            conv = nn.Conv2d(3, 4, 3, bias=True)
            wspec = QuantSpec("int8")
            self.conv = QuantConv2d.from_float(conv, wspec, None)
            self.bn = nn.BatchNorm2d(4).eval()
            with torch.no_grad():
                self.bn.weight.copy_(gamma)
                self.bn.bias.uniform_(-1, 1)
                self.bn.running_mean.uniform_(-1, 1)
                self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            return self.bn(self.conv(x))

    from slimtorch.export.onnx import OPSET, onnx_ready

    m, x = M().eval(), torch.randn(2, 3, 8, 8)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(onnx_ready(m), (x,), buf, dynamo=False, opset_version=OPSET, input_names=["x"])
    proto = onnx.load_from_string(buf.getvalue())
    fold_weight_quantization(proto.graph)
    return proto, x


def test_batchnorm_folding_is_exact_with_negative_gammas():
    proto, x = _qdq_conv_bn_graph(torch.tensor([1.5, -0.7, 0.2, -2.0]))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before = ort.InferenceSession(proto.SerializeToString(), so).run(None, {"x": x.numpy()})[0]
    assert fold_batchnorm(proto.graph) == 1
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    after = ort.InferenceSession(proto.SerializeToString(), so).run(None, {"x": x.numpy()})[0]
    assert np.allclose(before, after, atol=1e-5)


def test_specs_without_a_fast_qdq_form_are_refused_naming_the_layer(tmp_path):
    lin = nn.Sequential(nn.Linear(256, 8))
    quantize_(lin, "W4A16-g128", [], "rtn")
    with pytest.raises(SlimError, match="'0'.*8-bit weights"):
        export_onnx(lin, (torch.randn(1, 256),), tmp_path / "x.onnx", ["x"], {"x": {0: "batch"}})
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_compressed_tensors(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    v = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 70), dtype=torch.int8)
    unsigned = v.to(torch.int32) + (1 << (bits - 1))
    assert torch.equal(pack_int32(unsigned, bits), ct.pack_to_int32(v, bits))
    assert torch.equal(pack_int32(unsigned.t(), bits).t(), ct.pack_to_int32(v, bits, packed_dim=0))


def test_compressed_tensors_decompresses_our_w4_tensors_to_our_weights():
    """compressed-tensors' own decompressor turns our uint4 group tensors back into our dequantized weight."""
    comp = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.quantization import QuantizationConfig

    lin = nn.Sequential(nn.Linear(256, 48))
    quantize_(lin, "W4A16-g128", [], "rtn")
    m = lin[0]
    assert m.wspec == QuantSpec("uint4", PerGroup(128), symmetric=False)
    cfg = QuantizationConfig.model_validate(quantization_config(lin))
    scheme = next(iter(cfg.config_groups.values()))
    tensors = {k.split(".", 1)[1]: v for k, v in layer_tensors("0", m, torch.float32).items()}
    out = comp.PackedQuantizationCompressor.decompress(tensors, scheme)
    assert torch.allclose(out["weight"], m.weight(), atol=1e-6)


def test_w8a8_tensors_carry_our_activation_scale_and_zero_point():
    lin = nn.Sequential(nn.Linear(16, 8))
    calib = [(torch.randn(32, 16) + 1,)]
    quantize_(lin, "W8A8", calib, "rtn")
    t = layer_tensors("0", lin[0], torch.float32)
    assert t["0.weight"].dtype == torch.int8 and torch.equal(t["0.weight"], lin[0].qweight)
    assert t["0.input_scale"].item() == lin[0].act.scale.item()
    assert t["0.input_zero_point"].item() == int(lin[0].act.zero.item())
    group = quantization_config(lin)["config_groups"]["group_0"]
    assert group["input_activations"]["symmetric"] is False and group["weights"]["strategy"] == "channel"
