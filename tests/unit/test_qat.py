"""QAT quantizers against hand-computed forwards and gradients; prepare/convert equivalence; the training
loop's exact resume."""

import math

import pytest
import torch
from torch import nn

from slimtorch.distill import FeatureTaps, feature_loss, kd_loss
from slimtorch.errors import SlimError
from slimtorch.distill import TrainConfig, train_student
from slimtorch.qat import METHODS as QUANTIZERS
from slimtorch.qat import convert, prepare_qat, qat_plan
from slimtorch.qat.dorefa import DoReFaWeight, dorefa_weight
from slimtorch.qat.lsq import LSQ, lsq_fake_quant, lsq_init_step
from slimtorch.qat.pact import PACT, pact_fake_quant
from slimtorch.distill.trainer import cosine_lr
from slimtorch.quant import primitives as P
from slimtorch.quant.modules import QuantConv2d, QuantLinear
from slimtorch.spec import PerChannel, PerTensor, QuantSpec


def test_lsq_forward_and_step_gradient_by_hand():
    v = torch.tensor([-1.0, 0.25, 0.75, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    out = lsq_fake_quant(v, s, -4, 3, grad_scale=0.1)  # v/s = -2, 0.5 -> 0 (half to even), 1.5 -> 2, 10 -> 3
    assert torch.equal(out.detach(), torch.tensor([-1.0, 0.0, 1.0, 1.5]))
    out.sum().backward()
    # d/ds: round(v/s) - v/s inside (0, -0.5, 0.5), qmax = 3 where clipped above; times the gradient scale
    assert s.grad.item() == pytest.approx(0.1 * (0 - 0.5 + 0.5 + 3))
    assert torch.equal(v.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))  # straight through inside, 0 when clipped


def test_lsq_clipped_below_gives_qmin_and_module_uses_the_papers_gradient_scale():
    s = torch.tensor(1.0, requires_grad=True)
    lsq_fake_quant(torch.tensor([-10.0]), s, -4, 3, 1.0).sum().backward()
    assert s.grad.item() == -4
    w = torch.randn(6, 5)
    q = LSQ(QuantSpec("int4", PerChannel(0)), (6, 5), weight=True)
    q(w).sum().backward()  # first call sets the step: 2 mean|w| / sqrt(qmax) per output channel
    assert torch.allclose(q.step.detach().flatten(), 2 * w.abs().mean(1) / math.sqrt(7))
    s0 = q.step.detach().clone().requires_grad_(True)
    lsq_fake_quant(w, s0, -8, 7, 1.0).sum().backward()
    assert torch.allclose(q.step.grad, s0.grad / math.sqrt(5 * 7))  # g = 1 / sqrt(N qmax), N = 5 per channel


def test_lsq_init_step_formula():
    v = torch.tensor([[1.0, -3.0], [2.0, 2.0]])
    assert lsq_init_step(v, 3).item() == pytest.approx(2 * 2.0 / math.sqrt(3))
    assert torch.allclose(lsq_init_step(v, 3, (1,)).flatten(), torch.tensor([4.0, 4.0]) / math.sqrt(3))


def test_pact_forward_and_alpha_gradients_plain_and_calibrated():
    x = torch.tensor([-1.0, 0.3, 1.9, 9.0])
    expected = torch.tensor([0.0, 0.0, 4 / 3, 4.0])  # alpha 4, 2 bits: step 4/3
    grads = {}
    for calibrated in (False, True):
        xi = x.clone().requires_grad_(True)
        a = torch.tensor(4.0, requires_grad=True)
        out = pact_fake_quant(xi, a, 0, 3, calibrated)
        assert torch.allclose(out.detach(), expected)
        out.sum().backward()
        assert torch.equal(xi.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))
        grads[calibrated] = a.grad.item()
    assert grads[False] == pytest.approx(1.0)  # PACT: only the clipped-above value
    # SAT: plus (round(x/d) - x/d) / qmax inside: (0 - 0.225) / 3 + (1 - 1.425) / 3
    assert grads[True] == pytest.approx(1.0 - 0.225 / 3 - 0.425 / 3)


def test_signed_pact_clips_below_at_qmin_steps_with_gradient_qmin_over_qmax():
    a = torch.tensor(1.0, requires_grad=True)
    out = pact_fake_quant(torch.tensor([-5.0, 5.0]), a, -2, 1)
    assert torch.equal(out.detach(), torch.tensor([-2.0, 1.0]))
    out.sum().backward()
    assert a.grad.item() == pytest.approx(-2 + 1)


