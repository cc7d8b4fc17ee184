"""The fuzz suite: each category in a worker process of its own (tests/fuzz/worker.py), a summary table,
and with ``--record`` a line in benchmarks/results/fuzz.jsonl.

    PYTHONPATH=src python -m tests.fuzz.run --full --record     # >= 2,000 recipes, >= 100 of the rest
    PYTHONPATH=src python -m tests.fuzz.run                     # the quick subset CI runs (test_fuzz.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = {"recipes": 400, "folders": 40, "files": 100, "argv": 40}
FULL = {"recipes": 3000, "folders": 500, "files": 1000, "argv": 200}
LIMITS = {"peak_rss_mb": 2048, "slowest_case_s": 30}


def run_category(category: str, n: int, seed: int, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    r = subprocess.run([sys.executable, "-m", "tests.fuzz.worker", category, str(seed), str(n), str(work)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60 * 60)
    if r.returncode != 0 or not r.stdout.strip():
        return {"category": category, "cases": n, "worker_failed": r.returncode, "stderr": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _header() -> dict:
    """records.run_header with this checkout's commit (and whether the tree had uncommitted changes)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from records import run_header

    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain", "--", "src", "tests"], capture_output=True,
                                text=True).stdout.strip())
    head = run_header("cpu", commit + ("+uncommitted" if dirty else ""))
    head["command"] = "PYTHONPATH=src python -m tests.fuzz.run " + " ".join(sys.argv[1:])  # no local paths
    return {**head, "cpus": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full counts instead of the quick subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", action="store_true", help="append the summary to benchmarks/results/fuzz.jsonl")
    a = ap.parse_args()
    sizes = FULL if a.full else QUICK
    head = _header() if a.record else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for category, n in sizes.items():
            rows.append(run_category(category, n, a.seed, Path(tmp) / category))
            row = rows[-1]
            print(f"{category:8s} {row.get('cases')} cases: ok {row.get('ok')}, refused {row.get('refused')}, "
                  f"defects {row.get('defect')}, hangs {row.get('hang')}, peak {row.get('peak_rss_mb', 0):.0f} MB, "
                  f"slowest {row.get('slowest_case_s')} s, {row.get('seconds')} s", flush=True)
            for d in row.get("defects", []) or [row.get("stderr")]:
                if d:
                    print("   ", str(d)[:400])
    if a.record:
        rec = {**head, "suite": "full" if a.full else "quick", "seed": a.seed, "limits": LIMITS,
               "categories": rows}
        with open(ROOT / "benchmarks" / "results" / "fuzz.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
