"""Language models at the low-bit extremes (issue 24): W4A4 with and without rotations, a 4-bit KV cache,
and data-free HQQ, on tinyllama-fm's held-out perplexity (FP baseline from the same run).

    PYTHONPATH=src python benchmarks/llm_lowbit.py [--cases NAME ...] [--limit N] [--seed S]

Cases (``--cases``, default all): ``w4a4-rtn``, ``w4a4-smoothquant``, ``w4a4-gptq``, ``rot-w4a4-rtn``,
``rot-w4a4-gptq``, ``rot-w4a4kv4-gptq``, ``rot-w4a4kv8-gptq``, ``w4a4kv4-gptq`` (KV cache without rotation),
``rot-fp`` (rotation alone: must equal FP), ``rotlearned-*`` (the residual rotation learned by Cayley SGD on
the W4A4 fake-quantized loss, ``calib.learned_rotation``, ``--rot-steps`` steps of ``--rot-batch`` windows). W4A4: int4 per-channel weights, dynamic per-token int4 (symmetric)
activations on every block linear; KV: K and V at the attention's matmul points, dynamic asymmetric per token
and head. The rotation (``calib.rotate``: random Hadamard, seed ``--seed``) is applied before calibration.
Appends one JSON line per case to benchmarks/results/llm_lowbit.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from records import run_header

from slimtorch.calib.data import calibration_set
from slimtorch.calib.rotate import rotate_llama
from slimtorch.eval import evaluate
from slimtorch.quant.recipe import get_preset
from slimtorch.quantize import quantize_
from slimtorch.spec import PerToken, QuantSpec
from slimtorch.zoo import load_model

RESULTS = Path(__file__).parent / "results" / "llm_lowbit.jsonl"
CASES = ("w4a4-rtn", "w4a4-smoothquant", "w4a4-gptq", "rot-fp", "rot-w4a4-rtn", "rot-w4a4-gptq",
         "rot-w4a4kv4-gptq", "rot-w4a4kv8-gptq", "w4a4kv4-gptq", "rotlearned-w4a4-rtn", "rotlearned-w4a4-gptq")


def recipe_for(case: str):
    if case == "rot-fp":
        return None
    rec = get_preset("W4A4")
    for bits in ("4", "8"):
        if f"kv{bits}" in case:
            rec = dataclasses.replace(rec, name=f"W4A4KV{bits}", kv_cache=QuantSpec(
                f"uint{bits}", PerToken(), symmetric=False, dynamic=True))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tinyllama-fm")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--rot-steps", type=int, default=100)
    ap.add_argument("--rot-batch", type=int, default=2)
    ap.add_argument("--rot-lr", type=float, default=1.5)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    common = {**run_header(f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", commit),
              "model": args.model, "limit": args.limit, "seed": args.seed}
    fp = load_model(args.model)
    fp_res = evaluate(args.model, model=fp, limit=args.limit)
    fp_ppl = fp_res.metrics[0].value
    calib = calibration_set(args.model, model=fp)
    for case in args.cases:
        q = copy.deepcopy(fp)
        t0 = time.perf_counter()
        extra = {}
        if case.startswith("rotlearned"):
            from slimtorch.calib.learned_rotation import learn_rotation

            rot, losses = learn_rotation(fp, calib, get_preset("W4A4"), steps=args.rot_steps, lr=args.rot_lr,
                                         seed=args.seed, batch=args.rot_batch)
            rotate_llama(q, seed=args.seed, residual=rot)
            extra = {"rotation_steps": args.rot_steps, "rotation_batch": args.rot_batch, "rotation_lr": args.rot_lr,
                     "rotation_losses": [round(v, 4) for v in losses]}
        elif case.startswith("rot"):
            rotate_llama(q, seed=args.seed)
        rec = recipe_for(case)
        method = case.rsplit("-", 1)[1]
        report = None if rec is None else quantize_(q, rec, calib, method)
        secs = time.perf_counter() - t0
        res = evaluate(args.model, model=q, reference=fp, limit=args.limit)
        out = {**common, "case": case, "recipe": None if rec is None else rec.name, "method": method,
               "rotation": case.startswith("rot"), "dataset": res.dataset,
               "fp": {m.name: m.value for m in fp_res.metrics}, "quantized": {m.name: m.value for m in res.metrics},
               "seconds": round(secs, 1), "notes": [] if report is None else report.notes,
               "quantized_layers": None if report is None else len(report.quantized), **extra}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(out) + "\n")
        print(f"{case:20s} {res.metrics[0].name} {res.metrics[0].value:8.3f} (fp {fp_ppl:.3f}) {secs:5.0f}s", flush=True)


if __name__ == "__main__":
    main()
