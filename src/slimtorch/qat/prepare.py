"""Turn a float model into a trainable quantized one (``prepare_qat``) and back into the post-training
modules and save format (``convert``).

The Plan is the post-training one (``slimtorch.spec``: layer name -> LayerPlan of weight and input
QuantSpecs): it says which layers are quantized and at how many bits, and whether an input is signed
(``int<b>``) or not (``uint<b>``). The method decides how the values are learned:

* ``lsq``: weights and inputs by learned steps (one per output channel for weights);
* ``pact``: DoReFa weights (``original`` levels) and PACT-clipped inputs;
* ``sat``: DoReFa weights (``modified`` levels) with SAT's rescaling of the last linear layer, and
  PACT inputs with SAT's calibrated clipping gradient.

:func:`qat_plan` builds the usual plan: every Linear/Conv2d at the given widths, the first and last
layer at 8 bits (LSQ's and SAT's convention), inputs unsigned where a sample batch shows they are
never negative.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.hooks import TemporaryHooks
from slimtorch.qat.dorefa import DoReFaWeight
from slimtorch.qat.lsq import LSQ
from slimtorch.qat.modules import QAT_TYPES, QATConv2d, QATLinear
from slimtorch.qat.pact import PACT
from slimtorch.quant.modules import QuantConv2d, QuantLinear, quant_type_for
from slimtorch.sequential import set_module
from slimtorch.spec import LayerPlan, PerChannel, PerTensor, Plan, QuantSpec

Quantizers = Callable[[str, nn.Module, LayerPlan, bool], tuple[nn.Module, nn.Module | None]]


def _lsq(name: str, layer: nn.Module, p: LayerPlan, last: bool):
    gran = PerTensor() if isinstance(p.weight.granularity, PerTensor) else PerChannel(0)  # groups: per channel
    wspec = QuantSpec(f"int{p.weight.bits}", gran)  # LSQ weights are signed and symmetric
    return LSQ(wspec, tuple(layer.weight.shape), weight=True), None if p.act is None else LSQ(p.act)


def _pact(name: str, layer: nn.Module, p: LayerPlan, last: bool):
    return (DoReFaWeight(p.weight.bits, "original"),
            None if p.act is None else PACT(p.act))


def _sat(name: str, layer: nn.Module, p: LayerPlan, last: bool):
    return (DoReFaWeight(p.weight.bits, "modified", rescale=last),
            None if p.act is None else PACT(p.act, calibrated=True))


METHODS: dict[str, Quantizers] = {"lsq": _lsq, "pact": _pact, "sat": _sat}


def _check_plan(model: nn.Module, plan: Plan) -> None:
    for name, p in plan.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise SlimError(f"the plan names layer {name!r}, which this model does not have") from None
        if quant_type_for(layer) is None or p.weight is None:
            raise SlimError(f"layer {name!r} ({type(layer).__name__}) cannot be trained quantized: QAT takes "
                            "Linear/Conv2d layers with a weight spec")
        for spec in (p.weight, p.act):
            if spec is not None and (spec.is_float or spec.dynamic):
                raise SlimError(f"layer {name!r}: QAT learns integer formats with static scales; got {spec.dtype}"
                                f"{' dynamic' if spec.dynamic else ''}")


def prepare_qat(model: nn.Module, plan: Plan, method: str | Quantizers = "lsq",
                match_std: bool | None = None) -> nn.Module:
    """Swap each planned layer for its QAT layer (in place; returns ``model``). ``method`` names one of
    ``METHODS`` or is itself a ``(name, layer, layer_plan, is_last_linear) -> (wq, aq)`` factory (AdaBits
    passes its own). Weight quantizers are initialised from the weights now, input quantizers from the
    first batch they see. ``match_std``: DoReFa weights keep the float weights' spread (see
    ``slimtorch.qat.dorefa``); None turns it on exactly when the model has no BatchNorm."""
    if isinstance(method, str) and method not in METHODS:
        raise SlimError(f"unknown QAT method {method!r}; choose one of: {', '.join(METHODS)}")
    make = METHODS[method] if isinstance(method, str) else method
    if not plan:
        raise SlimError("the QAT plan is empty: no layer to train quantized")
    _check_plan(model, plan)
    linears = [n for n in plan if isinstance(model.get_submodule(n), nn.Linear)]
    last = linears[-1] if linears else None
    if match_std is None:
        match_std = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for name, p in plan.items():
        layer = model.get_submodule(name)
        wq, aq = make(name, layer, p, name == last)
        if isinstance(wq, DoReFaWeight):
            wq.match_std = match_std
        wq = wq.to(layer.weight.device)
        aq = None if aq is None else aq.to(layer.weight.device)
        qat = (QATLinear if isinstance(layer, nn.Linear) else QATConv2d).from_float(layer, wq, aq)
        with torch.no_grad():
            wq(qat.weight)  # LSQ sets its step from the weight
        set_module(model, name, qat)
    return model


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Replace every QAT layer by the post-training QuantLinear / QuantConv2d holding the trained codes
    and scales (in place; returns ``model``). Its outputs equal the QAT model's in eval mode."""
    found = False
    for name, m in list(model.named_modules()):
        if not isinstance(m, QAT_TYPES):
            continue
        found = True
        wspec, codes, scale, zero = m.wq.export_weight(m.weight)
        qtype = QuantLinear if isinstance(m, QATLinear) else QuantConv2d
        aspec = None
        if m.aq is not None:
            aspec, ascale, azero = m.aq.export()
        new = qtype.from_float(m, wspec, aspec, (codes, scale.to(codes.device), zero.to(codes.device)))
        if m.aq is not None:
            new.act.scale, new.act.zero = ascale.to(codes.device), azero.to(codes.device)
        set_module(model, name, new)
    if not found:
        raise SlimError("the model has no QAT layers to convert; call prepare_qat first")
    return model


