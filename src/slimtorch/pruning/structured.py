"""Structured (width) pruning of channel groups as a family of ``apply_``: ``StructuredConfig`` removes the
least important ``ratio`` of each group's channels (pruning/graph.py: MLP neurons, a CNN block's inner
channels, a CNN stage's residual channels), giving a physically smaller dense model.

Importance of channel j of a group (producers P, consumers C, per-channel members M):

* ``magnitude``: the L2 norm of everything the channel owns, ``sqrt(sum_P ||P[j]||^2 + sum_C ||C[:, j]||^2)``;
* ``activation``: ``sum_C mean |x_j| * ||C[:, j]||``, the average size of what the channel adds to the
  consumers' outputs over the calibration data (Minitron-style activation importance, made output-aware);
* ``taylor``: ``sum over P, C, M of |w * dL/dw|`` over the channel's weights (first-order Taylor estimate of
  the loss change when the channel goes, as in Molchanov et al. 2019 and torch-pruning's group Taylor), with
  the gradient of the cross-entropy against the model's own predictions, so no labels are needed.

With ``heads=True`` attention heads are pruned too (pruning/heads.py: a unit is a KV head with its query
heads), by the same ratio (rounded to the nearest whole head, at least one) and the same importance summed
over each head's channels.

``budget`` instead of ``ratio``: the fraction of the model's FLOPs (``measure="flops"``, multiply-adds of its
Linear/Conv calls on the calibration batch) or parameters to keep; the one ratio for every group that meets
it is found by bisection on the exact counts, computed without pruning.

The kept count is rounded down to a multiple of ``align`` (8 by default: widths tensor cores like) and is at
least ``align``. A LayerNorm inside a group keeps normalising over the channels that are left, so its output
is not exactly the masked original's; BatchNorm and everything else is exact. Config fields of the model (a
transformers ``intermediate_size``) are not changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.api import Report, handler
from slimtorch.errors import SlimError
from slimtorch.hooks import TemporaryHooks
from slimtorch.progress import Progress
from slimtorch.pruning.graph import ChannelGroup, channel_groups, requires_grad_only
from slimtorch.pruning.heads import HeadGroup, head_groups, set_heads_
from slimtorch.sequential import Batch, collect, first_tensor

IMPORTANCE = ("magnitude", "activation", "taylor")
MEASURES = ("flops", "params")


@dataclass(frozen=True)
class StructuredConfig:
    """``ratio`` of each channel group removed, or ``budget``: the fraction of ``measure`` (flops or params)
    kept; ``importance`` magnitude, activation or taylor; ``align``."""

    ratio: float = 0.25
    importance: str = "activation"
    align: int = 8
    budget: float | None = None
    measure: str = "flops"
    heads: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise SlimError(f"structured pruning ratio must be in [0, 1); got {self.ratio}")
        if self.importance not in IMPORTANCE:
            raise SlimError(f"importance {self.importance!r}: choose one of {', '.join(IMPORTANCE)}")
        if not 1 <= self.align <= 1024:
            raise SlimError(f"align must be 1..1024; got {self.align}")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise SlimError(f"budget is the fraction kept, in (0, 1]; got {self.budget}")
        if self.measure not in MEASURES:
            raise SlimError(f"measure {self.measure!r}: choose one of {', '.join(MEASURES)}")


@dataclass(kw_only=True)
class StructuredReport(Report):
    groups: dict[str, tuple[int, int]]  # group (its first consumer) -> (width before, after)
    ratio: float
    params_before: int
    params_after: int
    flops_before: int  # multiply-adds of the Linear/Conv calls for the first calibration batch
    flops_after: int


def kept_width(width: int, ratio: float, align: int) -> int:
    """Channels kept: ``width * (1 - ratio)`` rounded down to a multiple of ``align``, at least ``align``
    (or the whole width when it is smaller)."""
    keep = int(width * (1.0 - ratio)) // align * align
    return min(width, max(keep, align))


def _dense_weight(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().float()


def _in_columns(m: nn.Module) -> torch.Tensor:
    """(in channels, rest) view of a dense layer's weight, one row per input channel."""
    w = _dense_weight(m)
    return w.transpose(0, 1).reshape(w.shape[1], -1)


