"""CUDA plumbing shared by the NVRTC kernels: their source (``cuda/*.cu`` package data), compiling at
first use, the driver library through ctypes, its launch and tensor-map structures, and the driver's
enum values by name.

Why ctypes and ``cuLaunchKernelEx`` rather than torch's launcher: the int4 kernels need cluster
dimensions and programmatic dependent launch, which only the extended launch takes, and at one row a
kernel takes about 10 us, so a launch must cost little (the ctypes objects of each launch shape are
made once, :class:`Launcher`).
"""

from __future__ import annotations

import ctypes
import threading
from importlib import resources

import torch

# CUlaunchAttributeID
CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
# CUfunction_attribute
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
# CUtensorMapDataType
CU_TENSOR_MAP_DATA_TYPE_UINT32 = 2
CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 = 9
# CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill
CU_TENSOR_MAP_INTERLEAVE_NONE = 0
CU_TENSOR_MAP_SWIZZLE_NONE = 0
CU_TENSOR_MAP_SWIZZLE_128B = 3
CU_TENSOR_MAP_L2_PROMOTION_L2_256B = 3
CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0  # out-of-bounds elements read as zeros


def source(*names: str) -> str:
    """The text of ``cuda/<name>`` files of this package, concatenated in order."""
    folder = resources.files("slimtorch.kernels") / "cuda"
    return "".join((folder / name).read_text() for name in names)


_DRIVER: list = []  # the CUDA driver library (ctypes), loaded once


def driver():
    """The CUDA driver library through ctypes."""
    if not _DRIVER:
        from torch.cuda._utils import _get_gpu_runtime_library

        _DRIVER.append(_get_gpu_runtime_library())
    return _DRIVER[0]


def check(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"{what} failed with CUDA error {err}")


_COMPILED: dict = {}  # (source id, kernel name, device index) -> torch's compiled-kernel object


def compile_kernel(src: str, name: str, device: torch.device, compute_capability: str | None = None,
                   dynamic_smem: int = 0):
    """``name`` (a kernel or template instance of ``src``) compiled by NVRTC for ``device``, once per
    process; with ``dynamic_smem``, allowed that many bytes of dynamic shared memory."""
    key = (id(src), name, device.index)
    kern = _COMPILED.get(key)
    if kern is None:
        kw = {} if compute_capability is None else {"compute_capability": compute_capability}
        with torch.cuda.device(device):
            kern = torch.cuda._compile_kernel(src, name, **kw)
        if dynamic_smem:
            check(driver().cuFuncSetAttribute(kern.func, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic_smem),
                  f"cuFuncSetAttribute({name})")
        _COMPILED[key] = kern
    return kern


class LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttr)), ("num_attrs", ctypes.c_uint)]


def attribute(attr_id: int, *values: int) -> LaunchAttr:
    return LaunchAttr(attr_id, b"", (ctypes.c_int * 16)(*values))


PDL = attribute(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 1)  # programmatic dependent launch


class _LaunchShape:
    """The ctypes objects of one launch shape, made once; a call only refreshes the argument values."""

    def __init__(self, kern, grid: tuple, block: int, kinds: tuple, pdl: bool) -> None:
        self.func = kern.func
        self.vals = [ctypes.c_void_p() if kind else ctypes.c_int() for kind in kinds]
        self.ptrs = (ctypes.c_void_p * len(kinds))(*map(ctypes.addressof, self.vals))
        self.cfg = LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(block, 1, 1), 0, None,
                                ctypes.pointer(PDL) if pdl else None, 1 if pdl else 0)
        self.cfg_ref = ctypes.byref(self.cfg)