@pytest.mark.parametrize("scheme", ["original", "modified", "centered"])
@pytest.mark.parametrize("rescale", [False, True])
def test_dorefa_levels_and_exact_export(scheme, rescale):
    w = torch.randn(8, 3, 3, 3)
    wq = dorefa_weight(w, 2, scheme)
    levels = {"original": [-1, -1 / 3, 1 / 3, 1], "modified": [-1, -0.5, 0, 0.5],
              "centered": [-0.75, -0.25, 0.25, 0.75]}[scheme]
    dist = (torch.unique(wq)[:, None] - torch.tensor(levels)[None]).abs().amin(1)
    assert dist.max() < 1e-6 and len(dist) >= 3
    q = DoReFaWeight(2, scheme, rescale)
    out = q(w)
    if rescale:  # SAT: output std 1 / sqrt(n_out), n_out = 8 * 9
        assert out.std().item() == pytest.approx(1 / math.sqrt(72), rel=1e-5)
    spec, codes, scale, zero = q.export_weight(w)
    assert spec.dtype == ("int2" if scheme == "modified" else "uint2")
    lo, hi = spec.qrange
    assert codes.min() >= lo and codes.max() <= hi
    assert torch.allclose(P.dequantize(codes, scale, zero, spec).reshape(w.shape), out, atol=1e-6)


def _toy() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def test_qat_plan_orders_layers_keeps_edges_at_8_bits_and_reads_input_signs():
    model, x = _toy(), torch.randn(4, 1, 6, 6)
    plan = qat_plan(model, 4, 4, (x,))
    assert list(plan) == ["0", "3", "7", "9"]
    assert [p.weight.dtype for p in plan.values()] == ["int8", "int4", "int4", "int8"]
    assert [p.act.dtype for p in plan.values()] == ["int8", "uint4", "uint4", "uint8"]  # the image is signed
    assert all(p.act.granularity == PerTensor() for p in plan.values())
    assert [p.weight.dtype for p in qat_plan(model, 3, None, (x,), first_last_bits=None).values()] == ["int3"] * 4
    with pytest.raises(SlimError, match="2 to 8"):
        qat_plan(model, 1, 4, (x,))


@pytest.mark.parametrize("method", list(QUANTIZERS))
def test_convert_gives_core_modules_with_the_qat_outputs(method):
    model, x = _toy(), torch.randn(16, 1, 6, 6)
    plan = qat_plan(model, 3, 3, (x,))
    prepare_qat(model, plan, method)
    model.train()
    model(x).sum().backward()  # first batch: LSQ input steps are set; BN statistics move
    model.eval()
    want = model(x)
    convert(model)
    assert isinstance(model[0], QuantConv2d) and isinstance(model[9], QuantLinear)
    assert model[3].wspec.bits == 3 and model[3].act.spec.bits == 3
    assert torch.allclose(model(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(SlimError, match="no QAT layers"):
        convert(model)


def test_prepare_qat_rejects_bad_plans_and_methods():
    model, x = _toy(), torch.randn(2, 1, 6, 6)
    plan = qat_plan(model, 4, 4, (x,))
    with pytest.raises(SlimError, match="unknown QAT method"):
        prepare_qat(model, plan, "magic")
    with pytest.raises(SlimError, match="does not have"):
        prepare_qat(model, {"nope": plan["0"]}, "lsq")
    with pytest.raises(SlimError, match="static scales"):
        prepare_qat(model, {"0": plan["0"].__class__(weight=plan["0"].weight,
                                                     act=QuantSpec("int8", PerTensor(), dynamic=True))})


def test_kd_and_feature_losses_by_hand():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 3.0, 1.0]])
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(4 * (p * (p / q).log()).sum().item(), rel=1e-5)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    f = {"a": torch.tensor([1.0, 3.0])}
    assert feature_loss({"a": torch.tensor([2.0, 3.0])}, f).item() == pytest.approx(0.5 / 5.0)
    model = _toy()
    with FeatureTaps(model, ("5",)) as taps:
        model(torch.randn(2, 1, 6, 6))
    assert taps.features["5"].shape == (2, 8, 1, 1)


def test_cosine_lr_schedule():
    assert cosine_lr(0, 100, 1.0) == 1.0 and cosine_lr(50, 100, 1.0) == pytest.approx(0.5)
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(100, 100, 1.0) == pytest.approx(0.0, abs=1e-12)


def _mlp_task():
    torch.manual_seed(0)
    x = torch.randn(96, 1, 6, 6)
    y = (x.flatten(1)[:, :4].argmax(1))
    teacher = _toy()
    return x, y, teacher


def _prepared(teacher, x):
    import copy

    model = copy.deepcopy(teacher)
    return prepare_qat(model, qat_plan(model, 4, 4, (x[:8],)), "lsq")


