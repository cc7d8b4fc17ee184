"""Print the kernel benchmark records as Markdown (the README's table): speed-up over bf16 from the
same run, CUDA-graph replay (eager in brackets), and the roofline's predicted time.

    python benchmarks/kernels_table.py [--shape 4096x11008] [--run DATE]

By default each cell is the newest record of its case, with the methods that the newest run timed; with
``--run`` only the run that started at DATE (a record's "date", or a prefix of it).
"""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "kernels.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default=None, help="K x N, e.g. 4096x11008")
    ap.add_argument("--run", default=None, help="only the run whose date starts with this")
    args = ap.parse_args()
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    if args.run:
        rows = [r for r in rows if r["date"].startswith(args.run)]
        if not rows:
            raise SystemExit(f"no run in {RESULTS} started at {args.run}")
    device = rows[-1]["device"]  # the newest run's GPU: ratios only compare records of one device
    rows = [r for r in rows if r["device"] == device]
    print(f"{device}, torch {rows[-1]['torch']}, torchao {rows[-1].get('torchao')}\n")
    last = {}
    for r in rows:
        last[(r["K"], r["N"], r["M"], r["method"])] = r
    newest = {r["method"] for r in rows if r["date"] == rows[-1]["date"]}  # methods the newest run timed
    methods = [meth for meth in dict.fromkeys(k[3] for k in last) if meth in newest]
    print("| K x N | M | " + " | ".join(methods) + " |")
    print("|---|---:|" + "---:|" * len(methods))
    for k, n, m in dict.fromkeys((k[0], k[1], k[2]) for k in last):
        if args.shape and f"{k}x{n}" != args.shape:
            continue
        cells = []
        for meth in methods:
            r = last.get((k, n, m, meth))
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("error")
            elif meth == "bf16":
                cells.append(f"{r['graph_us']:.1f} us")
            else:
                cells.append(f"{r['speedup_graph']:.2f}x ({r['speedup_eager']:.2f}x)")
        print(f"| {k}x{n} | {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
