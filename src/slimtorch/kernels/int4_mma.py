"""int4 weight-only linear on the tensor cores (CUDA C++ compiled at first use by NVRTC), for M = 1..32.

Why: the Triton GEMV spends about 3.5 instructions per weight (extract, convert, multiply-add, and
shares of the x loads), comparable to the memory time at M = 1 (benchmarks/notes/int4_kernel.md). Here
one ``lop3`` turns two codes into a bf16x2 pair ``(128 + q)``, one packed ``fma`` subtracts
``128 + zero`` exactly (codes and integer zeros are exact in bf16), and ``mma.sync m16n8k16`` does
the multiply-adds: about 1.4 instructions per weight, so the kernel is bound by memory alone. The
activation rows are the mma's N dimension (8 per tile; at M = 1 seven of the eight are wasted, which
the tensor cores can afford). Each group of 128 inputs is summed in float32 by the mma and scaled
once per group in float32, so the result is the float32 product ``sum s (q - z) x`` (more exact than
dequantizing to bf16 first).

The layout (:func:`prepare_int4_mma`, plain torch, testable on CPU) puts in each thread's 16-byte loads
exactly the codes its mma fragments need:

* ``words (N/16, K/128, 2, 2, 16, 4)`` int32: for 16 output channels (a block ``nb``) and 128 inputs (a
  unit ``u``), lane ``l = 4 g + t`` holds 8 words, ``j = 4 h + i`` at ``[nb, u, t // 2, h, 2 g + t % 2, i]``
  (each of the lane's two 16-byte loads, h = 0 and 1, reads two whole 256-byte lines with the warp; and the
  lanes with ``t // 2`` = 0 or 1, whose inputs are the first or second 64 of the unit, each have one
  contiguous 512 bytes, which the wgmma GEMM loads per half unit); word ``j`` holds the codes
  of channels ``16 nb + g`` (nibbles 0, 4, 2, 6) and ``16 nb + g + 8`` (nibbles 1, 5, 3, 7) at inputs ``128 u + 32 t + 4 j +
  {0, 1, 2, 3}`` (nibble pairs (0, 4) and (2, 6) are inputs (+0, +1) and (+2, +3)). The mma's K
  slots are permuted so that these are the inputs the lane's B fragments hold when it reads
  ``x[128 u + 32 t : 128 u + 32 t + 32]`` as four 16-byte loads.
* ``meta (N/16, K/G, 8, 4)`` int32: for lane row ``g`` the scales of channels g and g + 8 (float32
  bits) and ``-(128 + zero)`` of each as a bf16x2 pair.

Needs integer zero-points in 0..15 (what our quantizers produce), N a multiple of 16, groups of 128,
256, 512... dividing K, bf16 activations and a GPU with bf16 mma (sm_80 or newer); ``mma_supported`` says.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimtorch.kernels._cuda import Launcher, compile_kernel, source
from slimtorch.kernels.reference import unpack_int4


@dataclass(frozen=True)
class Int4MMAWeight:
    """An int4 weight in the tensor-core kernel's layout (see the module docstring)."""

    words: torch.Tensor  # (N/16, K/128, 2, 2, 16, 4) int32
    meta: torch.Tensor  # (N/16, K/G, 8, 4) int32
    group: int

    @property
    def n(self) -> int:
        return self.words.shape[0] * 16

    @property
    def k(self) -> int:
        return self.words.shape[1] * 128

    @property
    def unit_shift(self) -> int:
        """log2(group / 128): a unit of 128 inputs belongs to group ``u >> unit_shift``."""
        return (self.group // 128).bit_length() - 1


def layout_supported(n: int, k: int, group: int, zero: torch.Tensor | None = None) -> bool:
    """Whether :func:`prepare_int4_mma` takes this weight: N a multiple of 16, groups of 128, 256, 512...
    dividing K, and zeros that are integers 0..15."""
    if n % 16 or group < 128 or group & (group - 1) or k % group:
        return False
    return zero is None or bool(((zero == zero.round()) & (zero >= 0) & (zero <= 15)).all())


def mma_supported(device: torch.device) -> bool:
    """Whether the kernel runs on this device: CUDA (not ROCm) with bf16 mma (sm_80 or newer), and NVRTC
    compiles the kernels' source there (tried once per device; a failure means the Triton kernels run)."""
    if device.type != "cuda" or torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    if device.index not in _COMPILES:
        try:
            compile_kernel(_SOURCE, "int4_mma_dequant", device)
            _COMPILES[device.index] = True
        except Exception:  # noqa: BLE001 (no NVRTC, or a torch without _compile_kernel)
            _COMPILES[device.index] = False
    return _COMPILES[device.index]


def _bf16_bits(v: torch.Tensor) -> torch.Tensor:
    """float values (exact in bf16) -> their bf16 bits in the low half of an int32, duplicated into the high."""
    b = v.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    b = b | (b << 16)
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32)


