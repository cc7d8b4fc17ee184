"""Activation ranges for diffusion models: one static range per timestep group, and shortcut splitting.

Why: a diffusion network sees inputs whose statistics drift along the trajectory (near-pure noise at
t ~ T, almost clean images at t ~ 0), so one static range per layer either clips the late steps or wastes
levels on the early ones (PTQ4DM, Q-Diffusion, TDQ). :class:`GroupedActQuant` keeps one range per group of
timesteps and picks each sample's range from its own t, on the device (no host sync, mixed-t batches
allowed). And the 1x1 shortcut conv of a UNet decoder block takes the concatenation of the running deep
feature and a shallow skip, whose ranges differ by an order of magnitude; Q-Diffusion's shortcut-splitting
quantizes the two parts separately (:class:`SplitActQuant`).

:func:`refine_activation_ranges_` applies both to a model already quantized with static activations
(``apply_(model, PTQConfig(preset), batches)``) and recalibrates the replaced quantizers on the same
``(x_t, t, y)`` batches, split by group. Where a layer runs on a GPU kernel that quantizes activations
itself (per row, dynamically: the DiT's linears), its static ranges are not used there; they serve the
reference path (the UNet's convs, any CPU run).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.hooks import ModuleHook, attach, attached, detach
from slimtorch.quant import primitives as P
from slimtorch.quant.modules import ActQuant, QuantConv2d, QuantWeight
from slimtorch.quantize import calibrate_activations
from slimtorch.spec import QuantSpec


class TimestepGroups:
    """Which group each sample's timestep falls in: ``groups`` equal spans of [0, steps). The model's
    forward pre-hook (:meth:`attach`) stores the ids of the current call; quantizers read them."""

    def __init__(self, groups: int, steps: int = 1000) -> None:
        if groups < 1 or groups > steps:
            raise SlimError(f"timestep groups must be 1..{steps}, got {groups}")
        self.groups, self.steps = groups, steps
        self.bounds = torch.tensor([steps * g / groups for g in range(1, groups)])
        self.ids: torch.Tensor | None = None

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) steps -> (B,) group ids (long, on t's device)."""
        return torch.bucketize(t.float(), self.bounds.to(t.device), right=True)

    def attach(self, model: nn.Module) -> None:
        """Attach the pre-hook that reads ``t`` (the model's second argument, or ``t=``) to ``model``,
        replacing one attached before."""
        if _TimestepHook.name in attached(model):
            detach(model, _TimestepHook.name)
        attach(model, _TimestepHook(self))


class _TimestepHook(ModuleHook):
    """Stores the group ids of each call's timesteps in its :class:`TimestepGroups`."""

    name = "timestep-groups"

    def __init__(self, groups: TimestepGroups) -> None:
        self.groups = groups

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        t = args[1] if len(args) > 1 else kwargs.get("t")
        if t is None:
            raise SlimError("timestep-group activation ranges need the model called as model(x, t, ...)")
        t = torch.as_tensor(t, device=args[0].device)
        self.groups.ids = self.groups.of(t.expand(args[0].shape[0]) if t.ndim == 0 else t)
        return args, kwargs


class GroupedActQuant(nn.Module):
    """A static per-tensor quantizer with one range per timestep group (buffers ``scale``, ``zero``: (G,))."""

    def __init__(self, spec: QuantSpec, groups: TimestepGroups, scale: torch.Tensor, zero: torch.Tensor) -> None:
        super().__init__()
        self.spec, self.state = spec, groups
        self.register_buffer("scale", scale.reshape(groups.groups).float())
        self.register_buffer("zero", zero.reshape(groups.groups).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.state.ids
        if ids is None or ids.shape[0] != x.shape[0]:
            raise SlimError("timestep-group quantizer: its input's first dimension is not the model's batch")
        shape = (-1,) + (1,) * (x.dim() - 1)
        return P.fake_quant(x, self.scale[ids].view(shape), self.zero[ids].view(shape), self.spec)

    def extra_repr(self) -> str:
        return f"{self.spec.dtype}, {self.state.groups} timestep groups"


class SplitActQuant(nn.Module):
    """Quantizes channels ``[:split]`` and ``[split:]`` of its input (dim 1) with separate quantizers."""

    def __init__(self, head: nn.Module, tail: nn.Module, split: int) -> None:
        super().__init__()
        self.head, self.tail, self.split = head, tail, split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.head(x[:, :self.split]), self.tail(x[:, self.split:])], dim=1)

    def extra_repr(self) -> str:
        return f"split={self.split}"


