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
    assert allocate(torch.tensor([10.0, 1.0, 1.0]), 12, cap=5) == [5, 4, 3] or \
        allocate(torch.tensor([10.0, 1.0, 1.0]), 12, cap=5) == [5, 3, 4]
    capped = allocate(torch.rand(50, generator=torch.Generator().manual_seed(1)) ** 4, 400, cap=9)
    assert sum(capped) == 400 and max(capped) <= 9
    with pytest.raises(SlimError):
        allocate(torch.ones(3), 10, cap=3)
    with pytest.raises(SlimError):
        allocate(torch.tensor([-1.0, 2.0]), 3)


def test_draw_takes_the_counts_without_replacement():
    traj = torch.arange(4 * 6).float().reshape(4, 6, 1)  # step i, sample j holds 6 i + j
    x, step, row = draw(traj, [0, 6, 2, 1], torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0], 6 * step + row)
    assert step.tolist() == [1] * 6 + [2] * 2 + [3]
    assert sorted(x[:6, 0].tolist()) == [6, 7, 8, 9, 10, 11]
    assert all(12 <= v < 18 for v in x[6:8, 0].tolist()) and len(set(x[6:8, 0].tolist())) == 2
    with pytest.raises(SlimError):
        draw(traj, [7, 0, 0, 0])


@pytest.mark.parametrize("method", ["tdac", "uniform"])
def test_calibration_batches_cover_the_trajectory_and_quantize(method):
    """Batches drawn from one FP run: inputs the model really saw at their steps, labels of their rows;
    they calibrate a W8A8 quantization of the UNet through apply_."""
    import copy

    from slimtorch.api import apply_
    from slimtorch.diffusion.ptq import calibration_batches, record_trajectory
    from slimtorch.diffusion.schedule import NoiseSchedule
    from slimtorch.diffusion.unet import DDPMUNet
    from slimtorch.quantize import PTQConfig

    torch.manual_seed(0)
    net = DDPMUNet(ch=32, groups=8).eval()
    batches = calibration_batches(net, samples=40, steps=10, method=method, trajectory_batch=8, batch=16,
                                  generator=torch.Generator().manual_seed(0))
    x = torch.cat([b[0] for b in batches])
    t = torch.cat([b[1] for b in batches])
    y = torch.cat([b[2] for b in batches])
    assert len(x) == 40 and [len(b[0]) for b in batches] == [16, 16, 8]
    run = record_trajectory(net, 8, 10, NoiseSchedule.linear(), torch.Generator().manual_seed(0))
    for xi, ti, yi in zip(x, t, y):  # each input is a stored row at its step, with that row's label
        i = run["t"].tolist().index(int(ti))
        hit = (run["x"][i] == xi).flatten(1).all(1)
        assert hit.any() and int(run["y"][hit.nonzero()[0, 0]]) == int(yi)
    if method == "uniform":
        assert sorted(torch.bincount(t).tolist())[-10:] == [4] * 10
    # the static range of the first layer's input (min-max observer) spans every step's inputs
    q = copy.deepcopy(net)
    apply_(q, PTQConfig("W8A8", "rtn"), batches)
    act = q.conv_in.act
    lo, hi = float(act.scale * (-128 - act.zero)), float(act.scale * (127 - act.zero))
    step = float(act.scale)
    assert lo <= float(x.min()) + step and hi >= float(x.max()) - step
    assert hi - lo <= float(x.max() - x.min()) + 2 * step
