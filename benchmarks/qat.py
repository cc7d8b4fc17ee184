"""QAT accuracy on the Fashion-MNIST zoo models against FP and post-training RTN at the same plan.

Each run appends one JSON line to DIR/qat.jsonl as soon as it finishes (date, commit, device, torch,
command, model, method, bits, FP and quantized top-1 on the whole test set, training history).

    PYTHONPATH=src python benchmarks/qat.py [--models fmnist-cnn,fmnist-vit] \
        [--runs rtn:W4A4,lsq:W4A4,rtn:W2A2,lsq:W2A2,pact:W4A4,sat:W4A4,adabits:8/6/4/2] [--epochs 15] [--out DIR]

Training runs on the GPU when there is one. The plan is qat_plan's: first and last layers at 8 bits.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from slimtorch.cli.qat_job import parse_bits
from slimtorch.eval.metrics import classifier_top1
from slimtorch.qat import TrainConfig, convert, prepare_qat, qat_plan, train_qat
from slimtorch.qat.adabits import export_width, prepare_adabits, set_bits, widths_variants
from slimtorch.quantize import quantize_plan_
from slimtorch.zoo import data, load_model
from slimtorch.zoo.augment import shift_flip


def adabits_run(name, fp, fp_acc, bits, x, y, xt, yt, args, common) -> None:
    """One AdaBits model for all widths in ``bits`` (e.g. 8/6/4/2); one record per width."""
    widths = tuple(int(b) for b in bits.split("/"))
    t0 = time.perf_counter()
    dev = next(fp.parameters()).device
    plan = qat_plan(fp, min(widths), min(widths), (x[:256].to(dev),))
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, kd_weight=args.kd, batch_size=256)
    model = prepare_adabits(copy.deepcopy(fp), plan, widths)

    def per_width(m) -> dict:
        out = {}
        for b in widths:
            set_bits(m, b)
            out[str(b)] = classifier_top1(m, xt[:2000], yt[:2000])
        return out

    hist = train_qat(model, fp, x.to(dev), y.to(dev), cfg, augment=shift_flip, evaluate=per_width,
                     log=lambda line: print("  ", line, flush=True), variants=widths_variants(widths))
    seconds = time.perf_counter() - t0
    for b in widths:
        acc = classifier_top1(export_width(copy.deepcopy(model), b), xt, yt)
        rec = {**common, "model": name, "method": "adabits", "bits": f"W{b}A{b}", "w_bits": b, "a_bits": b,
               "widths": list(widths), "first_last_bits": 8, "fp_top1": fp_acc, "top1": acc, "delta": acc - fp_acc,
               "seconds": seconds, "train_samples": len(x),
               "config": {**cfg.__dict__, "feature_layers": list(cfg.feature_layers)}, "history": hist.epochs}
        print(f"  {name} adabits {widths} at {b} bits: top-1 {acc:.2f} ({acc - fp_acc:+.2f})", flush=True)
        with open(args.out / "qat.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="fmnist-cnn,fmnist-vit")
    ap.add_argument("--runs", default="rtn:W4A4,lsq:W4A4,rtn:W2A2,lsq:W2A2,pact:W4A4,sat:W4A4,adabits:8/6/4/2")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--kd", type=float, default=1.0)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    common = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": os.environ.get("SLIMTORCH_COMMIT"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
              "command": "python " + " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    x, y = train.normalized()[:args.limit_train], train.labels[:args.limit_train]
    xt, yt = test.normalized().to(dev), test.labels.to(dev)
    for name in args.models.split(","):
        fp = load_model(name).to(dev)
        fp_acc = classifier_top1(fp, xt, yt)
        print(f"{name}: FP top-1 {fp_acc:.2f}", flush=True)
        for run in args.runs.split(","):
            method, bits = run.split(":")
            if method == "adabits":
                adabits_run(name, fp, fp_acc, bits, x, y, xt, yt, args, common)
                continue
            w, a = parse_bits(bits)
            plan = qat_plan(fp, w, a, (x[:256].to(dev),))
            t0, row = time.perf_counter(), {}
            if method == "rtn":
                q = copy.deepcopy(fp)
                calib = [(x[i:i + 128].to(dev),) for i in range(0, min(1024, len(x)), 128)]
                quantize_plan_(q, plan, calib, "rtn")
            else:
                cfg = TrainConfig(epochs=args.epochs, lr=args.lr, kd_weight=args.kd, batch_size=256)
                q = prepare_qat(copy.deepcopy(fp), plan, method)
                hist = train_qat(q, fp, x.to(dev), y.to(dev), cfg, augment=shift_flip,
                                 evaluate=lambda m: classifier_top1(m, xt[:2000], yt[:2000]),
                                 log=lambda line: print("  ", line, flush=True))
                convert(q)
                row = {"config": {**cfg.__dict__, "feature_layers": list(cfg.feature_layers)},
                       "history": hist.epochs}
            acc = classifier_top1(q, xt, yt)
            rec = {**common, "model": name, "method": method, "bits": bits, "w_bits": w, "a_bits": a,
                   "first_last_bits": 8, "fp_top1": fp_acc, "top1": acc, "delta": acc - fp_acc,
                   "seconds": time.perf_counter() - t0, "train_samples": len(x), **row}
            print(f"  {name} {method} {bits}: top-1 {acc:.2f} ({acc - fp_acc:+.2f}) in {rec['seconds']:.0f} s",
                  flush=True)
            with open(args.out / "qat.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
