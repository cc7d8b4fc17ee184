"""Roofline cost of layers and models: FLOPs, bytes moved, arithmetic intensity, bound, time.

``time = max(flops / peak(compute dtype), bytes / bandwidth)``: a layer is compute-bound when its
arithmetic intensity (FLOPs per byte) exceeds the chip's ridge point ``peak / bandwidth``.

Conventions (what a fused kernel moves, each tensor once):
* weights at their stored bits, plus scales (fp32) and zero-points (fp32, asymmetric) per granule;
* activations in and out at ``act_bytes`` (bf16: 2); activation quantization is assumed fused
  into the GEMM (issue-5 kernels), so it adds no extra round trip;
* compute dtype: int8 / fp8 when activations are quantized to it, bf16 otherwise (weight-only
  formats dequantize to bf16 in registers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimtorch.cost.hardware import Hardware
from slimtorch.spec import PerChannel, PerGroup, PerTensor, QuantSpec


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # linear | conv2d | attention
    flops: float
    bytes: float
    compute: str  # bf16 | fp8 | int8 | fp32

    @property
    def intensity(self) -> float:
        return self.flops / max(self.bytes, 1.0)

    def compute_time(self, hw: Hardware) -> float:
        return self.flops / hw.peak(self.compute)

    def memory_time(self, hw: Hardware) -> float:
        return self.bytes / hw.mem_bandwidth

    def time(self, hw: Hardware) -> float:
        return max(self.compute_time(hw), self.memory_time(hw))

    def bound(self, hw: Hardware) -> str:
        return "compute" if self.compute_time(hw) >= self.memory_time(hw) else "memory"


def weight_bytes(out_f: int, in_f: int, spec: QuantSpec | None, float_bytes: int = 2) -> float:
    """Bytes of a stored (out_f, in_f) weight: codes plus fp32 scales (and zero-points if asymmetric)."""
    if spec is None:
        return out_f * in_f * float_bytes
    g = spec.granularity
    if isinstance(g, PerGroup):
        granules = out_f * math.ceil(in_f / g.size)
    elif isinstance(g, PerChannel):
        granules = out_f if g.axis % 2 == 0 else in_f
    elif isinstance(g, PerTensor):
        granules = 1
    else:
        granules = out_f
    return out_f * in_f * spec.bits / 8 + granules * 4 * (1 if spec.symmetric else 2)


def compute_dtype(weight: QuantSpec | None, act: QuantSpec | None, default: str = "bf16") -> str:
    if act is not None and weight is not None:
        if act.is_float and weight.is_float:
            return "fp8"
        if not act.is_float and act.bits <= 8 and not weight.is_float:
            return "int8"
    return default


def linear_cost(name: str, m: int, k: int, n: int, weight: QuantSpec | None = None, act: QuantSpec | None = None,
                act_bytes: int = 2) -> LayerCost:
    """``y (m, n) = x (m, k) @ W (n, k)^T``: 2mkn FLOPs; weights + input + output bytes."""
    moved = weight_bytes(n, k, weight, act_bytes) + m * k * act_bytes + m * n * act_bytes
    return LayerCost(name, "linear", 2.0 * m * k * n, moved, compute_dtype(weight, act))


def conv2d_cost(name: str, batch: int, cin: int, cout: int, kernel: tuple[int, int], groups: int,
                in_hw: tuple[int, int], out_hw: tuple[int, int], weight: QuantSpec | None = None,
                act: QuantSpec | None = None, act_bytes: int = 2) -> LayerCost:
    """2 * outputs * (cin / groups * kh * kw) FLOPs; weights + input + output bytes."""
    width = cin // groups * kernel[0] * kernel[1]
    outputs = batch * cout * out_hw[0] * out_hw[1]
    moved = (weight_bytes(cout, width, weight, act_bytes) + batch * cin * in_hw[0] * in_hw[1] * act_bytes
             + outputs * act_bytes)
    return LayerCost(name, "conv2d", 2.0 * outputs * width, moved, compute_dtype(weight, act))


def attention_cost(name: str, batch: int, heads: int, kv_heads: int, head_dim: int, q_len: int, kv_len: int,
                   causal: bool = True, act_bytes: int = 2, kv_bytes: int = 2) -> LayerCost:
    """Scores ``Q K^T`` and ``P V``: 4 * B * H * Tq * Tk * D FLOPs (halved for a causal prefill, where a
    fused kernel skips the masked half). Bytes: Q and output at ``act_bytes``, K and V (the KV cache
    during decode) at ``kv_bytes``; the (T, T) scores stay on chip (fused attention)."""
    pairs = q_len * kv_len
    if causal and q_len == kv_len:
        pairs = q_len * (q_len + 1) / 2
    flops = 4.0 * batch * heads * pairs * head_dim
    moved = 2 * batch * heads * q_len * head_dim * act_bytes + 2 * batch * kv_heads * kv_len * head_dim * kv_bytes
    return LayerCost(name, "attention", flops, moved, "bf16")


def kv_cache_bytes(layers: int, batch: int, kv_heads: int, head_dim: int, tokens: int, kv_bytes: int = 2) -> float:
    """K and V for every layer: 2 * L * B * KV * D * T * bytes."""
    return 2.0 * layers * batch * kv_heads * head_dim * tokens * kv_bytes
