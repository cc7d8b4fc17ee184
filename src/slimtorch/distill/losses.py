"""Knowledge-distillation losses.

* :func:`kd_loss`: Hinton et al.'s ``T^2 KL(softmax(t / T) || softmax(s / T))`` on logits.
* :func:`feature_loss`: mean squared error between matching intermediate features, each normalised by
  the teacher feature's mean square so that layers of different scale weigh alike.
* :class:`FeatureTaps`: records the outputs of named submodules during a forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.hooks import TemporaryHooks


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` averaged over the batch; logits (B, C) (or (..., C))."""
    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    t_log = F.log_softmax(teacher.float().detach() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * t * t


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over names of ``mean((s - t)^2) / mean(t^2)``."""
    if student.keys() != teacher.keys():
        raise SlimError(f"feature names differ: {sorted(student)} vs {sorted(teacher)}")
    total = torch.zeros(())
    for name, s in student.items():
        t = teacher[name].detach().float()
        total = total.to(s.device) + (s.float() - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12)
    return total


class FeatureTaps:
    """``with FeatureTaps(model, names) as taps: model(x)``; then ``taps.features`` maps name -> output."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self._hooks = TemporaryHooks()
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise SlimError(f"feature layer {name!r} is not a submodule of the model") from None
            self._hooks.after(module, lambda mod, args, out, name=name: self.features.__setitem__(name, out))

    def __enter__(self) -> FeatureTaps:
        self.features.clear()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.remove()
