"""FracBits: mixed precision by learned fractional bit-widths (Yang & Jin, AAAI 2021; deJQK/FracBits),
and a cheap sensitivity-based baseline.

Each weight-quantized layer gets a learned width ``lam`` in [2, 8]. Its weights are the interpolation of
the two neighbouring integer widths, ``Q_lam(w) = (1 - f) Q_floor(w) + f Q_floor+1(w)``, ``f = lam -
floor(lam)`` (``lam`` gets its gradient through ``f``; the rounding inside ``Q`` is straight-through).
``Q_b`` is a symmetric quantizer over a learned per-channel clipping range ``c`` shared by all widths:
levels ``-(2^(b-1) - 1) .. 2^(b-1) - 1`` times ``c / (2^(b-1) - 1)`` (the official code's DoReFa levels
also share one range across widths; a learned range keeps the float scale, which LayerNorm networks need).

The budget is the weights' average bit-width ``sum_l n_l lam_l / sum_l n_l`` over the fractional layers
(``n_l`` weights each); the loss adds ``kappa |average - target|`` (the paper's ``kappa |cost - target|``
with model size as the cost). After ``hard_epoch`` epochs (the paper: 120 of 150) a bisection finds the
offset ``o`` for which ``round(lam + o)`` meets the budget, the widths are frozen as integers and training
goes on. The widths are trained by plain SGD (``TrainConfig.width_lr``, default here
``FRACBITS_WIDTH_LR``): under Adam every width moved by the same step and none separated. :func:`fracbits_plan` then gives the ordinary Plan (layer -> bits), which ``prepare_qat`` and
``quantize_plan_`` both take, and :func:`save_plan` / :func:`load_plan` store it as JSON.

:func:`sensitivity_bits` is the cheap baseline: each layer's loss increase when only it is rounded to
each candidate width, then a greedy allocation of the same budget (the upgrade with the best loss drop
per extra bit first).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.io.checkpoint import atomic_write_bytes
from slimtorch.qat.lazy import FirstBatchInit
from slimtorch.qat.lsq import LSQ
from slimtorch.qat.modules import QAT_TYPES
from slimtorch.qat.prepare import prepare_qat
from slimtorch.qat.ste import round_ste, scale_grad
from slimtorch.spec import LayerPlan, PerChannel, Plan, QuantSpec, spec_from_dict, spec_to_dict

MIN_BITS, MAX_BITS = 2, 8
FRACBITS_WIDTH_LR = 0.05  # plain SGD for the widths (TrainConfig.width_lr), the paper's learning rate


def range_quant(w: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric ``bits``-bit levels over ``[-clip, clip]`` (clip broadcasts), straight-through rounding."""
    qmax = 2 ** (bits - 1) - 1
    s = clip / qmax
    return round_ste(torch.clamp(w / s, -qmax, qmax)) * s


