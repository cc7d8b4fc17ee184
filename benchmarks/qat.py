"""QAT accuracy on the Fashion-MNIST zoo models against FP and post-training RTN at the same plan.

Each run appends one JSON line to DIR/qat.jsonl as soon as it finishes (date, commit, device, torch,
command, model, method, bits, FP and quantized top-1 on the whole test set, training history).

    PYTHONPATH=src python benchmarks/qat.py [--models fmnist-cnn,fmnist-vit] \
        [--runs rtn:W4A4,lsq:W4A4,rtn:W2A2,lsq:W2A2,pact:W4A4,sat:W4A4,adabits:8/6/4/2] [--epochs 15] [--out DIR]

Run kinds: ``rtn|lsq|pact|sat:WnAm``; ``adabits:8/6/4/2`` (one record per width); ``fracbits:3`` and
``sensitivity:3`` (weights at an average of 3 bits, inputs 8-bit; the plan is saved under DIR/plans);
``f8net`` (fixed point, integer forward checked); ``adabin`` and ``sign`` (W1A1); ``pim:ADC`` (digital
LSQ W4A4, that model on the simulated PIM array with an ADC-bit ADC, and PIM-QAT). The last four
take fmnist-cnn only.

Training runs on the GPU when there is one. The plan is qat_plan's: first and last layers at 8 bits.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from records import run_header

from slimtorch.cli.qat_job import parse_bits
from slimtorch.eval.metrics import classifier_top1
from slimtorch.distill import TrainConfig, train_student
from slimtorch.qat import convert, prepare_qat, qat_plan
from slimtorch.qat.adabin import binarize_cnn, set_ede
from slimtorch.qat.adabits import evaluate_widths, export_width, prepare_adabits, widths_variants
from slimtorch.qat.f8net import F8CNN, integer_forward
from slimtorch.qat.fracbits import (
    FRACBITS_WIDTH_LR,
    FracWeight,
    final_plan,
    is_hard,
    prepare_fracbits,
    save_plan,
    sensitivity_bits,
    training_hooks,
    with_weight_bits,
)
from slimtorch.qat.pim import PIMConfig, calibrate_bn, calibration_batches, to_pim
from slimtorch.quantize import quantize_plan_
from slimtorch.zoo import data, load_model
from slimtorch.zoo.augment import shift_flip


def adabits_run(name, fp, fp_acc, bits, x, y, xt, yt, args, common) -> None:
    """One AdaBits model for all widths in ``bits`` (e.g. 8/6/4/2); one record per width."""
    widths = tuple(int(b) for b in bits.split("/"))
    t0 = time.perf_counter()
    dev = next(fp.parameters()).device
    plan = qat_plan(fp, min(widths), min(widths), (x[:256].to(dev),))
    model = prepare_adabits(copy.deepcopy(fp), plan, widths)
    row = _train(model, fp, x.to(dev), y.to(dev), args, val=(xt[:2000], yt[:2000]), per_width=widths,
                 variants=widths_variants(widths))
    seconds = time.perf_counter() - t0
    for b in widths:
        acc = classifier_top1(export_width(copy.deepcopy(model), b), xt, yt)
        rec = {**common, "model": name, "method": "adabits", "bits": f"W{b}A{b}", "w_bits": b, "a_bits": b,
               "widths": list(widths), "first_last_bits": 8, "fp_top1": fp_acc, "top1": acc, "delta": acc - fp_acc,
               "seconds": seconds, "train_samples": len(x), **row}
        print(f"  {name} adabits {widths} at {b} bits: top-1 {acc:.2f} ({acc - fp_acc:+.2f})", flush=True)
        _write(args, rec)


def _write(args, rec: dict) -> None:
    with open(args.out / "qat.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def _train(model, fp, x, y, args, width_lr: float = 0.0, val=None, per_width: tuple[int, ...] = (), **kw):
    """train_student with the benchmark's settings; evaluates top-1 on ``val`` after each epoch (at each of
    ``per_width`` for AdaBits). Returns the record's config and history."""
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, kd_weight=args.kd, batch_size=256, width_lr=width_lr)
    evaluate = partial(classifier_top1, x=val[0], y=val[1])
    hist = train_student(model, fp, x, y, cfg, augment=shift_flip,
                     evaluate=evaluate_widths(evaluate, per_width) if per_width else evaluate,
                     log=lambda line: print("  ", line, flush=True), **kw)
    return {"config": asdict(cfg), "history": hist.epochs}


