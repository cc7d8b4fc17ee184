"""Print the latest PTQ accuracy records as a Markdown table (the README's table).

    python benchmarks/ptq_table.py
"""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "ptq_accuracy.jsonl"


def main() -> None:
    latest = {}
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        latest[(r["model"], r["preset"], r["method"])] = r  # later records win
    print("| model | preset | method | metric | FP | quantized | bits/weight | layers kept float |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for (model, preset, method), r in latest.items():
        name = next(iter(r["quantized"]))
        print(f"| {model} | {preset} | {method} | {name} | {r['fp'][name]:.2f} | {r['quantized'][name]:.2f} | "
              f"{r['bits_per_weight']:.2f} | {r['skipped_layers']} |")


if __name__ == "__main__":
    main()
