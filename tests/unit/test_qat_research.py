"""FracBits, F8Net, AdaBin models and the PIM simulation against hand-computed or float references."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.distill import TrainConfig, train_student
from slimtorch.qat import convert, prepare_qat, qat_plan
from slimtorch.qat.adabin import BinaryConv2d, Maxout, binarize_cnn, set_ede, xnor_weight
from slimtorch.qat.dorefa import DoReFaWeight
from slimtorch.qat.f8net import F8CNN, fix_quant, integer_forward, requant
from slimtorch.qat.fracbits import (
    FracWeight,
    assign_bits,
    average_bits,
    budget_penalty,
    final_plan,
    frac_quant,
    fracbits_plan,
    harden,
    is_hard,
    load_plan,
    prepare_fracbits,
    range_quant,
    save_plan,
    sensitivity_bits,
    training_hooks,
    with_weight_bits,
)
from slimtorch.qat.pim import PIMConfig, adc, calibrate_bn, conv_chunks, linear_partial_sums, to_digital, to_pim
from slimtorch import packing
from slimtorch.quant import primitives as P
from slimtorch.zoo.cnn import FmnistCNN


def _toy() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16),
                         nn.ReLU(), nn.Linear(16, 4))


# ----------------------------------------------------------------------------- FracBits
def test_frac_quant_interpolates_neighbouring_widths_and_lam_gets_their_difference():
    w = torch.tensor([[0.9, -0.4, 0.1, 0.33]])
    clip = torch.tensor([[1.0]])
    # 2 bits: levels {-1, 0, 1}; 3 bits: steps of 1/3
    assert torch.equal(range_quant(w, clip, 2), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    q3 = torch.tensor([[1.0, -1 / 3, 0.0, 1 / 3]])
    assert torch.allclose(range_quant(w, clip, 3), q3)
    lam = torch.tensor(2.25, requires_grad=True)
    out = frac_quant(w, clip, lam)
    assert torch.allclose(out, 0.75 * torch.tensor([[1.0, 0, 0, 0]]) + 0.25 * q3)
    out.sum().backward()
    assert lam.grad.item() == pytest.approx(float((q3 - torch.tensor([[1.0, 0, 0, 0]])).sum()))


def test_assign_bits_bisection_meets_the_budget_and_keeps_the_order():
    lams, sizes = [2.2, 3.6, 4.9, 3.1], [100, 100, 100, 100]
    bits = assign_bits(lams, sizes, 3.0)
    assert sum(b * s for b, s in zip(bits, sizes)) / 400 <= 3.0
    assert bits == sorted(bits, key=lambda b: lams[bits.index(b)]) or bits[0] <= bits[3] <= bits[1] <= bits[2]
    assert bits == [2, 3, 4, 3]  # round(lam - 0.5 + eps): the largest offset within the budget
    with pytest.raises(SlimError, match="below the 2-bit minimum"):
        assign_bits(lams, sizes, 1.5)


def test_fracbits_trains_hardens_emits_a_reloadable_plan_and_converts(tmp_path):
    torch.manual_seed(0)
    model, x = _toy(), torch.randn(64, 1, 6, 6)
    plan = qat_plan(model, 3, 8, (x,))
    fp = copy.deepcopy(model)
    q = prepare_fracbits(model, plan, 3.5)
    assert float(average_bits(q).detach()) == pytest.approx(3.5)
    assert float(budget_penalty(q, 3.0).detach()) == pytest.approx(0.5)
    y = torch.randint(0, 4, (64,))
    lam0 = [float(m.wq.lam.detach()) for m in q.modules() if hasattr(m, "wq") and isinstance(m.wq, FracWeight)]
    train_student(q, fp, x, y, TrainConfig(epochs=3, batch_size=16, lr=1e-2), penalty=lambda m: budget_penalty(m, 3.0))
    lam1 = [float(m.wq.lam.detach()) for m in q.modules() if hasattr(m, "wq") and isinstance(m.wq, FracWeight)]
    assert all(b < a for a, b in zip(lam0, lam1))  # the budget term pulls the widths toward 3
    # by plain SGD (width_lr) each width moves by its own gradient: the budget pulls the larger layer harder
    q2 = prepare_fracbits(copy.deepcopy(fp), plan, 3.5)
    train_student(q2, fp, x, y, TrainConfig(epochs=1, batch_size=16, lr=1e-3, width_lr=0.1, kd_weight=0.0),
              penalty=lambda m: budget_penalty(m, 3.0))
    big, small = [m for m in q2.modules() if hasattr(m, "wq") and isinstance(m.wq, FracWeight)]
    assert big.weight.numel() == 576 and small.weight.numel() == 128  # budget gradients 576/704 and 128/704
    assert 3.5 - float(big.wq.lam.detach()) > 2 * (3.5 - float(small.wq.lam.detach())) > 0

    with pytest.raises(SlimError, match="fractional"):
        fracbits_plan(q, plan)
    hook, _ = training_hooks(3.0, epochs=5)  # hard assignment before epoch round(0.8 * 5) = 4
    hook(q, 3, 5)
    assert not is_hard(q)
    hook(q, 4, 5)
    assert is_hard(q) and final_plan(q, plan, 3.0) == fracbits_plan(q, plan)
    bits = harden(q, 3.0)
    final = fracbits_plan(q, plan)
    assert {n: final[n].weight.bits for n in bits} == bits and final[next(iter(plan))].weight.bits == 8
    save_plan(tmp_path / "plan.json", final, {"target": 3.0})
    assert load_plan(tmp_path / "plan.json") == final
    q.eval()
    want = q(x)
    convert(q)
    assert torch.allclose(q(x), want, atol=1e-5)
    # the plan is an ordinary one: QAT (and PTQ) take it
    prepare_qat(copy.deepcopy(fp), load_plan(tmp_path / "plan.json"), "lsq")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SlimError, match="not a slimtorch plan"):
        load_plan(tmp_path / "bad.json")


def test_sensitivity_bits_gives_the_sensitive_layer_the_bits_within_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4))
    with torch.no_grad():  # layer 2 is ternary (+-0.1, 0): rounding it loses nothing at any width
        model[2].weight.copy_(torch.randint(-1, 2, (64, 64)) * 0.1)
        model[2].weight[:, 0] = 0.1
    x = torch.randn(128, 8)
    plan = qat_plan(model, 3, None, (x,))
    bits = sensitivity_bits(model, plan, x, 3.0)
    # start at 2 bits each; layer 1's upgrades are the only ones that lower the loss: 2 -> 3 -> 4 fills
    # the budget (2 * 4096 + 4 * 4096 = 3 bits on average over the two layers)
    assert bits == {"1": 4, "2": 2}
    new = with_weight_bits(plan, bits)
    assert new["1"].weight.bits == 4 and new["0"] == plan["0"]


# ----------------------------------------------------------------------------- F8Net
def test_requant_is_a_rounding_shift_matching_fix_quant():
    acc = torch.tensor([-7, -6, -5, 5, 6, 7, 1000, -1000])
    # shift 2 = divide by 4, ties up: -1.75 -> -2, -1.5 -> -1, -1.25 -> -1, 1.25 -> 1, 1.5 -> 2, 1.75 -> 2
    assert requant(acc, 2, True).tolist() == [-2, -1, -1, 1, 2, 2, 127, -127]
    assert torch.equal(requant(acc, 2, True).double(),
                       fix_quant(acc.double() / 4, 0, True) * 1.0)
    assert requant(torch.tensor([3]), -2, False).tolist() == [12]


def test_f8net_integer_forward_equals_the_fake_quant_forward():
    torch.manual_seed(0)
    fp = FmnistCNN(widths=(4, 8, 8))
    for m in fp.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model = F8CNN(fp)
    x = torch.randn(32, 1, 28, 28)
    train_student(model, None, x, torch.randint(0, 10, (32,)), TrainConfig(epochs=2, batch_size=16, kd_weight=0.0))
    model.eval()
    with torch.no_grad():
        ref = model(x[:8]).double()
    acc, fl = integer_forward(model, x[:8])
    assert acc.dtype == torch.int64
    assert torch.equal(acc.double() / 2.0**fl, ref)
    # the folded weights are on the 8-bit grid of their format
    wq, _ = model.blocks[0].conv1.quantized(5)
    codes = wq * 2.0 ** int(model.blocks[0].conv1.fl_w)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 127
    with pytest.raises(SlimError, match="eval mode"):
        integer_forward(model.train(), x[:2])
    with pytest.raises(SlimError, match="fmnist-cnn"):
        F8CNN(_toy())


def test_f8net_folds_batch_norm_with_batch_statistics_in_training():
    torch.manual_seed(0)
    fp = FmnistCNN(widths=(4, 8, 8))
    model = F8CNN(fp)
    layer = model.stem
    x = torch.randn(16, 1, 28, 28)
    wf, bf = layer.folded(x)  # train mode: batch statistics of the float convolution
    y = F.conv2d(x, layer.weight, None, 1, 1)
    mu, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    bn = fp.stem[1]
    assert torch.allclose(F.conv2d(x, wf, bf, 1, 1),
                          F.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps), atol=1e-4)
    assert torch.allclose(layer.bn.running_mean, 0.1 * mu, atol=1e-6)
    assert torch.allclose(wf, layer.weight * (bn.weight / torch.sqrt(var + bn.eps))[:, None, None, None])


# ----------------------------------------------------------------------------- AdaBin models
def test_binarize_cnn_swaps_binary_convs_and_maxout_and_sign_baseline_uses_xnor_scaling():
    fp = FmnistCNN(widths=(4, 8, 8))
    model = binarize_cnn(copy.deepcopy(fp), "adabin")
    bins = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    assert len(bins) == 6 and isinstance(model.layer1.relu, Maxout) and isinstance(model.stem[2], Maxout)
    assert isinstance(model.layer2.shortcut[0], nn.Conv2d) and not isinstance(model.layer2.shortcut[0], BinaryConv2d)
    set_ede(model, 5, 10)
    assert bins[0].t == pytest.approx(10 ** (-3 + 4 * 0.5))
    wb = bins[0].binary_weight()
    for row in wb.reshape(wb.shape[0], -1):  # two values per channel: mean -/+ std of the real weights
        assert len(torch.unique(row)) <= 2
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]], requires_grad=True)
    out = xnor_weight(w)
    assert torch.equal(out.detach(), torch.tensor([[2.0, -2.0], [0.5, 0.5]]))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(2, 1, 28, 28)
    assert binarize_cnn(copy.deepcopy(fp), "sign")(x).shape == (2, 10)
    with pytest.raises(SlimError, match="adabin or sign"):
        BinaryConv2d(nn.Conv2d(1, 1, 3), "xnor")


# ----------------------------------------------------------------------------- PIM
def test_adc_reads_partial_sums_on_its_grid_and_clamps_at_full_scale():
    cfg = PIMConfig(rows=4, adc_bits=3)  # levels -3..3, step = full scale / 3 = 2
    p = torch.tensor([0.0, 1.0, 2.0, 4.0, -5.0, 100.0], requires_grad=True)
    out = adc(p, 6.0, cfg)
    assert torch.equal(out.detach(), torch.tensor([0.0, 0.0, 2.0, 4.0, -4.0, 6.0]))  # /2, half to even
    out.sum().backward()
    assert torch.equal(p.grad, torch.tensor([1.0, 1, 1, 1, 1, 0]))  # straight through, 0 beyond full scale


def test_chunked_partial_sums_add_up_to_the_full_product():
    torch.manual_seed(0)
    x, w = torch.randint(0, 16, (3, 10, 6, 6)).float(), torch.randint(-8, 8, (5, 10, 3, 3)).float()
    parts, rows = conv_chunks(x, w, 27, (1, 1), (1, 1))  # 3 channels x 9 per chunk -> 4 chunks
    assert parts.shape == (3, 4, 5, 6, 6) and rows == 27
    assert torch.equal(parts.sum(1), F.conv2d(x, w, None, 1, 1))
    assert torch.equal(parts[:, 0], F.conv2d(x[:, :3], w[:, :3], None, 1, 1))
    xl, wl = torch.randint(0, 16, (4, 100)).float(), torch.randint(-8, 8, (7, 100)).float()
    lp, lrows = linear_partial_sums(xl, wl, 32)
    assert lp.shape == (4, 4, 7) and lrows == 32 and torch.equal(lp.sum(1), xl @ wl.T)


def test_pim_layer_is_the_adc_read_sum_of_its_chunks_within_half_a_step_of_digital():
    torch.manual_seed(0)
    model, x = _toy(), torch.randn(32, 1, 6, 6)
    plan = qat_plan(model, 4, 4, (x,), first_last_bits=None)
    q = prepare_qat(model, plan, "lsq").eval()
    want = q(x)
    h = torch.relu(q[1](q[0](x)))  # the second conv's input
    cfg = PIMConfig(rows=27, adc_bits=8)
    fine = to_pim(copy.deepcopy(q), cfg, rescale=False)
    layer = fine[3]
    qx, sx = layer.aq.codes(h)
    qw, sw = layer.wq.codes(layer.weight)
    parts, rows = conv_chunks(qx, qw, 27, (1, 1), (1, 1))  # 3 of the 8 input channels per chunk
    assert rows == 27 and parts.shape[1] == 3
    full_scale = 27 * 15 * 8
    by_hand = adc(parts, full_scale, cfg).sum(1) * sx * sw.reshape(1, -1, 1, 1) + layer.bias.reshape(1, -1, 1, 1)
    got = layer(h)
    assert torch.allclose(got, by_hand, atol=1e-6)
    digital = q[3](h)
    bound = 3 * (full_scale / 127) / 2 * sx * sw.reshape(1, -1, 1, 1)  # half an ADC step per chunk
    assert ((got - digital).abs() <= bound + 1e-6).all() and not torch.equal(got, digital)
    coarse = to_pim(copy.deepcopy(q), PIMConfig(rows=16, adc_bits=2), rescale=False)
    assert (coarse(x) - want).abs().mean() > 0.1 * want.abs().mean()
    back = to_digital(copy.deepcopy(fine))
    assert torch.allclose(back(x), want, atol=1e-6)
    # BN calibration: the running statistics become those of the model's own (PIM) forward
    n = calibrate_bn(coarse, [(x,)])
    assert n == 2
    coarse.train()
    h = coarse[0](x)
    assert torch.allclose(coarse[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    with pytest.raises(SlimError, match="LSQ layers"):
        to_pim(prepare_qat(_toy(), qat_plan(_toy(), 4, 4, (x,)), "pact"), PIMConfig())
    with pytest.raises(SlimError, match="out of range"):
        PIMConfig(adc_bits=1)


def test_pim_qat_rescale_keeps_the_digital_output_scale():
    torch.manual_seed(0)
    model, x = _toy(), torch.randn(32, 1, 6, 6)
    q = prepare_qat(model, qat_plan(model, 4, 4, (x,), first_last_bits=None), "lsq").eval()
    q(x)
    p = to_pim(copy.deepcopy(q), PIMConfig(rows=8, adc_bits=3, noise=0.5), rescale=True).train()
    p(x)
    layer = p[3]
    assert layer.eta_seen and math.isfinite(float(layer.eta)) and float(layer.eta) > 0
    # eta is an EMA (0.9 old + 0.1 new) of std(ideal) / std(PIM), started at the first batch's value
    cfg, x2 = PIMConfig(rows=8, adc_bits=6), 3 * torch.randn(32, 1, 6, 6)
    first, second = (to_pim(copy.deepcopy(q), cfg, rescale=True).train() for _ in range(2))
    first(x), second(x2)
    eta_a, eta_b = float(first[3].eta), float(second[3].eta)
    assert eta_a != pytest.approx(eta_b)
    first(x2)
    assert float(first[3].eta) == pytest.approx(0.9 * eta_a + 0.1 * eta_b, rel=1e-6)


def test_pim_linear_reads_each_token_as_its_own_input_vector():
    torch.manual_seed(0)
    lin, x = nn.Linear(40, 6), torch.randn(3, 5, 40)
    q = prepare_qat(nn.Sequential(lin), qat_plan(nn.Sequential(lin), 4, 4, (x,), first_last_bits=None), "lsq")
    q(x)  # LSQ steps from this batch
    p = to_pim(q, PIMConfig(rows=16, adc_bits=4), rescale=False).eval()
    out = p(x)
    assert out.shape == (3, 5, 6)
    rows = torch.stack([p(x[:, t]) for t in range(5)], 1)  # the same layer on (batch, features) slices
    assert torch.allclose(out, rows, atol=1e-6)


# ----------------------------------------------------------------------------- formats and DoReFa extension
@pytest.mark.parametrize("bits", [5, 6, 7])
def test_five_to_seven_bit_codes_round_trip_one_byte_each(bits):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (3, 11)).to(torch.int8)
    packed = packing.pack(q, bits, -(2 ** (bits - 1)))
    assert packed.shape == (3, 11)
    assert torch.equal(packing.unpack(packed, bits, -(2 ** (bits - 1)), 11), q)


def test_dorefa_match_std_keeps_the_float_spread_and_exports_exactly():
    torch.manual_seed(0)
    w = torch.randn(8, 16) * 0.05
    q = DoReFaWeight(4, "modified", match_std=True)
    out = q(w)
    assert out.std().item() == pytest.approx(w.std().item(), rel=1e-5)
    spec, codes, scale, zero = q.export_weight(w)
    assert torch.allclose(P.dequantize(codes, scale, zero, spec), out, atol=1e-7)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # no BatchNorm: on by default
    prepare_qat(model, qat_plan(model, 4, 4, (torch.randn(4, 4),)), "pact")
    assert model[0].wq.match_std and model[2].wq.match_std