def importance(model: nn.Module, group: ChannelGroup | HeadGroup, kind: str, input_mean_abs: dict | None = None,
               grads: dict | None = None) -> torch.Tensor:
    """(width,) importance of each unit (channel, or head) of ``group`` (module docstring)."""
    get = model.get_submodule
    if kind == "activation":
        return sum(group.per_unit(c, input_mean_abs[c].float() * _in_columns(get(c)).norm(dim=1))
                   for c in group.consumers)
    if kind == "magnitude":
        rows = sum(group.per_unit(p, _dense_weight(get(p)).flatten(1).pow(2).sum(1)) for p in group.producers)
        return (rows + sum(group.per_unit(c, _in_columns(get(c)).pow(2).sum(1)) for c in group.consumers)).sqrt()
    score = 0
    for name in group.producers + group.consumers + group.members:
        for pname, p in get(name).named_parameters(recurse=False):
            wg = (p.detach().float() * grads[f"{name}.{pname}"]).abs()
            if name in group.consumers and pname == "weight":
                score = score + group.per_unit(name, wg.transpose(0, 1).reshape(wg.shape[1], -1).sum(1))
            elif not (name in group.consumers and pname == "bias"):
                score = score + group.per_unit(name, wg.reshape(wg.shape[0], -1).sum(1))
    return score


class _MeanAbs:
    """Mean |x_j| of each input channel over what a layer sees (channel dim 1 for a conv, last for a Linear)."""

    def __init__(self, layer: nn.Module) -> None:
        self.dim = -1 if isinstance(layer, nn.Linear) else 1
        self.sum, self.rows = 0, 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().movedim(self.dim, -1)
        x = x.reshape(-1, x.shape[-1])
        self.sum, self.rows = self.sum + x.abs().sum(0), self.rows + x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.rows


def _input_mean_abs(model: nn.Module, groups: list[ChannelGroup], calib: list[Batch]) -> dict[str, torch.Tensor]:
    names = {c for g in groups for c in g.consumers}
    stats = collect({c: model.get_submodule(c) for c in names}, _MeanAbs,
                    lambda: [model(*batch) for batch in calib])
    return {n: st.mean for n, st in stats.items()}


