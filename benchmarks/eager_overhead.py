"""Eager per-call cost of one quantized linear against bf16, at small M where the GPU work is microseconds and
the Python and launch cost shows: the wall time per call of a long loop of calls, and the host CPU time of
issuing them. Where the host is slower than the GPU (the usual case at M = 1), the wall time is the host's.

    PYTHONPATH=src python benchmarks/eager_overhead.py [--out FILE]

Rows, each for M in {1, 8} on 4096x4096 and 11008x4096 (N x K) weights:
* ``bf16 F.linear`` and ``bf16 nn.Linear`` (the module call adds nn.Module's own cost);
* each preset's QuantLinear module call (``QuantLinear(...)``) and its kernel called directly
  (``kernel: ...``, the module's eager function).
The int4 module call is also profiled (cProfile, the top functions by own time) and the profile saved in the
record. Appends one JSON line per row to benchmarks/results/eager_overhead.jsonl (or --out).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from records import run_header

from slimtorch.quantize import quantize_

CALLS = 2000
PRESETS = ("W4A16-g128", "W8A8-dynamic", "FP8", "W4A8")


def per_call_us(fn, calls: int = CALLS) -> tuple[float, float]:
    """(wall µs per call over a loop, host CPU µs per call) after warm-up; the best of 3 loops."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = (float("inf"), float("inf"))
    for _ in range(3):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            fn()
        c1 = time.process_time()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        best = min(best, ((t1 - t0) * 1e6 / calls, (c1 - c0) * 1e6 / calls))
    return best


def profile_top(fn, calls: int = 500, top: int = 8) -> list[str]:
    """The ``top`` functions by own time over ``calls`` calls (cProfile), one line each."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    lines = [ln.strip() for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("ncalls"))
    return lines[start:start + top + 1]


def quantized(lin: torch.nn.Linear, preset: str) -> torch.nn.Module:
    q = torch.nn.Sequential(torch.nn.Linear(lin.in_features, lin.out_features, bias=False))
    q[0].weight.data.copy_(lin.weight.data)
    quantize_(q, preset, [], "rtn")
    return q.cuda().to(torch.bfloat16)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eager_overhead.jsonl"))
    args = ap.parse_args()
    head = run_header(torch.cuda.get_device_name())
    for n, k in ((4096, 4096), (11008, 4096)):
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False)
        mod = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        mod.weight.data.copy_(lin.weight.data)
        w = mod.weight.detach()
        layers = {p: quantized(lin, p) for p in PRESETS}
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            rows: dict[str, tuple[float, float]] = {}
            extra: dict[str, dict] = {}
            with torch.no_grad():
                rows["bf16 F.linear"] = per_call_us(lambda: F.linear(x, w))
                rows["bf16 nn.Linear"] = per_call_us(lambda: mod(x))
                for p, q in layers.items():
                    rows[f"QuantLinear {p}"] = per_call_us(lambda q=q: q(x))
                    extra[f"QuantLinear {p}"] = {"kernel_op": q.kernel_op}
                    if q._eager is not None:
                        rows[f"kernel {p}"] = per_call_us(lambda q=q: q._eager(x))
                for p in ("W4A16-g128", "W8A8-dynamic"):
                    extra[f"QuantLinear {p}"]["profile"] = profile_top(lambda p=p: layers[p](x), top=14)
            base_f, base_m = rows["bf16 F.linear"], rows["bf16 nn.Linear"]
            for name, (wall, host) in rows.items():
                rec = {**head, "shape_nk": [n, k], "m": m, "what": name, "wall_us_per_call": wall,
                       "host_cpu_us_per_call": host, "wall_ratio_to_bf16_F_linear": wall / base_f[0],
                       "wall_ratio_to_bf16_nn_linear": wall / base_m[0], "calls": CALLS, **extra.get(name, {})}
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{n}x{k} M={m} {name:28s} wall {wall:6.1f} us  host {host:6.1f} us  "
                      f"{wall / base_f[0]:.2f}x F.linear  {wall / base_m[0]:.2f}x nn.Linear", flush=True)
            for p in ("W4A16-g128", "W8A8-dynamic"):
                print("  profile of QuantLinear", p)
                for line in extra[f"QuantLinear {p}"]["profile"]:
                    print("   ", line)


if __name__ == "__main__":
    main()
