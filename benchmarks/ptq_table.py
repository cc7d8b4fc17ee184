"""Print the latest PTQ accuracy records as a Markdown table (the README's table).

    python benchmarks/ptq_table.py
"""

from pathlib import Path

from records import latest

RESULTS = Path(__file__).parent / "results" / "ptq_accuracy.jsonl"


def main() -> None:
    records = latest(RESULTS, ("model", "preset", "method"))
    print("| model | preset | method | metric | FP | quantized | agreement with FP | bits/weight | layers kept float |")
    print("|---|---|---|---|---:|---:|---|---:|---:|")
    for (model, preset, method), r in sorted(records.items(), key=_order):
        name = next(iter(r["quantized"]))
        agree = "; ".join(f"{k.replace('_to_reference', '')} {_fmt(v)}" for k, v in r["quantized"].items()
                          if k in AGREEMENT)
        print(f"| {model} | {preset} | {method} | {name} | {r['fp'][name]:.2f} | {r['quantized'][name]:.2f} | "
              f"{agree} | {r['bits_per_weight']:.2f} | {r['skipped_layers']} |")


AGREEMENT = ("top1_agreement", "next_token_agreement", "mean_cosine_to_reference", "retrieval_agreement")
PRESETS = ["W8A8", "W8A8-dynamic", "FP8", "W4A8", "W4A16-g128", "W3A16-g128"]
METHODS = ["rtn", "smoothquant", "gptq", "awq"]


def _order(item):
    (model, preset, method), _ = item
    return (model, PRESETS.index(preset) if preset in PRESETS else 99, METHODS.index(method))


def _fmt(v: float) -> str:
    return f"{v:.4f}" if v <= 1.0 else f"{v:.1f}%"  # cosines are <= 1, agreements are percentages


if __name__ == "__main__":
    main()