def frac_quant(w: torch.Tensor, clip: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``(1 - f) Q_b(w) + f Q_{b+1}(w)`` with ``b = floor(lam)``, ``f = lam - b`` (lam in [2, 8])."""
    lam = lam.clamp(MIN_BITS, MAX_BITS)
    b = min(int(math.floor(float(lam.detach()))), MAX_BITS - 1)
    f = lam - b
    return (1 - f) * range_quant(w, clip, b) + f * range_quant(w, clip, b + 1)


class FracWeight(FirstBatchInit):
    """Weight quantizer with a learned fractional width ``lam`` (scalar) and per-channel range ``clip``;
    after :meth:`harden` it is an ordinary ``bits``-bit quantizer (``hard_bits``)."""

    def __init__(self, shape: tuple[int, ...], init_bits: float) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(float(init_bits)))
        self.clip = nn.Parameter(torch.ones((shape[0],) + (1,) * (len(shape) - 1)))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("hard_bits", torch.tensor(-1))

    def _clip(self, w: torch.Tensor) -> torch.Tensor:
        if self.needs_init():
            with torch.no_grad():  # LSQ's start at the upper width: clip = qmax * 2 mean|w| / sqrt(qmax)
                qmax = 2 ** (self.bits_now() - 1) - 1
                self.clip.copy_(2 * w.abs().mean(dim=tuple(range(1, w.ndim)), keepdim=True) * math.sqrt(qmax))
                self.initialized.fill_(True)
        g = 1.0 / math.sqrt(w[0].numel() * (2 ** (self.bits_now() - 1) - 1))
        return scale_grad(self.clip.abs().clamp(min=1e-8), g).to(w.dtype)

    _hard: int | None = None  # hard_bits on the Python side (reading the buffer waits for the GPU)

    def hard(self) -> int:
        """The assigned width, or a value <= 0 while the width is fractional."""
        if self._hard is None:
            self._hard = int(self.hard_bits)
        return self._hard

    def bits_now(self) -> int:
        return self.hard() if self.hard() > 0 else min(math.ceil(float(self.lam.detach())), MAX_BITS)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        clip = self._clip(w)
        if self.hard() > 0:
            return range_quant(w, clip, self.hard())
        return frac_quant(w, clip, self.lam)

    def harden(self, bits: int) -> None:
        self.hard_bits.fill_(bits)
        self._hard = int(bits)
        self.lam.requires_grad_(False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._hard = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def export_weight(self, w: torch.Tensor):
        """(spec, codes (out, -1), scale (out, 1), zero) of the hardened quantizer."""
        if self.hard() <= 0:
            raise SlimError("FracBits widths are still fractional; harden them (hard assignment) before export")
        b = self.hard()
        qmax = 2 ** (b - 1) - 1
        scale = (self.clip.detach().abs().clamp(min=1e-8).float() / qmax).reshape(-1, 1)
        codes = torch.round(torch.clamp(w.detach().float().reshape(w.shape[0], -1) / scale, -qmax, qmax))
        return QuantSpec(f"int{b}", PerChannel(0)), codes.to(torch.int8), scale, torch.zeros_like(scale)

    def extra_repr(self) -> str:
        return f"lam={float(self.lam.detach()):.3f}, hard_bits={self.hard()}"


def prepare_fracbits(model: nn.Module, plan: Plan, init_bits: float) -> nn.Module:
    """QAT layers for ``plan`` (in place): layers whose plan has 8-bit weights (the edges) stay fixed
    LSQ, the others get a :class:`FracWeight` starting at ``init_bits``; inputs are LSQ as in the plan."""

    def quantizers(name: str, layer: nn.Module, p: LayerPlan, last: bool):
        aq = None if p.act is None else LSQ(p.act)
        if p.weight.bits == MAX_BITS:
            return LSQ(QuantSpec(f"int{MAX_BITS}", PerChannel(0)), tuple(layer.weight.shape), weight=True), aq
        return FracWeight(tuple(layer.weight.shape), init_bits), aq

    return prepare_qat(model, plan, quantizers)


def _frac_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QAT_TYPES) and isinstance(m.wq, FracWeight)]


def average_bits(model: nn.Module) -> torch.Tensor:
    """The weights' average width over the fractional layers (differentiable in ``lam``)."""
    layers = _frac_layers(model)
    if not layers:
        raise SlimError("the model has no FracBits layers; call prepare_fracbits first")
    n = torch.tensor([float(m.weight.numel()) for _, m in layers], device=layers[0][1].weight.device)
    lam = torch.stack([m.wq.lam.clamp(MIN_BITS, MAX_BITS) if m.wq.hard() <= 0 else m.wq.hard_bits.float()
                       for _, m in layers])
    return (n * lam).sum() / n.sum()


def budget_penalty(model: nn.Module, target: float, kappa: float = 1.0) -> torch.Tensor:
    return kappa * (average_bits(model) - target).abs()


def assign_bits(lams: list[float], sizes: list[int], target: float, trials: int = 30) -> list[int]:
    """Integer widths ``clamp(round(lam + o), 2, 8)`` with the largest offset ``o`` (bisection) whose
    average width (weighted by ``sizes``) does not exceed ``target``."""
    n = sum(sizes)

    def widths(o: float) -> list[int]:
        return [int(min(max(round(lam + o), MIN_BITS), MAX_BITS)) for lam in lams]

    def avg(o: float) -> float:
        return sum(b * s for b, s in zip(widths(o), sizes)) / n

    if avg(-MAX_BITS) > target + 1e-9:
        raise SlimError(f"a budget of {target} bits is below the {MIN_BITS}-bit minimum")
    lo, hi = -float(MAX_BITS), float(MAX_BITS)
    for _ in range(trials):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) <= target + 1e-9 else (lo, mid)
    return widths(lo)


def harden(model: nn.Module, target: float) -> dict[str, int]:
    """Freeze every fractional width to an integer meeting the ``target`` average; returns layer -> bits."""
    layers = _frac_layers(model)
    bits = assign_bits([float(m.wq.lam.detach()) for _, m in layers], [m.weight.numel() for _, m in layers], target)
    for (_, m), b in zip(layers, bits):
        m.wq.harden(b)
    return {n: b for (n, _), b in zip(layers, bits)}


def is_hard(model: nn.Module) -> bool:
    """Whether the fractional widths have been frozen to integers."""
    return any(m.wq.hard() > 0 for _, m in _frac_layers(model))