def _taylor_grads(model: nn.Module, groups: list[ChannelGroup], calib: list[Batch]) -> dict[str, torch.Tensor]:
    """Gradient, summed over the calibration batches, of the cross-entropy of the model's logits against its
    own argmax, for every parameter of every group layer."""
    names = {n for g in groups for n in g.producers + g.consumers + g.members}
    params = {f"{n}.{pn}": p for n in names for pn, p in model.get_submodule(n).named_parameters(recurse=False)}
    for p in params.values():
        p.grad = None
    try:
        with requires_grad_only(model, params.values()), torch.enable_grad():
            for batch in calib:
                logits = first_tensor(model(*batch)).float()
                logits = logits.reshape(-1, logits.shape[-1])
                F.cross_entropy(logits, logits.argmax(-1)).backward()
        return {k: (p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                for k, p in params.items()}
    finally:
        for p in params.values():
            p.grad = None


def _dense_macs(model: nn.Module, example: Batch) -> dict[str, int]:
    """Multiply-adds of each Linear/Conv call on ``example`` (summed over calls)."""
    macs: dict[str, int] = {}
    with TemporaryHooks() as hooks, torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                def count(mod, a, o, name=name):
                    per_out = mod.weight[0].numel()  # in/groups * kernel for a conv, in for a Linear
                    macs[name] = macs.get(name, 0) + o.numel() * per_out
                hooks.after(m, count)
        model(*example)
    return macs


def kept_fractions(groups: list, keep: dict[str, int]) -> tuple[dict[str, float], dict[str, float]]:
    """(layer -> fraction of its output channels kept, layer -> fraction of its input channels kept) once
    each group keeps ``keep[group.name]`` units (members: their one channel dimension, as output)."""
    fo: dict[str, float] = {}
    fi: dict[str, float] = {}
    for g in groups:
        f = keep[g.name] / g.width
        for p in g.producers + g.members:
            fo[p] = f
        for c in g.consumers:
            fi[c] = f
    return fo, fi


def _counts(model: nn.Module, groups: list, keep: dict[str, int], macs: dict[str, int]
            ) -> tuple[int, int]:
    """(params, multiply-adds) of ``model`` once each group keeps ``keep[group.name]`` channels."""
    fo, fi = kept_fractions(groups, keep)
    members = {m for g in groups for m in g.members}
    params = 0.0
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            o = fo.get(name, 1.0)
            params += p.numel() * (o * fi.get(name, 1.0) if pname == "weight" and name not in members else o)
    flops = sum(n * fo.get(k, 1.0) * fi.get(k, 1.0) for k, n in macs.items())
    return round(params), round(flops)


def _keep_all(groups: list, ratio: float, align: int) -> dict[str, int]:
    return {g.name: (max(1, round(g.width * (1.0 - ratio))) if isinstance(g, HeadGroup)
                     else kept_width(g.width, ratio, align)) for g in groups}


def smallest_ratio(groups: list, align: int, fits: Callable[[dict[str, int]], bool], unmet: str) -> float:
    """The smallest uniform ratio whose widths (``_keep_all``) ``fits`` accepts, by bisection (widths are
    integers, so a budget is met from below); SlimError ``unmet`` when not even the narrowest widths fit."""
    lo, hi = 0.0, 0.999
    if not fits(_keep_all(groups, hi, align)):
        raise SlimError(unmet)
    for _ in range(40):
        mid = (lo + hi) / 2
        if fits(_keep_all(groups, mid, align)):
            hi = mid
        else:
            lo = mid
    return hi


def _ratio_for_budget(model, groups, macs, config: StructuredConfig) -> float:
    """The smallest uniform ratio whose pruned model keeps at most ``budget`` of the measure (exact counts)."""
    idx = 1 if config.measure == "flops" else 0
    full = _counts(model, groups, {g.name: g.width for g in groups}, macs)[idx]
    return smallest_ratio(groups, config.align,
                          lambda keep: _counts(model, groups, keep, macs)[idx] <= config.budget * full,
                          f"a {config.measure} budget of {config.budget:.0%} cannot be met by width pruning of "
                          f"this model's channel groups (the layers outside them are too large)")


def _narrow_(mod: nn.Module, idx: torch.Tensor, role: str) -> None:
    """Keep channels ``idx`` of ``mod`` in place: output rows of a producer, input columns of a consumer,
    every per-channel tensor of a member."""
    idx = idx.to(mod.weight.device)
    k = len(idx)

    def cut(name: str, dim: int) -> None:
        t = getattr(mod, name, None)
        if t is None:
            return
        new = t.detach().index_select(dim, idx).clone()
        if isinstance(t, nn.Parameter):
            setattr(mod, name, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            setattr(mod, name, new)

    if role == "consumer":
        cut("weight", 1)
        if isinstance(mod, nn.Linear):
            mod.in_features = k
        else:
            mod.in_channels = k
        return
    cut("weight", 0)
    cut("bias", 0)
    if isinstance(mod, nn.Linear):
        mod.out_features = k
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = (k,)
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        cut("running_mean", 0)
        cut("running_var", 0)
        mod.num_features = k
    else:  # conv: a producer, or a depthwise member
        mod.out_channels = k
        if role == "member":
            mod.in_channels = mod.groups = k


def prune_group_(model: nn.Module, group: ChannelGroup | HeadGroup, idx: torch.Tensor) -> None:
    """Keep units ``idx`` (sorted channels, or heads) of every layer of ``group``."""
    for p in group.producers:
        _narrow_(model.get_submodule(p), group.channels(p, idx), "producer")
    for m in group.members:
        _narrow_(model.get_submodule(m), group.channels(m, idx), "member")
    for c in group.consumers:
        _narrow_(model.get_submodule(c), group.channels(c, idx), "consumer")
    if isinstance(group, HeadGroup):
        set_heads_(model, group, len(idx))


def unit_scores(model: nn.Module, groups: list, kind: str, calib: list[Batch]) -> dict[str, torch.Tensor]:
    """Group name -> (width,) importance of its units under criterion ``kind`` (module docstring)."""
    means = _input_mean_abs(model, groups, calib) if kind == "activation" else {}
    grads = _taylor_grads(model, groups, calib) if kind == "taylor" else {}
    return {g.name: importance(model, g, kind, means, grads) for g in groups}


def keep_most_important_(model: nn.Module, groups: list, scores: dict[str, torch.Tensor], keep: dict[str, int],
                         progress: Progress, what: str) -> None:
    """Prune each group to its ``keep[name]`` highest-scoring units (kept in their order)."""
    for g in progress(groups, what):
        prune_group_(model, g, torch.sort(torch.topk(scores[g.name], keep[g.name]).indices).values)


def find_groups(model: nn.Module, example: Batch, heads: bool) -> list:
    """Channel groups (and, with ``heads``, the head groups that share no layer with them) of ``model``."""
    groups: list = channel_groups(model, tuple(t[:1] if torch.is_tensor(t) else t for t in example))
    if heads:
        taken = {n for g in groups for n in g.producers + g.consumers}
        groups += [h for h in head_groups(model) if not taken & set(h.producers + h.consumers)]
    return groups


def narrow_to_(model: nn.Module, widths: dict, heads: bool, example: Batch, what: str = "the saved widths") -> None:
    """Give the unpruned ``model`` the shapes a structured pruning left (``widths``: group -> units kept), so
    that the pruned weights load into it (export/pruned.py). The kept units are the first ones: the weights
    that follow replace them all."""
    groups = {g.name: g for g in find_groups(model.eval(), example, heads)}
    if set(groups) != set(widths):
        raise SlimError(f"{what} name groups {sorted(set(widths) - set(groups))[:3]} the base model lacks, or "
                        f"miss {sorted(set(groups) - set(widths))[:3]}: not a pruning of this model")
    for name, g in groups.items():
        k = widths[name]
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= g.width:
            raise SlimError(f"{what}: group {name} keeps {k!r} of {g.width} units")
        prune_group_(model, g, torch.arange(k))


@handler(StructuredConfig, "structured")
def _apply_structured(model: nn.Module, config: StructuredConfig, calib: list[Batch],
                      progress: Progress) -> StructuredReport:
    if not calib:
        raise SlimError("structured pruning needs calibration data (one batch traces the model)")
    model.eval()
    groups = find_groups(model, calib[0], config.heads)
    if not groups:
        raise SlimError("no channel groups found (layers joined only by channel-wise operations, with nothing "
                        "else reading the channels): this model has nothing width pruning can narrow")
    macs = _dense_macs(model, calib[0])
    params_before = sum(p.numel() for p in model.parameters())
    flops_before = sum(macs.values())
    ratio = config.ratio if config.budget is None else _ratio_for_budget(model, groups, macs, config)
    keep = _keep_all(groups, ratio, config.align)
    keep_most_important_(model, groups, unit_scores(model, groups, config.importance, calib), keep, progress,
                         "structured pruning")
    widths = {g.name: (g.width, keep[g.name]) for g in groups}
    notes = ["model config fields (intermediate_size) are not updated"]
    if any(isinstance(model.get_submodule(m), nn.LayerNorm) for g in groups for m in g.members):
        notes.append("a LayerNorm inside a pruned group now normalises over the kept channels only")
    return StructuredReport(groups=widths, ratio=ratio, params_before=params_before,
                            params_after=sum(p.numel() for p in model.parameters()),
                            flops_before=flops_before, flops_after=sum(_dense_macs(model, calib[0]).values()),
                            notes=notes)
