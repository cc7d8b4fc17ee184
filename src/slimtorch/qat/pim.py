"""PIM-QAT: training for processing-in-memory hardware (Jin et al., arXiv 2209.08617).

No official code exists; the paper's abstract gives the ideas, and the simulation below is our reading
of the standard PIM setting (see ../shared/notes/seed_methods.md section 11; the exact factors are ours):

* **The array**: a layer's dot products are split into chunks of at most ``rows`` products (the array
  height; for a k x k convolution, ``rows // k^2`` input channels per chunk). Each chunk's analog sum of
  integer products ``P = sum_i x_i w_i`` (LSQ codes of inputs and weights, the "native" scheme) is read
  by an ADC of ``adc_bits`` bits over the chunk's full scale ``FS = rows_used * max|x| * max|w|``:
  ``ADC(P) = clamp(round(P / D), -L, L) * D`` with ``L = 2^(adc_bits - 1) - 1``, ``D = FS / L``; the
  chunks are then added digitally and the sum scaled by the two steps. Optional thermal noise (Gaussian,
  ``noise`` ADC LSBs) before the rounding and a saturating non-linearity ``FS tanh(g P / FS) / g``.
* **PIM-QAT**: training runs through this simulation with a straight-through ADC rounding.
* **Rescaling** (forward): the PIM output is multiplied by ``eta = std(ideal) / std(PIM)`` (not
  differentiated), measured on each training batch and kept as an EMA for inference, so the layer's
  output keeps the scale of the digital layer it replaces.
* **BN calibration**: :func:`calibrate_bn` re-estimates every BatchNorm's statistics with the simulated
  forward after training (a cumulative average over the given batches).

The first and last layers (the plan's 8-bit edges) run digitally, as usual in PIM work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.calib.batchnorm import calibrate_bn  # noqa: F401 - re-exported: PIM's BN calibration
from slimtorch.errors import SlimError
from slimtorch.qat.lsq import LSQ
from slimtorch.qat.modules import QATConv2d, QATLinear
from slimtorch.qat.ste import round_ste
from slimtorch.sequential import set_module


@dataclass(frozen=True)
class PIMConfig:
    rows: int = 64  # products summed in analog per partial sum (array height)
    adc_bits: int = 5
    noise: float = 0.0  # thermal noise std, in ADC LSBs
    nonlinearity: float = 0.0  # g of FS tanh(g P / FS) / g; 0: linear ADC input
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows < 1 or not 2 <= self.adc_bits <= 16 or self.noise < 0 or self.nonlinearity < 0:
            raise SlimError(f"PIM settings out of range: rows {self.rows} >= 1, ADC bits {self.adc_bits} in "
                            f"[2, 16], noise {self.noise} >= 0, non-linearity {self.nonlinearity} >= 0")


def adc(p: torch.Tensor, full_scale: float, cfg: PIMConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Read partial sums ``p`` with the ADC (straight-through rounding, clamped range)."""
    levels = 2 ** (cfg.adc_bits - 1) - 1
    d = full_scale / levels
    if cfg.nonlinearity > 0:
        g = cfg.nonlinearity
        p = full_scale * torch.tanh(g * p / full_scale) / g
    u = p / d
    if cfg.noise > 0:
        u = u + cfg.noise * torch.randn(u.shape, generator=gen, device=u.device, dtype=u.dtype)
    return round_ste(torch.clamp(u, -levels, levels)) * d


