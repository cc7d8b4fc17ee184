"""Launching Triton kernels with little host work per call.

Why: ``kernel[grid](*args)`` binds and specialises its arguments in Python on every call: 30-40 us a launch
on this workplace's GPU hosts (a cProfile of an eager W8A8 linear in benchmarks/results/eager_overhead.jsonl),
more than a decode-sized GEMM takes on the GPU. After the first call with a given specialisation,
:func:`launch` calls the compiled kernel directly. (The int4 Triton kernels use it; the autotuned W8A8 and
W4A8 kernels do not yet: benchmarks/notes/issue20_speed.md.)
"""

from __future__ import annotations

import torch

_COMPILED: dict = {}  # (kernel, meta, argument specialisation) -> CompiledKernel


def _spec(v) -> tuple:
    """What Triton specialises a kernel argument on: dtype and 16-byte alignment, or an int's size."""
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    return v == 1, v % 16 == 0, -2**31 <= v < 2**31


def launch(kernel, grid: tuple, args: tuple, meta: dict) -> None:
    """``kernel[grid](*args, **meta)`` (a ``triton.jit`` function; ``args`` its leading arguments, ``meta``
    the rest by name plus launch options such as ``num_warps``); after the first launch with the same
    specialisation, the compiled kernel is called directly, skipping the JIT's per-call binding."""
    key = (kernel, tuple(meta.items()), tuple(_spec(a) for a in args))
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, **meta)
        return
    values = [*args, *(meta[name] for name in kernel.arg_names[len(args):])]
    compiled[grid + (1,) * (3 - len(grid))](*values, stream=torch.cuda.current_stream(args[0].device).cuda_stream)
