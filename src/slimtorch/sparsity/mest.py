"""MEST: memory-economic sparse training from scratch (Yuan et al., NeurIPS 2021; ../shared/notes/
seed_methods.md section 5).

The model is sparse from the first step (random masks at the starting density) and never dense: every
``every`` epochs an *elastic mutation* prunes each layer down to the lower-bound density by importance
``|w| + lam * |g|`` (``lam = 0``: magnitude), then grows it back to the upper-bound density at random zero
positions, new weights starting at zero. The bounds follow schedules over the run (fractions of the epochs):

* ``em`` (elastic mutation): prune to 0.92 -> 0.91 -> 0.90 sparsity, grow to 0.90 (a 2% -> 1% -> 0 mutation);
* ``ems`` (with the soft memory bound): prune to 0.90, grow to 0.88 -> 0.89 -> 0.90 (the model is briefly
  denser than the target, and pruned back at the next mutation and at the end).

(The paper's switch epochs 90 and 120 of 160 are 0.56 and 0.75 of the run.) The *training memory bound* is
the largest density the masks ever reach, ``1 - min(upper bound)``: the weights, gradients and optimizer state
of a truly sparse implementation scale with it. ``train_mest`` checks it after every mutation and reports it.

Data efficiency (``drop``): forgetting events (Toneva et al. 2019) are counted on the whole training set at
the end of every epoch (the paper counts them per mini-batch; a full pass per epoch is the same statistic at
a coarser time step); from epoch ``drop_after`` (a fraction of the run) on, that fraction of the samples that
were learned and never forgotten is left out of training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.distill.trainer import History, TrainConfig, train_student
from slimtorch.errors import SlimError
from slimtorch.progress import Progress, no_progress
from slimtorch.sparsity.training_masks import MaskSet, keep_count, topk_mask

Schedule = tuple[tuple[float, float], ...]  # (fraction of the epochs from which it holds, sparsity)
SCHEDULES: dict[str, tuple[Schedule, Schedule]] = {  # (prune-to, grow-to), for a 0.90 target
    "em": (((0.0, 0.92), (0.56, 0.91), (0.75, 0.90)), ((0.0, 0.90),)),
    "ems": (((0.0, 0.90),), ((0.0, 0.88), (0.56, 0.89), (0.75, 0.90))),
    "static": (((0.0, 0.90),), ((0.0, 0.90),)),  # no mutation: static random sparse training
}


@dataclass(frozen=True)
class MESTConfig:
    """``variant`` em | ems | static; ``sparsity`` the target (the schedules shift with it); ``every``
    epochs between mutations; ``lam`` the gradient weight of the importance; ``drop`` the fraction of
    unforgettable samples left out from ``drop_after`` (fraction of the epochs) on."""

    variant: str = "em"
    sparsity: float = 0.9
    every: int = 5
    lam: float = 0.0
    drop: float = 0.0
    drop_after: float = 0.5
    seed: int = 0
    min_size: int = 1024

    def __post_init__(self) -> None:
        if self.variant not in SCHEDULES:
            raise SlimError(f"MEST variant {self.variant!r}: choose one of {', '.join(SCHEDULES)}")
        if not 0.05 <= self.sparsity < 0.999:
            raise SlimError(f"MEST sparsity must be in [0.05, 0.999); got {self.sparsity}")
        if self.every < 1 or self.lam < 0 or not 0 <= self.drop <= 1 or not 0 <= self.drop_after <= 1:
            raise SlimError("MEST needs every >= 1 epoch, lam >= 0, drop and drop_after in [0, 1]")

    def bound(self, kind: int, progress: float) -> float:
        """Sparsity of the prune-to (``kind`` 0) or grow-to (1) schedule at ``progress`` (0..1 of the run)."""
        sched = SCHEDULES[self.variant][kind]
        value = [s for start, s in sched if start <= progress + 1e-9][-1]
        return min(0.999, max(0.0, value + self.sparsity - 0.90))


def mutate(weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, prune_to: float, grow_to: float,
           lam: float, generator: torch.Generator) -> torch.Tensor:
    """One elastic mutation of one layer: keep the ``1 - prune_to`` most important active weights
    (``|w| + lam |g|``), then add random inactive positions up to ``1 - grow_to`` density. Returns the new mask."""
    n = mask.numel()
    score = weight.detach().abs().float()
    if lam and grad is not None:
        score = score + lam * grad.detach().abs().float()
    score = torch.where(mask, score, torch.full_like(score, -1.0))
    keep = min(keep_count(n, prune_to), int(mask.sum()))
    kept = topk_mask(score, keep)
    grow = max(0, keep_count(n, grow_to) - keep)
    if grow:
        free = (~kept).flatten().nonzero().squeeze(1)
        pick = free[torch.randperm(len(free), generator=generator)[:grow].to(free.device)]
        kept = kept.flatten().clone()
        kept[pick] = True
        kept = kept.view_as(mask)
    return kept


class Forgetting:
    """Per-sample forgetting events over full-set evaluations (correct then wrong counts as one)."""

    def __init__(self, n: int) -> None:
        self.prev = torch.zeros(n, dtype=torch.bool)
        self.learned = torch.zeros(n, dtype=torch.bool)
        self.events = torch.zeros(n, dtype=torch.int32)

    def update(self, correct: torch.Tensor) -> None:
        correct = correct.cpu()
        self.events += (self.prev & ~correct).int()
        self.learned |= correct
        self.prev = correct

    def unforgettable(self) -> torch.Tensor:
        """Indices of the samples learned at some point and never forgotten, still correct."""
        return (self.learned & (self.events == 0) & self.prev).nonzero().squeeze(1)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([(model(x[i:i + batch]).argmax(1) == y[i:i + batch].to(x.device)) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def train_mest(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, mest: MESTConfig,
               augment: Callable | None = None, evaluate: Callable[[nn.Module], float] | None = None,
               progress: Progress = no_progress, log: Callable[[str], None] | None = None) -> tuple[History, dict]:
    """Train ``model`` sparse from scratch with MEST (module docstring). Returns the history and a record:
    the final sparsity, the memory bound and the largest density reached, the mutations, the samples seen."""
    gen = torch.Generator().manual_seed(mest.seed)
    masks = MaskSet.random(model, mest.bound(1, 0.0), seed=mest.seed, min_size=mest.min_size)
    masks.apply_(model)
    lowest = min(mest.bound(1, start) for start, _ in SCHEDULES[mest.variant][1])  # the densest grow-to
    max_kept = sum(keep_count(m.numel(), lowest) for m in masks.masks.values())
    bound = max_kept / masks.total()
    peak = [masks.density()]
    mutations: list[dict] = []
    forgetting = Forgetting(len(x)) if mest.drop > 0 else None
    pool: list[torch.Tensor | None] = [None]
    dropped = [0]

    def on_epoch(m: nn.Module, epoch: int, epochs: int) -> None:
        p = epoch / epochs
        if forgetting is not None and epoch > 0:
            forgetting.update(_correct(m, x, y))
            if pool[0] is None and p >= mest.drop_after:
                easy = forgetting.unforgettable()
                drop = easy[torch.randperm(len(easy), generator=gen)[:int(mest.drop * len(easy))]]
                keep = torch.ones(len(x), dtype=torch.bool)
                keep[drop] = False
                pool[0], dropped[0] = keep.nonzero().squeeze(1), len(drop)
        if epoch > 0 and epoch % mest.every == 0:
            lo, hi = mest.bound(0, p), mest.bound(1, p)
            before = masks.kept()
            for name, mask in masks.masks.items():
                w = m.get_submodule(name).weight
                new = mutate(w, w.grad, mask, lo, hi, mest.lam, gen)
                with torch.no_grad():
                    w.mul_(new & mask)  # grown weights start at zero
                masks.masks[name] = new
            peak.append(masks.density())
            if masks.kept() > max_kept:
                raise SlimError(f"MEST kept {masks.kept()} weights, above its memory bound of {max_kept}")
            mutations.append({"epoch": epoch, "prune_to": lo, "grow_to": hi, "kept_before": before,
                              "kept_after": masks.kept()})

    history = train_student(model, None, x, y, cfg, augment=augment, evaluate=evaluate, progress=progress, log=log,
                            on_epoch=on_epoch, before_step=masks.mask_grads_, after_step=masks.apply_,
                            subset=lambda e: pool[0])
    target_kept = sum(keep_count(m.numel(), mest.sparsity) for m in masks.masks.values())
    if masks.kept() > target_kept:  # the soft bound ends denser: prune to the target
        masks = MaskSet.magnitude(model, mest.sparsity, within=masks)
        masks.apply_(model)
    record = {"variant": mest.variant, "target_sparsity": mest.sparsity, "sparsity": 1 - masks.density(),
              "memory_bound_density": bound, "peak_density": max(peak), "mutations": mutations,
              "dropped_samples": dropped[0], "samples_seen": sum(r["samples"] for r in history.epochs),
              "masked_layers": len(masks.masks)}
    return history, record


def masked_layers_sparsity(model: nn.Module, names: list[str]) -> float:
    """Fraction of zeros over the weights of ``names`` (a check on the trained model itself)."""
    ws = [model.get_submodule(n).weight for n in names]
    return float(sum(int((w == 0).sum()) for w in ws)) / sum(w.numel() for w in ws)
