"""Structured pruning at a budget, then recovery by distillation, against torch-pruning at the same budget and
the same recovery: accuracy before and after recovery, parameters, multiply-adds, CPU latency and GPU
throughput of the smaller dense model against the original.

    PYTHONPATH=src python benchmarks/structured_pruning.py --models fmnist-cnn fmnist-vit --epochs 10 \
        [--methods ours-magnitude ours-taylor ours-activation tp-magnitude tp-taylor] [--device cuda]

Budgets (issue 22): fmnist-cnn keeps 50% of its FLOPs, fmnist-vit 60% of its parameters (heads pruned too);
methods ``npas-greedy`` / ``npas-loss`` / ``npas-uniform`` instead keep ``--latency`` of the dense model's
modelled latency (pruning/npas.py: roofline on h100-measured at batch 4096; Taylor importance), searched per
group (a step's cost: the Taylor importance it removes, or with ``loss`` the adaptive-BN divergence of the
candidate from the dense outputs) or by one ratio, so they differ only in where the width goes.
The budget is met from below by both toolkits, counted the same way (our counter: multiply-adds of the
Linear/Conv calls on one image; parameters). torch-pruning (PyPI ``torch-pruning``, optional) runs at its
documented settings for these models (MetaPruner, uniform ratio, group L2 magnitude or group Taylor, the
classifier ignored, ``round_to`` equal to our ``align``; for the ViT ``num_heads`` per qkv with
``prune_num_heads``), its ratio found by bisection to meet the same budget. Recovery for every method is the
same: ``pruning.recovery.recover_`` (KD from the original, AdamW, cosine), ``--epochs`` over the 60,000
training images with random shifts and flips. One JSON line per (model, method) to
benchmarks/results/structured_pruning.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from records import run_header
from timing import median_us

from slimtorch.api import apply_
from slimtorch.pruning.npas import NPASConfig
from slimtorch.pruning.recovery import recover_
from slimtorch.pruning.structured import StructuredConfig, _dense_macs
from slimtorch.zoo import load_model
from slimtorch.zoo.augment import shift_flip
from slimtorch.zoo.data import fashion_mnist

RESULTS = Path(__file__).parent / "results" / "structured_pruning.jsonl"
BUDGETS = {"fmnist-cnn": ("flops", 0.5), "fmnist-vit": ("params", 0.6)}


def counts(model: torch.nn.Module, example: torch.Tensor) -> dict:
    return {"params": sum(p.numel() for p in model.parameters()),
            "flops": sum(_dense_macs(model, (example,)).values())}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000))
    return 100.0 * hits / len(x)


@torch.no_grad()
def cpu_latency_ms(model: torch.nn.Module, batch: int, reps: int = 30) -> float:
    m = copy.deepcopy(model).float().cpu().eval()
    x = torch.randn(batch, 1, 28, 28)
    for _ in range(5):
        m(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        m(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def gpu_images_per_s(model: torch.nn.Module, batch: int = 4096, reps: int = 20, compiled: bool = False) -> float:
    """Images/s in bf16 autocast; ``compiled``: torch.compile with inductor's freezing (batch norms folded into
    the convolutions, elementwise work fused), the deployed form whose cost the FLOPs describe best."""
    m = copy.deepcopy(model).cuda().eval()
    if compiled:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        m = torch.compile(m)
    x = torch.randn(batch, 1, 28, 28, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            m(x)
        return batch / (median_us(lambda: m(x), 1, reps) / 1e6)


def _tp_prune(model, example, importance: str, ratio: float, calib: list, align: int):
    import torch_pruning as tp

    imp = tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude" else tp.importance.GroupTaylorImportance()
    kw = {}
    heads = {m.qkv: m.heads for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "heads")}
    if heads:
        kw = {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": ratio}
    last = model.fc if hasattr(model, "fc") else model.head
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=[last],
                                  round_to=align, **kw)
    if importance == "taylor":
        model.zero_grad()
        for (x,) in calib:  # the same label-free loss as ours: cross-entropy against the model's own argmax
            logits = model(x)
            torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
    pruner.step()
    for m in model.modules():  # the head count the forward reads (torch-pruning's timm example does this)
        if m in heads.values() or (hasattr(m, "qkv") and m.qkv in pruner.num_heads):
            m.heads = pruner.num_heads[m.qkv]
    model.zero_grad(set_to_none=True)
    return model


def tp_at_budget(fp, example, importance, measure, budget, calib, align):
    """torch-pruning's smallest uniform ratio that keeps at most ``budget`` of ``measure`` (bisection)."""
    full = counts(fp, example)[measure]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        m = _tp_prune(copy.deepcopy(fp), example, importance, mid, calib, align)
        if counts(m, example)[measure] <= budget * full:
            hi, best = mid, m
        else:
            lo = mid
    if best is None:
        best = _tp_prune(copy.deepcopy(fp), example, importance, hi, calib, align)
    return best, hi


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["fmnist-cnn", "fmnist-vit"])
    ap.add_argument("--methods", nargs="+",
                    default=["ours-magnitude", "ours-taylor", "ours-activation", "tp-magnitude", "tp-taylor"])
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.5, help="npas-* methods: fraction of the dense model's "
                    "modelled latency (h100-measured, batch 4096) allowed")
    ap.add_argument("--align", type=int, default=1, help="channel multiple for both toolkits (1: the budget is "
                    "met closely; 8 makes the 32-channel CNN stages miss it by a whole step)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--compiled", action="store_true", help="GPU: also time torch.compile'd models (freezing)")
    ap.add_argument("--cpu-latency", action=argparse.BooleanOptionalAction, default=True,
                    help="time the models on the CPU too (off on a GPU machine whose cores other jobs share)")
    args = ap.parse_args()
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name_dev = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    common = run_header(name_dev)
    tr, te = fashion_mnist("train"), fashion_mnist("test")
    xtr = tr.normalized().to(dev)  # labels unused: recovery distils from the original
    xte, yte = te.normalized().to(dev), te.labels.to(dev)
    batches = [(xtr[i:i + args.batch],) for i in range(0, len(xtr) - args.batch + 1, args.batch)]
    calib = batches[:8]
    gen = torch.Generator(device=dev).manual_seed(0)
    steps = round(args.epochs * len(batches))
    for name in args.models:
        measure, budget = BUDGETS[name]
        fp = load_model(name).to(dev).eval()
        example = xte[:1]
        fp_counts = counts(fp, example)
        fp_acc = accuracy(fp, xte, yte)
        fp_speed = {"cpu_ms_b1": cpu_latency_ms(fp, 1), "cpu_ms_b64": cpu_latency_ms(fp, 64)} if args.cpu_latency else {}
        if dev == "cuda":
            fp_speed["gpu_images_per_s"] = gpu_images_per_s(fp)
            if args.compiled:
                fp_speed["gpu_images_per_s_compiled"] = gpu_images_per_s(fp, compiled=True)
        print(f"{name}: fp {fp_acc:.2f}% {fp_counts} {fp_speed}", flush=True)
        for method in args.methods:
            t0 = time.perf_counter()
            tool, importance = method.split("-", 1)
            modelled = None
            try:
                if tool == "npas":  # latency-aware: greedy search against one uniform ratio, same modelled latency
                    m = copy.deepcopy(fp)
                    rep = apply_(m, NPASConfig(latency=args.latency, batch=4096,
                                               search="uniform" if importance == "uniform" else "greedy",
                                               evaluate="loss" if importance == "loss" else "importance",
                                               importance="taylor", align=args.align, heads=True), calib)
                    ratio, modelled = 1 - rep.params_after / rep.params_before, {
                        "hardware": rep.hardware, "batch": rep.batch, "dense_s": rep.latency_before_s,
                        "pruned_s": rep.latency_after_s, "widths": rep.groups}
                elif tool == "ours":
                    m = copy.deepcopy(fp)
                    rep = apply_(m, StructuredConfig(budget=budget, measure=measure, importance=importance,
                                                     align=args.align, heads=True), calib)
                    ratio = rep.ratio
                else:
                    m, ratio = tp_at_budget(fp, example, importance, measure, budget, calib, args.align)
            except Exception as e:  # noqa: BLE001 -- a peer that cannot prune this model is a result, recorded
                rec = {**common, "model": name, "method": method, "error": f"{type(e).__name__}: {e}"[:500]}
                print(rec["error"], flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                continue
            prune_s = time.perf_counter() - t0
            pruned_acc = accuracy(m, xte, yte)
            t1 = time.perf_counter()
            losses = (recover_(m, fp, batches, steps=steps, lr=args.lr, augment=lambda b: (shift_flip(b[0], gen),))
                      if args.epochs > 0 else [None])
            rec_s = time.perf_counter() - t1
            acc = accuracy(m, xte, yte)
            c = counts(m, example)
            speed = {"cpu_ms_b1": cpu_latency_ms(m, 1), "cpu_ms_b64": cpu_latency_ms(m, 64)} if args.cpu_latency else {}
            if dev == "cuda":
                speed["gpu_images_per_s"] = gpu_images_per_s(m)
                if args.compiled:
                    speed["gpu_images_per_s_compiled"] = gpu_images_per_s(m, compiled=True)
            rec = {**common, "model": name, "method": method, "measure": measure, "budget": budget, "align": args.align,
                   "ratio": round(ratio, 4), "fp_accuracy": fp_acc, "pruned_accuracy": pruned_acc,
                   "recovered_accuracy": acc, "fp_counts": fp_counts, "counts": c,
                   "kept": {k: c[k] / fp_counts[k] for k in c}, "fp_speed": fp_speed, "speed": speed,
                   "recovery": {"epochs": args.epochs, "steps": steps, "lr": args.lr, "batch": args.batch,
                                "loss_first": losses[0], "loss_last": losses[-1], "seconds": round(rec_s, 1)},
                   "prune_seconds": round(prune_s, 1), "cpu_threads": torch.get_num_threads(),
                   "modelled_latency": modelled}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{name} {method}: ratio {ratio:.3f} kept {rec['kept']} acc {pruned_acc:.2f} -> {acc:.2f} "
                  f"(fp {fp_acc:.2f}) speed {speed} ({prune_s:.0f}+{rec_s:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
