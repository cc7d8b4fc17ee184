"""Quantized modules that replace nn.Linear / nn.Conv2d, and the activation quantizer.

Weights are held as integer (or fp8) codes with their scales and zero-points, exactly what is
saved; the forward pass dequantizes them (a reference path: GPU kernels come later). Input
activations pass through an :class:`ActQuant`, which observes during calibration, then
fake-quantizes with frozen parameters (static) or with parameters computed per call (dynamic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.kernels.ops import OPS
from slimtorch.quant import primitives as P
from slimtorch.quant.observers import Observer, make_observer
from slimtorch.spec import QuantSpec


class ActQuant(nn.Module):
    """Quantizes the tensor flowing through it.

    States: ``observing`` (calibration: statistics only, values pass unchanged), then frozen
    static parameters in the buffers ``scale``/``zero``; a dynamic spec needs no calibration.
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.observer: Observer | None = None
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero", torch.empty(0))

    def start_observing(self) -> None:
        if not self.spec.dynamic:
            self.observer = make_observer(self.spec)

    def freeze(self) -> None:
        """Turn the observed statistics into static parameters, on the device its inputs ran on (a quantizer
        made on the CPU and put into a GPU model must not freeze CPU scales; qparams may also build
        zero-points on the CPU); never observed: the module's own device."""
        if self.observer is not None:
            scale, zero = self.observer.qparams()
            dev = self.__dict__.pop("_observed_on", self.scale.device)
            self.scale, self.zero = scale.to(dev), zero.to(dev)
            self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            scale, zero = P.qparams(*P.min_max(x, self.spec), self.spec)
            return P.fake_quant(x, scale.to(x.device), zero.to(x.device), self.spec)
        if self.observer is not None:
            self.observer.update(x)
            self._observed_on = x.device
            return x
        if self.scale.numel() == 0:
            raise SlimError("static activation quantizer was never calibrated; pass calibration data")
        return P.fake_quant(x, self.scale, self.zero, self.spec)

    def extra_repr(self) -> str:
        return f"{self.spec.dtype}, {type(self.spec.granularity).__name__}, dynamic={self.spec.dynamic}"


class MatmulInput(nn.Identity):
    """A named point where a tensor enters a matmul that has no weight: attention's Q, K, V and softmax
    probabilities (``role``: "q", "k", "v", "probs"; K and V are what a KV cache holds). Models place these
    (our zoo's ViT and TinyLlama do); a recipe with an ``attention`` (or, at K and V, ``kv_cache``) spec
    replaces each by an :class:`ActQuant`. Until then it is the identity."""

    def __init__(self, role: str | None = None) -> None:
        super().__init__()
        self.role = role


