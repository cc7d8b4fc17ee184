"""HQQ: calibration-free weight quantization by half-quadratic optimisation (Badri & Shaji, 2023).

Why: round-to-nearest takes each group's range from its min and max, so one outlier weight sets the step of
the whole group. HQQ instead fits the quantization to the weight under an l_p error with p < 1, which is
robust to a few large errors (it would rather miss one outlier than blur every other weight), and it needs
no data: minutes of GPTQ and its calibration set become seconds of tensor arithmetic.

The problem, for one weight ``W`` with codes ``Q = clamp(round(W / s + z))``::

    min_{z, W_e}  ||W_e||_p^p + beta / 2 ||W_e - (W - (Q - z) s)||^2

is solved by alternating its two closed forms (half-quadratic splitting): the error estimate is a generalised
soft threshold ``W_e = shrink_p(W - W_r)``, and the zero-point the mean of ``Q - (W - W_e) / s`` over the
group; ``beta`` grows by ``kappa`` each step. The iterate with the lowest l_p error is kept.

What we add: our int4 kernels and compressed-tensors (what vLLM serves) take integer zero-points, so after
the float solve each zero-point is rounded, and the scale (which HQQ leaves at the min-max one) is solved
with the zero-point held: ``s = <W - W_e, Q - z> / ||Q - z||^2`` per group, by the same splitting. Symmetric
specs have ``z = 0`` and go straight to the scale step. Only integer formats apply (fp8 has no zero-point).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimtorch.errors import SlimError
from slimtorch.quant import primitives as P
from slimtorch.spec import QuantSpec


@dataclass
class HQQResult:
    codes: torch.Tensor  # (out, in) int8/uint8, as primitives.quantize gives
    scale: torch.Tensor  # the spec's scale shape
    zero: torch.Tensor  # the same shape, integers
    lp_error: list[float] = field(default_factory=list)  # ||W - W_r||_p^p of the kept iterate, after each step


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft threshold: the minimiser of ``|e|^p + beta / 2 (e - x)^2`` (an approximation for
    p < 1, as in HQQ): ``sign(x) relu(|x| - |x|^(p - 1) / beta)``."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-12).pow(p - 1) / beta)


def _lp(e: torch.Tensor, p: float) -> torch.Tensor:
    return e.abs().pow(p).sum()


def hqq_quantize(w: torch.Tensor, spec: QuantSpec, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, scale_iters: int = 10) -> HQQResult:
    """HQQ codes, scales and integer zero-points of ``w`` (viewed as ``(out, -1)``) under ``spec`` (module
    docstring); ``lp_error`` traces the kept iterate's error, which never rises."""
    if spec.is_float:
        raise SlimError(f"hqq quantizes integer formats; {spec.dtype} has no zero-point to fit (use rtn)")
    w2 = w.detach().float().reshape(w.shape[0], -1)
    qmin, qmax = spec.qrange
    scale, zero = P.qparams(*P.min_max(w2, spec), spec)
    wg = P.grouped(w2, spec)

    dims = P.reduce_dims(w2, spec)

    def codes(s, z):  # integer z: as primitives.quantize rounds
        return torch.clamp(torch.round(wg / s) + z, qmin, qmax)

    def error(s, z):
        return wg - (codes(s, z) - z) * s

    best = (_lp(error(scale, zero), p).item(), scale, zero)
    trace = [best[0]]
    s, z, b = scale, zero.clone(), beta
    if not spec.symmetric:  # HQQ's zero-point solve, zero-points as floats
        for _ in range(iters):
            q = torch.clamp(torch.round(wg / s + z), qmin, qmax)  # z is a float here
            we = shrink_lp(wg - (q - z) * s, b, p)
            z = (q - (wg - we) / s).mean(dim=dims, keepdim=True).reshape(zero.shape)
            b *= kappa
            err = _lp(error(s, z.round().clamp(qmin, qmax)), p).item()  # judged as it will be stored
            if err < best[0]:
                best = (err, s, z.round().clamp(qmin, qmax))
            trace.append(best[0])
        s, z = best[1], best[2]
    b = beta
    for _ in range(scale_iters):  # the scale, zero-points held at their integers
        q = codes(s, z) - z
        we = shrink_lp(wg - q * s, b, p)
        num = ((wg - we) * q).sum(dim=dims, keepdim=True)
        den = (q * q).sum(dim=dims, keepdim=True)
        s = torch.where(den > 0, num / den.clamp_min(1e-12), s).clamp_min(P.EPS).reshape(scale.shape)
        b *= kappa
        err = _lp(error(s, z), p).item()
        if err < best[0]:
            best = (err, s, z)
        trace.append(best[0])
    _, s, z = best
    return HQQResult(P.quantize(w2, s, z, spec), s, z, trace)