def training_hooks(target: float, epochs: int, hard_fraction: float = 0.8):
    """``(on_epoch, penalty)`` for ``train_student``: the budget term, and the hard assignment before epoch
    ``round(hard_fraction * epochs)`` (at least 1; the paper: 120 of 150)."""
    hard_epoch = max(1, round(hard_fraction * epochs))

    def on_epoch(model: nn.Module, epoch: int, _epochs: int) -> None:
        if epoch >= hard_epoch and not is_hard(model):
            harden(model, target)

    return on_epoch, lambda model: budget_penalty(model, target)


def final_plan(model: nn.Module, plan: Plan, target: float) -> Plan:
    """The trained model's Plan; widths still fractional (training ended before the hard assignment) are
    hardened first."""
    if not is_hard(model):
        harden(model, target)
    return fracbits_plan(model, plan)


def fracbits_plan(model: nn.Module, plan: Plan) -> Plan:
    """``plan`` with each hardened FracBits layer's weight width."""
    out = dict(plan)
    for name, m in _frac_layers(model):
        if m.wq.hard() <= 0:
            raise SlimError(f"layer {name!r} still has a fractional width; harden the model first")
        out[name] = LayerPlan(weight=QuantSpec(f"int{m.wq.hard()}", PerChannel(0)), act=plan[name].act)
    return out


def with_weight_bits(plan: Plan, bits: dict[str, int]) -> Plan:
    """``plan`` with the weight widths of ``bits`` (layer -> bits) replaced, granularity kept."""
    return {n: LayerPlan(weight=QuantSpec(f"int{bits[n]}", p.weight.granularity), act=p.act) if n in bits else p
            for n, p in plan.items()}


def save_plan(path: Path, plan: Plan, meta: dict | None = None) -> None:
    """Write ``plan`` as JSON (atomic): ``{"layers": {name: {"weight": spec, "act": spec}}, "meta": ...}``."""
    raw = {"layers": {n: {"weight": spec_to_dict(p.weight), "act": spec_to_dict(p.act)} for n, p in plan.items()},
           "meta": meta or {}}
    atomic_write_bytes(Path(path), (json.dumps(raw, indent=2) + "\n").encode())


def load_plan(path: Path) -> Plan:
    """Read a plan written by :func:`save_plan`."""
    try:
        raw = json.loads(Path(path).read_text())
        return {n: LayerPlan(weight=spec_from_dict(d["weight"]), act=spec_from_dict(d.get("act")))
                for n, d in raw["layers"].items()}
    except FileNotFoundError:
        raise SlimError(f"plan file {path} does not exist") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SlimError(f"plan file {path} is not a slimtorch plan: {exc}") from None


@torch.no_grad()
def sensitivity_bits(model: nn.Module, plan: Plan, batch: torch.Tensor, target: float,
                     candidates: tuple[int, ...] = (2, 3, 4, 5, 6, 8)) -> dict[str, int]:
    """The baseline: widths for the plan's non-8-bit layers from their loss sensitivity (KL to the float
    output on ``batch`` when only that layer's weights are rounded, per channel, to each width), then a
    greedy allocation of the ``target`` average (start at the lowest width; repeatedly take the upgrade
    with the largest loss drop per extra weight bit that fits)."""
    model.eval()
    ref = F.log_softmax(model(batch).float(), -1)
    layers = [n for n, p in plan.items() if p.weight.bits != MAX_BITS]
    if not layers:
        raise SlimError("the plan has no layer below 8 bits to allocate")
    loss: dict[tuple[str, int], float] = {}
    for name in layers:
        layer = model.get_submodule(name)
        w = layer.weight.data.clone()
        for b in candidates:
            qmax = 2 ** (b - 1) - 1
            s = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp(min=1e-12) / qmax
            layer.weight.data = torch.round(w / s).clamp(-qmax, qmax) * s
            out = F.log_softmax(model(batch).float(), -1)
            loss[name, b] = float(F.kl_div(out, ref, log_target=True, reduction="batchmean"))
        layer.weight.data = w
    sizes = {n: model.get_submodule(n).weight.numel() for n in layers}
    budget = target * sum(sizes.values())
    bits = {n: candidates[0] for n in layers}
    used = sum(bits[n] * sizes[n] for n in layers)
    while True:
        best, gain = None, 0.0
        for n in layers:
            i = candidates.index(bits[n])
            if i + 1 == len(candidates):
                continue
            nb = candidates[i + 1]
            extra = (nb - bits[n]) * sizes[n]
            if used + extra > budget + 1e-6:
                continue
            g = (loss[n, bits[n]] - loss[n, nb]) / extra
            if best is None or g > gain:
                best, gain = n, g
        if best is None:
            return bits
        nb = candidates[candidates.index(bits[best]) + 1]
        used += (nb - bits[best]) * sizes[best]
        bits[best] = nb
