"""The DDPM forward process and the conversions between what a network may predict.

``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with ``abar_t = prod_{s <= t} (1 - beta_s)``, t = 0..T-1
(t = 0 is the first noising step, as in DDPM's code). A network predicts eps, x_0 or v
(``v = sqrt(abar) eps - sqrt(1 - abar) x_0``, Salimans & Ho); samplers work from (x_0, eps) estimates, which
:func:`split` gives for any of the three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtorch.errors import SlimError

PREDICTIONS = ("eps", "x0", "v")


@dataclass(frozen=True)
class NoiseSchedule:
    """``alphas_cumprod`` (T,) float64, decreasing from about 1 to about 0."""

    alphas_cumprod: torch.Tensor

    @classmethod
    def linear(cls, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """DDPM's linear betas (Ho et al.: T = 1000, 1e-4 .. 0.02)."""
        if steps < 2 or not 0 < beta_start <= beta_end < 1:
            raise SlimError(f"noise schedule: need steps >= 2 and 0 < beta_start <= beta_end < 1; got {steps}, "
                            f"{beta_start}, {beta_end}")
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0))

    @classmethod
    def cosine(cls, steps: int = 1000, s: float = 0.008) -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule (betas clipped at 0.999)."""
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + s) / (1 + s) * torch.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return cls(torch.cumprod(1 - betas, 0))

    @property
    def steps(self) -> int:
        return self.alphas_cumprod.numel()

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) for integer steps ``t`` (B,), shaped to broadcast against ``like``
        (B, ...), in ``like``'s dtype."""
        a = self.alphas_cumprod.to(like.device)[t.long()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.sqrt().to(like.dtype).view(shape), (1 - a).sqrt().to(like.dtype).view(shape)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from x_0 (B, ...), noise of the same shape and steps t (B,)."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """What a network trained for ``prediction`` should output at (x_t, t)."""
        check_prediction(prediction)
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        a, s = self.coefficients(t, x0)
        return a * eps - s * x0


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise SlimError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def split(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
          prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0 estimate, eps estimate) from a network output ``out`` at x_t with coefficients a = sqrt(abar),
    s = sqrt(1 - abar) (as :meth:`NoiseSchedule.coefficients` gives)."""
    if prediction == "eps":
        return (x_t - s * out) / a, out
    if prediction == "x0":
        return out, (x_t - a * out) / s
    if prediction == "v":  # x_0 = a x_t - s v, eps = s x_t + a v (a^2 + s^2 = 1)
        return a * x_t - s * out, s * x_t + a * out
    check_prediction(prediction)
    raise AssertionError  # unreachable