class QuantWeight(nn.Module):
    """Common part: weight codes (2-D, ``(out, in_features)``), scale, zero-point, bias, input quantizer."""

    def __init__(self, wspec: QuantSpec, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None, act: QuantSpec | None, weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.wspec = wspec
        self.weight_shape = tuple(weight_shape)
        self.register_buffer("qweight", qweight)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero", zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act = None if act is None else ActQuant(act)
        # Per-input-channel factor applied to the input before everything else (SmoothQuant / AWQ:
        # the weight was quantized as W * s, so the input is multiplied by 1 / s). None: no smoothing.
        self.register_buffer("inv_smooth", None)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) / .half() convert every floating buffer, fp8 codes and float32 scales
        # included; those are the quantization itself (a bf16 scale is a different quantized weight, and
        # bf16 codes no kernel takes), so they follow the device only
        before = {name: getattr(self, name) for name in ("qweight", "w_scale", "w_zero")}
        out = super()._apply(fn, recurse)
        for name, t in before.items():
            now = getattr(self, name)
            if now.dtype != t.dtype:
                setattr(self, name, t.to(now.device))
        return out

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight in its original shape."""
        return P.dequantize(self.qweight, self.w_scale, self.w_zero, self.wspec, dtype).reshape(self.weight_shape)

    def _smoothed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inv_smooth is None else x * self.inv_smooth.to(x.dtype)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = self._smoothed(x)
        return x if self.act is None else self.act(x)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and zero-point of a weight viewed as 2-D ``(out, -1)``; RTN when no scale is given."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    if scale is None:
        obs = make_observer(spec)
        obs.update(w2)
        scale, zero = (t.to(w2.device) for t in obs.qparams())  # observers keep their statistics on the CPU
    return P.quantize(w2, scale, zero, spec), scale, zero


KERNEL_BUFFERS = ("kernel_a", "kernel_b", "kernel_c", "kernel_d")
"""A QuantLinear's weights in its kernel's layout (non-persistent buffers, as many as the kernel takes)."""


class QuantLinear(QuantWeight):
    """``y = act(x) @ dequant(W).T + b``. x (..., in) -> (..., out).

    ``use_kernels`` (default True): run the GPU kernel where one applies; False keeps the reference.

    On CUDA the weights are also held in the kernel's layout (non-persistent buffers ``kernel_a``,
    ``kernel_b``..., made when the layer is built on or moved to the GPU or loads a state dict). Under
    ``torch.compile`` the forward calls the kernel as a custom operator (``slimtorch.kernels.ops``), which
    is traced without a graph break; eagerly it calls the same kernel directly (``dispatch.eager_kernel``),
    without the operator's dispatch cost."""

    use_kernels = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kernel_op: str | None = None
        for name in KERNEL_BUFFERS:
            self.register_buffer(name, None, persistent=False)
        self._prepare_kernel()

    def _prepare_kernel(self) -> None:
        """The weights in the kernel's layout, where a custom-operator kernel runs this layer's specs on
        its device; otherwise none (the reference path, or the Triton fallback of :meth:`kernel`)."""
        self.kernel_op, self._eager = None, None
        for name in KERNEL_BUFFERS:
            setattr(self, name, None)
        if not self.qweight.is_cuda:
            return
        from slimtorch.kernels.dispatch import eager_kernel, kernel_weights

        got = kernel_weights(self.wspec, self.act.spec if self.act is not None else None, self.qweight,
                             self.w_scale, self.w_zero)
        if got is not None:
            self.kernel_op = got[0]
            for name, t in zip(KERNEL_BUFFERS, got[1]):
                setattr(self, name, t)
            self._eager = eager_kernel(self.kernel_op, got[1])

    def _kernel_weights(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (getattr(self, name) for name in KERNEL_BUFFERS) if t is not None)

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.cpu(): the kernel layout follows the weights (remade from them, not converted)
        self.kernel_op, self._eager = None, None
        for name in KERNEL_BUFFERS:
            setattr(self, name, None)
        out = super()._apply(fn, recurse)
        self._prepare_kernel()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # loading copies into the weights in place: the kernel layout is remade from the new values
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare_kernel()

    @classmethod
    def from_float(cls, lin: nn.Linear, wspec: QuantSpec, act: QuantSpec | None,
                   qparams: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> QuantLinear:
        q, s, z = (t.to(lin.weight.device) for t in qparams or quantize_weight(lin.weight, wspec))
        return cls(wspec, q, s, z, lin.bias, act, tuple(lin.weight.shape))

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    def kernel(self):
        """The GPU kernel for this layer's specs (slimtorch.kernels.dispatch): the eager form of its custom
        operator, else (int4 where the CUDA kernels cannot run) the Triton fallback, built once per placement
        of the weights; None on CPU or where no kernel applies."""
        if self._eager is not None:
            return self._eager
        key = (self.qweight.device, self.qweight.data_ptr())
        cached = self.__dict__.get("_kernel")
        if cached is None or cached[0] != key:
            from slimtorch.kernels.dispatch import linear_kernel

            fn = linear_kernel(self.wspec, self.act.spec if self.act is not None else None, self.qweight,
                               self.w_scale, self.w_zero) if self.qweight.is_cuda else None
            self.__dict__["_kernel"] = cached = (key, fn)
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """On CUDA with bf16 inputs, the layer's kernel where one applies (dynamic activation
        quantization included); elsewhere the reference: fake-quantized input, dequantized weight."""
        if self.kernel_op is not None and x.is_cuda and x.dtype == torch.bfloat16 and self.use_kernels:
            if self.inv_smooth is not None:
                x = x * self.inv_smooth.to(x.dtype)
            if torch.compiler.is_compiling():  # traced: the custom operator, which torch.compile sees whole
                y = OPS[self.kernel_op](x, *self._kernel_weights())
            else:  # eager: the same kernel without the operator's dispatch cost
                y = self._eager(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        fn = self.kernel() if x.is_cuda and x.dtype == torch.bfloat16 and self.use_kernels else None
        if fn is not None:  # the kernel quantizes activations itself
            y = fn(self._smoothed(x))
            return y if self.bias is None else y + self.bias.to(y.dtype)
        x = self._input(x)
        return F.linear(x, self.weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def same_pads(hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]) -> list[int]:
    """TensorFlow 'SAME' padding for an input of spatial size ``hw``: F.pad order (left, right, top, bottom)."""
    pads = []
    for size, k, s in zip(hw[::-1], kernel[::-1], stride[::-1]):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


class QuantConv2d(QuantWeight):
    """Conv2d with a quantized weight (quantized as ``(out, in/groups * kh * kw)``).

    ``same_padding``: pad like TensorFlow's 'SAME' from the input size at each call (a float conv
    declares this with a class attribute ``tf_same_padding = True``, as the zoo's EfficientNet does)."""

    def __init__(self, *args, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros",
                 same_padding: bool = False) -> None:
        super().__init__(*args)
        if padding_mode != "zeros":
            raise SlimError(f"Conv2d padding_mode {padding_mode!r} is not supported by QuantConv2d")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.same_padding = same_padding

    @classmethod
    def from_float(cls, conv: nn.Conv2d, wspec: QuantSpec, act: QuantSpec | None,
                   qparams: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> QuantConv2d:
        q, s, z = qparams or quantize_weight(conv.weight, wspec)
        return cls(wspec, q, s, z, conv.bias, act, tuple(conv.weight.shape), stride=conv.stride,
                   padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                   padding_mode=conv.padding_mode, same_padding=getattr(conv, "tf_same_padding", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if self.same_padding:
            pads = same_pads(tuple(x.shape[-2:]), tuple(self.weight_shape[-2:]), tuple(self.stride))
            x = F.pad(x, pads) if any(pads) else x
        x = self._input(x)
        return F.conv2d(x, self.weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                        self.stride, self.padding, self.dilation, self.groups)


QUANT_TYPES = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def quant_type_for(module: nn.Module) -> type[QuantWeight] | None:
    """The quantized module that can replace ``module`` faithfully, or None.

    Linear/Conv2d and subclasses that keep their parent's forward qualify; a Conv2d subclass that
    overrides forward qualifies only when it declares TF 'SAME' padding (``tf_same_padding``)."""
    for base, qtype in QUANT_TYPES.items():
        if isinstance(module, base):
            if type(module).forward is base.forward or getattr(type(module), "tf_same_padding", False):
                return qtype
    return None