def extra_run(name, fp, fp_acc, method, arg, x, y, xt, yt, args, common) -> None:
    """fracbits / sensitivity / f8net / adabin / sign / pim runs (see the module docstring)."""
    dev = next(fp.parameters()).device
    x, y = x.to(dev), y.to(dev)
    val = (xt[:2000], yt[:2000])
    t0 = time.perf_counter()
    base = {**common, "model": name, "method": method, "fp_top1": fp_acc, "train_samples": len(x)}
    recs = []
    if method in ("fracbits", "sensitivity"):
        target = float(arg)
        plan = qat_plan(fp, round(target), 8, (x[:256],))
        if method == "fracbits":
            q = prepare_fracbits(copy.deepcopy(fp), plan, target + 0.5)
            hook, penalty = training_hooks(target, args.epochs)
            lams: dict = {}

            def on_epoch(m, epoch, epochs):  # keep the learned widths seen just before the hard assignment
                if not is_hard(m):
                    lams.update({n: round(float(mod.wq.lam.detach()), 3) for n, mod in m.named_modules()
                                 if isinstance(getattr(mod, "wq", None), FracWeight)})
                hook(m, epoch, epochs)
            row = _train(q, fp, x, y, args, args.width_lr, val=val, on_epoch=on_epoch, penalty=penalty)
            row["lam_before_hard_assignment"] = lams
            final = final_plan(q, plan, target)
            convert(q)
        else:
            bits = sensitivity_bits(copy.deepcopy(fp), plan, x[:512], target)
            final = with_weight_bits(plan, bits)
            q = prepare_qat(copy.deepcopy(fp), final, "lsq")
            row = _train(q, fp, x, y, args, val=val)
        (args.out / "plans").mkdir(exist_ok=True)
        lr_tag = f"-wlr{args.width_lr:g}" if method == "fracbits" and args.width_lr != FRACBITS_WIDTH_LR else ""
        plan_file = args.out / "plans" / f"{name}-{method}-{arg}{lr_tag}.json"
        save_plan(plan_file, final, {"model": name, "method": method, "target_weight_bits": target})
        sizes = {n: fp.get_submodule(n).weight.numel() for n in final}
        inner = [n for n in final if plan[n].weight.bits != 8]
        avg = sum(final[n].weight.bits * sizes[n] for n in inner) / sum(sizes[n] for n in inner)
        recs.append({"bits": f"W{arg}avgA8", "w_bits": avg, "a_bits": 8, "target_weight_bits": target,
                     "layer_bits": {n: final[n].weight.bits for n in final}, "plan_file": plan_file.name,
                     "top1": classifier_top1(q, xt, yt), **row})
    elif method == "f8net":
        q = F8CNN(fp).to(dev)
        row = _train(q, fp, x, y, args, val=val)
        q = q.eval().cpu()  # checked on the CPU: exact float32 arithmetic (no TF32 convolutions)
        xc, yc = xt.cpu(), yt.cpu()
        fake = classifier_top1(q, xc, yc)
        accs, equal, worst, n = [], 0, 0.0, 0
        for i in range(0, args.integer_images, 100):  # int64 matmuls on the CPU: a subset
            with torch.no_grad():
                ref = q(xc[i:i + 100]).double()
            acc, fl = integer_forward(q, xc[i:i + 100])
            lsb = (acc.double() / 2.0**fl - ref).abs() * 2.0**fl
            equal += int((lsb == 0).all(-1).sum())
            worst, n = max(worst, float(lsb.max())), n + len(ref)
            accs.append(((acc.argmax(-1) == yc[i:i + 100]).double(), (ref.argmax(-1) == yc[i:i + 100]).double()))
        recs.append({"bits": "W8A8-fixed", "w_bits": 8, "a_bits": 8, "top1": fake,
                     "integer_top1_subset": float(torch.cat([a for a, _ in accs]).mean() * 100),
                     "fake_top1_subset": float(torch.cat([b for _, b in accs]).mean() * 100), "integer_equal_rows": equal,
                     "integer_rows": n, "integer_max_lsb_diff": worst, **row})
    elif method in ("adabin", "sign"):
        q = binarize_cnn(copy.deepcopy(fp), method).to(dev)
        row = _train(q, fp, x, y, args, val=val, on_epoch=set_ede if method == "adabin" else None)
        recs.append({"bits": "W1A1", "w_bits": 1, "a_bits": 1, "top1": classifier_top1(q, xt, yt),
                     "note": "binary 3x3 convs in the residual blocks; stem, 1x1 shortcuts and fc in float", **row})
    elif method == "pim":
        cfg = PIMConfig(rows=64, adc_bits=int(arg))
        plan = qat_plan(fp, 4, 4, (x[:256],))
        edges = (next(iter(plan)), list(plan)[-1])
        calib = calibration_batches(x)
        digital = prepare_qat(copy.deepcopy(fp), plan, "lsq")
        row = _train(digital, fp, x, y, args, val=val)
        d_acc = classifier_top1(digital, xt, yt)
        conv_pim = to_pim(copy.deepcopy(digital), cfg, rescale=False, skip=edges)
        c_acc = classifier_top1(conv_pim, xt, yt)
        n_bn = calibrate_bn(conv_pim, calib)  # 0 for the ViT (LayerNorm only): c_cal == c_acc
        c_cal = classifier_top1(conv_pim, xt, yt)
        pq = to_pim(prepare_qat(copy.deepcopy(fp), plan, "lsq"), cfg, rescale=True, skip=edges)
        prow = _train(pq, fp, x, y, args, val=val)
        p_raw = classifier_top1(pq, xt, yt)
        calibrate_bn(pq, calib)
        p_acc = classifier_top1(pq, xt, yt)
        pim = {"pim": {**cfg.__dict__, "digital_layers": list(edges), "scheme": "native", "bn_layers": n_bn}}
        recs += [{"bits": "W4A4", "w_bits": 4, "a_bits": 4, "method": "lsq-digital", "top1": d_acc, **row},
                 {"bits": "W4A4", "w_bits": 4, "a_bits": 4, "method": "lsq-on-pim", "top1": c_acc,
                  "top1_bn_calibrated": c_cal, "gap_to_digital": d_acc - c_acc, **pim},
                 {"bits": "W4A4", "w_bits": 4, "a_bits": 4, "method": "pim-qat", "top1": p_acc,
                  "top1_before_bn_calibration": p_raw, "gap_to_digital": d_acc - p_acc, **pim, **prow}]
    seconds = time.perf_counter() - t0
    for r in recs:
        rec = {**base, **r, "delta": r["top1"] - fp_acc, "seconds": seconds}
        print(f"  {name} {rec['method']} {rec['bits']}: top-1 {rec['top1']:.2f} ({rec['delta']:+.2f})", flush=True)
        _write(args, rec)


