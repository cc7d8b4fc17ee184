"""Sweep the int4 wgmma GEMM (slimtorch/kernels/int4_gemm.py) on an H100: every (NT, STAGES) config's
CUDA-graph time at each (shape, M), with bf16 cuBLAS and the dequantize + cuBLAS path of the same run
(median of 5 x 20 calls, repeated ``--reps`` times; the record keeps the second-best). Each config's
product is checked against the float32 reference first. One record per (shape, M) goes to
DIR/int4_gemm_sweep.jsonl.

    PYTHONPATH=src python benchmarks/int4_gemm_sweep.py [--shapes 4096x11008] [--ms 128,2048] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kernel_speed import SHAPES, int4_weights
from timing import rotation_sets, time_calls
from records import run_header

from slimtorch.kernels import int4_gemm as G
from slimtorch.kernels import int4_mma as I
from slimtorch.kernels import reference as R


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default="128,2048,8192")
    ap.add_argument("--configs", default="256:4,256:3,128:6,128:8", help="NT:STAGES pairs")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    common = run_header(torch.cuda.get_device_name())
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        sets = rotation_sets(k * n // 2)
        ws, qs, packed = int4_weights(k, n, sets)
        del qs[1:]
        for m in (int(v) for v in args.ms.split(",")):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
            ref = R.int4_weight_only_linear_ref(xs[0].float(), *qs[0]).float()
            errs = {}
            for nt, st in configs:
                y = G.int4_gemm(xs[0], packed[0], G.GemmConfig(nt, st)).float()
                errs[f"{nt}:{st}"] = ((y - ref).norm() / ref.norm()).item()
                assert errs[f"{nt}:{st}"] < 5e-3, (nt, st, errs)
            times: dict[str, list[float]] = {}
            for _ in range(args.reps):
                times.setdefault("bf16", []).append(time_calls(lambda i: F.linear(xs[i], ws[i]), sets, 20, graph=True))
                times.setdefault("dequant", []).append(
                    time_calls(lambda i: F.linear(xs[i], I.dequantize_int4_mma(packed[i])), sets, 20, graph=True))
                for nt, st in configs:
                    times.setdefault(f"{nt}:{st}", []).append(
                        time_calls(lambda i, c=G.GemmConfig(nt, st): G.int4_gemm(xs[i], packed[i], c), sets, 20, graph=True))
            us = {key: sorted(v)[min(1, len(v) - 1)] for key, v in times.items()}
            best = min((v, key) for key, v in us.items() if key not in ("bf16", "dequant"))
            rec = {**common, "K": k, "N": n, "M": m, "bf16_us": us["bf16"], "dequant_us": us["dequant"],
                   "best": best[1], "best_us": best[0], "speedup_best": us["bf16"] / best[0], "graph_us": us,
                   "rel_err": errs}
            with open(args.out / "int4_gemm_sweep.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{k}x{n} M={m}: bf16 {us['bf16']:.1f} dequant {us['dequant']:.1f} "
                  + " ".join(f"{key} {v:.1f}" for key, v in us.items() if ":" in key)
                  + f" -> {us['bf16'] / best[0]:.2f}x; err {max(errs.values()):.2e}", flush=True)


if __name__ == "__main__":
    main()
