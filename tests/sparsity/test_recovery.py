"""Recovery by distillation: it brings a width-pruned student back toward its teacher on held-out data."""

import copy

import pytest
import torch
from torch import nn

from slimtorch.api import apply_
from slimtorch.distill.losses import kd_loss
from slimtorch.errors import SlimError
from slimtorch.pruning.recovery import recover_
from slimtorch.pruning.structured import StructuredConfig


def test_recovery_closes_most_of_the_gap_on_held_out_inputs():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 10)).eval()
    g = torch.Generator().manual_seed(1)
    train = [(torch.randn(64, 16, generator=g),) for _ in range(16)]
    held = torch.randn(256, 16, generator=g)
    student = copy.deepcopy(teacher)
    apply_(student, StructuredConfig(ratio=0.5, align=8), train)
    assert student[0].out_features == 32
    with torch.no_grad():
        before = float(kd_loss(student(held), teacher(held)))
    losses = recover_(student, teacher, train, steps=300, lr=3e-3)
    with torch.no_grad():
        after = float(kd_loss(student(held), teacher(held)))
    assert len(losses) == 300 and after < 0.3 * before, (before, after)
    assert not any(p.requires_grad for p in student.parameters())


def test_recovery_refuses_no_data_and_no_steps():
    m = nn.Linear(2, 2)
    with pytest.raises(SlimError):
        recover_(m, m, [], steps=10)
    with pytest.raises(SlimError):
        recover_(m, m, [(torch.zeros(1, 2),)], steps=0)
