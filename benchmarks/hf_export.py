"""HF export round trip: a language model quantized by `slimtorch quantize`, exported with
`slimtorch export --format hf` (compressed-tensors), reloaded by transformers + compressed-tensors, and its
perplexity compared with ours on the same windows (the full held-out split).

    PYTHONPATH=src python benchmarks/hf_export.py [--model tinyllama-fm] [--presets W4A16-g128 W8A8]

Appends one JSON line per preset to benchmarks/results/hf_export.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from records import run_header

from slimtorch.jobs.export import run_export_hf
from slimtorch.jobs.quantize import run_quantize

RESULTS = Path(__file__).parent / "results" / "hf_export.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tinyllama-fm")
    ap.add_argument("--presets", nargs="+", default=["W4A16-g128", "W8A8"])
    ap.add_argument("--method", default="rtn")
    args = ap.parse_args()
    head = run_header(f"CPU, {os.cpu_count()} cores")
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            q = Path(tmp) / "q"
            run_quantize(args.model, preset, args.method, q)
            rep = run_export_hf(q, Path(tmp) / "hf")
            rec = {**head, "model": args.model, "preset": preset, "method": args.method, "dataset": rep["dataset"],
                   "metrics": rep["metrics"], "reload_check": rep["reload_check"], "export": rep["export"],
                   "files": rep["files"], "notes": rep["notes"], "versions": rep["versions"]}
            with RESULTS.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(preset, rep["reload_check"], flush=True)


if __name__ == "__main__":
    main()
