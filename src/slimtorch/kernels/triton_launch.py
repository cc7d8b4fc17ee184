"""Launching Triton kernels with little host work per call.

Why: ``kernel[grid](*args)`` binds and specialises its arguments in Python on every call, and an autotuned
kernel also computes its tuning key: 30-40 us a launch on this workplace's GPU hosts (a cProfile of an
eager W8A8 linear in benchmarks/results/eager_overhead.jsonl), more than a decode-sized GEMM takes on the
GPU. After the first call with a given specialisation, :func:`launch` calls the compiled kernel directly;
:func:`launch_tuned` does the same with the configuration the autotuner chose for a key.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_COMPILED: dict = {}  # (kernel, meta, argument specialisation) -> CompiledKernel
_BEST: dict = {}  # (autotuned kernel, key values) -> the chosen triton.Config


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


def launch_tuned(tuner, grid: Callable[[dict], tuple], args: tuple, meta: dict, key: tuple) -> None:
    """``tuner[grid](*args, **meta)`` for a ``triton.autotune`` kernel whose tuning key has the values ``key``:
    the first call per key runs the autotuner; later calls launch its choice through :func:`launch`."""
    best = _BEST.get((tuner, key))
    if best is None:
        tuner[grid](*args, **meta)
        _BEST[(tuner, key)] = tuner.best_config
        return
    full = {**meta, **best.all_kwargs()}
    launch(tuner.fn, tuple(grid(full)), args, full)
