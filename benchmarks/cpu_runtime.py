"""Deployed CPU speed: each model quantized W8A8 by `slimtorch quantize`, exported to QDQ ONNX by
`slimtorch export --format onnx`, and run in ONNX Runtime beside FP ONNX and PyTorch FP eager, all timed in
turn on the same batch (the export job's protocol), with accuracy on the full evaluation set.

    PYTHONPATH=src python benchmarks/cpu_runtime.py --models fmnist-cnn minilm [--batches 1 256] [--method rtn]

Appends one JSON line per (model, batch) to benchmarks/results/cpu_runtime.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from records import run_header

from slimtorch.jobs.export import run_export_onnx
from slimtorch.jobs.quantize import run_quantize

RESULTS = Path(__file__).parent / "results" / "cpu_runtime.jsonl"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--preset", default="W8A8")
    args = ap.parse_args()
    device = f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    head = run_header(device)
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            q = Path(tmp) / "q"
            quant = run_quantize(model, args.preset, args.method, q)
            rep = run_export_onnx(q, Path(tmp) / "onnx", tuple(args.batches))
            for b, lat in rep["latency"].items():
                rec = {**head, "model": model, "preset": args.preset, "method": args.method, "batch": int(b),
                       "input": lat["input"], "dataset": rep["dataset"], "metrics": rep["metrics"],
                       "latency": {k: lat[k] for k in ("pytorch_fp", "onnx_fp", "onnx_int8")},
                       "speedup_int8_vs_onnx_fp": lat["speedup_int8_vs_onnx_fp"],
                       "speedup_int8_vs_pytorch_fp": lat["speedup_int8_vs_pytorch_fp"],
                       "files": rep["files"], "export": rep["export"], "timing": rep["timing"],
                       "runtimes": rep["runtimes"], "notes": rep["notes"], "versions": rep["versions"],
                       "quantize_seconds": quant["time_s"]}
                with RESULTS.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(model, b, {k: round(lat[k]["median_ms"], 3) for k in ("pytorch_fp", "onnx_fp", "onnx_int8")},
                      f"int8 vs ORT FP {lat['speedup_int8_vs_onnx_fp']:.2f}x", flush=True)
            print(model, [(m["name"], m["pytorch_quantized"], m["onnx_int8"]) for m in rep["metrics"]], flush=True)


if __name__ == "__main__":
    main()
