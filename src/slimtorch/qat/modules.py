"""Training-time layers: a float weight trained through a weight quantizer, and an input quantizer.

They subclass ``nn.Linear`` / ``nn.Conv2d`` and keep the parameter names (``weight``, ``bias``), so a
float state dict loads into them unchanged. Quantizers are modules with:

* weight quantizers: ``forward(w) -> w_hat`` and ``export_weight(w) -> (spec, codes, scale, zero)``;
* input quantizers: ``forward(x) -> x_hat`` and ``export() -> (spec, scale, zero)``;

where the exported values reproduce the forward exactly through the core's ``dequantize`` /
``fake_quant``, so :func:`slimtorch.qat.convert` gives the post-training modules and save format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QATLinear(nn.Linear):
    """``y = aq(x) @ wq(W).T + b``. x (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, wq: nn.Module, aq: nn.Module | None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.wq, self.aq = wq, aq

    @classmethod
    def from_float(cls, lin: nn.Linear, wq: nn.Module, aq: nn.Module | None) -> QATLinear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, wq, aq, lin.weight.device, lin.weight.dtype)
        m.load_state_dict(lin.state_dict(), strict=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x if self.aq is None else self.aq(x), self.wq(self.weight), self.bias)


class QATConv2d(nn.Conv2d):
    """Conv2d on ``aq(x)`` with weight ``wq(W)``. x (B, C, H, W)."""

    def __init__(self, conv: nn.Conv2d, wq: nn.Module, aq: nn.Module | None) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.load_state_dict(conv.state_dict(), strict=False)
        self.wq, self.aq = wq, aq

    @classmethod
    def from_float(cls, conv: nn.Conv2d, wq: nn.Module, aq: nn.Module | None) -> QATConv2d:
        return cls(conv, wq, aq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x if self.aq is None else self.aq(x), self.wq(self.weight), self.bias)


QAT_TYPES = (QATLinear, QATConv2d)