def shortcut_splits(model: nn.Module) -> dict[str, int]:
    """{name of a shortcut conv: channels of the running tensor in its concatenated input} for every
    decoder block whose 1x1 shortcut takes ``cat([h, skip])`` (ResBlocks built with ``concat_split``)."""
    out = {}
    for name, m in model.named_modules():
        split = getattr(m, "concat_split", None)
        if split is not None and isinstance(getattr(m, "skip", None), QuantConv2d | nn.Conv2d):
            out[f"{name}.skip" if name else "skip"] = split
    return out


def _static_layers(model: nn.Module) -> dict[str, QuantWeight]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QuantWeight) and isinstance(m.act, ActQuant) and not m.act.spec.dynamic}


def _by_group(batches: list[tuple], groups: TimestepGroups) -> list[list[tuple]]:
    """The (x_t, t, y, ...) batches split by the group of each sample's t."""
    out: list[list[tuple]] = [[] for _ in range(groups.groups)]
    for b in batches:
        ids = groups.of(b[1]).to(b[1].device)
        for g in ids.unique().tolist():
            keep = ids == g
            out[g].append(tuple(v[keep] if torch.is_tensor(v) and v.shape[:1] == ids.shape else v for v in b))
    return out


def refine_activation_ranges_(model: nn.Module, batches: list[tuple], groups: int = 1, split: bool = True,
                              steps: int = 1000) -> dict:
    """Replace the static input quantizers of ``model`` (quantized by apply_) by per-timestep-group ranges
    (``groups`` > 1) and split quantizers on the shortcut convs of concatenations (``split``), calibrated on
    ``batches`` of ``(x_t, t, y)``. Returns {"groups", "split_layers", "layers", "range_spread"}: the last,
    per layer, the largest over the smallest group scale (how much the range drifts over the trajectory)."""
    layers = _static_layers(model)
    if not layers:
        raise SlimError("no static activation quantizers to refine: quantize with a static-activation preset first")
    if not batches:
        raise SlimError("refining activation ranges needs calibration batches (x_t, t, y)")
    tg = TimestepGroups(groups, steps)
    per_group = _by_group(batches, tg)
    empty = [g for g, bs in enumerate(per_group) if not bs]
    if empty:
        raise SlimError(f"timestep groups {empty} got no calibration samples; use fewer groups or more steps")
    splits = shortcut_splits(model) if split else {}
    spec_of = {n: m.act.spec for n, m in layers.items()}
    parts = {n: (2 if n in splits else 1) for n in layers}
    # (layer, part) -> per-group (scale, zero); each group calibrates fresh quantizers (with one group, those
    # are the result)
    found: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for gb in per_group:
        fresh = {}
        for n, m in layers.items():
            qs = [ActQuant(spec_of[n]).to(m.qweight.device) for _ in range(parts[n])]
            m.act = SplitActQuant(qs[0], qs[1], splits[n]) if parts[n] == 2 else qs[0]
            fresh[n] = qs
        calibrate_activations(model, gb, quantizers=[q for qs in fresh.values() for q in qs])
        for n, qs in fresh.items():
            for i, q in enumerate(qs):
                found.setdefault((n, i), []).append((q.scale, q.zero))
    spread = {}
    if groups > 1:
        tg.attach(model)
        for n, m in layers.items():
            qs = []
            for i in range(parts[n]):
                s = torch.stack([sz[0].reshape(()) for sz in found[(n, i)]])
                z = torch.stack([sz[1].reshape(()) for sz in found[(n, i)]])
                qs.append(GroupedActQuant(spec_of[n], tg, s, z).to(m.qweight.device))
                spread[n if parts[n] == 1 else f"{n}[{i}]"] = float(s.max() / s.min())
            m.act = SplitActQuant(qs[0], qs[1], splits[n]) if parts[n] == 2 else qs[0]
    return {"groups": groups, "split_layers": len(splits), "layers": len(layers), "range_spread": spread}
