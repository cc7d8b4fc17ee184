"""Quantize, dequantize and fake-quantize tensors. Pure functions; statistics live in observers.py.

Scale (and zero-point) shapes broadcast against the tensor, by granularity, for ``x`` of shape
``(..., C)``:

* PerTensor: ``()``
* PerChannel(axis): ``x.ndim`` dims, ``x.shape[axis]`` at ``axis`` and 1 elsewhere
* PerToken: ``(..., 1)``
* PerGroup(g): ``(..., C // g, 1)``, against ``x`` viewed as ``(..., C // g, g)``

Integer codes: ``q = clamp(round(x / scale) + zero, qmin, qmax)``, ``x_hat = (q - zero) * scale``.
Symmetric: ``zero = 0`` and ``scale = amax / qmax``. Asymmetric: the range is widened to hold 0,
``scale = (max - min) / (qmax - qmin)``, ``zero = qmin - round(min / scale)``.
FP8: ``q = cast(clamp(x / scale, -fmax, fmax))`` with ``scale = amax / fmax``.
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError
from slimtorch.spec import FP8_MAX, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

EPS = torch.finfo(torch.float32).eps
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` as ``(..., C // g, g)`` for PerGroup(g), unchanged otherwise."""
    g = spec.granularity
    if not isinstance(g, PerGroup):
        return x
    if x.shape[-1] % g.size:
        raise SlimError(f"last dimension {x.shape[-1]} is not a multiple of group size {g.size}; "
                        f"pick a group size that divides it (or per-channel)")
    return x.unflatten(-1, (x.shape[-1] // g.size, g.size))


def reduce_dims(x: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    """The dimensions of ``grouped(x)`` that share one scale."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return tuple(range(x.ndim))
    if isinstance(g, PerChannel):
        axis = g.axis % x.ndim
        return tuple(d for d in range(x.ndim) if d != axis)
    if isinstance(g, PerToken | PerGroup):
        return (x.ndim - 1,) if isinstance(g, PerToken) else (x.ndim,)
    raise SlimError(f"unsupported granularity {g!r}")


def scale_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """The scale (and zero-point) shape of a tensor of ``shape`` under ``spec`` (computed on the meta
    device: no memory); SlimError where the granularity does not fit the shape."""
    return tuple(min_max(torch.empty(shape, device="meta"), spec)[0].shape)


def min_max(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granule min and max of ``x``, in the scale shape (see module docstring)."""
    xg = grouped(x.detach().float(), spec)
    dims = reduce_dims(x, spec)
    if isinstance(spec.granularity, PerTensor):
        return xg.amin(), xg.amax()
    return xg.amin(dim=dims, keepdim=True), xg.amax(dim=dims, keepdim=True)


def qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point (float tensors holding integers) for the range ``[min_val, max_val]``."""
    if torch.isnan(min_val).any() or torch.isnan(max_val).any() or torch.isinf(min_val).any() \
            or torch.isinf(max_val).any():
        raise SlimError("the tensor to quantize holds NaN or Inf values; check the model and calibration data")
    min_val, max_val = min_val.float().clamp(max=0.0), max_val.float().clamp(min=0.0)  # the range holds 0
    if spec.is_float:
        scale = torch.maximum(-min_val, max_val) / FP8_MAX[spec.dtype]
        return scale.clamp(min=EPS), torch.zeros_like(scale)
    qmin, qmax = spec.qrange
    if spec.symmetric:
        scale = (torch.maximum(-min_val, max_val) / qmax).clamp(min=EPS)
        return scale, torch.zeros_like(scale)
    scale = ((max_val - min_val) / (qmax - qmin)).clamp(min=EPS)
    zero = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax)
    return scale, zero


def code_dtype(spec: QuantSpec) -> torch.dtype:
    return FP8_DTYPES[spec.dtype] if spec.is_float else torch.uint8 if spec.dtype == "uint8" else torch.int8


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes of ``x``: int8/uint8 tensors for integer formats, float8 tensors for fp8. Same shape as x."""
    xg = grouped(x.float(), spec)
    if spec.is_float:
        fmax = FP8_MAX[spec.dtype]
        q = (xg / scale).clamp(-fmax, fmax).to(FP8_DTYPES[spec.dtype])
    else:
        qmin, qmax = spec.qrange
        q = (torch.round(xg / scale) + zero).clamp(qmin, qmax).to(code_dtype(spec))
    return q.reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real values of codes ``q``: ``(q - zero) * scale``."""
    qg = grouped(q.float(), spec)
    return ((qg - zero) * scale).reshape(q.shape).to(dtype)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, with the clipped straight-through estimator:
    the gradient is 1 where ``x`` lies inside the representable range and 0 where it was clipped."""
    if not spec.is_float and not (x.requires_grad and torch.is_grad_enabled()):
        # no gradient wanted (inference, calibration, sampling): the same values without the estimator's
        # extra passes and the integer-code round trip (the clamped integers are exact in float32)
        qmin, qmax = spec.qrange
        xg = grouped(x.float(), spec)
        y = torch.round(xg / scale).add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)
        return y.reshape(x.shape).to(x.dtype)
    xg = grouped(x, spec)
    if spec.is_float:
        fmax = FP8_MAX[spec.dtype]
        lo, hi = -fmax * scale, fmax * scale
    else:
        qmin, qmax = spec.qrange
        lo, hi = (qmin - zero) * scale, (qmax - zero) * scale
    clipped = xg.clamp(lo.to(x.dtype), hi.to(x.dtype))  # gradient 1 on [lo, hi], boundaries included
    out = dequantize(quantize(x.detach(), scale, zero, spec), scale, zero, spec, x.dtype)
    return (clipped + (grouped(out, spec) - clipped).detach()).reshape(x.shape)