EXTRA = ("fracbits", "sensitivity", "f8net", "adabin", "sign", "pim")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="fmnist-cnn,fmnist-vit")
    ap.add_argument("--runs", default="rtn:W4A4,lsq:W4A4,rtn:W2A2,lsq:W2A2,pact:W4A4,sat:W4A4,adabits:8/6/4/2")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--width-lr", type=float, default=FRACBITS_WIDTH_LR, help="FracBits: SGD lr of the widths")
    ap.add_argument("--kd", type=float, default=1.0)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--integer-images", type=int, default=1000, help="F8Net: test images run integer-only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    common = run_header(torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    x, y = train.normalized()[:args.limit_train], train.labels[:args.limit_train]
    xt, yt = test.normalized().to(dev), test.labels.to(dev)
    for name in args.models.split(","):
        fp = load_model(name).to(dev)
        fp_acc = classifier_top1(fp, xt, yt)
        print(f"{name}: FP top-1 {fp_acc:.2f}", flush=True)
        for run in args.runs.split(","):
            method, _, bits = run.partition(":")
            if method in EXTRA:
                extra_run(name, fp, fp_acc, method, bits, x, y, xt, yt, args, common)
                continue
            if method == "adabits":
                adabits_run(name, fp, fp_acc, bits, x, y, xt, yt, args, common)
                continue
            w, a = parse_bits(bits)
            plan = qat_plan(fp, w, a, (x[:256].to(dev),))
            t0, row = time.perf_counter(), {}
            if method == "rtn":  # on the CPU: post-training needs no GPU
                q = copy.deepcopy(fp).cpu()
                calib = [(x[i:i + 128],) for i in range(0, min(1024, len(x)), 128)]
                quantize_plan_(q, {n: p for n, p in plan.items()}, calib, "rtn")
                q = q.to(dev)
            else:
                q = prepare_qat(copy.deepcopy(fp), plan, method)
                row = _train(q, fp, x.to(dev), y.to(dev), args, val=(xt[:2000], yt[:2000]))
                convert(q)
            acc = classifier_top1(q, xt, yt)
            rec = {**common, "model": name, "method": method, "bits": bits, "w_bits": w, "a_bits": a,
                   "first_last_bits": 8, "fp_top1": fp_acc, "top1": acc, "delta": acc - fp_acc,
                   "seconds": time.perf_counter() - t0, "train_samples": len(x), **row}
            print(f"  {name} {method} {bits}: top-1 {acc:.2f} ({acc - fp_acc:+.2f}) in {rec['seconds']:.0f} s",
                  flush=True)
            _write(args, rec)


if __name__ == "__main__":
    main()
