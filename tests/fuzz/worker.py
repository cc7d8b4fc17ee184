"""Run one fuzz category in this process, each case under a 30 s alarm, and print a JSON summary:
``python -m tests.fuzz.worker CATEGORY SEED N WORKDIR``.

Outcomes per case: ``ok`` (a sound result, checked), ``refused`` (one SlimError), ``defect`` (any other
exception or a failed check: a traceback a user would see, a wrong result, a partial folder, a payload
that ran) and ``hang`` (past 30 s). The summary gives their counts, the slowest case, this process's peak
resident memory (everything it ran, the libraries included) and the first defects with their cases."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASE_SECONDS = 30
MEMORY_CAP = 8 * 2**30  # address space: a runaway allocation fails here instead of taking the machine


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang()


def cases(category: str, seed: int, n: int, work: Path):
    """(description, thunk) for each case of ``category``."""
    import torch

    from slimtorch.zoo import load_model
    from tests.fuzz import argv as A
    from tests.fuzz import artifacts as X
    from tests.fuzz import recipes as R
    from tests.hostile import folders as F

    if category == "recipes":
        model, calib, x = R.tiny_model_and_data()
        for i, text in enumerate(R.recipe_texts(seed, n)):
            yield text[:300], lambda text=text: R.run_recipe(text, work / "r.yaml", model, calib, x)
    elif category == "folders":
        good = F.tiny_llama_folder(work / "good")
        r = random.Random(seed)
        for i in range(n):
            dst = work / f"f{i}"
            names = X.damaged_folder(good, dst, r)
            yield ",".join(names), lambda dst=dst: X.run_folder(dst)
    elif category == "files":
        from slimtorch.calib.data import calibration_set
        from slimtorch.export.quantized import save_quantized
        from slimtorch.quantize import quantize_

        q = load_model("fmnist-cnn")
        quantize_(q, "W8A8", calibration_set("fmnist-cnn", 128))
        src = work / "good.safetensors"
        save_quantized(q, src, "fmnist-cnn", {"recipe": "W8A8", "method": "rtn"})
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        r = random.Random(seed)
        for i in range(n):
            dst = work / f"t{i}.safetensors"
            what, fixed = X.tamper(src, dst, r)
            yield f"{what} (checksum {'recomputed' if fixed else 'stale'})", \
                lambda dst=dst, fixed=fixed: X.run_quantized(dst, q, x, fixed)
    elif category == "argv":
        A.prepare_work(work)
        for argv in A.argv_sets(seed, n, work):
            yield " ".join(repr(a) if not a or " " in a else a for a in argv), lambda argv=argv: A.run_argv(argv, work)
    else:
        raise SystemExit(f"unknown category {category}")


def main() -> None:
    category, seed, n, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    work.mkdir(parents=True, exist_ok=True)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    os.environ.setdefault("SLIMTORCH_TEST_MARKER", str(work / "pwned"))
    signal.signal(signal.SIGALRM, _alarm)
    counts = {"ok": 0, "refused": 0, "defect": 0, "hang": 0}
    defects, slowest = [], (0.0, "")
    t_all = time.perf_counter()
    for desc, run in cases(category, seed, n, work):
        desc = desc.replace(str(work.parent), "WORK")  # records carry no local paths
        t0 = time.perf_counter()
        signal.alarm(CASE_SECONDS)
        try:
            outcome = run()
        except Hang:
            outcome = "hang"
        except Exception as exc:  # noqa: BLE001 - every escape is a defect to report
            outcome = "defect"
            defects.append({"case": desc, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                            "where": [ln.replace(str(ROOT) + "/", "") for ln in traceback.format_exc().splitlines()[-3:-1]]})
        finally:
            signal.alarm(0)
        if Path(os.environ["SLIMTORCH_TEST_MARKER"]).exists():
            outcome = "defect"
            defects.append({"case": desc, "error": "a pickle payload or a folder's Python ran"})
            Path(os.environ["SLIMTORCH_TEST_MARKER"]).unlink()
        if outcome == "hang":
            defects.append({"case": desc, "error": f"past {CASE_SECONDS} s"})
        counts[outcome] += 1
        dt = time.perf_counter() - t0
        if dt > slowest[0]:
            slowest = (dt, desc[:200])
    print(json.dumps({"category": category, "seed": seed, "cases": n, **counts,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "slowest_case_s": round(slowest[0], 2), "slowest_case": slowest[1],
                      "seconds": round(time.perf_counter() - t_all, 1), "defects": defects[:20]}))


if __name__ == "__main__":
    main()