def linear_partial_sums(x: torch.Tensor, w: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """x (B, in), w (O, in) -> partial sums (B, chunks, O) of at most ``rows`` products, and rows used."""
    n = x.shape[-1]
    rows = min(rows, n)
    chunks = -(-n // rows)
    pad = chunks * rows - n
    xc = F.pad(x, (0, pad)).reshape(*x.shape[:-1], chunks, rows)
    wc = F.pad(w, (0, pad)).reshape(w.shape[0], chunks, rows)
    return torch.einsum("bcr,ocr->bco", xc, wc), rows


def conv_chunks(x: torch.Tensor, w: torch.Tensor, rows: int, stride, padding) -> tuple[torch.Tensor, int]:
    """x (B, C, H, W), w (O, C, kh, kw) -> partial sums (B, chunks, O, H', W'), each over ``g`` input
    channels (``g kh kw <= rows``, at least one channel), by one grouped convolution; and rows used."""
    o, c, kh, kw = w.shape
    g = max(1, min(c, rows // (kh * kw)))
    chunks = -(-c // g)
    pad = chunks * g - c
    xp = F.pad(x, (0, 0, 0, 0, 0, pad))
    wp = F.pad(w, (0, 0, 0, 0, 0, pad)).reshape(o, chunks, g, kh, kw).transpose(0, 1).reshape(chunks * o, g, kh, kw)
    y = F.conv2d(xp, wp, None, stride, padding, groups=chunks)
    return y.reshape(y.shape[0], chunks, o, *y.shape[2:]), g * kh * kw


class _PIMMixin:
    """Shared by PIMLinear / PIMConv2d: LSQ codes in, ADC-read partial sums out, rescaled."""

    def _setup(self, cfg: PIMConfig, rescale: bool) -> None:
        if not isinstance(self.wq, LSQ) or not isinstance(self.aq, LSQ):
            raise SlimError("the PIM simulation takes LSQ layers with quantized inputs (prepare_qat(..., 'lsq') "
                            "with input bits)")
        self.cfg, self.rescale = cfg, rescale
        self.register_buffer("eta", torch.tensor(1.0))
        self.register_buffer("eta_seen", torch.tensor(False))
        self._gen: torch.Generator | None = None

    def _noise_gen(self, device) -> torch.Generator | None:
        if self.cfg.noise <= 0:
            return None
        if self._gen is None or self._gen.device != torch.device(device):
            self._gen = torch.Generator(device=device).manual_seed(self.cfg.seed)
        return self._gen

    def _pim(self, x: torch.Tensor) -> torch.Tensor:
        qx, sx = self.aq.codes(x)
        qw, sw = self.wq.codes(self.weight)
        psum, rows = self._partial_sums(qx, qw)  # (B, chunks, O, ...)
        amax = max(abs(self.aq.qmin), abs(self.aq.qmax))
        wmax = max(abs(self.wq.qmin), abs(self.wq.qmax))
        digital = adc(psum, float(rows * amax * wmax), self.cfg, self._noise_gen(x.device)).sum(1)
        scale = sx * sw.reshape(1, -1, *([1] * (digital.ndim - 2)))
        if self.rescale:
            if self.training:
                with torch.no_grad():
                    eta = psum.sum(1).float().std() / digital.float().std().clamp(min=1e-12)  # ideal / PIM
                    self.eta.copy_(torch.where(self.eta_seen, 0.9 * self.eta + 0.1 * eta, eta))  # no GPU wait
                    self.eta_seen.fill_(True)
                digital = digital * eta.to(digital.dtype)
            else:
                digital = digital * self.eta.to(digital.dtype)
        out = digital * scale
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, *([1] * (out.ndim - 2)))
        return out


class PIMLinear(_PIMMixin, QATLinear):
    """A QATLinear (LSQ) whose product runs on the simulated PIM array. x (..., in) -> (..., out): every
    row (a token of a transformer) is its own input vector to the array."""

    @classmethod
    def from_qat(cls, m: QATLinear, cfg: PIMConfig, rescale: bool) -> PIMLinear:
        new = cls(m.in_features, m.out_features, m.bias is not None, m.wq, m.aq, m.weight.device, m.weight.dtype)
        new.load_state_dict(m.state_dict(), strict=False)
        new._setup(cfg, rescale)
        return new.to(m.weight.device)

    def _partial_sums(self, qx, qw):
        return linear_partial_sums(qx, qw, self.cfg.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2:
            raise SlimError("PIMLinear takes (..., features) inputs with at least one batch dimension")
        return self._pim(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)


class PIMConv2d(_PIMMixin, QATConv2d):
    """A QATConv2d (LSQ) whose product runs on the simulated PIM array. x (B, C, H, W)."""

    @classmethod
    def from_qat(cls, m: QATConv2d, cfg: PIMConfig, rescale: bool) -> PIMConv2d:
        new = cls(m, m.wq, m.aq)
        new._setup(cfg, rescale)
        return new.to(m.weight.device)

    def _partial_sums(self, qx, qw):
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros":
            raise SlimError("the PIM simulation takes plain convolutions (groups 1, dilation 1, zero padding)")
        return conv_chunks(qx, qw, self.cfg.rows, self.stride, self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pim(x)


def to_pim(model: nn.Module, cfg: PIMConfig, rescale: bool = True, skip: tuple[str, ...] = ()) -> nn.Module:
    """Put every LSQ QAT layer of ``model`` except ``skip`` (e.g. the first and last) on the simulated PIM
    array, in place; parameters and quantizer state are kept, so a model trained digitally can be
    evaluated on PIM as it is. Returns ``model``."""
    found = False
    for name, m in list(model.named_modules()):
        if name in skip or type(m) not in (QATLinear, QATConv2d):
            continue
        cls = PIMLinear if isinstance(m, QATLinear) else PIMConv2d
        set_module(model, name, cls.from_qat(m, cfg, rescale))
        found = True
    if not found:
        raise SlimError("the model has no QAT layers to put on the PIM simulation; call prepare_qat first")
    return model


def to_digital(model: nn.Module) -> nn.Module:
    """Undo :func:`to_pim` (in place): the PIM layers become plain QAT layers again."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PIMLinear | PIMConv2d):
            cls = QATLinear if isinstance(m, PIMLinear) else QATConv2d
            set_module(model, name, cls.from_float(m, m.wq, m.aq))
    return model


def calibration_batches(x: torch.Tensor, batch: int = 256, limit: int = 4096) -> list[tuple[torch.Tensor]]:
    """Full batches of ``x`` (at most ``limit`` samples; all of ``x`` as one batch when it is smaller than
    ``batch``), as forward-argument tuples for :func:`calibrate_bn`."""
    return [(x[i:i + batch],) for i in range(0, min(limit, len(x) - batch + 1), batch)] or [(x,)]
