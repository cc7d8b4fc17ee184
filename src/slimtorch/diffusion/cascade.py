"""LowDiff-style cascaded sampling with one unified network: most denoising steps run at 16x16 (a quarter
of the pixels), then a few steps at 32x32 refine the result, conditioned on the low-resolution sample.

The network is a :class:`~slimtorch.diffusion.unet.DDPMUNet` with ``cond_ch=1`` and ``resolutions=2``:
stage 0 denoises 16x16 images (its condition channel is zero), stage 1 denoises 32x32 images given the
16x16 image upsampled. Training (:func:`training_batch`) picks a stage per sample: stage 0 learns the
downsampled data; stage 1 learns the full data conditioned on its own downsampled copy, upsampled and
lightly noised (noise-conditioning augmentation, as cascaded diffusion models do, so that stage 1 tolerates
the errors of a sampled low-resolution image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.diffusion.samplers import guided, sample, timesteps
from slimtorch.diffusion.schedule import NoiseSchedule
from slimtorch.progress import Progress, no_progress


def downsample(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 2R, 2R) -> (B, C, R, R), 2x2 average."""
    return F.avg_pool2d(x, 2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """(B, C, R, R) -> (B, C, 2R, 2R), bilinear."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def training_batch(x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None, p_low: float = 0.5,
                   aug_noise: float = 0.1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split a batch of 32x32 images (B, C, 32, 32) with labels (B,) into the two stages' training inputs:
    one (clean target, condition or zeros, stage ids, labels) per stage present. ``generator``: a CPU one."""
    low = (torch.rand(x0.shape[0], generator=generator) < p_low).to(x0.device)
    out = []
    if low.any():
        small = downsample(x0[low])
        out.append((small, torch.zeros_like(small), torch.zeros(small.shape[0], dtype=torch.long, device=x0.device),
                    y[low]))
    if (~low).any():
        big = x0[~low]
        c = upsample(downsample(big))
        c = c + aug_noise * torch.randn(c.shape, generator=generator).to(c.device, c.dtype)
        out.append((big, c, torch.ones(big.shape[0], dtype=torch.long, device=x0.device), y[~low]))
    return out


def stage_steps(total: int) -> tuple[int, int]:
    """How a budget of ``total`` sampling steps splits between the stages: 80% at 16x16, at least one each."""
    low = max(1, total * 4 // 5)
    return low, max(1, total - low)


def _stage_net(model: nn.Module, cond: torch.Tensor, stage: int):
    """``net(x, t, y)`` for one stage; the condition follows the batch when guidance doubles it."""

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = cond if x.shape[0] == cond.shape[0] else cond.repeat(x.shape[0] // cond.shape[0], 1, 1, 1)
        return model(x, t, y, cond=c, stage=torch.full_like(y, stage))

    return net


@torch.no_grad()
def cascade_sample(model: nn.Module, labels: torch.Tensor, schedule: NoiseSchedule, steps_low: int, steps_high: int,
                   guidance: float = 2.0, sampler: str = "ddim", generator: torch.Generator | None = None,
                   progress: Progress = no_progress) -> tuple[torch.Tensor, torch.Tensor]:
    """(32x32 samples, their 16x16 first stage) for ``labels`` (B,): ``steps_low`` steps at 16x16, then
    ``steps_high`` at 32x32 conditioned on the upsampled first stage."""
    dev = labels.device
    b = labels.shape[0]
    x = torch.randn(b, 1, 16, 16, generator=generator).to(dev)
    zeros = torch.zeros_like(x)
    low = sample(sampler, guided(_stage_net(model, zeros, 0), labels, guidance, model.num_classes), x, schedule,
                 timesteps(schedule.steps, steps_low), progress=progress).clamp(-1, 1)
    x = torch.randn(b, 1, 32, 32, generator=generator).to(dev)
    high = sample(sampler, guided(_stage_net(model, upsample(low), 1), labels, guidance, model.num_classes), x,
                  schedule, timesteps(schedule.steps, steps_high), progress=progress)
    return high, low


def sample_model(model: nn.Module, labels: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule, steps: int,
                 guidance: float = 2.0, sampler: str = "ddim", generator: torch.Generator | None = None,
                 grid: list[int] | None = None, net=None) -> torch.Tensor:
    """One batch of class-conditional samples of one of our models, the way each is sampled: a LowDiff
    model (``cond_ch``) through :func:`cascade_sample` (its noise drawn from ``generator``, most steps at
    16x16: :func:`stage_steps`), any other through ``sampler`` from ``noise`` with guidance, on ``grid`` (a
    distilled student's steps) or ``steps`` evenly spaced. ``net``: what to call in place of ``model``
    (a wrapper that casts inputs, say)."""
    if getattr(model, "cond_ch", 0):
        return cascade_sample(model, labels, schedule, *stage_steps(steps), guidance, sampler, generator)[0]
    return sample(sampler, guided(net or model, labels, guidance, model.num_classes), noise, schedule,
                  grid or timesteps(schedule.steps, steps))
