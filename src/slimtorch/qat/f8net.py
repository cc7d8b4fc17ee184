"""F8Net: fixed-point 8-bit-only networks (Jin et al., ICLR 2022; snap-research/F8Net).

A value is held as an 8-bit integer with ``fl`` fractional bits: ``x_q = clamp(floor(x 2^fl + 1/2), lo, hi)
/ 2^fl``, ``[lo, hi] = [-(2^7 - 1), 2^7 - 1]`` signed or ``[0, 2^8 - 1]`` unsigned; straight-through
gradient inside the range, 0 where clipped. (Ties round up, as a right shift after adding half an LSB
does, so the integer forward below reproduces the fake-quant one exactly.) Multiplying two such numbers
gives an integer with ``fl_a + fl_b`` fractional bits; moving it to another format is a bit shift: no
floating-point multiply anywhere.

Formats come from standard deviations (the official ``format_from_metric``, metric ``std``):
``fl = clamp(floor(log2(c / sigma)), 0, 8 - signed)``, ``c = 40`` signed, ``70`` unsigned. Weights: the
sigma of the BN-folded weight, at every step. Activations: the batch's sigma in training, an EMA
(momentum 0.1) of it at inference.

Batch norm is folded during training as in the paper: the convolution runs once to get the batch's
mean and variance, ``W_f = gamma / sigma_B * W``, ``b_f = beta - gamma mu_B / sigma_B``, and the folded
weight is what is quantized (running statistics in eval). Biases are int32 with the accumulator's
format ``fl_in + fl_w``.

:class:`F8CNN` builds this for the zoo's residual CNN (``fmnist-cnn``): each ReLU output is a fixed-point
tensor; a residual sum aligns its two accumulators by left shifts; global average pooling is an integer
sum times the integer ``m = round(2^14 / (H W))`` and a shift. :func:`integer_forward` runs the trained
model with integer tensors only (int64 matmuls of the codes, shifts, clamps) and returns the logits'
integer accumulators and their fractional length.

Not done: the paper's PACT-in-fixed-point variant (learned clipping with the next layer's scale absorbed)
and shared "master" formats across residual branches: each tensor here has its own format.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import SlimError

WORD = 8
POOL_SHIFT = 14  # average pooling: sum * round(2^14 / count) >> 14


def fix_range(signed: bool, wl: int = WORD) -> tuple[int, int]:
    return (-(2 ** (wl - 1) - 1), 2 ** (wl - 1) - 1) if signed else (0, 2**wl - 1)


def fix_quant(x: torch.Tensor, fl: int, signed: bool = True, wl: int = WORD) -> torch.Tensor:
    """``clamp(floor(x 2^fl + 1/2), lo, hi) / 2^fl`` with the straight-through gradient masked to the range."""
    lo, hi = fix_range(signed, wl)
    scaled = x * 2.0**fl
    inside = (scaled >= lo) & (scaled <= hi)
    q = torch.clamp(torch.floor(scaled + 0.5), lo, hi) / 2.0**fl
    return torch.where(inside, x + (q - x).detach(), q.detach())


def fraclen_from_std(sigma: float, signed: bool = True, wl: int = WORD) -> int:
    """F8Net's rule: ``clamp(floor(log2(c / sigma)), 0, wl - signed)``, c = 40 signed, 70 unsigned."""
    c = 40.0 if signed else 70.0
    if not sigma > 0:
        return wl - int(signed)
    return int(min(max(math.floor(math.log2(c / sigma)), 0), wl - int(signed)))


def requant(acc: torch.Tensor, shift: int, signed: bool, wl: int = WORD) -> torch.Tensor:
    """Integer accumulator -> fixed-point codes: ``(acc + 2^(s-1)) >> s`` (left shift when s < 0), clamped."""
    lo, hi = fix_range(signed, wl)
    v = (acc + (1 << (shift - 1))) >> shift if shift > 0 else acc << -shift
    return v.clamp(lo, hi)


