"""Sweep the block shape of the int4 tensor-core kernel (slimtorch/kernels/int4_mma.py) on the GPU at hand:
every config's CUDA-graph time (median of 5 x 50 calls, repeated ``--reps`` times; the record keeps the
second-best of the repeats), with the default config and bf16 of the same run. One record per (shape, M)
goes to DIR/int4_mma_sweep.jsonl; the rule and the table ``_TUNED`` in int4_mma.py are read off them.

    PYTHONPATH=src python benchmarks/int4_mma_sweep.py [--shapes 4096x11008] [--ms 1,16] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from kernel_speed import int4_weights
from timing import rotation_sets, time_calls
from records import run_header

from slimtorch.kernels import int4_mma as I
from slimtorch.kernels import reference as R
from slimtorch.kernels.dispatch import int4_linear

SHAPES = "4096x11008,11008x4096,4096x4096,5120x13824,8192x8192,4096x12288,4096x22016"  # K x N; the last two
# are a 7B decoder's fused q/k/v and gate/up projections (benchmarks/decode.py)


def space(m: int, n: int, hopper: bool, warps: tuple[int, ...], near: I.MMAConfig | None = None):
    """Configs to time; with ``near`` (a config), only its NB, WARPS and KS, with every PF and EARLY."""
    mt = 1 << max(0, (m - 1).bit_length() - 3)  # tiles of 8 rows, as mma_config picks them
    pdl = hopper and mt < 4
    nbs, ks_ = (1, 2), (1, 2) if hopper and m > 1 else (1,)
    if near:
        nbs, warps, ks_ = (near.nb,), (near.warps,), (near.ks,)
    for nb, w, pf, ks, early in itertools.product(nbs, warps, (0, 1, 2) if near else (0, 1), ks_,
                                                  (0, 1) if pdl else (0,)):
        if (n // 16) % nb == 0 and w * nb * mt * 512 <= 48 * 1024:
            yield I.MMAConfig(nb=nb, mt=mt, warps=w, pf=pf, ks=ks, pdl=pdl, early=bool(early))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warps", default="2,4,8,16", help="warps per program to try")
    ap.add_argument("--near-default", action="store_true",
                    help="only the default config's NB, WARPS and KS, with every PF and EARLY")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    common = run_header(torch.cuda.get_device_name())
    hopper = torch.cuda.get_device_capability()[0] >= 9
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        sets = rotation_sets(k * n // 2)
        ws, qs, packed = int4_weights(k, n, sets)
        for m in (int(v) for v in args.ms.split(",")):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
            ref = R.int4_weight_only_linear_ref(xs[0].float(), *qs[0]).float()
            near = I.mma_config(m, n, k, xs[0].device) if args.near_default else None
            cfgs = {f"nb{c.nb}w{c.warps}pf{c.pf}ks{c.ks}" + ("e" if c.early else ""): c
                    for c in space(m, n, hopper, tuple(int(v) for v in args.warps.split(",")), near)}
            for key, cfg in cfgs.items():  # every config computes the product
                y = I.int4_mma_linear(xs[0], packed[0], cfg).float()
                assert ((y - ref).norm() / ref.norm()).item() < 3e-3, key
            times: dict[str, list[float]] = {}
            for _ in range(args.reps):
                times.setdefault("bf16", []).append(time_calls(lambda i: F.linear(xs[i], ws[i]), sets, graph=True))
                times.setdefault("default", []).append(time_calls(lambda i: int4_linear(xs[i], packed[i]), sets, graph=True))
                for key, cfg in cfgs.items():
                    times.setdefault(key, []).append(
                        time_calls(lambda i, c=cfg: I.int4_mma_linear(xs[i], packed[i], c), sets, graph=True))
            us = {key: sorted(v)[min(1, len(v) - 1)] for key, v in times.items()}
            best = min((v, key) for key, v in us.items() if key not in ("bf16", "default"))
            rec = {**common, "K": k, "N": n, "M": m, "default_config": asdict(I.mma_config(m, n, k, xs[0].device)),
                   "default_us": us["default"], "bf16_us": us["bf16"], "best": best[1], "best_us": best[0],
                   "graph_us": us}
            with open(args.out / "int4_mma_sweep.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{k}x{n} M={m}: bf16 {us['bf16']:.1f} default {us['default']:.1f} best {best[1]} {best[0]:.1f} us",
                  flush=True)


if __name__ == "__main__":
    main()
