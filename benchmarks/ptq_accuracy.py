"""Post-training quantization accuracy: zoo models x presets x methods, FP baseline from the same run.

    PYTHONPATH=src python benchmarks/ptq_accuracy.py --models tinyllama-fm --presets W4A16-g128 W3A16-g128 \
        --methods rtn gptq awq [--limit N]

Appends one JSON line per (model, preset, method) to benchmarks/results/ptq_accuracy.jsonl.
SmoothQuant runs only with activation-quantizing presets, AWQ only with weight-only presets.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from records import run_header

from slimtorch.calib.data import calibration_set
from slimtorch.eval import evaluate
from slimtorch.quant.recipe import get_preset
from slimtorch.quantize import quantize_
from slimtorch.zoo import load_model

RESULTS = Path(__file__).parent / "results" / "ptq_accuracy.jsonl"


def applies(preset: str, method: str) -> bool:
    weight_only = get_preset(preset).weight_only
    return not ((method == "smoothquant" and weight_only) or (method == "awq" and not weight_only))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--presets", nargs="+", default=["W8A8", "W4A16-g128", "W4A8", "W3A16-g128"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "smoothquant", "gptq", "awq"])
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    common = {**run_header(f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", commit),
              "limit": args.limit}
    for name in args.models:
        fp = load_model(name)
        fp_res = evaluate(name, model=fp, limit=args.limit)
        calib = calibration_set(name, model=fp)
        for preset in args.presets:
            for method in args.methods:
                if not applies(preset, method):
                    continue
                q = copy.deepcopy(fp)
                t0 = time.perf_counter()
                rep = quantize_(q, preset, calib, method)
                secs = time.perf_counter() - t0
                res = evaluate(name, model=q, reference=fp, limit=args.limit)
                rec = {**common, "model": name, "preset": preset, "method": method, "dataset": res.dataset,
                       "fp": {m.name: m.value for m in fp_res.metrics},
                       "quantized": {m.name: m.value for m in res.metrics},
                       "bits_per_weight": rep.bits_per_weight, "quantized_layers": len(rep.quantized),
                       "skipped_layers": len(rep.skipped), "calib_samples": rep.calib_samples,
                       "quantize_seconds": round(secs, 1), "notes": rep.notes}
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                first = res.metrics[0]
                print(f"{name} {preset} {method}: {first.name} {first.value:.3f} "
                      f"(fp {fp_res.metrics[0].value:.3f}) {secs:.0f}s", flush=True)


if __name__ == "__main__":
    main()