def test_training_resumes_exactly_where_it_stopped(tmp_path):
    x, y, teacher = _mlp_task()
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2, kd_weight=0.5, temperature=2.0)
    straight = _prepared(teacher, x)
    h = train_student(straight, teacher, x, y, cfg, ckpt_dir=tmp_path / "a")
    assert [r["epoch"] for r in h.epochs] == [1, 2, 3]

    class Stop(Exception):
        pass

    def stop_after_first(line):
        if '"epoch": 1' in line:
            raise Stop

    interrupted = _prepared(teacher, x)
    with pytest.raises(Stop):
        train_student(interrupted, teacher, x, y, cfg, ckpt_dir=tmp_path / "b", log=stop_after_first)
    resumed = _prepared(teacher, x)
    h2 = train_student(resumed, teacher, x, y, cfg, ckpt_dir=tmp_path / "b", resume=True)
    assert [r["epoch"] for r in h2.epochs] == [1, 2, 3]
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(SlimError, match="different config"):
        train_student(_prepared(teacher, x), teacher, x, y, TrainConfig(epochs=4, batch_size=32), ckpt_dir=tmp_path / "b",
                  resume=True)


def test_training_lowers_the_loss_and_checks_its_inputs():
    x, y, teacher = _mlp_task()
    model = _prepared(teacher, x)
    h = train_student(model, None, x, y, TrainConfig(epochs=6, batch_size=32, lr=1e-2, kd_weight=0.0))
    assert h.epochs[-1]["loss"] < h.epochs[0]["loss"]
    with pytest.raises(SlimError, match="teacher"):
        train_student(model, None, x, y, TrainConfig(epochs=1, batch_size=32))
    with pytest.raises(SlimError, match="fewer than one batch"):
        train_student(model, teacher, x[:8], y[:8], TrainConfig(epochs=1, batch_size=32))
    with pytest.raises(SlimError, match="kd_weight"):
        TrainConfig(kd_weight=2.0)


def test_pact_starts_alpha_from_the_first_batch_unless_given():
    x = torch.tensor([1.0, -3.0, 2.0, 2.0])
    q = PACT(QuantSpec("uint2", PerTensor(), symmetric=False))
    q(x)
    assert q.alpha.item() == pytest.approx(2 * 2.0 * math.sqrt(3)) and bool(q.initialized)
    fixed = PACT(QuantSpec("uint2", PerTensor(), symmetric=False), alpha=8.0)
    fixed(x)
    assert fixed.alpha.item() == 8.0


@pytest.mark.parametrize("scheme", ["centered", "modified"])
def test_adabits_switches_widths_shares_weights_and_exports_each_width(scheme):
    import copy

    from slimtorch.qat.adabits import SwitchableBatchNorm2d, export_width, prepare_adabits, set_bits, widths_variants

    torch.manual_seed(0)
    x = torch.randn(64, 1, 6, 6)
    y = x.flatten(1)[:, :4].argmax(1)
    fp = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                       nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model = prepare_adabits(copy.deepcopy(fp), qat_plan(fp, 4, 4, (x[:8],)), (8, 4, 2), scheme)
    assert isinstance(model[1], SwitchableBatchNorm2d) and len(model[1].bns) == 3
    train_student(model, fp, x, y, TrainConfig(epochs=1, batch_size=32, lr=1e-2), variants=widths_variants((8, 4, 2)))
    model.eval()
    outs = {}
    for b in (8, 4, 2):
        set_bits(model, b)
        assert model[3].wq.bits == b and model[3].aq.bits == b and model[0].wq.bits == 8  # first layer fixed
        # the 2-bit weight levels are the 4-bit ones with the low bits dropped (floor levels)
        outs[b] = model(x).detach()
    set_bits(model, 4)
    w4 = model[3].wq(model[3].weight)
    set_bits(model, 2)
    w2 = model[3].wq(model[3].weight)
    half = 0.5 if scheme == "centered" else 0.0  # centered levels are half a step above modified ones
    k4, k2 = ((w4 + 1) * 8 - half).detach(), ((w2 + 1) * 2 - half).detach()  # codes 0..15 and 0..3
    assert set(k4.unique().tolist()) <= set(range(16)) and len(k2.unique()) >= 3
    assert torch.equal(torch.floor(k4 / 4), k2)
    if scheme == "centered":  # symmetric: the 2-bit levels are +-1/4 and +-3/4
        assert set(w2.detach().unique().tolist()) <= {-0.75, -0.25, 0.25, 0.75}
    assert len({round(float(o.detach().sum()), 3) for o in outs.values()}) == 3  # three models, one weight set
    # every width's alpha and BN were trained: all initialised; the BN after the fixed 8-bit first layer
    # saw the same inputs at every width, the one after a switching layer did not
    assert bool(model[3].aq.initialized.all())
    assert torch.equal(model[1].bns[0].running_mean, model[1].bns[2].running_mean)
    assert not torch.equal(model[4].bns[0].running_mean, model[4].bns[2].running_mean)
    for b in (8, 2):
        frozen = export_width(copy.deepcopy(model), b)
        assert isinstance(frozen[1], nn.BatchNorm2d) and isinstance(frozen[3], QuantConv2d)
        wdtype = f"uint{b}" if scheme == "centered" else f"int{b}"  # centered: half-integer zero-point
        assert frozen[3].wspec.dtype == wdtype and frozen[3].act.spec.dtype == f"uint{b}"
        assert torch.allclose(frozen(x), outs[b], atol=1e-5)
    with pytest.raises(SlimError, match="not one of the trained widths"):
        set_bits(model, 6)
    with pytest.raises(SlimError, match="'centered' or 'modified'"):
        prepare_adabits(copy.deepcopy(fp), qat_plan(fp, 4, 4, (x[:8],)), (8, 4), "original")


