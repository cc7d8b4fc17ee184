"""Latency-aware width search (after NPAS, Li et al. 2021, "compiler-aware unified network pruning and
architecture search"): each channel group (and attention layer) gets its own width, chosen so that the model
meets a *latency* budget with the least importance removed, where latency is what the roofline cost model
(slimtorch.cost) gives for the pruned model's Linear/Conv calls on a named chip at a batch size.

Search (NetAdapt-style greedy, the simplest search NPAS's space admits): from the dense model, repeatedly
take one step (``step`` of a group's original width) off the group whose step costs the least per second of
modelled latency saved, until the budget is met. What a step costs (``evaluate``):

* ``importance``: the group criterion of ``structured.importance`` summed over the channels a step removes;
  Taylor estimates are comparable across groups (loss change), the others are divided by their group's mean.
  Cheap, but additive: it cannot see that cutting a 32-channel stage to 6 costs more than its channels' sum
  (on fmnist-cnn at 50% latency it did that and lost to uniform pruning after recovery).
* ``loss``: the candidate itself is built (the step taken on a copy), its BatchNorm statistics re-estimated
  on the calibration data, and its output compared with the dense model's (KL divergence of the softmax on
  the calibration batches): EagleEye's adaptive-BN evaluation of a sub-network, which tracks accuracy after
  fine-tuning far better than the raw pruned loss does. One forward per group per step. The chosen model
  gets the same BatchNorm re-estimation (fmnist-cnn at 50% latency: 11% top-1 before it, 47% after, on
  256 calibration images, before any recovery).

``search="uniform"`` is the baseline at the same modelled latency: one ratio for every group, by bisection.
The chosen widths go through the same pruning as ``StructuredConfig`` (the most important channels are kept).

What the model does not see: batch-norm and activation passes (folded and fused in a compiled deployment,
separate kernels in eager PyTorch), attention matmuls and launch overheads; measured latency is the check
(benchmarks/structured_pruning.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.api import Report, handler
from slimtorch.calib.batchnorm import calibrate_bn
from slimtorch.cost.estimate import layer_costs, trace
from slimtorch.cost.hardware import get_hardware
from slimtorch.errors import SlimError
from slimtorch.progress import Progress, no_progress
from slimtorch.pruning.heads import HeadGroup
from slimtorch.pruning.structured import (
    IMPORTANCE,
    _keep_all,
    find_groups,
    keep_most_important_,
    kept_fractions,
    smallest_ratio,
    unit_scores,
)
from slimtorch.sequential import Batch, first_tensor

SEARCHES = ("greedy", "uniform")
EVALUATIONS = ("importance", "loss")


@dataclass(frozen=True)
class NPASConfig:
    """``latency``: the fraction of the dense model's modelled latency allowed; ``hardware`` and ``batch``
    of the model; ``importance``; ``step`` of a group's width per greedy move; ``search`` greedy or uniform;
    ``evaluate``: what a greedy step costs (module docstring); ``eval_samples``: calibration samples the
    ``loss`` evaluation uses."""

    latency: float = 0.5
    hardware: str = "h100-measured"
    batch: int = 256
    importance: str = "taylor"
    step: float = 0.0625
    align: int = 1
    heads: bool = False
    search: str = "greedy"
    evaluate: str = "importance"
    eval_samples: int = 512

    def __post_init__(self) -> None:
        if not 0.0 < self.latency <= 1.0:
            raise SlimError(f"latency budget is the fraction of the dense latency kept, in (0, 1]; got {self.latency}")
        if self.importance not in IMPORTANCE:
            raise SlimError(f"importance {self.importance!r}: choose one of {', '.join(IMPORTANCE)}")
        if self.search not in SEARCHES:
            raise SlimError(f"search {self.search!r}: choose one of {', '.join(SEARCHES)}")
        if self.evaluate not in EVALUATIONS:
            raise SlimError(f"evaluate {self.evaluate!r}: choose one of {', '.join(EVALUATIONS)}")
        if not 1 <= self.eval_samples <= 1 << 20:
            raise SlimError(f"eval_samples must be 1..2^20; got {self.eval_samples}")
        if not 0.0 < self.step <= 0.5 or not 1 <= self.batch <= 1 << 20 or not 1 <= self.align <= 1024:
            raise SlimError("step must be in (0, 0.5], batch 1..2^20, align 1..1024")
        get_hardware(self.hardware)  # an unknown chip fails here


@dataclass(kw_only=True)
class NPASReport(Report):
    groups: dict[str, tuple[int, int]]
    latency_before_s: float  # modelled, for one batch of ``batch``
    latency_after_s: float
    hardware: str
    batch: int
    search: str
    params_before: int
    params_after: int


class LatencyModel:
    """Modelled latency of ``model`` narrowed to given widths: shapes traced once, then every Linear/Conv
    call's channels scaled by its groups' kept fractions and costed on the roofline."""

    def __init__(self, model: nn.Module, groups: list, example: Batch, hardware: str, batch: int) -> None:
        self.calls, _ = trace(model, lambda: model.eval()(*example))
        self.groups, self.hw = groups, get_hardware(hardware)
        self.scale = batch / max(1, example[0].shape[0])

    def __call__(self, keep: dict[str, int]) -> float:
        fo, fi = kept_fractions(self.groups, keep)
        total = 0.0
        for name, mod, ishape, oshape in self.calls:
            b = fo.get(name, 1.0)
            a = fi.get(name, b if _depthwise(mod) else 1.0)  # a depthwise conv's input is its output's width
            i2, o2 = _scaled(ishape, a), _scaled(oshape, b)
            total += layer_costs([(name, _Shape(mod, o2), i2, o2)], {}, self.scale)[0].time(self.hw)
        return total


def _depthwise(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups > 1


def _scaled(shape: tuple, f: float) -> tuple:
    """``shape`` with its channel dimension (1 of a 4-d conv tensor, else the last) times ``f``, at least 1."""
    c = 1 if len(shape) == 4 else len(shape) - 1
    return (*shape[:c], max(1, round(shape[c] * f)), *shape[c + 1:])


class _Shape:
    """What layer_costs reads of a conv (weight shape, groups) at a narrowed output width ``oshape``."""

    def __init__(self, mod: nn.Module, oshape: tuple) -> None:
        w = tuple(mod.weight.shape)
        self.groups = oshape[1] if _depthwise(mod) else getattr(mod, "groups", 1)
        self.weight_shape = (oshape[1], w[1], *w[2:]) if len(w) == 4 else w


def _steps(g, step: float, align: int) -> int:
    """Units one greedy move takes off group ``g``."""
    return max(1 if isinstance(g, HeadGroup) else align, round(g.width * step))


def importance_cost(scores: dict[str, torch.Tensor], kind: str) -> Callable[[dict[str, int], str, int], float]:
    """``cost(keep, group, k2)``: the importance a step from ``keep[group]`` to ``k2`` units removes."""
    norm = {n: (s if kind == "taylor" else s / s.mean().clamp_min(1e-12)) for n, s in scores.items()}
    order = {n: torch.sort(s).values for n, s in norm.items()}  # least important first

    def cost(keep: dict[str, int], name: str, k2: int) -> float:
        width = len(order[name])
        return float(order[name][width - keep[name]: width - k2].sum())

    return cost


class LossCost:
    """``cost(keep, group, k2)``: how much further from the dense model's outputs the candidate (``keep``
    with ``group`` at ``k2``) is than ``keep`` itself: the KL divergence of its softmax on ``batches``, after
    its BatchNorm statistics are re-estimated on them (module docstring). Each keep is built once."""

    def __init__(self, model: nn.Module, groups: list, scores: dict[str, torch.Tensor], batches: list[Batch]) -> None:
        self.model, self.groups, self.scores, self.batches = model, groups, scores, batches
        with torch.no_grad():
            self.targets = [self._log_probs(model, b) for b in batches]
        self.seen: dict[tuple, float] = {}

    @staticmethod
    def _log_probs(model: nn.Module, batch: Batch) -> torch.Tensor:
        out = first_tensor(model(*batch)).float()
        return F.log_softmax(out.reshape(-1, out.shape[-1]), -1)

    def divergence(self, keep: dict[str, int]) -> float:
        key = tuple(sorted(keep.items()))
        if key not in self.seen:
            m = copy.deepcopy(self.model)
            keep_most_important_(m, self.groups, self.scores, keep, no_progress, "")
            calibrate_bn(m, self.batches)
            m.eval()
            with torch.no_grad():
                total = sum(float(F.kl_div(self._log_probs(m, b), t, reduction="sum", log_target=True))
                            for b, t in zip(self.batches, self.targets))
            self.seen[key] = total / sum(t.shape[0] for t in self.targets)
        return self.seen[key]

    def __call__(self, keep: dict[str, int], name: str, k2: int) -> float:
        return self.divergence({**keep, name: k2}) - self.divergence(keep)


def search_widths(groups: list, cost: Callable[[dict[str, int], str, int], float], latency: LatencyModel,
                  budget: float, step: float, align: int, progress: Progress = no_progress) -> dict[str, int]:
    """Greedy: the widths meeting ``budget`` seconds at the least ``cost`` per second saved (module
    docstring)."""
    keep = {g.name: g.width for g in groups}
    now = latency(keep)
    most = sum(g.width // _steps(g, step, align) for g in groups)  # every group down to one step
    for _ in progress(range(most), "latency-aware search (greedy steps, at most)"):
        if now <= budget:
            break
        best, best_ratio, best_lat = None, float("inf"), now
        for g in groups:
            k2 = keep[g.name] - _steps(g, step, align)
            if k2 < 1:
                continue
            lat = latency({**keep, g.name: k2})
            saved = now - lat
            if saved <= 0:
                continue
            ratio = cost(keep, g.name, k2) / saved
            if ratio < best_ratio:
                best, best_ratio, best_lat = (g.name, k2), ratio, lat
        if best is None:
            break
        keep[best[0]], now = best[1], best_lat
    if now > budget:
        raise SlimError("the latency budget cannot be met by narrowing this model's channel groups (the "
                        "layers outside them take more than the budget)")
    return keep


def uniform_widths(groups: list, latency: LatencyModel, budget: float, align: int) -> dict[str, int]:
    """One ratio for every group, the smallest that meets ``budget`` (bisection)."""
    ratio = smallest_ratio(groups, align, lambda keep: latency(keep) <= budget,
                           "the latency budget cannot be met by uniform width pruning of this model")
    return _keep_all(groups, ratio, align)


@handler(NPASConfig, "npas")
def _apply_npas(model: nn.Module, config: NPASConfig, calib: list[Batch], progress: Progress) -> NPASReport:
    if not calib:
        raise SlimError("latency-aware pruning needs calibration data (one batch traces the model)")
    model.eval()
    groups = find_groups(model, calib[0], config.heads)
    if not groups:
        raise SlimError("no channel groups found: this model has nothing width pruning can narrow")
    example = tuple(t[:1] if torch.is_tensor(t) else t for t in calib[0])
    latency = LatencyModel(model, groups, example, config.hardware, config.batch)
    dense = latency({g.name: g.width for g in groups})
    scores = unit_scores(model, groups, config.importance, calib)
    budget = config.latency * dense
    judged = config.search == "greedy" and config.evaluate == "loss"  # candidates built, BN re-estimated
    eval_batches = _first_samples(calib, config.eval_samples) if judged else []
    if config.search == "greedy":
        if judged:
            cost = LossCost(model, groups, scores, eval_batches)
        else:
            cost = importance_cost(scores, config.importance)
        keep = search_widths(groups, cost, latency, budget, config.step, config.align, progress)
    else:
        keep = uniform_widths(groups, latency, budget, config.align)
    before = sum(p.numel() for p in model.parameters())
    after = latency(keep)
    keep_most_important_(model, groups, scores, keep, progress, "latency-aware pruning")
    notes = ["latency is the roofline model of the Linear/Conv calls, not a measurement"]
    if judged and calibrate_bn(model, eval_batches):  # the model as the search judged it
        notes.append("BatchNorm statistics re-estimated on the calibration data (as the search evaluated "
                     "its candidates)")
    return NPASReport(groups={g.name: (g.width, keep[g.name]) for g in groups}, latency_before_s=dense,
                      latency_after_s=after, hardware=config.hardware, batch=config.batch, search=config.search,
                      params_before=before, params_after=sum(p.numel() for p in model.parameters()),
                      notes=notes)


def _first_samples(calib: list[Batch], n: int) -> list[Batch]:
    """The calibration batches cut to their first ``n`` samples in all."""
    out, left = [], n
    for b in calib:
        if left <= 0:
            break
        size = b[0].shape[0]
        out.append(tuple(t[:left] if torch.is_tensor(t) and t.shape[:1] == (size,) else t for t in b))
        left -= size
    return out


def modelled_latency(model: nn.Module, example: Batch, hardware: str, batch: int) -> float:
    """The same model's latency for an (already pruned) model as it is: a check of the search's own figure."""
    m = copy.deepcopy(model)
    return LatencyModel(m, [], example, hardware, batch)({})
