"""int4 weight-only prefill against bf16 under sustained load, as a long prefill runs: each method's CUDA graph
(20 calls) is replayed back to back for ``--seconds``, the mean time per call is recorded with the SM clock and
power that nvidia-smi sampled meanwhile (every 100 ms), and bf16 runs before and after ours. On an H100 a
bf16 GEMM this long runs at the power limit, where the clock falls to about 1.35-1.45 GHz; short bursts (the
medians of benchmarks/kernel_speed.py) run nearer 1.98 GHz, so the two regimes can rank kernels differently. One
record per (shape, M) goes to DIR/int4_gemm_sustained.jsonl.

    PYTHONPATH=src python benchmarks/int4_gemm_sustained.py [--shapes 8192x8192] [--ms 2048,8192] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernel_speed import SHAPES, int4_weights
from timing import cuda_graph
from records import run_header

from slimtorch.kernels import reference as R
from slimtorch.kernels.dispatch import int4_linear


def _sustain(g: torch.cuda.CUDAGraph, calls: int, seconds: float) -> tuple[float, float, float]:
    """(mean us per call, start, end wall-clock time) of replays back to back for about ``seconds``."""
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0, n = time.time(), 0
    e0.record()
    while time.time() - t0 < seconds:
        for _ in range(3):
            g.replay()
        n += 3
        torch.cuda.synchronize()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1000 / (n * calls), t0, time.time()


def _samples(path: Path) -> list[tuple[float, float, float]]:
    """nvidia-smi's csv lines: (unix time, SM MHz, W)."""
    out = []
    for row in csv.reader(path.read_text().splitlines()):
        try:
            ts = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f")
            out.append((ts.replace(tzinfo=datetime.timezone.utc).timestamp(), float(row[1]), float(row[2])))
        except (ValueError, IndexError):
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default="2048,8192")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    common = run_header(torch.cuda.get_device_name())
    args.out.mkdir(parents=True, exist_ok=True)
    smi_file = Path(tempfile.mkstemp(suffix=".csv")[1])
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "100"], stdout=smi_file.open("w"), stderr=subprocess.DEVNULL,
                           stdin=subprocess.DEVNULL)
    runs = []
    try:
        for shape in args.shapes.split(","):
            k, n = (int(v) for v in shape.split("x"))
            ws, qs, packed = int4_weights(k, n, 1)
            for m in (int(v) for v in args.ms.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = R.int4_weight_only_linear_ref(x.float(), *qs[0]).float()
                err = ((int4_linear(x, packed[0]).float() - ref).norm() / ref.norm()).item()
                assert err < 5e-3, (shape, m, err)
                fns = {"bf16": lambda: F.linear(x, ws[0]), "ours_int4wo": lambda: int4_linear(x, packed[0])}
                times = {}
                for name in ("bf16", "ours_int4wo", "bf16"):
                    fns[name]()
                    torch.cuda.synchronize()
                    us, t0, t1 = _sustain(cuda_graph(lambda i, f=fns[name]: f(), 20), 20, args.seconds)
                    times.setdefault(name, []).append((us, t0, t1))
                    time.sleep(0.3)
                runs.append((k, n, m, times))
                print(f"{shape} M={m}: bf16 {times['bf16'][0][0]:.1f}/{times['bf16'][1][0]:.1f} us, "
                      f"ours {times['ours_int4wo'][0][0]:.1f} us", flush=True)
    finally:
        time.sleep(0.3)
        smi.terminate()
    samples = _samples(smi_file)
    with open(args.out / "int4_gemm_sustained.jsonl", "a") as f:
        for k, n, m, times in runs:
            rec = {**common, "K": k, "N": n, "M": m, "seconds": args.seconds}
            for name, rs in times.items():
                for i, (us, t0, t1) in enumerate(rs):
                    seen = [s for s in samples if t0 + 0.3 <= s[0] <= t1]  # past the first samples of the run
                    key = name if len(rs) == 1 else f"{name}_{'before' if i == 0 else 'after'}"
                    rec[key] = {"us": us, "sm_mhz": statistics.mean(s[1] for s in seen) if seen else None,
                                "watts": statistics.mean(s[2] for s in seen) if seen else None}
            bf16 = min(rec["bf16_before"]["us"], rec["bf16_after"]["us"])
            rec["speedup_vs_faster_bf16"] = bf16 / rec["ours_int4wo"]["us"]
            f.write(json.dumps(rec) + "\n")
            print(f"{k}x{n} M={m}: {rec['speedup_vs_faster_bf16']:.3f}x bf16 (the faster of its two runs); SM MHz "
                  f"bf16 {rec['bf16_before']['sm_mhz']}, ours {rec['ours_int4wo']['sm_mhz']}", flush=True)


if __name__ == "__main__":
    main()