def _fixed_weight_bias(w: torch.Tensor, b: torch.Tensor, fl_in: int,
                       fl_w_buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit weights in the format of their std (recorded in ``fl_w_buffer``) and an int32 bias in the
    accumulator's format ``fl_in + fl_w``."""
    fl_w = fraclen_from_std(float(w.detach().float().std()), True)
    fl_w_buffer.fill_(fl_w)
    return fix_quant(w, fl_w, True), fix_quant(b, fl_in + fl_w, True, wl=32)


class FixAct(nn.Module):
    """Activation quantizer: 8-bit fixed point, ``fl`` from the batch's std in training and from its EMA
    (momentum 0.1) in eval. ``fl`` (a buffer) holds the format of the last output."""

    def __init__(self, signed: bool, momentum: float = 0.1) -> None:
        super().__init__()
        self.signed, self.momentum = signed, momentum
        self.register_buffer("std_ema", torch.tensor(-1.0))
        self.register_buffer("fl", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.std_ema < 0:  # the EMA starts from the first batch, in either mode
            sigma = x.detach().float().std()
            with torch.no_grad():
                first = self.std_ema < 0
                self.std_ema.copy_(sigma if first else (1 - self.momentum) * self.std_ema + self.momentum * sigma)
        fl = fraclen_from_std(float(sigma if self.training else self.std_ema), self.signed)
        self.fl.fill_(fl)
        return fix_quant(x, fl, self.signed)

    def eval_fl(self) -> int:
        """The inference format (from the EMA of the std)."""
        return fraclen_from_std(float(self.std_ema), self.signed)

    def extra_repr(self) -> str:
        return f"signed={self.signed}"


class F8ConvBN(nn.Module):
    """Conv2d (+ BatchNorm2d folded into it) with 8-bit fixed-point weights and an int32 bias.
    ``forward(x, fl_in)``: x holds fixed-point values with ``fl_in`` fractional bits."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> None:
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise SlimError("F8Net layers take plain convolutions (groups 1, dilation 1, zero padding)")
        self.stride, self.padding, self.kernel_size = conv.stride, conv.padding, conv.kernel_size
        self.weight = nn.Parameter(conv.weight.detach().clone())
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bn = None if bn is None else nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum)
        if bn is not None:
            self.bn.load_state_dict(bn.state_dict())
        self.register_buffer("conv_bias", bias)
        self.register_buffer("fl_w", torch.tensor(0, dtype=torch.long))

    def folded(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_f, b_f): batch statistics of ``conv(x)`` in training, running ones otherwise."""
        w, b = self.weight, self.conv_bias
        if self.bn is None:
            return w, b
        bn = self.bn
        if self.training and x is not None:
            y = F.conv2d(x, w, None, self.stride, self.padding)
            mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
            with torch.no_grad():
                n = y.numel() / y.shape[1]
                m = bn.momentum if bn.momentum is not None else 0.1
                bn.running_mean.mul_(1 - m).add_(m * (mean + b))
                bn.running_var.mul_(1 - m).add_(m * var * n / max(n - 1, 1))
                bn.num_batches_tracked += 1
            mean = mean + b
        else:
            mean, var = bn.running_mean, bn.running_var
        inv = bn.weight / torch.sqrt(var + bn.eps)
        return w * inv[:, None, None, None], bn.bias + (b - mean) * inv

    def quantized(self, fl_in: int, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return _fixed_weight_bias(*self.folded(x), fl_in, self.fl_w)

    def forward(self, x: torch.Tensor, fl_in: int) -> torch.Tensor:
        wq, bq = self.quantized(fl_in, x)
        return F.conv2d(x, wq, bq, self.stride, self.padding)


class F8Linear(nn.Module):
    """Linear layer with 8-bit fixed-point weights and an int32 bias; ``forward(x, fl_in)``."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().clone())
        self.bias = nn.Parameter(lin.bias.detach().clone() if lin.bias is not None else torch.zeros(lin.out_features))
        self.register_buffer("fl_w", torch.tensor(0, dtype=torch.long))

    def quantized(self, fl_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _fixed_weight_bias(self.weight, self.bias, fl_in, self.fl_w)

    def forward(self, x: torch.Tensor, fl_in: int) -> torch.Tensor:
        wq, bq = self.quantized(fl_in)
        return F.linear(x, wq, bq)


class F8Block(nn.Module):
    """The zoo's ResBlock in fixed point: relu(conv2(q1(relu(conv1(x)))) + shortcut(x)), quantized."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1 = F8ConvBN(block.conv1[0], block.conv1[1])
        self.q1 = FixAct(signed=False)
        self.conv2 = F8ConvBN(block.conv2, block.bn2)
        sc = block.shortcut
        self.shortcut = None if isinstance(sc, nn.Identity) else F8ConvBN(sc[0], sc[1])
        self.q_out = FixAct(signed=False)

    def forward(self, x: torch.Tensor, fl: int) -> tuple[torch.Tensor, int]:
        h = self.q1(torch.relu(self.conv1(x, fl)))
        y = self.conv2(h, int(self.q1.fl)) + (x if self.shortcut is None else self.shortcut(x, fl))
        return self.q_out(torch.relu(y)), int(self.q_out.fl)


def _pool_multiplier(count: int) -> int:
    return round(2**POOL_SHIFT / count)


class F8CNN(nn.Module):
    """fmnist-cnn in 8-bit fixed point (fake-quant training form). x (B, 1, 28, 28) -> logits (B, 10)."""

    def __init__(self, fp: nn.Module) -> None:
        super().__init__()
        names = ("stem", "layer1", "layer2", "layer3", "pool", "fc")
        if not all(hasattr(fp, n) for n in names) or not isinstance(fp.stem, nn.Sequential):
            raise SlimError("F8Net's fixed-point model is built for the zoo's residual CNN (fmnist-cnn): "
                            "stem, layer1-3, pool, fc")
        self.q_in = FixAct(signed=True)
        self.stem = F8ConvBN(fp.stem[0], fp.stem[1])
        self.q_stem = FixAct(signed=False)
        self.blocks = nn.ModuleList(F8Block(b) for b in (fp.layer1, fp.layer2, fp.layer3))
        self.q_pool = FixAct(signed=False)
        self.fc = F8Linear(fp.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_in(x)
        x = self.q_stem(torch.relu(self.stem(x, int(self.q_in.fl))))
        fl = int(self.q_stem.fl)
        for b in self.blocks:
            x, fl = b(x, fl)
        count = x.shape[2] * x.shape[3]
        pooled = x.sum((2, 3)) * (_pool_multiplier(count) / 2**POOL_SHIFT)
        x = self.q_pool(pooled)
        return self.fc(x, int(self.q_pool.fl))


# ----------------------------------------------------------------------------- integer-only inference
def _codes(v: torch.Tensor, fl: int) -> torch.Tensor:
    c = v.detach().double() * 2.0**fl
    if not torch.equal(c, c.round()):
        raise SlimError("a fixed-point tensor is not on its grid; run the model once in eval mode first")
    return c.round().long()


def _conv_int(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride, padding) -> torch.Tensor:
    """int64 convolution by im2col + int64 matmul: x (B, C, H, W) codes, w (O, C, kh, kw), b (O,)."""
    bsz, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    cols = F.unfold(x.double(), (kh, kw), padding=padding, stride=stride).long()  # exact: small integers
    acc = w.reshape(o, -1) @ cols + b[:, None]  # (B, O, L)
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (wd + 2 * padding[1] - kw) // stride[1] + 1
    return acc.reshape(bsz, o, ho, wo)


def _layer_int(layer: F8ConvBN, x: torch.Tensor, fl_in: int) -> tuple[torch.Tensor, int]:
    wq, bq = layer.quantized(fl_in)
    fl_w = int(layer.fl_w)
    return _conv_int(x, _codes(wq, fl_w), _codes(bq, fl_in + fl_w), layer.stride, layer.padding), fl_in + fl_w


def _to_act(acc: torch.Tensor, fl_acc: int, q: FixAct) -> tuple[torch.Tensor, int]:
    fl = q.eval_fl()
    return requant(acc.clamp(min=0), fl_acc - fl, q.signed), fl


@torch.no_grad()
def integer_forward(model: F8CNN, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer-only inference of an eval-mode :class:`F8CNN`: returns the int64 logit accumulators and
    their fractional length (logits = acc / 2^fl). Formats are the model's eval ones, so run it once in
    eval mode (``model.eval(); model(x)``) before calling this. Only the input image is converted from
    float (to the first layer's fixed-point format)."""
    if model.training:
        raise SlimError("integer_forward takes the model in eval mode (its running statistics and formats)")
    model = model.cpu()
    fl = model.q_in.eval_fl()
    lo, hi = fix_range(True)
    a = torch.clamp(torch.floor(x.detach().double().cpu() * 2.0**fl + 0.5), lo, hi).long()
    acc, fl_acc = _layer_int(model.stem, a, fl)
    a, fl = _to_act(acc, fl_acc, model.q_stem)
    for b in model.blocks:
        h_acc, h_fl = _layer_int(b.conv1, a, fl)
        h, h_fl = _to_act(h_acc, h_fl, b.q1)
        y, y_fl = _layer_int(b.conv2, h, h_fl)
        s, s_fl = (a, fl) if b.shortcut is None else _layer_int(b.shortcut, a, fl)
        top = max(y_fl, s_fl)
        a, fl = _to_act((y << (top - y_fl)) + (s << (top - s_fl)), top, b.q_out)
    count = a.shape[2] * a.shape[3]
    pooled = a.sum((2, 3)) * _pool_multiplier(count)  # fractional length fl + POOL_SHIFT
    p_fl = model.q_pool.eval_fl()
    p = requant(pooled, fl + POOL_SHIFT - p_fl, False)
    wq, bq = model.fc.quantized(p_fl)
    fl_w = int(model.fc.fl_w)
    return p @ _codes(wq, fl_w).T + _codes(bq, p_fl + fl_w), p_fl + fl_w
