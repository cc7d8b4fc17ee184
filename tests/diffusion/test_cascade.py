"""LowDiff's cascade: the unified network takes both stages; training batches split by stage with the right
conditions; sampling runs stage 0 at 16x16 and conditions stage 1 on it."""

import torch

from slimtorch.diffusion.cascade import (
    cascade_sample,
    downsample,
    training_batch,
    upsample,
)
from slimtorch.diffusion.schedule import NoiseSchedule
from slimtorch.diffusion.unet import DDPMUNet


def test_unified_network_runs_both_stages_and_uses_its_inputs():
    torch.manual_seed(0)
    net = DDPMUNet(ch=32, groups=8, cond_ch=1, resolutions=2).eval()
    y = torch.tensor([1, 2])
    with torch.no_grad():
        lo = net(torch.randn(2, 1, 16, 16), torch.tensor([10, 10]), y, stage=torch.tensor([0, 0]))
        x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 10])
        c = torch.randn(2, 1, 32, 32)
        hi = net(x, t, y, cond=c, stage=torch.tensor([1, 1]))
        assert lo.shape == (2, 1, 16, 16) and hi.shape == (2, 1, 32, 32)
        assert not torch.allclose(hi, net(x, t, y, cond=torch.zeros_like(c), stage=torch.tensor([1, 1])))
        assert not torch.allclose(hi, net(x, t, y, cond=c, stage=torch.tensor([0, 0])))


def test_training_batch_splits_by_stage():
    x0 = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64)
    (lo, lo_c, lo_s, lo_y), (hi, hi_c, hi_s, hi_y) = training_batch(x0, y, torch.Generator().manual_seed(1), aug_noise=0.0)
    assert lo_s.tolist() == [0] * len(lo) and hi_s.tolist() == [1] * len(hi) and len(lo) + len(hi) == 64
    assert lo.shape[-1] == 16 and torch.equal(lo_c, torch.zeros_like(lo))
    assert torch.equal(lo, downsample(x0[lo_y])) and torch.equal(hi, x0[hi_y])  # labels follow their images
    assert torch.allclose(hi_c, upsample(downsample(hi)))  # its own low-resolution copy


def test_cascade_sampling_conditions_the_second_stage_on_the_first():
    seen = []

    class Fake(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y, cond=None, stage=None):
            seen.append((x.shape[-1], int(stage[0]), None if cond is None else cond.clone()))
            return torch.zeros_like(x)  # eps = 0: DDIM moves x_T straight to x_T / sqrt(abar_T)

    labels = torch.tensor([0, 1, 2])
    high, low = cascade_sample(Fake(), labels, NoiseSchedule.linear(), 4, 2, guidance=2.0,
                               generator=torch.Generator().manual_seed(0))
    assert low.shape == (3, 1, 16, 16) and high.shape == (3, 1, 32, 32)
    assert [s[:2] for s in seen] == [(16, 0)] * 4 + [(32, 1)] * 2
    assert all(torch.equal(s[2], torch.zeros_like(s[2])) for s in seen[:4])
    cond = seen[-1][2]
    assert cond.shape == (6, 1, 32, 32) and torch.equal(cond[:3], upsample(low)) and torch.equal(cond[3:], upsample(low))


def test_stage_steps_split_the_budget():
    from slimtorch.diffusion.cascade import stage_steps

    assert stage_steps(50) == (40, 10) and stage_steps(100) == (80, 20) and stage_steps(1) == (1, 1)
