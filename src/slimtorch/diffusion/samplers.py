"""Samplers: DDPM (ancestral), DDIM and DPM-Solver++(2M), as functions of a denoiser.

A denoiser is ``fn(x_t (B, ...), t (B,) long) -> network output`` (eps, x_0 or v, as ``prediction`` says);
:func:`guided` wraps a class-conditional network with classifier-free guidance. Every sampler takes the
steps it evaluates the network at as an increasing list (:func:`timesteps`) and returns x_0; it makes one
network call per step.

* DDIM (Song et al.): ``x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z`` with
  ``sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')``; eta = 0 is deterministic.
* DDPM: DDIM with eta = 1, which over consecutive steps is DDPM's ancestral step (posterior mean and
  variance beta~_t; tests/diffusion check it against the closed form).
* DPM-Solver++(2M) (Lu et al. 2022): multistep second order in lambda = log(alpha / sigma) on the x_0
  prediction; first order on the first step and on the last (to x_0), as diffusers' ``lower_order_final``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimtorch.diffusion.schedule import NoiseSchedule, check_prediction, split
from slimtorch.errors import SlimError
from slimtorch.progress import Progress, no_progress

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim", "dpmpp-2m")


def timesteps(train_steps: int, n: int, spacing: str = "uniform") -> list[int]:
    """``n`` distinct steps in [0, train_steps - 1], increasing, from 0 to the last: evenly spaced, or
    ``quadratic`` (denser near 0, as DDIM's CIFAR setting)."""
    if not 1 <= n <= train_steps:
        raise SlimError(f"sampling steps must be between 1 and the schedule's {train_steps}; got {n}")
    if spacing not in ("uniform", "quadratic"):
        raise SlimError(f"timestep spacing {spacing!r}: choose uniform or quadratic")
    if n == 1:
        return [train_steps - 1]
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    ts = (u if spacing == "uniform" else u**2) * (train_steps - 1)
    out: list[int] = []
    for v in ts.round().long().tolist():  # strictly increasing even where rounding collides
        out.append(max(v, out[-1] + 1) if out else v)
    shift = out[-1] - (train_steps - 1)
    if shift > 0:  # collisions near 0 pushed the top past the end: pull the tail back
        out = [min(v, train_steps - 1 - (len(out) - 1 - i)) for i, v in enumerate(out)]
    return out


def guided(net: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor,
           scale: float, null_label: int) -> Denoiser:
    """Classifier-free guidance: ``out_uncond + scale (out_cond - out_uncond)``, both branches in one batch
    (the conditional half first). ``net(x, t, labels)``; ``null_label`` is the class id the network was
    trained with for "no class". scale = 1 is the conditional network alone (one branch)."""
    if scale == 1.0:
        return lambda x, t: net(x, t, labels)
    null = torch.full_like(labels, null_label)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return fn


def _abar(schedule: NoiseSchedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def ddim_step(x: torch.Tensor, out: torch.Tensor, ab: float, ab_prev: float, prediction: str, eta: float,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM step from x_t (abar = ``ab``) to the step with abar ``ab_prev`` (1.0: x_0), given the
    network output ``out`` at x_t; ``noise`` (like x) is needed when eta > 0."""
    x0, eps = split(out.to(x.dtype), x, torch.tensor(ab**0.5, dtype=x.dtype),
                    torch.tensor((1 - ab) ** 0.5, dtype=x.dtype), prediction)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
    x = ab_prev**0.5 * x0 + max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
    return x + sigma * noise if sigma > 0 else x


def ddim(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: list[int], prediction: str = "eps",
         eta: float = 0.0, generator: torch.Generator | None = None, progress: Progress = no_progress) -> torch.Tensor:
    """x_T (B, ...) -> x_0 through the steps ``steps`` (increasing; evaluated from the last down)."""
    check_prediction(prediction)
    order = list(reversed(steps))
    for i, t in enumerate(progress(order, "sampling")):
        t_prev = order[i + 1] if i + 1 < len(order) else -1
        out = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta > 0 else None
        x = ddim_step(x, out, _abar(schedule, t), _abar(schedule, t_prev), prediction, eta, noise)
    return x


def ddpm(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: list[int], prediction: str = "eps",
         generator: torch.Generator | None = None, progress: Progress = no_progress) -> torch.Tensor:
    """Ancestral sampling: DDIM with eta = 1 (module docstring)."""
    return ddim(denoise, x, schedule, steps, prediction, 1.0, generator, progress)


def dpm_solver_pp_2m(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: list[int],
                     prediction: str = "eps", progress: Progress = no_progress) -> torch.Tensor:
    """DPM-Solver++(2M), deterministic: x_T (B, ...) -> x_0 (module docstring)."""
    check_prediction(prediction)
    order = list(reversed(steps))
    prev_x0, prev_h = None, None
    for i, t in enumerate(progress(order, "sampling")):
        ab = _abar(schedule, t)
        a, s = ab**0.5, (1 - ab) ** 0.5
        out = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0, _ = split(out.to(x.dtype), x, torch.tensor(a, dtype=x.dtype), torch.tensor(s, dtype=x.dtype), prediction)
        if i + 1 == len(order):  # the last step lands on x_0 itself (sigma = 0: lambda is infinite)
            return x0
        ab_next = _abar(schedule, order[i + 1])
        a_n, s_n = ab_next**0.5, (1 - ab_next) ** 0.5
        h = torch.log(torch.tensor(a_n / s_n, dtype=torch.float64)) - torch.log(torch.tensor(a / s, dtype=torch.float64))
        d = x0
        if prev_x0 is not None:
            r = float(prev_h / h)
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (s_n / s) * x - a_n * float(torch.expm1(-h)) * d
        prev_x0, prev_h = x0, h
    return x


def sample(sampler: str, denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: list[int],
           prediction: str = "eps", generator: torch.Generator | None = None,
           progress: Progress = no_progress) -> torch.Tensor:
    """One of :data:`SAMPLERS` by name."""
    if sampler == "ddim":
        return ddim(denoise, x, schedule, steps, prediction, 0.0, generator, progress)
    if sampler == "ddpm":
        return ddpm(denoise, x, schedule, steps, prediction, generator, progress)
    if sampler == "dpmpp-2m":
        return dpm_solver_pp_2m(denoise, x, schedule, steps, prediction, progress)
    raise SlimError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
