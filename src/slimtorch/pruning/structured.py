"""Structured (width) pruning of neuron groups as a family of ``apply_``: ``StructuredConfig`` removes the
least important ``ratio`` of each group's neurons (pruning/graph.py), giving a physically smaller dense model.

Importance of neuron j of a group (producers P, consumer C):

* ``magnitude``: the L2 norm of everything the neuron owns, ``sqrt(sum_p ||P[j, :]||^2 + ||C[:, j]||^2)``;
* ``activation``: ``mean |x_j| * ||C[:, j]||``, the average size of what the neuron adds to the consumer's
  output over the calibration data (the activation criterion of Minitron-style width pruning, made
  output-aware).

The kept count is rounded down to a multiple of ``align`` (8 by default: the widths tensor cores like) and
is at least ``align``. Config fields of the model (a transformers ``intermediate_size``) are not changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.api import Report, handler
from slimtorch.errors import SlimError
from slimtorch.progress import Progress
from slimtorch.pruning.graph import NeuronGroup, neuron_groups
from slimtorch.sequential import Batch, collect, set_module

IMPORTANCE = ("magnitude", "activation")


@dataclass(frozen=True)
class StructuredConfig:
    """``ratio`` of each neuron group removed; ``importance`` magnitude or activation; ``align``."""

    ratio: float = 0.25
    importance: str = "activation"
    align: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise SlimError(f"structured pruning ratio must be in [0, 1); got {self.ratio}")
        if self.importance not in IMPORTANCE:
            raise SlimError(f"importance {self.importance!r}: choose one of {', '.join(IMPORTANCE)}")
        if not 1 <= self.align <= 1024:
            raise SlimError(f"align must be 1..1024; got {self.align}")


@dataclass(kw_only=True)
class StructuredReport(Report):
    groups: dict[str, tuple[int, int]]  # consumer -> (width before, after)
    params_before: int
    params_after: int


def kept_width(width: int, ratio: float, align: int) -> int:
    """Neurons kept: ``width * (1 - ratio)`` rounded down to a multiple of ``align``, at least ``align``
    (or the whole width when it is smaller)."""
    keep = int(width * (1.0 - ratio)) // align * align
    return min(width, max(keep, align))


def importance(model: nn.Module, group: NeuronGroup, kind: str, input_mean_abs: torch.Tensor | None) -> torch.Tensor:
    """(width,) importance of each neuron of ``group`` (module docstring)."""
    c = model.get_submodule(group.consumer).weight.detach().float()
    col = c.norm(dim=0)
    if kind == "activation":
        return input_mean_abs.float() * col
    rows = sum(model.get_submodule(p).weight.detach().float().pow(2).sum(1) for p in group.producers)
    return (rows + col.pow(2)).sqrt()


def _narrow(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of ``lin`` keeping output rows (dim 0) or input columns (dim 1) ``idx``."""
    w = lin.weight.detach().index_select(dim, idx.to(lin.weight.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach()[idx.to(lin.bias.device)])
    return new


class _MeanAbs:
    """Mean |x_j| of each input feature over the rows a layer sees (a ``sequential.collect`` statistic)."""

    def __init__(self, layer: nn.Module) -> None:
        self.sum, self.rows = 0, 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.sum, self.rows = self.sum + x.abs().sum(0), self.rows + x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.rows


def _input_mean_abs(model: nn.Module, groups: list[NeuronGroup], calib: list[Batch]) -> dict[str, torch.Tensor]:
    stats = collect({g.consumer: model.get_submodule(g.consumer) for g in groups}, _MeanAbs,
                    lambda: [model(*batch) for batch in calib])
    return {n: st.mean for n, st in stats.items()}


@handler(StructuredConfig, "structured")
def _apply_structured(model: nn.Module, config: StructuredConfig, calib: list[Batch],
                      progress: Progress) -> StructuredReport:
    if not calib:
        raise SlimError("structured pruning needs calibration data (one batch traces the model)")
    before = sum(p.numel() for p in model.parameters())
    groups = neuron_groups(model.eval(), tuple(t[:1] if torch.is_tensor(t) else t for t in calib[0]))
    if not groups:
        raise SlimError("no neuron groups found (Linear -> elementwise -> Linear with nothing else reading the "
                        "neurons): this model has no MLP that width pruning can narrow")
    means = _input_mean_abs(model, groups, calib) if config.importance == "activation" else {}
    widths = {}
    for g in progress(groups, "structured pruning"):
        keep = kept_width(g.width, config.ratio, config.align)
        score = importance(model, g, config.importance, means.get(g.consumer))
        idx = torch.sort(torch.topk(score, keep).indices).values
        for p in g.producers:
            set_module(model, p, _narrow(model.get_submodule(p), idx, 0))
        set_module(model, g.consumer, _narrow(model.get_submodule(g.consumer), idx, 1))
        widths[g.consumer] = (g.width, keep)
    return StructuredReport(groups=widths, params_before=before,
                            params_after=sum(p.numel() for p in model.parameters()),
                            notes=["model config fields (intermediate_size) are not updated"])
