"""PACT: a learned clipping level for activations (Choi et al., 2018), and SAT's gradient-calibrated form.

With ``delta = alpha / qmax`` the input is clipped to ``[qmin * delta, alpha]`` and rounded to multiples
of ``delta``: unsigned codes (``qmin = 0``, the paper's ReLU case) give ``alpha * round(clip(x, 0, alpha)
* n / alpha) / n`` with ``n = 2^b - 1``; signed codes (inputs that can be negative) use the same step
on both sides.

Gradients (``x`` inside the range: straight-through 1; outside: 0):

* PACT: ``d x_q / d alpha`` is 1 where ``x >= alpha``, ``qmin / qmax`` where x is clipped below, 0 inside.
* calibrated (SAT, Jin et al. 2019): inside the range also ``(round(x / delta) - x / delta) / qmax``,
  i.e. ``Q(x / alpha) - x / alpha``, the quantization-error term that PACT drops.

``alpha`` is a learned scalar; PACT puts an L2 penalty on it, which the training loop's weight decay
provides. SAT's code starts it at 8 (conv inputs) or 10 (linear inputs), values for ImageNet networks.
By default (``alpha=None``) it starts from the first batch instead, at ``qmax`` times LSQ's initial
step, ``2 mean|x| sqrt(qmax)``: activations after batch norm have a spread near 1, and a clip of 8 at
2 bits would round almost all of them to 0.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.qat.lazy import FirstBatchInit
from slimtorch.qat.ste import round_ste
from slimtorch.spec import PerTensor, QuantSpec


def pact_fake_quant(x: torch.Tensor, alpha: torch.Tensor, qmin: int, qmax: int,
                    calibrated: bool = False) -> torch.Tensor:
    """``delta * round(clamp(x / delta, qmin, qmax))`` with ``delta = alpha / qmax``, PACT's gradients (or
    SAT's calibrated ones)."""
    delta = alpha / qmax
    if calibrated:
        return round_ste(torch.clamp(x / delta, qmin, qmax)) * delta
    y = torch.minimum(torch.maximum(x, delta * qmin), alpha)  # alpha gets the gradient of clipped values only
    return y + (torch.round(y / delta) * delta - y).detach()


def initial_alpha(x: torch.Tensor, qmax: int) -> float:
    """The data-driven start: ``qmax`` times LSQ's initial step, ``2 mean|x| sqrt(qmax)`` (1 for all zeros)."""
    return float(2 * x.detach().abs().float().mean() * qmax**0.5) or 1.0


class PACT(FirstBatchInit):
    """Activation quantizer with a learned clipping level ``alpha`` (a scalar), following ``spec``
    (an integer dtype: ``uint<b>`` for non-negative inputs, ``int<b>`` otherwise)."""

    def __init__(self, spec: QuantSpec, alpha: float | None = None, calibrated: bool = False) -> None:
        super().__init__()
        self.spec, self.calibrated = spec, calibrated
        self.qmin, self.qmax = spec.qrange
        self.alpha = nn.Parameter(torch.tensor(8.0 if alpha is None else float(alpha)))
        self.register_buffer("initialized", torch.tensor(alpha is not None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.needs_init():
            with torch.no_grad():
                self.alpha.fill_(initial_alpha(x, self.qmax))
                self.initialized.fill_(True)
        alpha = self.alpha.abs().clamp(min=1e-4).to(x.dtype)  # SAT's code uses |alpha|
        return pact_fake_quant(x, alpha, self.qmin, self.qmax, self.calibrated)

    def export(self) -> tuple[QuantSpec, torch.Tensor, torch.Tensor]:
        """(spec, scale, zero) for which the core's ``fake_quant`` equals this forward."""
        scale = self.alpha.detach().abs().clamp(min=1e-4).float() / self.qmax
        return QuantSpec(self.spec.dtype, PerTensor(), symmetric=self.qmin < 0), scale, torch.zeros_like(scale)

    def extra_repr(self) -> str:
        return f"{self.spec.dtype}, calibrated={self.calibrated}"
