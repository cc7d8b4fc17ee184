"""Print the generate() records (benchmarks/results/generate.jsonl) as Markdown: decode and prefill tokens/s of
each version against bf16 of the same run, per mode and batch.

    python benchmarks/generate_table.py [--run DATE]

By default the newest run; ``--run`` picks the run whose "date" starts with DATE.
"""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "generate.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    args = ap.parse_args()
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    run = args.run or rows[-1]["date"]
    rows = [r for r in rows if r["date"].startswith(run)]
    if not rows:
        raise SystemExit(f"no run in {RESULTS} started at {run}")
    r0 = rows[0]
    print(f"{r0['device']}, torch {r0['torch']}, transformers {r0['transformers']}, commit {r0['git_commit']}, "
          f"{r0['layers']} layers, prompt {r0['prompt']}, {r0['new_tokens']} new tokens\n")
    base = {(r["mode"], r["batch"]): r for r in rows if r["version"] == "bf16" and "error" not in r}
    print("| version | mode | batch | decode tok/s | x bf16 | prefill tok/s | x bf16 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['version']} | {r['mode']} | {r['batch']} | error: {r['error'][:60]} | | | |")
            continue
        b = base.get((r["mode"], r["batch"]))
        dx = f"{r['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x" if b else ""
        px = f"{r['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}x" if b else ""
        print(f"| {r['version']} | {r['mode']} | {r['batch']} | {r['decode_tokens_per_s']:.0f} | {dx} | "
              f"{r['prefill_tokens_per_s']:.0f} | {px} |")


if __name__ == "__main__":
    main()
