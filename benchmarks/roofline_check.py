"""Roofline predictions against measured GPU times: every kernel record (benchmarks/results/kernels.jsonl)
is predicted with the chip's datasheet profile and with its measured-ceiling profile, and the ratio
measured / predicted is written to benchmarks/results/roofline.jsonl.

    python benchmarks/roofline_check.py [--run DATE]

roofline.jsonl covers every record; the table and the counts printed are of one run: the newest, or the
one whose date starts with DATE.

The measured time is the CUDA-graph replay (launch overhead removed). A ratio of 1 means the kernel
runs at the roofline; above 1, slower than it. "within 25%" counts ratios in [0.8, 1.25].
"""

import argparse
import json
from pathlib import Path

from slimtorch.cost.hardware import get_hardware
from slimtorch.cost.roofline import linear_cost
from slimtorch.quant.recipe import get_preset

RESULTS = Path(__file__).parent / "results"
PRESETS = {"int4wo": "W4A16-g128", "int8": "W8A8-dynamic", "fp8": "FP8"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="the run (its records' date, or a prefix) to print; default the newest")
    args = ap.parse_args()
    rows = [json.loads(line) for line in (RESULTS / "kernels.jsonl").read_text().splitlines()]
    run = args.run or rows[-1]["date"]
    if not any(r["date"].startswith(run) for r in rows):
        raise SystemExit(f"no run in kernels.jsonl started at {run}")
    out = []
    for r in rows:
        if "graph_us" not in r or r["method"].endswith("_fused"):
            continue
        chip = "h200" if "H200" in r["device"] else "h100"
        key = next((k for k in PRESETS if k in r["method"]), None)
        rec = get_preset(PRESETS[key]) if key else None
        cost = linear_cost("x", r["M"], r["K"], r["N"], rec.weight if rec else None, rec.act if rec else None)
        entry = {"K": r["K"], "N": r["N"], "M": r["M"], "method": r["method"], "device": r["device"],
                 "kernels_record_date": r["date"], "measured_us": r["graph_us"], "flops": cost.flops,
                 "bytes": cost.bytes, "compute": cost.compute}
        for profile in (chip, f"{chip}-measured"):
            hw = get_hardware(profile)
            entry[f"predicted_us[{profile}]"] = cost.time(hw) * 1e6
            entry[f"bound[{profile}]"] = cost.bound(hw)
            entry[f"ratio[{profile}]"] = r["graph_us"] / (cost.time(hw) * 1e6)
        out.append(entry)
    (RESULTS / "roofline.jsonl").write_text("".join(json.dumps(e) + "\n" for e in out))
    out = [e for e in out if e["kernels_record_date"].startswith(run)]
    print(f"run {out[0]['kernels_record_date'] if out else run}")
    print("| method | K x N | M | bound | measured us | predicted (datasheet) | predicted (measured ceilings) | ratio |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for e in out:
        if e["method"] in ("bf16", "ours_int8", "ours_fp8", "ours_int4wo"):
            chip = "h200" if "H200" in e["device"] else "h100"
            m = f"{chip}-measured"
            print(f"| {e['method']} | {e['K']}x{e['N']} | {e['M']} | {e[f'bound[{m}]']} | {e['measured_us']:.1f} | "
                  f"{e[f'predicted_us[{chip}]']:.1f} | {e[f'predicted_us[{m}]']:.1f} | {e[f'ratio[{m}]']:.2f} |")
    for method in ("bf16", "ours_int8", "ours_fp8", "ours_int4wo"):
        sel = [e for e in out if e["method"] == method]
        for bound in ("memory", "compute"):
            group = [e for e in sel if e[f"bound[{'h200' if 'H200' in e['device'] else 'h100'}-measured]"] == bound]
            if group:
                ok = sum(0.8 <= e[f"ratio[{'h200' if 'H200' in e['device'] else 'h100'}-measured]"] <= 1.25
                         for e in group)
                print(f"{method} {bound}-bound: {ok}/{len(group)} within 25% of the measured-ceiling roofline")


if __name__ == "__main__":
    main()
