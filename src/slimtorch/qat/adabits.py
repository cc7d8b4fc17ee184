"""AdaBits: one set of weights trained jointly for several bit-widths (Jin, Yang, Liao, CVPR 2020).

Following the official code (deJQK/AdaBits):

* weights: DoReFa with floor levels ``k = floor(2^b u)``, so a lower width is a higher one with its
  low bits dropped (``k_b = k_8 >> (8 - b)``); the last linear layer SAT-rescaled. The code's default
  maps ``k`` to the ``modified`` levels ``(k - 2^(b-1)) / 2^(b-1)``; we default to the ``centered`` ones
  (half a step higher, symmetric about 0), which its README recommends for zero-mean weights and which
  keep the same codes, hence the same bit-dropping. At 2 bits ``modified`` is {-1, -1/2, 0, 1/2}: small
  positive weights go to 0 and small negative ones to -1/2. Trained alone at 2 bits on fmnist-cnn (one
  epoch on 6,000 images, CPU) it reached 32.2% top-1, ``centered`` 84.6%;
* inputs: PACT with SAT's calibrated gradient and a *switchable clipping level* (one alpha per width);
* *switchable batch norm*: one BatchNorm2d per width;
* joint training: each batch runs forward/backward once per width, gradients add up, then one
  optimizer step (``train_student(..., variants=widths_variants(model, widths))``);
* the first and last layers keep 8 bits (the plan's edges), the rest switch with :func:`set_bits`.

:func:`export_width` freezes the model at one width (plain BatchNorm2d, core quantized modules), ready
for ``save_quantized``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.qat.dorefa import DoReFaWeight
from slimtorch.qat.lazy import FirstBatchInit
from slimtorch.qat.pact import initial_alpha, pact_fake_quant
from slimtorch.qat.prepare import convert, prepare_qat
from slimtorch.sequential import set_module
from slimtorch.spec import INT_RANGES, LayerPlan, PerTensor, Plan, QuantSpec


class SwitchablePACT(FirstBatchInit):
    """Calibrated PACT with one learned clipping level per width; ``bits`` selects the current one.
    Each level starts from the first batch seen at its width (as :class:`~slimtorch.qat.pact.PACT`)."""

    def __init__(self, widths: tuple[int, ...], signed: bool) -> None:
        super().__init__()
        self.widths, self.signed, self.bits = tuple(widths), signed, max(widths)
        self.alpha = nn.Parameter(torch.ones(len(widths)))
        self.register_buffer("initialized", torch.zeros(len(widths), dtype=torch.bool))

    def _range(self) -> tuple[int, int]:
        return INT_RANGES[f"{'int' if self.signed else 'uint'}{self.bits}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.widths.index(self.bits)
        qmin, qmax = self._range()
        if self.needs_init(i):
            with torch.no_grad():
                self.alpha[i] = initial_alpha(x, qmax)
                self.initialized[i] = True
        return pact_fake_quant(x, self.alpha[i].abs().clamp(min=1e-4).to(x.dtype), qmin, qmax, calibrated=True)

    def export(self) -> tuple[QuantSpec, torch.Tensor, torch.Tensor]:
        qmin, qmax = self._range()
        scale = self.alpha[self.widths.index(self.bits)].detach().abs().clamp(min=1e-4).float() / qmax
        spec = QuantSpec(f"{'int' if self.signed else 'uint'}{self.bits}", PerTensor(), symmetric=self.signed)
        return spec, scale, torch.zeros_like(scale)

    def extra_repr(self) -> str:
        return f"widths={self.widths}, bits={self.bits}, signed={self.signed}"


class SwitchableBatchNorm2d(nn.Module):
    """One BatchNorm2d per width, all starting from the float model's; ``bits`` selects one."""

    def __init__(self, bn: nn.BatchNorm2d, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.widths, self.bits = tuple(widths), max(widths)
        self.bns = nn.ModuleList(copy.deepcopy(bn) for _ in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[self.widths.index(self.bits)](x)


def prepare_adabits(model: nn.Module, plan: Plan, widths: tuple[int, ...], scheme: str = "centered") -> nn.Module:
    """AdaBits layers for ``plan`` (in place): layers whose plan has 8-bit weights (the edges of
    ``qat_plan(..., first_last_bits=8)``) stay at 8 bits, the others switch among ``widths``; every
    BatchNorm2d becomes switchable. ``scheme`` is the weights' DoReFa levels, ``centered`` or the
    official code's ``modified`` (both drop low bits to switch down)."""
    widths = tuple(sorted(set(widths), reverse=True))
    if not widths or min(widths) < 2 or max(widths) > 8:
        raise SlimError(f"AdaBits widths go from 2 to 8, got {widths}")
    if scheme not in ("centered", "modified"):
        raise SlimError(f"AdaBits weight levels are 'centered' or 'modified', got {scheme!r}")

    def quantizers(name: str, layer: nn.Module, p: LayerPlan, last: bool):
        fixed = p.weight.bits == 8
        wq = DoReFaWeight(8 if fixed else max(widths), scheme, rescale=last)
        wq.switches = not fixed
        aq = None
        if p.act is not None:
            aq = SwitchablePACT((p.act.bits,) if fixed else widths, signed=p.act.dtype.startswith("int"))
            aq.bits = p.act.bits if fixed else max(widths)
        return wq, aq

    prepare_qat(model, plan, quantizers)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            set_module(model, name, SwitchableBatchNorm2d(m, widths))
    return model


def set_bits(model: nn.Module, bits: int) -> None:
    """Switch every switchable quantizer and batch norm of ``model`` to ``bits``."""
    found = False
    for m in model.modules():
        if isinstance(m, SwitchableBatchNorm2d) or (isinstance(m, SwitchablePACT) and len(m.widths) > 1):
            if bits not in m.widths:
                raise SlimError(f"width {bits} is not one of the trained widths {m.widths}")
            m.bits, found = bits, True
        elif isinstance(m, DoReFaWeight) and getattr(m, "switches", False):
            m.bits, found = bits, True
    if not found:
        raise SlimError("the model has no AdaBits layers; call prepare_adabits first")


def evaluate_widths(evaluate: Callable[[nn.Module], float], widths: tuple[int, ...]) -> Callable[[nn.Module], dict]:
    """``train_student``'s ``evaluate`` for an AdaBits model: ``evaluate`` at each width, ``{"8": ..., "6": ...}``."""
    def run(model: nn.Module) -> dict:
        out = {}
        for b in widths:
            set_bits(model, b)
            out[str(b)] = evaluate(model)
        return out
    return run


def widths_variants(widths: tuple[int, ...]) -> list[Callable[[nn.Module], None]]:
    """One ``model -> None`` switch per width, for ``train_student``'s joint training."""
    return [lambda m, b=b: set_bits(m, b) for b in sorted(widths, reverse=True)]


@torch.no_grad()
def export_width(model: nn.Module, bits: int) -> nn.Module:
    """The model at one width (in place): its BatchNorms, quantizers and levels frozen into plain
    BatchNorm2d and the core's quantized modules."""
    set_bits(model, bits)
    for name, m in list(model.named_modules()):
        if isinstance(m, SwitchableBatchNorm2d):
            set_module(model, name, m.bns[m.widths.index(bits)])
    return convert(model)
