"""Pruning accuracy: zoo models x methods x patterns, FP baseline from the same run (the Wanda paper's table
shape: dense, magnitude, Wanda, SparseGPT at 50% unstructured and 2:4).

    PYTHONPATH=src python benchmarks/sparsity_accuracy.py --models tinyllama-fm fmnist-vit \
        [--methods magnitude wanda sparsegpt] [--patterns unstructured 2:4] [--sparsity 0.5] [--limit N]

Methods ``width-magnitude`` / ``width-activation`` narrow the MLPs instead (pruning/structured.py, ratio =
--sparsity of their neurons; "sparsity" in the record is then the fraction of all parameters removed), and with
``--recover STEPS`` are then distilled from the dense model on the calibration set (pruning/recovery.py).
Appends one JSON line per (model, method, pattern) to benchmarks/results/sparsity_accuracy.jsonl.
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

from slimtorch.api import apply_
from slimtorch.calib.data import calibration_set
from slimtorch.eval import evaluate
from slimtorch.pruning.recovery import recover_
from slimtorch.pruning.structured import StructuredConfig
from slimtorch.progress import no_progress
from slimtorch.quantize import run_batches
from slimtorch.sparsity.masks import magnitude, unstructured_mask, wanda
from slimtorch.sequential import collect
from slimtorch.sparsity.prune import InputNorms, PruneConfig
from slimtorch.zoo import load_model

RESULTS = Path(__file__).parent / "results" / "sparsity_accuracy.jsonl"


def input_spread(model: torch.nn.Module, name: str, sparsity: float) -> dict[str, dict]:
    """Per linear layer: max / median and coefficient of variation of the input feature norms over the
    calibration set, and the share of weights on which Wanda's per-row mask equals magnitude's (per row too).
    Wanda differs from magnitude only where those norms spread (the outlier features of large LLMs)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    calib = calibration_set(name, model=model)
    stats = collect(layers, InputNorms, lambda: run_batches(model.eval(), calib, no_progress, ""))
    out = {}
    for n, m in layers.items():
        norm = stats[n].sq.sqrt().float()
        mag = unstructured_mask(magnitude(m.weight.detach()), sparsity, per_row=True)
        wan = unstructured_mask(wanda(m.weight.detach(), norm), sparsity, per_row=True)
        out[n] = {"norm_max_over_median": round(float(norm.max() / norm.median()), 2),
                  "norm_cv": round(float(norm.std() / norm.mean()), 3),
                  "mask_agreement": round(float((mag == wan).float().mean()), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "wanda-layer", "sparsegpt"])
    ap.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--recover", type=int, default=0, help="width methods: KD recovery steps on the calibration set")
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument("--quantize", default=None, help="also quantize with this preset (SparseGPT: jointly, in its "
                    "column pass; the others: RTN after pruning)")
    ap.add_argument("--reference", action="store_true", help="measure against the dense model too (agreement, "
                    "cosine to FP: the encoder's figure)")
    ap.add_argument("--outliers", action="store_true", help="instead of pruning: each target layer's spread of input "
                    "feature norms ||x_j|| (Wanda's factor) and how often Wanda's mask equals magnitude's")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip() or None
    common = {**run_header(f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", commit),
              "limit": args.limit}
    if args.outliers:
        for name in args.models:
            rec = {**common, "what": "wanda-vs-magnitude", "model": name, "sparsity": args.sparsity,
                   "layers": input_spread(load_model(name), name, args.sparsity)}
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            for layer, v in rec["layers"].items():
                print(f"{name} {layer}: {v}", flush=True)
        return
    for name in args.models:
        fp = load_model(name)
        fp_res = evaluate(name, model=fp, limit=args.limit, latency=False)
        calib = calibration_set(name, model=fp)
        for pattern in args.patterns:
            for method in args.methods:
                m = copy.deepcopy(fp)
                t0 = time.perf_counter()
                if method == "wanda-layer" and pattern != "unstructured":
                    continue  # the comparison group matters for unstructured masks only
                kind = pattern
                if method.startswith("width-"):  # structured: the MLPs narrowed by --sparsity of their neurons
                    if pattern != "unstructured":
                        continue
                    kind = "mlp-width"
                    config = StructuredConfig(ratio=args.sparsity, importance=method.removeprefix("width-"))
                else:
                    config = PruneConfig(method=method.removesuffix("-layer"), sparsity=args.sparsity,
                                         pattern=pattern, comparison="layer" if method.endswith("-layer") else "row",
                                         quantize=args.quantize)
                rep = apply_(m, config, calib)
                secs = time.perf_counter() - t0
                recovered = None
                if args.recover and method.startswith("width-"):  # logit distillation from the dense model
                    t1 = time.perf_counter()
                    losses = recover_(m, fp, calib, steps=args.recover, lr=args.recover_lr)
                    recovered = {"steps": args.recover, "lr": args.recover_lr, "first_loss": losses[0],
                                 "last_loss": losses[-1], "seconds": round(time.perf_counter() - t1, 1)}
                res = evaluate(name, model=m, limit=args.limit, latency=False,
                               reference=fp if args.reference else None)
                sparsity = rep.sparsity if hasattr(rep, "sparsity") else 1 - rep.params_after / rep.params_before
                rec = {**common, "model": name, "method": method, "pattern": kind,
                       "target_sparsity": args.sparsity, "sparsity": sparsity, "dataset": res.dataset,
                       "fp": {x.name: x.value for x in fp_res.metrics},
                       "pruned": {x.name: x.value for x in res.metrics}, "pruned_layers": len(rep.layers if hasattr(rep, "layers") else rep.groups),
                       "calib_samples": rep.calib_samples, "prune_seconds": round(secs, 1), "notes": rep.notes,
                       "recovery": recovered, "quantize": args.quantize}
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                first = res.metrics[0]
                print(f"{name} {kind} {method}: {first.name} {first.value:.3f} (fp {fp_res.metrics[0].value:.3f}) "
                      f"sparsity {sparsity:.3f} {secs:.0f}s", flush=True)


if __name__ == "__main__":
    main()
