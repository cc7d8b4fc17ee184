"""Quantization core against hand-computed cases."""

import pytest
import torch

from slimtorch.errors import SlimError
from slimtorch import packing
from slimtorch.quant import primitives as P
from slimtorch.quant.observers import kl_threshold, make_observer
from slimtorch.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec


def roundtrip(x, spec):
    scale, zero = P.qparams(*P.min_max(x, spec), spec)
    q = P.quantize(x, scale, zero, spec)
    return q, scale, zero, P.dequantize(q, scale, zero, spec)


def test_int8_symmetric_per_tensor():
    x = torch.tensor([-1.0, 0.5, 0.25, 1.27])
    q, scale, zero, _ = roundtrip(x, QuantSpec("int8", PerTensor()))
    assert scale.item() == pytest.approx(0.01) and zero.item() == 0
    assert q.dtype == torch.int8 and q.tolist() == [-100, 50, 25, 127]


def test_uint8_asymmetric_per_tensor():
    x = torch.tensor([-1.0, 0.0, 1.55])
    q, scale, zero, deq = roundtrip(x, QuantSpec("uint8", PerTensor(), symmetric=False))
    assert scale.item() == pytest.approx(0.01) and zero.item() == 100
    assert q.dtype == torch.uint8 and q.tolist() == [0, 100, 255]
    assert torch.allclose(deq, x, atol=1e-6)  # 0 is exactly representable


def test_int4_per_channel():
    w = torch.tensor([[0.7, -0.3], [1.4, 0.2]])
    q, scale, _, _ = roundtrip(w, QuantSpec("int4", PerChannel(0)))
    assert scale.flatten().tolist() == pytest.approx([0.1, 0.2]) and scale.shape == (2, 1)
    assert q.tolist() == [[7, -3], [7, 1]]


def test_int4_per_group():
    w = torch.tensor([[0.7, -0.3, 0.1, 0.02]])
    q, scale, _, deq = roundtrip(w, QuantSpec("int4", PerGroup(2)))
    assert scale.shape == (1, 2, 1) and scale.flatten().tolist() == pytest.approx([0.1, 0.1 / 7])
    assert q.tolist() == [[7, -3, 7, 1]]
    assert deq[0, 3].item() == pytest.approx(0.1 / 7)


def test_int3_and_uint2():
    q, scale, _, _ = roundtrip(torch.tensor([0.3, -0.2, 0.1]), QuantSpec("int3", PerTensor()))
    assert scale.item() == pytest.approx(0.1) and q.tolist() == [3, -2, 1]
    q, scale, zero, _ = roundtrip(torch.tensor([0.0, 0.3, 0.6, 0.9]), QuantSpec("uint2", PerTensor(), symmetric=False))
    assert scale.item() == pytest.approx(0.3) and zero.item() == 0 and q.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype,fmax", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_per_tensor(dtype, fmax):
    x = torch.tensor([2 * fmax, -2.0, 1.0, 0.0])
    q, scale, _, deq = roundtrip(x, QuantSpec(dtype, PerTensor()))
    assert scale.item() == pytest.approx(2.0)
    assert q.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    assert torch.equal(deq, x)  # 448 (57344), -1, 0.5 are exact in the format


def test_per_token():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -0.4]])
    q, scale, _, _ = roundtrip(x, QuantSpec("int8", PerToken(), dynamic=True))
    assert scale.flatten().tolist() == pytest.approx([2 / 127, 0.4 / 127]) and scale.shape == (2, 1)
    assert q[:, 1].tolist() == [-127, 64] and q[0, 0].item() == 64  # 63.5 rounds to even


def test_fake_quant_gradient_is_the_clipped_ste():
    spec = QuantSpec("int4", PerTensor())
    scale, zero = torch.tensor(0.1), torch.tensor(0.0)  # representable: [-0.8, 0.7]
    x = torch.tensor([-1.0, -0.8, 0.0, 0.33, 0.7, 0.9], requires_grad=True)
    y = P.fake_quant(x, scale, zero, spec)
    assert y.tolist() == pytest.approx([-0.8, -0.8, 0.0, 0.3, 0.7, 0.7])
    y.backward(torch.arange(1.0, 7.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]


def test_fake_quant_without_gradient_is_the_code_round_trip():
    # the no-gradient fast path must give dequantize(quantize(x)) exactly, for asymmetric grouped specs too
    g = torch.Generator().manual_seed(0)
    for spec, shape in ((QuantSpec("uint4", PerGroup(8), symmetric=False), (3, 16)),
                        (QuantSpec("int8", PerChannel(0)), (4, 5))):
        x = torch.randn(shape, generator=g).to(torch.bfloat16)
        q, scale, zero, _ = roundtrip(x.float(), spec)
        with torch.no_grad():
            y = P.fake_quant(x, scale, zero, spec)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, P.dequantize(q, scale, zero, spec, torch.bfloat16))
        assert torch.allclose(y.float(), P.fake_quant(x.float().requires_grad_(), scale, zero, spec).detach(), atol=1e-2)


