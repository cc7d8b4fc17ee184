"""GPU timing for the benchmarks: CUDA-event medians, CUDA graphs, and weight rotation past L2."""

from __future__ import annotations

import statistics

import torch

L2_BYTES = 50 * 2**20


def rotation_sets(set_bytes: int, least: int = 3) -> int:
    """How many copies of a weight to rotate among so that together they fill L2 three times over."""
    return max(least, -(-3 * L2_BYTES // set_bytes))


def median_us(run, calls: int, trials: int) -> float:
    """Median over ``trials`` of the CUDA-event time of ``run()`` (which makes ``calls`` calls), per call."""
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return statistics.median(times)


def cuda_graph(fn, calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn(0) .. fn(calls - 1)``, after one warm-up call on a side stream (as capture wants)."""
    g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(0)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    return g


def time_calls(fn, sets: int, calls: int = 50, trials: int = 5, graph: bool = False) -> float:
    """Median microseconds per call; call i uses input set i % sets."""
    for i in range(3):
        fn(i % sets)
    torch.cuda.synchronize()
    if graph:
        run = cuda_graph(lambda i: fn(i % sets), calls).replay
    else:
        def run():
            for i in range(calls):
                fn(i % sets)
    return median_us(run, calls, trials)