def test_f8net_fixed_point_quantizer_and_format_rule():
    from slimtorch.qat.f8net import fix_quant, fraclen_from_std

    x = torch.tensor([0.3, -0.26, 1.0, 200.0, -5.0], requires_grad=True)
    out = fix_quant(x, fl=2)  # steps of 1/4; codes in [-127, 127]
    assert torch.equal(out.detach(), torch.tensor([0.25, -0.25, 1.0, 31.75, -5.0]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]))
    assert torch.equal(fix_quant(torch.tensor([-1.0, 300.0]), 0, signed=False), torch.tensor([0.0, 255.0]))
    # fl = floor(log2(40 / sigma)) signed, log2(70 / sigma) unsigned, clamped to [0, 7] / [0, 8]
    assert fraclen_from_std(1.0) == 5 and fraclen_from_std(1.0, signed=False) == 6
    assert fraclen_from_std(0.01) == 7 and fraclen_from_std(0.01, signed=False) == 8
    assert fraclen_from_std(100.0) == 0


def test_adabin_weight_equalisation_statistics_and_gradients():
    from slimtorch.qat.adabin import AdaBinAct, Maxout, adabin_act, adabin_weight, ede_t

    w = torch.tensor([[1.0, 3.0, 2.0, 6.0], [-1.0, -1.0, 1.0, 1.0]], requires_grad=True)
    out = adabin_weight(w, t=1.0)
    # row 0: mean 3, std sqrt((4 + 0 + 1 + 9) / 4) = sqrt(3.5); values 3 -/+ sqrt(3.5), sign(0) = +1
    a = math.sqrt(3.5)
    assert torch.allclose(out[0].detach(), torch.tensor([3 - a, 3 + a, 3 - a, 3 + a]))
    assert torch.allclose(out[1].detach(), torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert ede_t(0, 10) == pytest.approx(1e-3) and ede_t(10, 10) == pytest.approx(10.0)
    assert ede_t(5, 10) == pytest.approx(10 ** -1)
    # EDE backward at t = 10 on the normalised input u = (w - beta) / alpha: k = 1, grad t (1 - tanh^2(t u))
    x = torch.tensor([[0.05, -0.05]], requires_grad=True)
    from slimtorch.qat.adabin import _EDESign

    _EDESign.apply(x, 10.0).sum().backward()
    assert torch.allclose(x.grad, 10 * (1 - torch.tanh(torch.tensor([[0.5, -0.5]])) ** 2))
    # activations: alpha (sign((x - beta) / alpha) + beta); Bi-Real gradient 2 - 2|u| inside [-1, 1)
    xa = torch.tensor([0.5, -0.25, 3.0], requires_grad=True)
    al, be = torch.tensor(2.0), torch.tensor(0.5)
    ya = adabin_act(xa, al, be)
    assert torch.allclose(ya.detach(), torch.tensor([2 * (1 + 0.5), 2 * (-1 + 0.5), 2 * (1 + 0.5)]))
    ya.sum().backward()  # u = 0, -0.375, 1.25; d/dx = g(u) / alpha * alpha
    assert torch.allclose(xa.grad, torch.tensor([2.0, 2 - 0.75, 0.0]))
    assert AdaBinAct().alpha.item() == 1.0
    m = Maxout(2)
    assert torch.allclose(m(torch.tensor([-4.0, 2.0]).reshape(1, 2, 1, 1)).flatten(), torch.tensor([-1.0, 2.0]))


def test_first_batch_init_is_remembered_until_a_state_dict_says_otherwise():
    spec = QuantSpec("int4", PerTensor())
    q, fresh = LSQ(spec), LSQ(spec)
    q(torch.full((8,), 2.0))
    first = q.step.detach().clone()
    assert first.item() == pytest.approx(2 * 2.0 / 7**0.5)  # LSQ's start: 2 mean|x| / sqrt(qmax)
    q(torch.full((8,), 5.0))
    assert torch.equal(q.step.detach(), first)  # set once
    q.load_state_dict(fresh.state_dict())  # a state that was never initialised: start again
    q(torch.full((8,), 5.0))
    assert q.step.item() == pytest.approx(2 * 5.0 / 7**0.5)