def prepare_int4_mma(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4MMAWeight:
    """The saved format (reference.py: ``packed (N, K/2)`` uint8, ``scale``/``zero`` ``(N, K/G)``) ->
    the kernel's layout (done once per layer, on the weights' device)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if scale.shape != zero.shape or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"int4 weight of shape {(n, k)} with scales {tuple(scale.shape)} and zeros "
                         f"{tuple(zero.shape)}: expected both (N, K/G)")
    group = k // scale.shape[1]
    if not layout_supported(n, k, group, zero):
        raise ValueError(f"int4 weight of shape {(n, k)}, group {group}: the tensor-core kernel needs N a multiple "
                         "of 16, groups of 128, 256, 512... that divide K, and integer zero-points 0..15")
    nb, units, groups = n // 16, k // 128, k // group
    q = unpack_int4(packed)  # (N, K) uint8
    # channel = 16 nb + 8 ro + g; input = 128 u + 32 t + 4 j + 2 kb + kl; nibble = ro + 2 kb + 4 kl
    q = q.reshape(nb, 2, 8, units, 4, 8, 2, 2).permute(0, 3, 2, 4, 5, 7, 6, 1)  # nb u g t j kl kb ro
    q = q.reshape(nb, units, 32, 8, 4, 2)  # last: the two nibbles of a byte, low first
    words = (q[..., 0] | (q[..., 1] << 4)).contiguous().view(torch.int32).reshape(nb, units, 8, 2, 2, 2, 4)
    words = words.permute(0, 1, 3, 5, 2, 4, 6).reshape(nb, units, 2, 2, 16, 4).contiguous()  # nb u t//2 h 2g+t%2 i
    s = scale.float().reshape(nb, 2, 8, groups).permute(0, 3, 2, 1)  # nb grp g ro
    z = _bf16_bits(-(128 + zero.float())).reshape(nb, 2, 8, groups).permute(0, 3, 2, 1)
    meta = torch.cat([s.contiguous().view(torch.int32), z], dim=-1).contiguous()
    return Int4MMAWeight(words, meta, group)


def unpack_int4_mma(w: Int4MMAWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`prepare_int4_mma`: codes ``(N, K)`` uint8, scale and zero ``(N, K/G)``."""
    nb, units = w.words.shape[:2]
    groups = w.meta.shape[1]
    b = w.words.reshape(nb, units, 2, 2, 8, 2, 4).permute(0, 1, 4, 2, 5, 3, 6)  # nb u g t//2 t%2 h i
    b = b.contiguous().view(torch.uint8).reshape(nb, units, 32, 8, 4)
    q = torch.stack([b & 15, b >> 4], dim=-1).reshape(nb, units, 8, 4, 8, 2, 2, 2)  # nb u g t j kl kb ro
    codes = q.permute(0, 7, 2, 1, 3, 4, 6, 5).reshape(nb * 16, units * 128)
    s = w.meta[..., :2].contiguous().view(torch.float32)  # nb grp g ro
    zb = w.meta[..., 2:] & 0xFFFF
    zb = torch.where(zb >= 2**15, zb - 2**16, zb).to(torch.int16).view(torch.bfloat16).float()
    scale = s.permute(0, 3, 2, 1).reshape(nb * 16, groups)
    zero = (-zb - 128).permute(0, 3, 2, 1).reshape(nb * 16, groups)
    return codes, scale, zero


_SOURCE = source("common.cuh", "int4_mma.cu")
_launch = Launcher(_SOURCE)
_COMPILES: dict = {}  # device index -> whether NVRTC compiled the source there


MAX_M = 32  # the most rows the tensor-core kernel takes (4 tiles of 8); more go to dequantize + cuBLAS


@dataclass(frozen=True)
class MMAConfig:
    """Block shape of the tensor-core kernel (a template instance of ``cuda/int4_mma.cu``)."""

    nb: int  # blocks of 16 output channels per program
    mt: int  # tiles of 8 activation rows: 1, 2 or 4
    warps: int
    pf: int = 1  # 1: prefetch the next unit; 2: only the first; 0: none
    ks: int = 1  # K split over a cluster of KS programs (sm_90 only)
    pdl: bool = False  # programmatic dependent launch (sm_90 only)
    early: bool = False  # with PDL: the next kernel may start before this one has read x


# Where the rule in mma_config was more than 5% slower than the best config of the H100 sweep
# (benchmarks/results/int4_mma_sweep.jsonl): (MT, N, K) -> the config's nb, warps, pf, ks (and early: off).
_TUNED = {
    (1, 11008, 4096): {"nb": 2, "warps": 8, "pf": 0, "ks": 1, "early": False},
    (1, 12288, 4096): {"nb": 2, "warps": 8, "pf": 0, "ks": 1, "early": False},  # a 7B model's fused q/k/v
    (1, 22016, 4096): {"nb": 1, "warps": 2, "pf": 1, "ks": 1, "early": False},  # and gate/up projections
    (1, 13824, 5120): {"nb": 1, "warps": 5, "pf": 1, "ks": 1},
    (2, 4096, 11008): {"nb": 2, "warps": 8, "pf": 1, "ks": 2},
    (4, 4096, 11008): {"nb": 2, "warps": 4, "pf": 1, "ks": 2},
}


_CONFIGS: dict = {}


def mma_config(m: int, n: int, k: int, device: torch.device) -> MMAConfig:
    """The config for ``m`` rows of a (K, N) weight on ``device``: ``_TUNED`` where it has the shape, else the
    rule: as many warps as fit the chip in one wave (about 32, 20 and 10 per multiprocessor at 1, 2 and 4
    tiles: registers limit it), so that every weight load is issued at once; PDL on Hopper below 4 tiles (it
    cost time at 4), and starting the next call early at one row only (benchmarks/notes/int4_kernel.md)."""
    mt = 1 << max(0, (m - 1).bit_length() - 3)  # 1, 2 or 4 tiles of 8 rows
    key = (mt, n, k, device.index)
    cfg = _CONFIGS.get(key)
    if cfg is not None:
        return cfg
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    pdl = hopper and mt < 4
    early = pdl and mt == 1
    tuned = _TUNED.get((mt, n, k))
    if tuned is not None and (hopper or tuned["ks"] == 1):
        cfg = MMAConfig(**{"mt": mt, "early": early, **tuned, "pdl": pdl})  # _TUNED only turns early off
    else:
        nb = 1 if mt == 1 or (n // 16) % 2 else 2
        cap = {1: 32, 2: 20, 4: 10}[mt] * torch.cuda.get_device_properties(device).multi_processor_count
        blocks = n // (16 * nb)
        warps = next((w for w in (16, 8) if blocks * w <= cap and w * nb * mt * 512 <= 48 * 1024), 4)
        cfg = MMAConfig(nb=nb, mt=mt, warps=warps, pf=1, ks=1, pdl=pdl, early=early)
    _CONFIGS[key] = cfg
    return cfg


def int4_mma_linear(x: torch.Tensor, w: Int4MMAWeight, config: MMAConfig | None = None) -> torch.Tensor:
    """x (..., K) bf16 with at most :data:`MAX_M` rows -> (..., N) bf16, on the tensor cores."""
    k, n = w.k, w.n
    if x.dtype != torch.bfloat16 or x.shape[-1] != k:
        raise ValueError(f"int4_mma_linear takes bf16 x (..., {k}); got {x.dtype} {tuple(x.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    cfg = config or mma_config(x2.shape[0], n, k, x.device)
    y = torch.empty(x2.shape[0], n, device=x.device, dtype=torch.bfloat16)
    name, grid, block, args = _launch_args(x2, w, y, cfg)
    _launch(name, grid, block, args, x.device, cfg.pdl)
    return y.reshape(*x.shape[:-1], n)


def _launch_args(x2: torch.Tensor, w: Int4MMAWeight, y: torch.Tensor, cfg: MMAConfig) -> tuple:
    """(kernel name, grid, block, arguments) of :func:`int4_mma_linear`'s launch."""
    m, n, k = x2.shape[0], w.n, w.k
    nb, mt, ks = cfg.nb, cfg.mt, cfg.ks
    if not 0 < m <= 8 * mt or mt > MAX_M // 8:
        raise ValueError(f"{m} rows with MT = {mt}: the tensor-core kernel takes 1..{8 * min(mt, MAX_M // 8)} rows")
    if (n // 16) % nb or cfg.warps * nb * mt * 512 > 48 * 1024:
        raise ValueError(f"config {cfg} does not fit N = {n} (N/16 a multiple of NB) or 48 KB of shared memory")
    tpl = f"{nb}, {mt}, {cfg.warps}, {cfg.pf}, {int(cfg.early)}"
    name = f"int4_mma<{tpl}>" if ks == 1 else f"int4_mma_split<{tpl}, {ks}>"
    args = (w.words, w.meta, x2, y, m, k // 128, w.meta.shape[1], w.unit_shift, x2.stride(0), n)
    return name, (n // (16 * nb), ks, 1), 32 * cfg.warps, args


class Int4Eager:
    """One layer's int4 linear for eager calls, with the least host work per call: for each (rows, row
    stride) seen, the launch is built once with the weights' pointers and every constant argument set
    (:class:`~slimtorch.kernels._cuda.BoundLaunch`); a call allocates the output, writes two pointers and
    launches. Why: at one row the kernel takes about 10 us of GPU time, so a launcher that rebuilt its
    arguments each call (about 20 us of Python) made the eager decode step of a 7B-shaped model slower than
    bf16's (benchmarks/results/decode.jsonl). More than :data:`MAX_M` rows go to ``large(x, w)`` (the
    dispatcher passes its ``int4_linear``, which picks the GEMM for that many rows)."""

    def __init__(self, w: Int4MMAWeight, large: Callable[[torch.Tensor, Int4MMAWeight], torch.Tensor]) -> None:
        self.w, self.k, self.n, self.large = w, w.k, w.n, large
        self.device_index = w.words.get_device()
        self._bound: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # fast path: an input of a (shape, strides, device, thread) seen before, whose rows the bound
        # launch reads in place (the first call of each checked everything below)
        launch = self._bound.get((x.shape, x.stride(), x.get_device(), threading.get_ident()))
        p = x.data_ptr()
        if launch is not None and not p & 15 and x.dtype is torch.bfloat16:
            y = torch.empty(launch.out_shape, dtype=torch.bfloat16, device=launch.device)
            launch.vals[2].value = p
            launch.vals[3].value = y.data_ptr()
            launch()
            return y
        return self._bind_or_run(x)

    def _bind_or_run(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        if x.shape[-1] != k or x.dtype != torch.bfloat16 or x.get_device() != self.device_index:
            raise ValueError(f"int4 linear on cuda:{self.device_index} takes bf16 x (..., {k}) on that device; got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if not 0 < m <= MAX_M:
            return self.large(x, self.w)
        in_place = x2.stride(-1) == 1 and not x2.stride(0) % 8 and not x2.data_ptr() % 16
        if not in_place:
            x2 = x2.contiguous()
        cfg = mma_config(m, self.n, k, x.device)
        y = x2.new_empty((m, self.n))
        name, grid, block, args = _launch_args(x2, self.w, y, cfg)
        if in_place and x2.data_ptr() == x.data_ptr():  # later calls of this layout launch at once
            launch = _launch.bind(name, grid, block, args, x.device, cfg.pdl)
            launch.keep = (self.w.words, self.w.meta)  # x and y are set on every call
            launch.out_shape, launch.device = (*x.shape[:-1], self.n), x.device
            self._bound[(x.shape, x.stride(), x.get_device(), threading.get_ident())] = launch
            launch()
        else:
            _launch(name, grid, block, args, x.device, cfg.pdl)
        return y.view(*x.shape[:-1], self.n)

    def __deepcopy__(self, memo: dict) -> Int4Eager:
        # the bound launches hold ctypes pointers (not copyable): the copy binds its own on first use
        import copy

        return Int4Eager(Int4MMAWeight(copy.deepcopy(self.w.words, memo), copy.deepcopy(self.w.meta, memo),
                                       self.w.group), self.large)


def dequantize_int4_mma(w: Int4MMAWeight) -> torch.Tensor:
    """The weight ``(N, K)`` in bf16 (``F.linear(x, result)`` is the linear)."""
    out = torch.empty(w.n, w.k, device=w.words.device, dtype=torch.bfloat16)
    units = w.k // 128
    args = (w.words, w.meta, out, units, w.meta.shape[1], w.unit_shift, w.k)
    _launch("int4_mma_dequant", (-(-units // 4), w.n // 16, 1), 128, args, out.device)
    return out
