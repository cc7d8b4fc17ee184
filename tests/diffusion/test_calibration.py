"""Calibration across the trajectory: TDAC's density and diversity on a hand-made case, allocation that
sums exactly, draws without replacement."""

import pytest
import torch

from slimtorch.diffusion.calibration import allocate, draw, tdac_weights, uniform_counts
from slimtorch.errors import SlimError


def test_tdac_density_and_diversity_by_hand():
    # five steps, one sample of two features: steps 0-2 sit together, step 3 is near them in MSE but points
    # elsewhere, step 4 is far away in both
    f = torch.tensor([[[1.0, 0.0]], [[1.0, 0.1]], [[0.9, 0.0]], [[0.0, 1.0]], [[-30.0, 0.0]]])
    w = tdac_weights(f, radius=1.05, lam=0.0)  # density alone: neighbours within MSE 1.05
    # MSE = squared distance / 2: 0.005-0.01 among steps 0-2, 0.905-1.0 from them to step 3, > 400 to step 4
    assert w.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    v = tdac_weights(f, radius=-1.0, lam=1.0)  # no neighbours at all: diversity alone (min-max)
    raw = [sum(1 - torch.nn.functional.cosine_similarity(f[t, 0], f[s, 0], dim=0) for s in range(5) if s != t) for t in range(5)]
    raw = torch.stack(raw).double()
    assert torch.allclose(v, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-9)


def test_allocation_sums_and_is_proportional():
    assert allocate(torch.tensor([1.0, 1.0, 2.0]), 8) == [2, 2, 4]
    assert allocate(torch.tensor([1.0, 1.0, 1.0]), 10) == [4, 3, 3]  # largest remainders, ties to the first
    assert sum(allocate(torch.rand(97, generator=torch.Generator().manual_seed(0)), 1024)) == 1024
    assert uniform_counts(4, 10) == [3, 3, 2, 2]
    assert allocate(torch.zeros(3), 3) == [1, 1, 1]
    with pytest.raises(SlimError):
        allocate(torch.tensor([-1.0, 2.0]), 3)


def test_draw_takes_the_counts_without_replacement():
    traj = torch.arange(4 * 6).float().reshape(4, 6, 1)  # step i, sample j holds 6 i + j
    x, step = draw(traj, [0, 6, 2, 1], torch.Generator().manual_seed(0))
    assert step.tolist() == [1] * 6 + [2] * 2 + [3]
    assert sorted(x[:6, 0].tolist()) == [6, 7, 8, 9, 10, 11]
    assert all(12 <= v < 18 for v in x[6:8, 0].tolist()) and len(set(x[6:8, 0].tolist())) == 2
    with pytest.raises(SlimError):
        draw(traj, [7, 0, 0, 0])