class BoundLaunch(_LaunchShape):
    """One launch of one kernel with its arguments set once (:meth:`Launcher.bind`); a call changes only the
    arguments that differ from call to call (``set``), then launches on the current stream. The eager path
    of a layer keeps one per shape of input, so that a call costs a few attribute writes and one driver call
    (benchmarks/eager_overhead.py measures it against a bf16 ``F.linear``)."""

    def __init__(self, kern, grid: tuple, block: int, args: tuple, device: torch.device, pdl: bool) -> None:
        kinds = tuple(isinstance(a, torch.Tensor) for a in args)
        super().__init__(kern, grid, block, kinds, pdl)
        self.device_index = device.index
        self.keep = args  # the bound tensors stay alive as long as the launch that points at them
        for v, a, kind in zip(self.vals, args, kinds):
            v.value = a.data_ptr() if kind else a

    def __call__(self) -> None:
        self.cfg.stream = torch._C._cuda_getCurrentRawStream(self.device_index)
        err = driver().cuLaunchKernelEx(self.cfg_ref, self.func, self.ptrs, None)
        if err:
            check(err, "cuLaunchKernelEx")


class Launcher:
    """Launches the kernels of one source with ``cuLaunchKernelEx`` on the current stream (captured by CUDA
    graphs like any launch), optionally as programmatic dependent launches. Arguments are tensors (passed as
    pointers) and ints."""

    def __init__(self, src: str) -> None:
        self.src = src
        self._shapes: dict = {}

    def bind(self, name: str, grid: tuple, block: int, args: tuple, device: torch.device,
             pdl: bool = False) -> BoundLaunch:
        """A launch of ``name`` with ``args`` set (see :class:`BoundLaunch`); not shared between threads."""
        return BoundLaunch(compile_kernel(self.src, name, device), grid, block, args, device, pdl)

    def __call__(self, name: str, grid: tuple, block: int, args: tuple, device: torch.device,
                 pdl: bool = False) -> None:
        kinds = tuple(isinstance(a, torch.Tensor) for a in args)
        key = (name, device.index, grid, block, pdl, kinds, threading.get_ident())
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _LaunchShape(compile_kernel(self.src, name, device), grid, block, kinds, pdl)
        for v, a, kind in zip(shape.vals, args, kinds):
            v.value = a.data_ptr() if kind else a
        shape.cfg.stream = torch._C._cuda_getCurrentRawStream(device.index)
        check(driver().cuLaunchKernelEx(shape.cfg_ref, shape.func, shape.ptrs, None), f"cuLaunchKernelEx({name})")


def tensor_map_buffer() -> tuple:
    """Room for one TMA descriptor: (the buffer to keep alive, its 64-byte-aligned 128 bytes)."""
    buf = (ctypes.c_ubyte * 192)()
    return buf, (ctypes.c_ubyte * 128).from_address((ctypes.addressof(buf) + 63) & ~63)


def encode_tiled_into(out, dtype: int, ptr: int, dims, strides, box, ones, swizzle: int) -> None:
    """cuTensorMapEncodeTiled into ``out`` (ctypes arrays: dims innermost first, strides in bytes of dims 1..,
    the box in elements), no interleave, L2 promotion 256 B, zeros out of bounds."""
    err = driver().cuTensorMapEncodeTiled(out, dtype, len(dims), ctypes.c_void_p(ptr), dims, strides, box, ones,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    check(err, f"cuTensorMapEncodeTiled (dims {list(dims)}, box {list(box)})")


def encode_tiled(dtype: int, dims: tuple, strides: tuple, box: tuple, ptr: int, swizzle: int) -> ctypes.Array:
    """A TMA descriptor (see :func:`encode_tiled_into`) as 128 bytes of its own."""
    keep, view = tensor_map_buffer()
    r = len(dims)
    encode_tiled_into(view, dtype, ptr, (ctypes.c_uint64 * r)(*dims), (ctypes.c_uint64 * (r - 1))(*strides),
                      (ctypes.c_uint32 * r)(*box), (ctypes.c_uint32 * r)(*([1] * r)), swizzle)
    out = (ctypes.c_ubyte * 128)()
    ctypes.memmove(out, view, 128)
    return out
