"""Recovery after pruning: logit distillation from the original model (the teacher) into the pruned one.

Why distillation rather than the task loss: the teacher's full output distribution carries far more signal
per sample than a label, so a few hundred steps on unlabelled data (the calibration windows or images) win
back much of what pruning lost (Minitron; Sheared-LLaMA's continued pretraining is the long version).
Only float parameters train; a pruned model's zeros are not held at zero (use this after width pruning, which
leaves a dense model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtorch.distill.losses import kd_loss
from slimtorch.errors import SlimError
from slimtorch.progress import Progress, no_progress
from slimtorch.sequential import first_tensor


def recover_(student: nn.Module, teacher: nn.Module, batches: list[tuple], steps: int = 200, lr: float = 1e-4,
             temperature: float = 1.0, seed: int = 0, progress: Progress = no_progress,
             augment: Callable[[tuple], tuple] | None = None) -> list[float]:
    """Train ``student`` in place for ``steps`` AdamW steps (cosine decay) of KD(teacher || student) on
    ``batches`` (forward arguments, drawn in a seeded order; ``augment`` maps each drawn batch to the one
    both models see, e.g. random shifts of images). Returns the loss of each step."""
    if not batches:
        raise SlimError("recovery needs data: batches of forward arguments")
    if steps < 1:
        raise SlimError(f"recovery steps must be at least 1; got {steps}")
    params = [p for p in student.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.randint(0, len(batches), (steps,), generator=torch.Generator().manual_seed(seed))
    teacher.eval()
    student.train()
    losses = []
    for i in progress(range(steps), "recovery"):
        batch = batches[int(order[i])]
        if augment is not None:
            batch = augment(batch)
        with torch.no_grad():
            target = first_tensor(teacher(*batch))
        loss = kd_loss(first_tensor(student(*batch)), target, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())  # read once at the end: a read per step waits for the GPU
    student.eval()
    for p in params:
        p.requires_grad_(False)
    return torch.stack(losses).float().tolist()
