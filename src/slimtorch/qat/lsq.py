"""LSQ: learned step size quantization (Esser et al., ICLR 2020).

``v_hat = round(clamp(v / s, qmin, qmax)) * s`` with a learned step ``s``. The gradients are those of
the paper: ``d v_hat / d v`` is 1 inside the range and 0 outside (straight-through), and

    d v_hat / d s = round(v/s) - v/s   if qmin < v/s < qmax
                  = qmin               if v/s <= qmin
                  = qmax               if v/s >= qmax

multiplied by the gradient scale ``g = 1 / sqrt(N * qmax)`` (N: the number of values that share the
step: a layer's weights, or the features of one sample for activations). The step starts at
``2 * mean|v| / sqrt(qmax)``.

Weights use signed codes (``int<b>``, e.g. [-8, 7] at 4 bits) with one step per output channel or per
tensor; activations use one step per tensor, unsigned codes (``uint<b>``) when the layer's input is
non-negative (after a ReLU) and signed ones otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtorch.qat.lazy import FirstBatchInit
from slimtorch.qat.ste import round_ste, scale_grad
from slimtorch.spec import PerChannel, PerTensor, QuantSpec


def lsq_codes(v: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int,
              grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``round(clamp(v / s, qmin, qmax))``, ``s``) with LSQ's gradients (the step's scaled by
    ``grad_scale``); ``step`` broadcasts against ``v``."""
    s = scale_grad(step, grad_scale)
    return round_ste(torch.clamp(v / s, qmin, qmax)), s


def lsq_fake_quant(v: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float) -> torch.Tensor:
    """``round(clamp(v / s, qmin, qmax)) * s`` with LSQ's gradients; ``step`` broadcasts against ``v``."""
    q, s = lsq_codes(v, step, qmin, qmax, grad_scale)
    return q * s


def lsq_init_step(v: torch.Tensor, qmax: int, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """The paper's initial step ``2 mean|v| / sqrt(qmax)`` over ``dims`` (all when None), kept as dims."""
    a = v.detach().abs()
    mean = a.mean() if dims is None else a.mean(dim=dims, keepdim=True)
    return (2 * mean / math.sqrt(qmax)).clamp(min=1e-8)


class LSQ(FirstBatchInit):
    """A learned-step quantizer for one tensor, following ``spec`` (integer dtype; ``PerChannel(0)``
    or ``PerTensor`` granularity). The step is set from the first tensor it sees (``initialized``)."""

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...] = (), weight: bool = False) -> None:
        super().__init__()
        self.spec, self.is_weight = spec, weight
        self.qmin, self.qmax = spec.qrange
        per_channel = isinstance(spec.granularity, PerChannel)
        step_shape = (shape[0],) + (1,) * (len(shape) - 1) if per_channel else ()
        self.step = nn.Parameter(torch.ones(step_shape))
        self.register_buffer("initialized", torch.tensor(False))

    def _dims(self, v: torch.Tensor) -> tuple[int, ...] | None:
        return tuple(range(1, v.ndim)) if self.step.ndim else None

    def codes(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer-valued codes, step), both carrying LSQ's gradients; ``codes * step == forward(v)``."""
        if self.needs_init():
            with torch.no_grad():
                self.step.copy_(lsq_init_step(v, self.qmax, self._dims(v)))
                self.initialized.fill_(True)
        # N: the values sharing one step (weights), or the features of one sample (activations)
        n = v.numel() // self.step.numel() if self.is_weight else v[0].numel() if v.ndim > 1 else v.numel()
        step = self.step.abs().clamp(min=1e-8).to(v.dtype)
        return lsq_codes(v, step, self.qmin, self.qmax, 1.0 / math.sqrt(n * self.qmax))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        q, s = self.codes(v)
        return q * s

    def export(self, v: torch.Tensor | None = None) -> tuple[QuantSpec, torch.Tensor, torch.Tensor]:
        """(spec, scale, zero) that the core's ``fake_quant`` / ``dequantize`` use to give this forward
        exactly; the scale has the core's shape for a 2-D ``(out, -1)`` weight or for activations."""
        s = self.step.detach().abs().clamp(min=1e-8).float()
        spec = QuantSpec(self.spec.dtype, PerChannel(0) if s.ndim else PerTensor(), symmetric=self.qmin < 0)
        scale = s.reshape(-1, 1) if s.ndim else s
        return spec, scale, torch.zeros_like(scale)

    @torch.no_grad()
    def export_weight(self, w: torch.Tensor) -> tuple[QuantSpec, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(spec, codes (out, -1), scale, zero) with ``(codes - zero) * scale == forward(w)``."""
        spec, scale, zero = self.export()
        w2 = w.detach().float().reshape(w.shape[0], -1)
        codes = torch.round(torch.clamp(w2 / scale, self.qmin, self.qmax))
        return spec, codes.to(torch.uint8 if spec.dtype == "uint8" else torch.int8), scale, zero

    def extra_repr(self) -> str:
        return f"{self.spec.dtype}, [{self.qmin}, {self.qmax}], {'per channel' if self.step.ndim else 'per tensor'}"
