"""Progressive step distillation (Salimans & Ho 2022) with SnapFusion's classifier-free-guidance-aware loss.

A student starts as a copy of the teacher and learns to do in one DDIM step what the teacher does in two:
for a training point x_t at step t of the student's grid (t > t_mid > t_next on the teacher's grid of twice
as many steps), the teacher runs two deterministic DDIM steps t -> t_mid -> t_next, and the student's target
is the x_0 that makes a single DDIM step t -> t_next land on the teacher's result:

    x_next = a_n x0 + s_n (x_t - a_t x0) / s_t   =>   x0~ = (x_next - (s_n / s_t) x_t) / (a_n - s_n a_t / s_t)

(a = sqrt(abar), s = sqrt(1 - abar)). ``weighting="state"`` (the default) weights the x_0 error by
c^2 = (a_n - s_n a_t / s_t)^2, which makes the loss the error of the student's landing point x_next itself.
The paper's max(SNR, 1) ("truncated SNR", ``weighting="snr"``) suits x- or v-predicting students; for an
eps-predicting one it blows up on the first, near-pure-noise steps: there c is ~1e-3 (t 999 -> 967 of a 64-step
linear-schedule grid), so x0~ divides the teacher's result by c, and one Adam step at lr 1e-4 took the loss of
the shipped UNet from 3 to 941 (CPU check, benchmarks/notes/issue21_diffusion.md). Rounds halve the step
count: 64 -> 32 -> ... -> 4.

SnapFusion's CFG-aware distillation: with probability ``cfg_prob`` a training batch runs both teacher and
student under classifier-free guidance with a scale drawn from ``cfg_range`` (the student's guided output
is what is matched), so the few-step student keeps working under the guidance it is sampled with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimtorch.diffusion.samplers import ddim_step, guided
from slimtorch.diffusion.schedule import NoiseSchedule, split
from slimtorch.errors import SlimError


def one_step_target(x_t: torch.Tensor, x_next: torch.Tensor, ab_t: torch.Tensor, ab_n: torch.Tensor) -> torch.Tensor:
    """The x_0 (B, ...) with which one DDIM step from x_t (abar ``ab_t``, (B,)) lands on x_next (abar ``ab_n``)."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    a_t, s_t = ab_t.sqrt().view(shape), (1 - ab_t).sqrt().view(shape)
    a_n, s_n = ab_n.sqrt().view(shape), (1 - ab_n).sqrt().view(shape)
    return (x_next - (s_n / s_t) * x_t) / (a_n - s_n * a_t / s_t)


def _ddim_batch(denoise: Callable, x: torch.Tensor, t: torch.Tensor, t_to: torch.Tensor, schedule: NoiseSchedule,
                prediction: str) -> torch.Tensor:
    """One deterministic DDIM step per row (rows may sit at different steps); t_to = -1 lands on x_0."""
    ab = schedule.alphas_cumprod.to(x.device)
    ab_t = ab[t].to(x.dtype)
    ab_to = torch.where(t_to < 0, torch.ones_like(ab_t), ab[t_to.clamp(min=0)].to(x.dtype))
    shape = (-1,) + (1,) * (x.dim() - 1)
    x0, eps = split(denoise(x, t).to(x.dtype), x, ab_t.sqrt().view(shape), (1 - ab_t).sqrt().view(shape), prediction)
    return ab_to.sqrt().view(shape) * x0 + (1 - ab_to).sqrt().view(shape) * eps


def distill_loss(student: Callable, teacher: Callable, x0: torch.Tensor, y: torch.Tensor, teacher_grid: list[int],
                 schedule: NoiseSchedule, null_label: int, generator: torch.Generator | None = None,
                 cfg_prob: float = 0.0, cfg_range: tuple[float, float] = (1.0, 3.0),
                 prediction: str = "eps", weighting: str = "state") -> torch.Tensor:
    """The progressive-distillation loss on clean images x0 (B, ...) with labels y (B,).

    ``teacher_grid``: the teacher's sampling steps, increasing, of even length 2n (its last DDIM step goes
    from ``teacher_grid[0]`` to x_0). The student's grid is :func:`student_grid` (the odd entries); a
    student step from T[2i+1] to T[2i-1] (x_0 for i = 0) matches the teacher's two steps through T[2i].
    ``student`` / ``teacher``: ``fn(x, t, y) -> output`` (``prediction``). ``weighting``: "state" (the
    error of the landing point x_next) or "snr" (truncated SNR on the x_0 error); module docstring."""
    if weighting not in ("state", "snr"):
        raise SlimError(f"distillation weighting must be 'state' or 'snr', got {weighting!r}")
    grid = torch.tensor(teacher_grid, device=x0.device)
    n = len(teacher_grid) // 2
    if n < 1 or len(teacher_grid) % 2:
        raise SlimError(f"progressive distillation halves an even number of teacher steps; got {len(teacher_grid)}")
    b = x0.shape[0]
    i = torch.randint(0, n, (b,), generator=generator).to(x0.device)
    t, t_mid = grid[2 * i + 1], grid[2 * i]
    t_next = torch.where(i > 0, grid[(2 * i - 1).clamp(min=0)], torch.full_like(t, -1))
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = schedule.add_noise(x0, eps, t)
    scale = 1.0
    if cfg_prob > 0 and float(torch.rand(1, generator=generator)) < cfg_prob:
        lo, hi = cfg_range
        scale = lo + (hi - lo) * float(torch.rand(1, generator=generator))
    teach = guided(teacher, y, scale, null_label)
    stud = guided(student, y, scale, null_label)
    ab = schedule.alphas_cumprod.to(x0.device)
    ab_t = ab[t].to(x0.dtype)
    ab_n = torch.where(t_next < 0, torch.ones_like(ab[t]), ab[t_next.clamp(min=0)]).to(x0.dtype)
    with torch.no_grad():
        x_mid = _ddim_batch(teach, x_t, t, t_mid, schedule, prediction)
        x_next = _ddim_batch(teach, x_mid, t_mid, t_next, schedule, prediction)
        target = one_step_target(x_t, x_next, ab_t, ab_n)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    pred_x0, _ = split(stud(x_t, t).to(x0.dtype), x_t, ab_t.sqrt().view(shape), (1 - ab_t).sqrt().view(shape),
                       prediction)
    if weighting == "snr":
        weight = (ab_t / (1 - ab_t)).clamp(min=1.0)
    else:  # d x_next / d x0 of one DDIM step t -> t_next, squared
        weight = (ab_n.sqrt() - (1 - ab_n).sqrt() * (ab_t / (1 - ab_t)).sqrt()) ** 2
    return (weight.view(shape) * (pred_x0 - target).pow(2)).mean()


def student_grid(teacher_grid: list[int]) -> list[int]:
    """The student's steps: the odd entries of the teacher's increasing grid of even length."""
    return teacher_grid[1::2]


def ddim_one(denoise: Callable, x: torch.Tensor, schedule: NoiseSchedule, t: int, t_next: int,
             prediction: str = "eps") -> torch.Tensor:
    """One DDIM step of the whole batch from step t to t_next (-1: x_0), for checks."""
    ab = schedule.alphas_cumprod
    out = denoise(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    return ddim_step(x, out, float(ab[t]), 1.0 if t_next < 0 else float(ab[t_next]), prediction, 0.0, None)
