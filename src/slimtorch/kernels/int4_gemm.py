"""int4 weight-only GEMM for many activation rows (prefill), on Hopper's warpgroup tensor cores (wgmma).

Why: dequantizing the weight to bf16 and calling cuBLAS writes and reads the whole bf16 weight once
more, and needs room for it; at M = 2048 that cost 6-20% against bf16 (benchmarks/notes/int4_kernel.md).
Here the weights go from their int4 words straight into the registers that are wgmma's A operand, so
nothing bigger than the int4 weight is ever read.

It reads the same layout as the small-M kernel (:mod:`slimtorch.kernels.int4_mma`), whose K slots are
permuted for that kernel. A wgmma step reads its 16 inputs of x in order from shared memory, so each
lane gathers, for its fragment of step ``j`` (inputs ``16 j + 2 t + {0, 1, 8, 9}`` of a unit of 128),
two words written for lane ``(g, j // 2)`` and picks four bytes of them with one ``prmt``: the codes
of inputs ``16 j + 2 t`` and ``+ 1`` (channels g and g + 8) are bytes ``t % 2`` and ``2 + t % 2`` of word
``4 (j % 2) + t // 2``, those of ``+ 8`` and ``+ 9`` the same bytes of the word two further on.

A tile is 128 output channels x NT activation rows (NT is the wgmma's N: 64-256, by default 256). A block has
three warpgroups: a producer, whose one thread issues the tensor memory accelerator's copies, and two
consumers of 64 channels each (``setmaxnreg`` moves the producer's registers to them). Blocks run in
clusters of two along the channels, which share x: each loads half the rows and multicasts them to both.
Each stage brings 64 inputs x NT rows of x (128-byte swizzle), half a unit's words of the block's
channels (4 KB, contiguous per 16 channels) and, every other stage, their scales/zeros into a ring of
shared-memory slots guarded by mbarriers; a slot is released to both blocks' producers once its wgmmas
are done. One stage's wgmmas run while the next stage is decoded into the next of three sets of A
registers, so the consumers hold only two slots and the producer runs two stages ahead in a ring of 4.
Weights are scaled in bf16 (``s (q - z)`` rounded once, as the dequantize path does), and the products
are summed in float32. The blocks are persistent: each walks its pieces of work (:func:`schedule`,
mirrored by :func:`pieces`), the producer running ahead into the next piece while the consumers store
the last through shared memory (``stmatrix``) and a TMA store. A last round of tiles at most half full is
cut over K ("stream-K"): float32 partial sums, added up by the last part to finish. It is launched as a
programmatic dependent launch: set up while the previous kernel on the stream ends, it waits for that
kernel before its first load.

How fast it is against bf16, and the versions tried on the way: benchmarks/notes/int4_kernel.md.

Needs sm_90 (wgmma, TMA, clusters), the layout's conditions and N a multiple of 128 (clusters of two where
N is a multiple of 256), bf16 x whose row stride is a multiple of 8 elements.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from slimtorch.kernels._cuda import (
    CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
    CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    CU_TENSOR_MAP_DATA_TYPE_UINT32,
    CU_TENSOR_MAP_SWIZZLE_128B,
    CU_TENSOR_MAP_SWIZZLE_NONE,
    PDL,
    LaunchAttr,
    LaunchConfig,
    attribute,
    check,
    compile_kernel,
    driver,
    encode_tiled,
    encode_tiled_into,
    source,
    tensor_map_buffer,
)
from slimtorch.kernels.int4_mma import Int4MMAWeight


def _wgmma_asm(nt: int) -> str:
    """The inline-asm wgmma m64n{nt}k16 with A from registers: nt / 2 float accumulators, then a0..a3 and B's
    descriptor."""
    nd = nt // 2
    regs = ", ".join(f"%{i}" for i in range(nd))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(nd))
    return (
        f"template <> __device__ __forceinline__ void wgmma<{nt}>(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc) {{\n"
        f'  asm volatile("wgmma.mma_async.sync.aligned.m64n{nt}k16.f32.bf16.bf16 {{{regs}}}, '
        f'{{%{nd},%{nd + 1},%{nd + 2},%{nd + 3}}}, %{nd + 4}, 1, 1, 1, 0;"\n'
        f'    : {outs}\n'
        f'    : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));\n'
        "}\n")


_SOURCE = source("common.cuh") + source("int4_wgmma.cu").replace(
    "@WGMMA@", "".join(_wgmma_asm(nt) for nt in (64, 128, 192, 256)))

_COMPILES: dict = {}  # device index -> whether NVRTC compiled the kernel for sm_90a there


def gemm_supported(device: torch.device, w: Int4MMAWeight | None = None) -> bool:
    """Whether the wgmma GEMM runs here (on ``w``): a Hopper GPU (sm_90: wgmma and TMA), NVRTC compiling the
    kernel for sm_90a (tried once per device), and N a multiple of 128."""
    if device.type != "cuda" or torch.version.hip is not None or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    if w is not None and w.n % 128:
        return False
    if device.index not in _COMPILES:
        try:
            cfg = gemm_config(4096)  # the kernels are compiled per config; this tries one
            for cl in (1, 2):
                _kernel(cfg, cl, device)
            _COMPILES[device.index] = True
        except Exception:  # noqa: BLE001 (no NVRTC, or a torch without _compile_kernel)
            _COMPILES[device.index] = False
    return _COMPILES[device.index]


@dataclass(frozen=True)
class GemmConfig:
    """Rows of x per tile (the wgmma's N: 64, 128, 192 or 256) and the depth of the shared-memory ring."""

    nt: int
    stages: int

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory: the ring's stages (x, words, scales/zeros, a barrier each), the output tile
        and the barriers."""
        return self.stages * (self.nt * 128 + 4096 + 1024) + 2 * self.nt * 128 + 1024 + 16 * self.stages


MAX_SMEM = 226 * 1024  # what one block may use on an H100/H200


def gemm_config(m: int) -> GemmConfig:
    """128-row tiles and 8 stages up to M = 128 (where 256 rows would leave most of the chip idle); else
    256 rows and 4 stages, all the room that the output tile leaves (benchmarks/notes/int4_kernel.md)."""
    return GemmConfig(128, 8) if m <= 128 else GemmConfig(256, 4)


def _kernel(cfg: GemmConfig, cl: int, device: torch.device):
    return compile_kernel(_SOURCE, f"int4_wgmma<{cfg.nt}, {cfg.stages}, {cl}>", device, "90a", cfg.smem_bytes)


_WMAPS: dict = {}  # (words pointer, meta pointer, shapes) -> the weight's two descriptors


def _weight_maps(w: Int4MMAWeight) -> tuple:
    """Descriptors of the words (half a unit of 8 blocks of 16 channels per box) and of the scales/zeros (a
    group's 8 blocks per box). They depend only on addresses and shapes."""
    key = (w.words.data_ptr(), w.meta.data_ptr(), tuple(w.words.shape), tuple(w.meta.shape))
    maps = _WMAPS.get(key)
    if maps is None:
        nbs, units, groups = w.words.shape[0], w.words.shape[1], w.meta.shape[1]
        # words (nb, u x 256): half a unit's 512 bytes (words[nb, u, h]) of 8 blocks per box
        u32, plain = CU_TENSOR_MAP_DATA_TYPE_UINT32, CU_TENSOR_MAP_SWIZZLE_NONE
        wmap = encode_tiled(u32, (units * 256, nbs), (units * 1024,), (128, 8), w.words.data_ptr(), plain)
        mmap = encode_tiled(u32, (32, groups, nbs), (128, groups * 128), (32, 1, 8), w.meta.data_ptr(), plain)
        maps = _WMAPS[key] = (wmap, mmap)
    return maps


def _workspace(dev: torch.device, *shapes: tuple[int, torch.dtype]) -> list[torch.Tensor]:
    """Zeroed tensors that live as long as a cached launch, made by a helper thread on its own stream (then
    waited for). Why a thread: torch.compile's reduce-overhead mode warms up and records with every allocation
    *of the current thread* routed to its CUDA-graph pool (``_cuda_beginAllocateCurrentThreadToPool``), and
    cudagraph trees refuse a pool holding tensors that are not graph outputs; a side stream alone is not
    enough. The tensors are marked as used on the caller's stream, so their memory is not handed out again
    while work there may still read it. Inside a stream capture of our own (hand-built graphs), where the
    capture owns the allocations anyway, they are made directly."""
    if torch.cuda.is_current_stream_capturing():
        return [torch.zeros(n, device=dev, dtype=dt) for n, dt in shapes]
    out: list[torch.Tensor] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            side = torch.cuda.Stream(dev)
            with torch.cuda.stream(side):
                out.extend(torch.zeros(n, device=dev, dtype=dt) for n, dt in shapes)
            side.synchronize()
        except BaseException as exc:  # noqa: BLE001 -- re-raised on the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=make, name="slimtorch-int4-workspace")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    here = torch.cuda.current_stream(dev)
    for t in out:
        t.record_stream(here)
    return out


class _GemmLaunch:
    """The launch of one (device, stream, M, K, N, config, cluster): its ctypes objects, the schedule, the
    counters and the float32 workspace, made once; a call re-encodes x's descriptor and sets two pointers."""

    def __init__(self, dev: torch.device, stream: int, m: int, k: int, n: int, config: GemmConfig, cl: int,
                 stream_k: bool, band: int, pdl: bool) -> None:
        nt = config.nt
        self.smem = config.smem_bytes
        self.kern = _kernel(config, cl, dev)
        self.attrs = (LaunchAttr * 2)(attribute(CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, cl, 1, 1), PDL)
        self.cfg = LaunchConfig((ctypes.c_uint * 3)(cl, 1, 1), (ctypes.c_uint * 3)(384, 1, 1), self.smem,
                                ctypes.c_void_p(stream), self.attrs, 2 if pdl else 1)
        clusters = _max_clusters(self.kern.func, self.cfg, dev, cl)
        tiles_n, units = n // (128 * cl), k // 128  # in tiles of cl x 128 channels
        tiles = tiles_n * -(-m // nt)
        whole, tail, sk = schedule(tiles, units, clusters) if stream_k else (tiles, 0, 0)
        # partial sums: two slots per stream-K block; a counter per tail tile and block (each launch leaves them
        # at zero)
        self.part_sums, self.counters = _workspace(dev, (max(1, 2 * sk * cl * nt * 128), torch.float32),
                                                   (max(1, tail * cl), torch.int32))
        self.xbuf, self.xmap = tensor_map_buffer()
        self.xdims = (ctypes.c_uint64 * 2)(k, m)
        self.xstride = (ctypes.c_uint64 * 1)(0)
        self.xbox = (ctypes.c_uint32 * 2)(64, nt // cl)  # each block of a cluster loads its share of the rows
        self.ones = (ctypes.c_uint32 * 2)(1, 1)
        self.ybuf, self.ymap = tensor_map_buffer()
        self.ydims = (ctypes.c_uint64 * 2)(n, m)
        self.ystride = (ctypes.c_uint64 * 1)(n * 2)
        self.ybox = (ctypes.c_uint32 * 2)(64, nt)  # a warpgroup's 64 channels x NT rows
        self.ints = [ctypes.c_void_p(self.part_sums.data_ptr()), ctypes.c_void_p(self.counters.data_ptr()),
                     *(ctypes.c_int(v) for v in (m, units, 0, tiles_n, whole, tail, sk, band))]
        self.unit_shift = self.ints[4]
        self.cfg.grid[0] = max(min(clusters, whole), sk) * cl
        self.cfg_ref = ctypes.byref(self.cfg)
        self.maps = self.ptrs = None

    def launch(self, x2: torch.Tensor, w: Int4MMAWeight, y: torch.Tensor) -> None:
        self.xstride[0] = x2.stride(0) * 2
        # boxes of 64 inputs x NT rows, 128-byte swizzle, zeros past M; y the same
        bf16, swizzle = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, CU_TENSOR_MAP_SWIZZLE_128B
        encode_tiled_into(self.xmap, bf16, x2.data_ptr(), self.xdims, self.xstride, self.xbox, self.ones, swizzle)
        encode_tiled_into(self.ymap, bf16, y.data_ptr(), self.ydims, self.ystride, self.ybox, self.ones, swizzle)
        maps = _weight_maps(w)
        if maps is not self.maps:  # the argument pointers, remade when the weight changes
            self.maps = maps
            self.ptrs = (ctypes.c_void_p * 14)(*(ctypes.addressof(v) for v in (self.xmap, *maps, self.ymap, *self.ints)))
        self.unit_shift.value = w.unit_shift
        check(driver().cuLaunchKernelEx(self.cfg_ref, self.kern.func, self.ptrs, None), "cuLaunchKernelEx(int4_wgmma)")


_LAUNCHES: dict = {}
_CLUSTERS: dict = {}  # (kernel, cluster size) -> how many clusters fit on the device at once


def _max_clusters(func, cfg: LaunchConfig, dev: torch.device, cl: int) -> int:
    """How many clusters of ``cl`` blocks (one block per SM) can run at once: the SMs / cl, or fewer where the
    GPU's partitions hold an odd number of SMs (cuOccupancyMaxActiveClusters)."""
    key = (func.value if hasattr(func, "value") else func, cl)
    if key not in _CLUSTERS:
        n = ctypes.c_int(0)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        if cl == 1 or driver().cuOccupancyMaxActiveClusters(ctypes.byref(n), func, ctypes.byref(cfg)):
            n.value = sms // cl
        _CLUSTERS[key] = max(1, min(n.value, sms // cl))
    return _CLUSTERS[key]


def schedule(tiles: int, units: int, sms: int, min_units: int = 4) -> tuple[int, int, int]:
    """(whole, tail, sk): the first ``whole`` tiles are computed whole, round-robin over the ``sms`` blocks (or
    clusters); the last ``tail`` tiles (less than one round) are cut into ``sk`` equal shares of their units
    ("stream-K"), one per block, so that the last round keeps the whole chip busy. Each share has at least
    ``min_units`` units of 128 inputs. Only a last round at most half full is cut: the partial sums cost more
    than they save in a fuller one (on an H100, int4_gemm_sweep.jsonl)."""
    tail = tiles % sms
    sk = min(sms, tail * units // min_units)
    if tail == 0 or 2 * tail > sms or sk <= tail:
        return tiles, 0, 0
    return tiles - tail, tail, sk


def pieces(b: int, grid: int, tiles_n: int, units: int, whole: int, tail: int, sk: int) -> list[dict]:
    """Block ``b``'s pieces of work, as the kernel's ``piece`` walks them (here for the tests): ``tile``,
    units ``u0..u1``, and for a part of a tile its tail tile ``tt``, the tile's number of ``parts`` and the
    partial-sum ``slot``."""
    out = [dict(tile=t, u0=0, u1=units, tt=-1, parts=1, slot=0) for t in range(b, whole, grid)]
    if b < sk:
        w = tail * units
        e0, e1 = w * b // sk, w * (b + 1) // sk

        def owner(x: int) -> int:
            return (sk * (x + 1) - 1) // w

        for tt in range(e0 // units, tail):
            base = tt * units
            x0, x1 = max(e0, base), min(e1, base + units)
            if x0 >= x1:
                break
            p = dict(tile=whole + tt, u0=x0 - base, u1=x1 - base, tt=-1, parts=1, slot=0)
            if x1 - x0 < units:
                p.update(tt=tt, parts=owner(base + units - 1) - owner(base) + 1, slot=2 * b + (tt != e0 // units))
            out.append(p)
    return out


def int4_gemm(x: torch.Tensor, w: Int4MMAWeight, config: GemmConfig | None = None, stream_k: bool = True,
              cluster: int | None = None, band: int = 8, pdl: bool = True) -> torch.Tensor:
    """x (..., K) bf16 -> (..., N) bf16 with the wgmma kernel (any number of rows). ``config``: rows per
    tile and ring depth (default :func:`gemm_config`); ``stream_k``: split a last round at most half full over K
    (:func:`schedule`); ``cluster``: blocks per cluster sharing x, 1 or 2 (default 2 where N is a multiple of 256);
    ``band``: row tiles per band of the tile order (rows fastest within a band); ``pdl``: launch as a programmatic
    dependent launch (the kernel is set up while the previous one on the stream ends). The defaults are what the
    H100 measurements chose (benchmarks/notes/int4_kernel.md)."""
    k, n = w.k, w.n
    if x.dtype != torch.bfloat16 or x.shape[-1] != k:
        raise ValueError(f"int4_gemm takes bf16 x (..., {k}); got {x.dtype} {tuple(x.shape)}")
    if n % 128:
        raise ValueError(f"int4_gemm needs N a multiple of 128; got {n}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    dev = x.device
    if config is not None and (config.nt not in (64, 128, 192, 256) or config.stages < 3
                               or config.smem_bytes > MAX_SMEM):
        raise ValueError(f"int4_gemm: NT {config.nt} must be 64, 128, 192 or 256, and the stages ({config.stages}) at "
                         "least 3 (the consumers hold two slots, the stage in flight and the one being issued) and "
                         "fit 226 KB")
    stream = torch._C._cuda_getCurrentRawStream(dev.index)
    cl = cluster or (2 if n % 256 == 0 else 1)
    if cl not in (1, 2) or n % (128 * cl):
        raise ValueError(f"int4_gemm: a cluster of {cl} blocks needs N a multiple of {128 * cl}; got {n}")
    key = (dev.index, stream, m, k, n, config, cl, stream_k, band, pdl, threading.get_ident())
    launch = _LAUNCHES.get(key)
    if launch is None:  # the default config comes from gemm_config, once per launch shape
        launch = _LAUNCHES[key] = _GemmLaunch(dev, stream, m, k, n, config or gemm_config(m), cl, stream_k, band, pdl)
    launch.launch(x2, w, y)
    return y.reshape(*x.shape[:-1], n)
