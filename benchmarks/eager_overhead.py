"""Eager per-call cost of one quantized linear against bf16 F.linear, at small M where the GPU work is
microseconds and the Python and launch cost shows: the wall time per call of a long loop of calls (the GPU
queue never drains, so this is the host's rate), and the host time alone (CPU time of issuing the calls).

    PYTHONPATH=src python benchmarks/eager_overhead.py [--out FILE]

Appends one JSON line per (preset, shape, M) to benchmarks/results/eager_overhead.jsonl (or --out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from records import run_header

from slimtorch.quantize import quantize_

CALLS = 2000


def per_call_us(fn, calls: int = CALLS) -> tuple[float, float]:
    """(wall µs per call over a loop, host CPU µs per call) after warm-up."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    c1 = time.process_time()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    return (t1 - t0) * 1e6 / calls, (c1 - c0) * 1e6 / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eager_overhead.jsonl"))
    args = ap.parse_args()
    head = run_header(torch.cuda.get_device_name())
    for n, k in ((4096, 4096), (11008, 4096)):
        lin = torch.nn.Linear(k, n, bias=False)
        w = lin.weight.detach().cuda().to(torch.bfloat16)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                base = per_call_us(lambda: F.linear(x, w))
                rows = {"bf16 F.linear": base}
                for preset in ("W4A16-g128", "W8A8-dynamic", "FP8"):
                    q = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
                    q[0].weight.data.copy_(lin.weight.data)
                    quantize_(q, preset, [], "rtn")
                    q = q.cuda().to(torch.bfloat16)
                    rows[preset] = per_call_us(lambda: q(x))
            for name, (wall, host) in rows.items():
                rec = {**head, "shape": [n, k], "m": m, "what": name, "wall_us_per_call": wall,
                       "host_cpu_us_per_call": host, "ratio_to_bf16_wall": wall / base[0], "calls": CALLS}
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(n, k, m, name, f"wall {wall:.1f} us, host {host:.1f} us, {wall / base[0]:.2f}x bf16", flush=True)


if __name__ == "__main__":
    main()
