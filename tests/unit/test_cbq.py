"""CBQ's pieces (calib/cbq.py) against closed forms, and its LoRA-rounding against AdaRound's end state."""

import pytest
import torch
from torch import nn

from slimtorch.calib.cbq import (LoRARoundLinear, anneal, cbq, inverse_rectified_sigmoid, rectified_sigmoid,
                                 rounding_regulariser, window_loss)
from slimtorch.errors import SlimError
from slimtorch.quant import primitives as P
from slimtorch.spec import PerChannel, PerGroup, QuantSpec

SPEC = QuantSpec("uint3", PerGroup(32), symmetric=False)


def test_the_rectified_sigmoid_is_inverted_and_the_regulariser_vanishes_only_at_hard_roundings():
    h = torch.tensor([0.05, 0.3, 0.5, 0.9])
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-6)
    assert rounding_regulariser(torch.tensor([0.0, 1.0, 1.0]), 2.0).item() == 0.0
    assert rounding_regulariser(torch.tensor([0.5]), 2.0).item() == pytest.approx(1.0)


def test_the_start_is_the_float_weight_and_hard_codes_round_to_nearest():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    m = LoRARoundLinear(lin, SPEC, rank=4)
    # h(V0) is the fractional part (to the clamp of 0.01..0.99): the soft weight is the float weight, within
    # 1% of a step, wherever the code is not clipped (an integer zero-point shifts the grid, so the ends of a
    # min-max range may fall outside it)
    scale, zero = P.qparams(*P.min_max(lin.weight, SPEC), SPEC)
    step = scale.expand(8, 2, 32).reshape(8, 64)
    pos = (P.grouped(lin.weight.detach(), SPEC) / scale + zero).reshape(8, 64)
    inside = (pos >= 0) & (pos <= 7)
    assert inside.float().mean() > 0.9
    assert ((m.weight() - lin.weight).abs() <= 0.011 * step + 1e-7)[inside].all()
    rtn = P.dequantize(P.quantize(lin.weight, scale, zero, SPEC), scale, zero, SPEC)
    assert torch.allclose(m.weight(hard=True), rtn, atol=1e-6)


def test_lora_rounding_becomes_adarounds_hard_rounding_at_convergence():
    # a toy layer fitted to its float outputs with the annealed regulariser, at full rank (A B then spans every
    # matrix: AdaRound's own per-weight variable): every h ends at 0 or 1, the soft weight is then the hard
    # one, and the learned rounding fits at least as well as round-to-nearest
    torch.manual_seed(1)
    lin = nn.Linear(64, 16, bias=False)
    x = torch.randn(512, 64)
    y = lin(x).detach()
    m = LoRARoundLinear(lin, SPEC, rank=16)
    opt = torch.optim.Adam([m.a, m.b, m.log_gain], lr=1e-2)
    iters = 1000
    for it in range(iters):
        loss = (m(x) - y).pow(2).mean()
        sched = anneal(it, iters)
        if sched is not None:
            loss = loss + 0.003 * sched[1] * rounding_regulariser(m.h(), sched[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = m.h().detach()
    assert bool(((h < 0.01) | (h > 0.99)).all())
    assert torch.allclose(m.weight(), m.weight(hard=True), atol=1e-3 * m.scale.abs().max().item())
    scale, zero = P.qparams(*P.min_max(lin.weight, SPEC), SPEC)
    rtn = P.dequantize(P.quantize(lin.weight, scale, zero, SPEC), scale, zero, SPEC)
    err = (nn.functional.linear(x, m.weight(hard=True).detach()) - y).pow(2).mean()
    assert err < 0.95 * (x @ rtn.T - y).pow(2).mean()  # measured 0.87x


def test_finish_gives_the_quantized_layer_of_the_hard_weight():
    torch.manual_seed(2)
    lin = nn.Linear(64, 8)
    m = LoRARoundLinear(lin, QuantSpec("int4", PerChannel(0)), rank=2)
    q = m.finish(lin, None)
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), x @ m.weight(hard=True).T + lin.bias, atol=1e-5)


def test_window_loss_is_zero_on_equal_outputs_and_counts_kl_per_token():
    y = torch.randn(2, 5, 8)
    assert window_loss(y, y).item() == pytest.approx(0.0, abs=1e-6)
    assert window_loss(y, y + 1.0).item() == pytest.approx(1.0, abs=1e-5)  # a shift: softmax unchanged


def test_cbq_refuses_bad_windows_and_models_without_blocks():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    plan = {"0": type("P", (), {"weight": SPEC, "act": None})()}
    with pytest.raises(SlimError, match="overlap"):
        cbq(model, plan, [(torch.randn(2, 32),)], window=2, overlap=2)
    with pytest.raises(SlimError, match="repeated blocks"):
        cbq(model, plan, [(torch.randn(2, 32),)])
