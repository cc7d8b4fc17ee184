"""GPU linear-layer benchmark: bf16 vs our int4 weight-only / fp8 / int8 kernels vs torchao, with the
roofline's prediction for each case. Needs CUDA (run through the device tool).

    PYTHONPATH=src python benchmarks/kernel_speed.py [--out DIR] [--quick]

Ours are timed through the public API: a QuantLinear per preset (RTN), called as a model calls it (eagerly:
the kernel launched directly; in the graph column: captured). W4A8 layers run weight-only int4 up to
``dispatch.W4A16_MAX_M`` rows. Each case is timed two ways: eager calls, and the same calls replayed from a CUDA graph (launch
overhead removed), each the median of 5 trials of 50 calls after warm-up, with weights rotated
among enough copies to exceed L2. With ``--repeats R`` the methods are timed R times in turn and each
record keeps the medians (and the R times). Appends JSON lines to DIR/kernels.jsonl (default
benchmarks/results/), every record with its bf16 baseline from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from records import run_header
from timing import rotation_sets, time_calls

from slimtorch.cost.hardware import get_hardware
from slimtorch.cost.roofline import linear_cost
from slimtorch.kernels import reference as R
from slimtorch.quant.recipe import get_preset

SHAPES = [(4096, 11008), (8192, 8192), (4096, 4096), (11008, 4096), (5120, 13824)]  # (K, N)
MS = [1, 16, 128, 2048, 8192]
def int4_weights(k: int, n: int, sets: int, group: int = 128):
    """``sets`` random bf16 weights (N, K), their int4 quantization (packed, scale, zero) and those in the
    tensor-core layout (seeded, so every sweep times the same weights)."""
    from slimtorch.kernels.int4_mma import prepare_int4_mma

    torch.manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets)]
    qs = [R.quantize_int4_weight(w.float(), group) for w in ws]
    return ws, qs, [prepare_int4_mma(*q) for q in qs]


def quant_layers(weights: list[torch.Tensor], preset) -> list[torch.nn.Module]:
    """One QuantLinear (RTN, the preset's specs) per bf16 weight (N, K), on the GPU: each holds its weights in
    its kernel's layout and runs the kernel eagerly or, traced, as a custom operator."""
    from slimtorch.quant.modules import QuantLinear

    out = []
    for w in weights:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        q = QuantLinear.from_float(lin, preset.weight, preset.act)
        assert q.kernel_op is not None, preset.name
        out.append(q)
    return out


def _torchao_fns(k: int, n: int, weights: list[torch.Tensor], mode: str | None = None):
    """torchao's int4 weight-only, int8 dynamic and fp8 row-wise dynamic, compiled (with ``mode``; its
    documented best is max-autotune, here without inductor's own CUDA graphs, which the graph column adds);
    None where unavailable."""
    out = {}
    try:
        import torchao.quantization as tq
    except Exception as exc:  # noqa: BLE001
        return {"torchao": f"import failed: {exc}"}
    configs = {
        "torchao_int4wo": lambda: tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
        "torchao_int8dyn": lambda: tq.Int8DynamicActivationInt8WeightConfig(),
        "torchao_fp8row": lambda: tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow()),
    }
    for name, cfg in configs.items():
        try:
            mods = []
            for w in weights:
                lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                lin.weight.data.copy_(w)
                tq.quantize_(lin, cfg())
                mods.append(lin)
            compiled = [torch.compile(m, mode=mode) for m in mods]
            out[name] = compiled
        except Exception as exc:  # noqa: BLE001
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--quick", action="store_true", help="one shape, M in {1, 16, 8192}")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--torchao-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode for torchao's modules (default: max-autotune, CUDA graphs from the "
                         "graph column); 'default' for plain torch.compile")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x11008,8192x8192 (K x N)")
    ap.add_argument("--ms", default=None, help="e.g. 1,16")
    ap.add_argument("--methods", default=None, help="comma-separated subset, e.g. bf16,ours_int4wo")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time every method this many times in turn and keep the medians (bf16 moves by up to "
                         "15%% between runs on an H100)")
    args = ap.parse_args()
    from slimtorch.kernels.int4 import int4_weight_only_linear, prepare_int4

    hw = get_hardware("h200" if "H200" in torch.cuda.get_device_name() else "h100")
    # the device tool's copy of the tree may report another HEAD: pass the real one in SLIMTORCH_COMMIT
    commit = os.environ.get("SLIMTORCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    common = run_header(torch.cuda.get_device_name(), commit)
    try:
        import torchao
        common["torchao"] = torchao.__version__
        common["torchao_compile_mode"] = args.torchao_mode
    except Exception:  # noqa: BLE001
        common["torchao"] = None
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "kernels.jsonl"
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = [1, 16, 8192] if args.quick else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    presets = {"int4wo": get_preset("W4A16-g128"), "int8": get_preset("W8A8-dynamic"), "fp8": get_preset("FP8"),
               "w4a8": get_preset("W4A8")}
    print(f"{'K':>6} {'N':>6} {'M':>5} {'method':>16} {'eager us':>9} {'graph us':>9} {'x bf16':>7} {'pred us':>8}")
    for k, n in shapes:
        sets = rotation_sets(k * n // 2)  # int4 weights, the smallest
        weights, q4raw, _ = int4_weights(k, n, sets)
        q4t = [prepare_int4(*q) for q in q4raw]  # the Triton kernels' layout (int4.py)
        # our presets through the public API: QuantLinear modules, called as a model calls them
        layers = {key: quant_layers(weights, p) for key, p in presets.items()}
        # the progressive W4A8 kernel (prototype: called directly, not yet behind a preset)
        from slimtorch.kernels.w4a8 import pack_w4a8, quantize_progressive, w4a8p_linear

        prog = [quantize_progressive(w, 128) for w in weights]
        prog = [(pack_w4a8(c), s1, s2) for c, s1, s2 in prog]
        ao = {} if args.no_torchao else _torchao_fns(k, n, weights, args.torchao_mode)
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
            ref = F.linear(xs[0], weights[0])
            fns = {
                "bf16": lambda i: F.linear(xs[i], weights[i]),
                "ours_int4wo": lambda i: layers["int4wo"][i](xs[i]),
                "ours_int4wo_triton": lambda i: int4_weight_only_linear(xs[i], q4t[i]),
                "ours_int8": lambda i: layers["int8"][i](xs[i]),
                "ours_fp8": lambda i: layers["fp8"][i](xs[i]),
                "ours_w4a8": lambda i: layers["w4a8"][i](xs[i]),
                "ours_w4a8p": lambda i: w4a8p_linear(xs[i], *prog[i]),
                "ours_w4a8p_plain": lambda i: w4a8p_linear(xs[i], *prog[i], asm=False),
            }
            if m <= 32:  # the W4A8 layer runs weight-only int4 there (dispatch.W4A16_MAX_M)
                del fns["ours_w4a8p"], fns["ours_w4a8p_plain"]
            if m > 16:  # the Triton path is kept for GPUs without bf16 mma; it is timed where it was tuned
                del fns["ours_int4wo_triton"]
            for name, mods in ao.items():
                if name == "torchao_int8dyn" and m <= 16:  # its int8 GEMM needs M > 16; a failed graph
                    continue  # capture would poison the CUDA context for every later case
                if isinstance(mods, list):
                    fns[name] = lambda i, mods=mods: mods[i](xs[i])
            if args.methods:
                keep = set(args.methods.split(",")) | {"bf16"}
                fns = {k2: f for k2, f in fns.items() if k2 in keep}
            recs = {name: {**common, "K": k, "N": n, "M": m, "method": name} for name in fns}
            runs: dict[str, dict[str, list[float]]] = {name: {"eager_us": [], "graph_us": []} for name in fns}
            for rep in range(args.repeats):  # the methods in turn, so that a drift of the clock hits them all
                for name, fn in fns.items():
                    rec = recs[name]
                    if "error" in rec:
                        continue
                    try:
                        with torch.no_grad():
                            if rep == 0:
                                y = fn(0)
                                rec["rel_err_vs_bf16"] = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                            runs[name]["eager_us"].append(time_calls(fn, sets))
                            runs[name]["graph_us"].append(time_calls(fn, sets, graph=True))
                    except Exception as exc:  # noqa: BLE001
                        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                        traceback.print_exc(limit=2)
            base = recs["bf16"] if "error" not in recs["bf16"] else None
            for name, rec in recs.items():
                for key, vals in runs[name].items():
                    if vals and "error" not in rec:
                        rec[key] = statistics.median(vals)
                        if args.repeats > 1:
                            rec[key + "_runs"] = vals
                if args.repeats > 1:
                    rec["repeats"] = args.repeats
                preset = next((p for key, p in presets.items() if key in name), None)
                cost = linear_cost("x", m, k, n, preset.weight if preset else None, preset.act if preset else None)
                rec["predicted_us"] = cost.time(hw) * 1e6
                rec["predicted_for"] = hw.name
                rec["predicted_bound"] = cost.bound(hw)
                if base is not None and "graph_us" in rec and "graph_us" in base:
                    rec["speedup_graph"] = base["graph_us"] / rec["graph_us"]
                    rec["speedup_eager"] = base["eager_us"] / rec["eager_us"]
                    rec["baseline_graph_us"], rec["baseline_eager_us"] = base["graph_us"], base["eager_us"]
                with open(out_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if "error" in rec:
                    print(f"{k:>6} {n:>6} {m:>5} {name:>16} ERROR {rec['error'][:80]}", flush=True)
                else:
                    print(f"{k:>6} {n:>6} {m:>5} {name:>16} {rec['eager_us']:9.1f} {rec['graph_us']:9.1f} "
                          f"{rec.get('speedup_graph', 1.0):7.2f} {rec['predicted_us']:8.1f}", flush=True)
    for name, mods in ao.items() if not args.no_torchao else ():
        if isinstance(mods, str):
            print(f"{name}: {mods}")


if __name__ == "__main__":
    main()
