"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding, and the weight-correlation
analysis of "Lottery Ticket Preserves Weight Correlation: Is It Desirable or Not?" (Liu et al., ICML 2021).

IMP (Frankle & Carbin 2019; rewinding: Frankle et al. 2020): train the dense model, remove ``rate`` of the
remaining weights of each layer by magnitude, set the survivors back to their values at the rewind point
(initialisation, or iteration k of the dense run) and train again; repeat. After r rounds the sparsity is
``1 - (1 - rate)^r``. A ticket *wins* when (1) it reaches the dense model's accuracy in the same epochs and
(2) it clearly beats the same mask on a fresh random initialisation.

The seed paper's finding: winning depends on the correlation between the initial and the trained weights,
which stays high when the learning rate is small (the weights do not travel far, so the mask picked from the
trained weights also picks large initial weights) and collapses at a large learning rate, where tickets stop
winning; "pruning & fine-tuning" (train the pruned trained weights instead of rewinding) then does better in
the same total epochs. ``weight_correlation`` is that figure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.sparsity.training_masks import MaskSet

State = dict[str, torch.Tensor]


def snapshot(model: nn.Module) -> State:
    """A detached copy of every parameter and buffer (a rewind point)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rewind_(model: nn.Module, state: State, masks: MaskSet | None) -> None:
    """Set ``model`` to ``state`` (parameters and buffers), then zero what ``masks`` removes."""
    model.load_state_dict(state)
    if masks is not None:
        masks.apply_(model)


def weight_correlation(initial: State, trained: State, masks: MaskSet) -> dict:
    """Pearson correlation between initial and trained weights, per masked layer and over all of them,
    over the weights the masks keep and over all weights."""
    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
        d = (a.norm() * b.norm()).item()
        return float((a * b).sum().item() / d) if d > 0 else 0.0

    per, ka, kb, aa, ab = {}, [], [], [], []
    for name, m in masks.masks.items():
        w0, w1 = initial[f"{name}.weight"].flatten(), trained[f"{name}.weight"].flatten()
        keep = m.flatten().to(w0.device)
        per[name] = {"kept": corr(w0[keep], w1[keep]), "all": corr(w0, w1)}
        ka.append(w0[keep]), kb.append(w1[keep]), aa.append(w0), ab.append(w1)
    return {"kept": corr(torch.cat(ka), torch.cat(kb)), "all": corr(torch.cat(aa), torch.cat(ab)), "layers": per}


def imp(model: nn.Module, train: Callable[[nn.Module, MaskSet | None], float], rounds: int, rate: float = 0.2,
        rewind_point: Callable[[], State] | None = None, control: Callable[[int], bool] | None = None,
        reinit: Callable[[], State] | None = None, finetune: bool = False, min_size: int = 1024,
        log: Callable[[dict], None] | None = None) -> list[dict]:
    """Iterative magnitude pruning with rewinding.

    ``train(model, masks) -> accuracy`` trains in place (keeping ``masks``, None for dense) and evaluates.
    ``rewind_point()``: called after the dense run, the state to rewind to (the caller's ``train`` can keep
    the state at iteration k of that run; default: ``model``'s state now, its initialisation). For the rounds
    where ``control(round)`` holds, the same mask is also trained from ``reinit()`` (a fresh random
    initialisation: the random-reinitialisation control) and, with ``finetune``, from the pruned trained
    weights ("pruning & fine-tuning"). One record per round (round 0 is the dense run)."""
    if rounds < 1 or not 0 < rate < 1:
        raise SlimError(f"IMP needs rounds >= 1 and a rate in (0, 1); got {rounds}, {rate}")
    init = snapshot(model)
    records = [{"round": 0, "sparsity": 0.0, "accuracy": train(model, None)}]
    trained = snapshot(model)
    start = rewind_point() if rewind_point is not None else init
    records[0]["correlation_init_trained"] = weight_correlation(init, trained, MaskSet.magnitude(model, 0.0,
                                                                min_size=min_size))["all"]
    if log:
        log(records[-1])
    masks: MaskSet | None = None
    for r in range(1, rounds + 1):
        sparsity = 1.0 - (1.0 - rate) ** r
        rewind_(model, trained, None)
        masks = MaskSet.magnitude(model, sparsity, within=masks, min_size=min_size)
        rec = {"round": r, "sparsity": 1.0 - masks.density(),
               "correlation": weight_correlation(init, trained, masks)}
        if control is not None and control(r):
            if finetune:
                rewind_(model, trained, masks)
                rec["finetune_accuracy"] = train(model, masks)
            if reinit is not None:
                rewind_(model, reinit(), masks)
                rec["reinit_accuracy"] = train(model, masks)
        rewind_(model, start, masks)
        rec["ticket_accuracy"] = train(model, masks)
        trained = snapshot(model)
        records.append(rec)
        if log:
            log(rec)
    return records
