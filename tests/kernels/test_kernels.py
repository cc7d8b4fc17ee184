"""Kernels against their references (reference.py). The reference tests run on CPU; the kernel
tests need CUDA and Triton and skip cleanly without them."""

import pytest
import torch

from slimtorch.kernels import reference as R

CUDA = torch.cuda.is_available()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int4_pack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    packed = R.pack_int4(codes)
    assert packed.shape == (8, 32) and torch.equal(R.unpack_int4(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # low nibble = even column


def test_int4_reference_is_the_dequantized_float_linear():
    torch.manual_seed(0)
    w, x = torch.randn(32, 256), torch.randn(5, 256)
    packed, scale, zero = R.quantize_int4_weight(w, 128)
    q = R.unpack_int4(packed).float().reshape(32, 2, 128)
    wd = ((q - zero[..., None]) * scale[..., None]).reshape(32, 256)
    assert torch.allclose(R.int4_weight_only_linear_ref(x, packed, scale, zero), x @ wd.T, atol=1e-5)
    # rounding error is uniform over one step: rms = scale / sqrt(12) (a closed form for the error)
    assert rel(wd, w) == pytest.approx((scale.pow(2).mean() / 12).sqrt().item() / w.pow(2).mean().sqrt().item(),
                                       rel=0.1)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_w8a8_reference_matches_per_row_quantization_by_hand(dtype):
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(3, 64)
    wq, ws = R.quantize_weight_channels(w, dtype)
    qmax = 127.0 if dtype == torch.int8 else 448.0
    assert torch.allclose(ws, w.abs().amax(1) / qmax)
    xs = x.abs().amax(1, keepdim=True) / qmax
    xq = (x / xs).round().clamp(-127, 127) if dtype == torch.int8 else (x / xs).to(dtype).float()
    assert torch.allclose(R.w8a8_linear_ref(x, wq, ws), (xq * xs) @ (wq.float() * ws[:, None]).T, atol=1e-4)
    assert rel(R.w8a8_linear_ref(x, wq, ws), x @ w.T) < 0.08


gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 7, 16, 100, 1024])
@pytest.mark.parametrize("k,n", [(256, 384), (4096, 11008)])
def test_int4_kernel_matches_reference(m, k, n):
    from slimtorch.kernels.int4 import int4_weight_only_linear

    torch.manual_seed(m)
    w = torch.randn(n, k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    packed, scale, zero = R.quantize_int4_weight(w, 128)
    ref = R.int4_weight_only_linear_ref(x.float(), packed, scale, zero)
    for fused_only in (False, True):  # large M: dequantize + cuBLAS, unless fused_only
        y = int4_weight_only_linear(x, packed, scale, zero, fused_only=fused_only)
        assert rel(y, ref) < 1e-2  # bf16 weights in the dot


@pytest.mark.gpu
@gpu
def test_int4_dequantize_kernel_is_exact():
    from slimtorch.kernels.int4 import dequantize_int4

    w = torch.randn(384, 512, device="cuda")
    packed, scale, zero = R.quantize_int4_weight(w, 128)
    q = R.unpack_int4(packed).float().reshape(384, 4, 128)
    ref = ((q - zero[..., None]) * scale[..., None]).reshape(384, 512)
    assert torch.equal(dequantize_int4(packed, scale, zero, torch.float32), ref)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("m", [1, 16, 333, 2048])
def test_w8a8_kernels_match_reference(dtype, m):
    from slimtorch.kernels.w8a8 import fp8_linear, int8_linear

    torch.manual_seed(m)
    k, n = 4096, 1024
    w = torch.randn(n, k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wq, ws = R.quantize_weight_channels(w, dtype)
    y = (int8_linear if dtype == torch.int8 else fp8_linear)(x, wq, ws)
    assert rel(y, R.w8a8_linear_ref(x.float(), wq, ws)) < 1e-2
