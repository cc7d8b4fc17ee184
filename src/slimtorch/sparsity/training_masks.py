"""Masks held through training: which weights of which layers may be nonzero, kept so by zeroing the
gradients before each optimizer step and the weights after it (MEST's and the lottery-ticket code's way).

The weights are dense tensors with zeros (a simulation of sparse training, as in the papers' code); the
*training memory* of a truly sparse implementation is proportional to the nonzero weights, so the mask
density over training is the memory figure that ``MaskSet.density`` reports and MEST bounds.

Layers: the weight of every Linear and Conv with at least ``min_size`` elements (smaller ones, a CNN stem,
stay dense: they are a negligible share of the memory and the most sensitive to pruning).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.errors import SlimError


def prunable(model: nn.Module, min_size: int = 1024) -> list[str]:
    """Names of the Linear/Conv modules whose weights are masked."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.weight.numel() >= min_size]


def keep_count(numel: int, sparsity: float) -> int:
    """Weights kept at ``sparsity``: the nearest whole number, at least one."""
    return max(1, round(numel * (1.0 - sparsity)))


def topk_mask(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest entries of ``score`` (ties broken by position)."""
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    flat[torch.topk(score.flatten().float(), keep, sorted=False).indices] = True
    return flat.view_as(score)


def random_mask(shape: torch.Size, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly ``keep_count`` positions kept, uniformly at random."""
    n = int(torch.Size(shape).numel())
    return topk_mask(torch.rand(n, generator=generator), keep_count(n, sparsity)).view(shape)


class MaskSet:
    """Masks by module name, applied to a model's weights and gradients."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks

    @classmethod
    def random(cls, model: nn.Module, sparsity: float, seed: int = 0, min_size: int = 1024) -> MaskSet:
        """Uniform sparsity per layer, positions at random (static sparse training's start, and MEST's)."""
        if not 0.0 <= sparsity < 1.0:
            raise SlimError(f"sparsity must be in [0, 1); got {sparsity}")
        gen = torch.Generator().manual_seed(seed)
        return cls({n: random_mask(model.get_submodule(n).weight.shape, sparsity, gen).to(
            model.get_submodule(n).weight.device) for n in prunable(model, min_size)})

    @classmethod
    def magnitude(cls, model: nn.Module, sparsity: float, within: MaskSet | None = None,
                  min_size: int = 1024) -> MaskSet:
        """The largest-magnitude ``1 - sparsity`` of each layer's weights (among those ``within`` keeps)."""
        masks = {}
        for n in (within.masks if within is not None else prunable(model, min_size)):
            w = model.get_submodule(n).weight.detach().abs()
            if within is not None:
                w = torch.where(within.masks[n], w, torch.full_like(w, -1.0))
            masks[n] = topk_mask(w, keep_count(w.numel(), sparsity))
        return cls(masks)

    def apply_(self, model: nn.Module) -> None:
        """Zero the masked weights."""
        with torch.no_grad():
            for n, m in self.masks.items():
                model.get_submodule(n).weight.mul_(m)

    def mask_grads_(self, model: nn.Module) -> None:
        """Zero the masked weights' gradients (so that momentum does not build up there)."""
        for n, m in self.masks.items():
            g = model.get_submodule(n).weight.grad
            if g is not None:
                g.mul_(m)

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def total(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def density(self) -> float:
        """Fraction of the masked layers' weights that are kept."""
        return self.kept() / max(1, self.total())