def test_zero_and_constant_channels_stay_finite():
    w = torch.stack([torch.zeros(8), torch.full((8,), 5.0), torch.randn(8)])
    for spec in (QuantSpec("int8", PerChannel(0)), QuantSpec("uint4", PerChannel(0), symmetric=False)):
        _, scale, _, deq = roundtrip(w, spec)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert torch.equal(deq[0], torch.zeros(8)) and torch.allclose(deq[1], torch.full((8,), 5.0))


def test_bad_inputs_are_slim_errors():
    with pytest.raises(SlimError, match="not a multiple of group size"):
        P.min_max(torch.randn(2, 10), QuantSpec("int4", PerGroup(4)))
    with pytest.raises(SlimError, match="NaN"):
        P.qparams(torch.tensor(float("nan")), torch.tensor(1.0), QuantSpec("int8", PerTensor()))
    with pytest.raises(SlimError, match="symmetric: false"):
        QuantSpec("uint4", PerTensor())
    with pytest.raises(SlimError, match="unknown dtype"):
        QuantSpec("int9")
    with pytest.raises(SlimError, match="NaN or Inf activations"):
        make_observer(QuantSpec("int8", PerTensor())).update(torch.tensor([1.0, float("inf")]))


def test_minmax_and_ema_observers():
    spec = QuantSpec("int8", PerTensor(), observer="minmax")
    obs = make_observer(spec)
    obs.update(torch.tensor([-1.0, 0.5]))
    obs.update(torch.tensor([-0.2, 3.0]))
    assert [t.item() for t in obs.range()] == [-1.0, 3.0]
    assert obs.qparams()[0].item() == pytest.approx(3.0 / 127)
    ema = make_observer(QuantSpec("int8", PerTensor(), observer="ema"))
    ema.update(torch.tensor([-1.0, 1.0]))
    ema.update(torch.tensor([-1.0, 3.0]))
    assert ema.range()[1].item() == pytest.approx(1.0 + 0.01 * (3.0 - 1.0))


def test_percentile_observer():
    x = torch.arange(1, 10001, dtype=torch.float32)  # |x| percentile 99 = 9900.01 (linear interpolation)
    obs = make_observer(QuantSpec("int8", PerTensor(), observer="percentile"))
    obs.p = 0.99
    obs.update(x)
    assert obs.range()[1].item() == pytest.approx(9900.01, rel=1e-5)


def test_mse_observer_clips_an_outlier_and_beats_minmax():
    torch.manual_seed(0)
    x = torch.randn(4096)
    x[0] = 40.0
    spec = QuantSpec("int4", PerTensor(), observer="mse")
    obs = make_observer(spec)
    obs.update(x)
    mn, mx = obs.range()
    assert mx.item() < 40.0

    def err(lo, hi):
        s, z = P.qparams(lo, hi, spec)
        return ((P.fake_quant(x, s, z, spec) - x) ** 2).sum().item()

    assert err(mn, mx) < err(x.min(), x.max())


def test_mse_observer_per_channel_is_the_per_tensor_search_on_each_row():
    w = torch.randn(6, 32)
    obs = make_observer(QuantSpec("int4", PerChannel(0), observer="mse"))
    obs.update(w)
    mn, mx = obs.range()
    assert mn.shape == mx.shape == (6, 1) and (mx <= w.amax(1, keepdim=True) + 1e-6).all()
    for i, row in enumerate(w):  # each channel's range is what the per-tensor search finds on that row alone
        one = make_observer(QuantSpec("int4", PerTensor(), observer="mse"))
        one.update(row[None])
        lo, hi = one.range()
        torch.testing.assert_close((mn[i, 0], mx[i, 0]), (lo.reshape(()), hi.reshape(())))


def test_kl_threshold():
    torch.manual_seed(0)
    gauss = torch.randn(200_000).abs()
    gauss[:10] = 50.0  # rare outliers should be clipped away
    assert kl_threshold(gauss, 2048, 128).item() < 10.0
    uniform = torch.rand(200_000)  # nothing to gain by clipping a uniform distribution
    assert kl_threshold(uniform, 2048, 128).item() > 0.9


def test_pack_hand_case_and_round_trips():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    assert packing.pack(q, 4, -8).tolist() == [[0x69, 0x0F]]  # codes +8: 9, 6, 15, 0 -> low nibble first
    for bits, qmin in [(2, -2), (3, -4), (4, 0), (8, -128)]:
        for n in (1, 7, 8, 13):
            q = torch.randint(qmin, qmin + 2**bits, (3, n), dtype=torch.int16).to(torch.int8)
            packed = packing.pack(q, bits, qmin)
            assert packed.shape == (3, packing.packed_len(n, bits))
            assert torch.equal(packing.unpack(packed, bits, qmin, n), q)
    assert packing.packed_len(128, 4) == 64 and packing.packed_len(128, 3) == 48 and packing.packed_len(128, 2) == 32
