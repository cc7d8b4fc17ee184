"""Roofline counts against hand-computed values."""

import pytest

from slimtorch.cost.hardware import get_hardware
from slimtorch.cost.roofline import attention_cost, conv2d_cost, kv_cache_bytes, linear_cost
from slimtorch.errors import SlimError
from slimtorch.quant.recipe import get_preset

H100 = get_hardware("h100")


def test_bf16_gemm_8192_cubed_is_compute_bound_at_peak():
    c = linear_cost("x", 8192, 8192, 8192)
    assert c.flops == 2 * 8192**3
    assert c.bytes == 3 * 8192 * 8192 * 2  # W, x, y once each in bf16
    assert c.intensity == pytest.approx(8192 / 3)  # 2mkn / (2(mk + kn + mn)) with m = k = n
    assert c.bound(H100) == "compute"
    assert c.time(H100) == pytest.approx(2 * 8192**3 / 989.4e12)


def test_int4_gemv_bytes_and_memory_bound():
    w4 = get_preset("W4A16-g128").weight  # uint4, asymmetric, groups of 128
    c = linear_cost("x", 1, 4096, 11008, w4)
    codes = 4096 * 11008 // 2
    params = 11008 * (4096 // 128) * 8  # fp32 scale + fp32 zero per group
    assert c.bytes == codes + params + 4096 * 2 + 11008 * 2
    assert c.compute == "bf16" and c.bound(H100) == "memory"
    assert c.time(H100) == pytest.approx(c.bytes / 3.35e12)
    bf16 = linear_cost("x", 1, 4096, 11008)
    assert 3.4 < bf16.time(H100) / c.time(H100) < 3.6  # 16 bits vs 4.5 bits per weight, plus the activations


def test_quantized_activations_pick_the_compute_dtype():
    assert linear_cost("x", 8, 64, 64, get_preset("W8A8").weight, get_preset("W8A8").act).compute == "int8"
    assert linear_cost("x", 8, 64, 64, get_preset("FP8").weight, get_preset("FP8").act).compute == "fp8"
    assert linear_cost("x", 8, 64, 64, get_preset("W4A8").weight, get_preset("W4A8").act).compute == "int8"
    assert get_hardware("a100").peak("fp8") == 312e12  # no fp8 tensor cores: runs at bf16 rate


def test_conv_and_attention_counts():
    c = conv2d_cost("c", 2, 16, 32, (3, 3), 1, (28, 28), (28, 28))
    assert c.flops == 2 * (2 * 32 * 28 * 28) * (16 * 9)
    assert c.bytes == 32 * 16 * 9 * 2 + 2 * 16 * 28 * 28 * 2 + 2 * 32 * 28 * 28 * 2
    dw = conv2d_cost("d", 1, 32, 32, (3, 3), 32, (14, 14), (14, 14))
    assert dw.flops == 2 * 32 * 14 * 14 * 9  # depthwise: one input channel per output
    dec = attention_cost("a", 1, 32, 8, 128, 1, 4096)  # one decode step over a 4096-token cache
    assert dec.flops == 4 * 32 * 4096 * 128
    assert dec.bytes == 2 * 32 * 128 * 2 + 2 * 8 * 4096 * 128 * 2
    pre = attention_cost("a", 1, 32, 8, 128, 4096, 4096)
    assert pre.flops == 4 * 32 * (4096 * 4097 / 2) * 128  # causal: the masked half is skipped
    assert kv_cache_bytes(32, 1, 8, 128, 4096) == 2 * 32 * 8 * 128 * 4096 * 2  # 512 MiB for a Llama-3-8B shape


def test_unknown_hardware():
    with pytest.raises(SlimError, match="unknown hardware 'tpu'"):
        get_hardware("tpu")


def test_model_estimate_linear_flops_are_two_per_weight_per_token():
    import torch

    from slimtorch.cost.estimate import estimate
    from slimtorch.quant.recipe import build_plan
    from slimtorch.zoo.llama import LlamaConfig, TinyLlama

    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)
    model = TinyLlama(cfg).eval()
    plan, _ = build_plan(model, get_preset("W8A8"))
    prefill, decode = estimate(model, plan, (torch.zeros(1, 8, dtype=torch.long),), H100, batch=2, tokens=100,
                               context=300)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    lin = [c for c in prefill.layers if c.kind == "linear"]
    assert sum(c.flops for c in lin) == 2 * linear_weights * 2 * 100
    assert sum(c.flops for c in decode.layers if c.kind == "linear") == 2 * linear_weights * 2
    assert decode.kv_cache_bytes == 2 * 2 * 2 * 2 * 8 * 300 * 2  # 2 (K,V) x L x B x KV x D x T x bf16
    q = next(c for c in lin if c.name.endswith("q_proj"))
    assert q.compute == "int8" and q.bytes == 32 * 32 + 32 * 4 + 200 * 32 * 2 * 2  # int8 codes, fp32 scales, x and y
    assert next(c for c in lin if c.name == "lm_head").bytes == 64 * 32 * 2 + 200 * 32 * 2 + 200 * 64 * 2  # bf16


def test_measured_ceiling_profiles_scale_every_peak_by_bf16s_fraction():
    h = get_hardware("h200-measured")
    assert h.mem_bandwidth == 4.3e12 and h.peak("bf16") == pytest.approx(788e12)
    assert h.peak("int8") == pytest.approx(1978.9e12 * 788 / 989.4)
