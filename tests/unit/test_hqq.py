"""HQQ (calib/hqq.py) against closed forms and against round-to-nearest on cases with a known answer."""

import pytest
import torch

from slimtorch.calib.hqq import hqq_quantize, shrink_lp
from slimtorch.errors import SlimError
from slimtorch.quant import primitives as P
from slimtorch.spec import PerChannel, PerGroup, QuantSpec

SPEC = QuantSpec("uint4", PerGroup(128), symmetric=False)


def test_shrink_at_p_1_is_the_soft_threshold():
    x = torch.tensor([-3.0, -0.05, 0.0, 0.05, 0.5, 2.0])
    assert torch.allclose(shrink_lp(x, beta=10.0, p=1.0), torch.sign(x) * torch.relu(x.abs() - 0.1))


def test_shrink_minimises_its_scalar_problem_at_p_below_1():
    # |e|^p + beta/2 (e - x)^2 over a fine grid of e: HQQ's shrink is an approximate minimiser (the threshold
    # taken at x rather than at the solution): its objective is within 1% of the grid's minimum, and far
    # below that of keeping x or of zero
    beta, p = 10.0, 0.7
    e = torch.linspace(-3, 3, 600001, dtype=torch.float64)
    for x in (0.8, 1.5, -2.0):
        def f(v):
            return v.abs().pow(p) + beta / 2 * (v - x) ** 2
        got = f(shrink_lp(torch.tensor([x], dtype=torch.float64), beta, p)).item()
        best = f(e).min().item()
        assert got <= 1.01 * best and got < f(torch.tensor(0.0)).item() and got < f(torch.tensor(x)).item()


def test_the_kept_lp_error_never_rises_and_ends_below_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(4, 256) * 0.02
    r = hqq_quantize(w, SPEC)
    assert all(b <= a for a, b in zip(r.lp_error, r.lp_error[1:]))
    assert r.lp_error[-1] < r.lp_error[0]  # the first entry is round-to-nearest's
    scale, zero = P.qparams(*P.min_max(w, SPEC), SPEC)
    rtn_lp = (P.dequantize(P.quantize(w, scale, zero, SPEC), scale, zero, SPEC) - w).abs().pow(0.7).sum()
    assert r.lp_error[0] == pytest.approx(rtn_lp.item(), rel=1e-5)


def test_zero_points_stay_integers_in_range_and_codes_decode_to_the_reported_error():
    torch.manual_seed(1)
    w = torch.randn(8, 256)
    r = hqq_quantize(w, SPEC)
    assert torch.equal(r.zero, r.zero.round()) and int(r.zero.min()) >= 0 and int(r.zero.max()) <= 15
    assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= 15
    err = (P.dequantize(r.codes, r.scale, r.zero, SPEC) - w).abs().pow(0.7).sum().item()
    assert err == pytest.approx(r.lp_error[-1], rel=1e-4)


def test_an_outlier_no_longer_sets_the_step_of_its_group():
    # one weight 12x the rest: round-to-nearest spends the 16 levels on the outlier's range; HQQ's l_0.7 fit
    # gives up some of the outlier to keep the other 127 weights finer (their error falls)
    torch.manual_seed(2)
    w = torch.randn(16, 128) * 0.01
    w[:, 7] = 0.12
    scale, zero = P.qparams(*P.min_max(w, SPEC), SPEC)
    rtn = P.dequantize(P.quantize(w, scale, zero, SPEC), scale, zero, SPEC)
    r = hqq_quantize(w, SPEC)
    hq = P.dequantize(r.codes, r.scale, r.zero, SPEC)
    bulk = torch.ones(128, dtype=torch.bool)
    bulk[7] = False
    assert (hq - w)[:, bulk].norm() < 0.95 * (rtn - w)[:, bulk].norm()  # measured 0.93x


def test_symmetric_specs_keep_zero_at_0_and_fit_the_scale():
    torch.manual_seed(3)
    spec = QuantSpec("int4", PerChannel(0))
    w = torch.randn(8, 64)
    r = hqq_quantize(w, spec)
    assert torch.equal(r.zero, torch.zeros_like(r.zero)) and r.lp_error[-1] < r.lp_error[0]


def test_fp8_is_refused_with_a_reason():
    with pytest.raises(SlimError, match="integer formats"):
        hqq_quantize(torch.randn(4, 16), QuantSpec("fp8_e4m3", PerChannel(0)))


def test_the_hqq_method_quantizes_a_model_without_data():
    from slimtorch.quantize import quantize_

    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(32, 256)
    want = model(x)
    report = quantize_(model, "W4A16-g128", [], "hqq")
    assert report.method == "hqq" and len(report.quantized) == 1  # the 64-wide layer has no group of 128
    assert torch.nn.functional.cosine_similarity(model(x).flatten(), want.flatten(), dim=0) > 0.99