@torch.no_grad()
def qat_plan(model: nn.Module, w_bits: int, a_bits: int | None, sample: tuple, first_last_bits: int | None = 8,
             ignore: tuple[str, ...] = ()) -> Plan:
    """Every Linear/Conv2d of ``model`` (except ``ignore``) in the order they run on ``sample`` (a tuple of
    forward arguments): weights ``int<w_bits>`` per channel, inputs ``uint<a_bits>`` where the sample's
    inputs are never negative and ``int<a_bits>`` otherwise (no input quantization when ``a_bits`` is
    None). The first and last layers get ``first_last_bits`` (None: the same widths as the rest)."""
    for b in (w_bits, a_bits, first_last_bits):
        if b is not None and not 2 <= b <= 8:
            raise SlimError(f"bit-widths go from 2 to 8, got {b}")
    order: list[str] = []
    signed: dict[str, bool] = {}
    hooks = TemporaryHooks()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d) and quant_type_for(m) is not None and name not in ignore:
            def pre(mod, args, name=name):
                if name not in signed:
                    order.append(name)
                signed[name] = signed.get(name, False) or bool((args[0] < 0).any())
            hooks.before(m, pre)
    was_training = model.training
    model.eval()
    try:
        with hooks:
            model(*sample)
    finally:
        model.train(was_training)
    if not order:
        raise SlimError("the model has no Linear/Conv2d layer that ran on the sample")
    plan: Plan = {}
    for i, name in enumerate(order):
        edge = first_last_bits is not None and i in (0, len(order) - 1)
        wb = first_last_bits if edge else w_bits
        ab = None if a_bits is None else first_last_bits if edge else a_bits
        act = None if ab is None else QuantSpec(f"{'int' if signed[name] else 'uint'}{ab}", PerTensor(),
                                                symmetric=signed[name])
        plan[name] = LayerPlan(weight=QuantSpec(f"int{wb}", PerChannel(0)), act=act)
    return plan
