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
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from records import run_header

from slimtorch.api import apply_
from slimtorch.distill import TrainConfig, train_student
from slimtorch.eval.metrics import classifier_top1
from slimtorch.qat import prepare_qat, qat_plan
from slimtorch.qat.adabin import binarize_cnn
from slimtorch.qat.f8net import integer_forward
from slimtorch.qat.fracbits import (
    FRACBITS_WIDTH_LR,
    FracWeight,
    is_hard,
    load_plan,
    save_plan,
    sensitivity_bits,
    with_weight_bits,
)
from slimtorch.qat.methods import QAT_METHODS, Bits, ExportContext, QATConfig, parse_bits
from slimtorch.qat.pim import PIMConfig, calibrate_bn, calibration_batches, to_pim
from slimtorch.quantize import quantize_plan_
from slimtorch.zoo import data, load_model
from slimtorch.zoo.augment import shift_flip


def _write(args, rec: dict) -> None:
    with open(args.out / "qat.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def _train(model, fp, x, y, args, width_lr: float = 0.0, val=None, evaluate=None, **kw):
    """train_student with the benchmark's settings; evaluates top-1 on ``val`` after each epoch (through
    ``evaluate(metric)`` when given: AdaBits' per-width wrapper). Returns the record's config and history."""
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, kd_weight=args.kd, batch_size=256, width_lr=width_lr)
    metric = partial(classifier_top1, x=val[0], y=val[1])
    hist = train_student(model, fp, x, y, cfg, augment=shift_flip, evaluate=evaluate(metric) if evaluate else metric,
                         log=lambda line: print("  ", line, flush=True), **kw)
    return {"config": asdict(cfg), "history": hist.epochs}


def method_run(name, fp, fp_acc, method, arg, x, y, xt, yt, args, common) -> None:
    """A QAT method of ``QAT_METHODS``, prepared, trained and exported by its method object (as the
    ``train-qat`` job does); one record per exported model, with the method's own measurements."""
    qm = QAT_METHODS[method]
    dev = next(fp.parameters()).device
    x, y = x.to(dev), y.to(dev)
    # fracbits:3 is an average of 3 weight bits with 8-bit inputs; f8net and adabin need no width
    bits = Bits(round(float(arg)), 8) if method == "fracbits" else qm.bits(arg or {"f8net": "8", "adabin": "1"}[method])
    t0 = time.perf_counter()
    prep = apply_(copy.deepcopy(fp), QATConfig(method, bits, epochs=args.epochs), [(x[:256],)])
    student, plan = prep.student, prep.plan
    train_kw = dict(student.train)
    extra: dict = {}
    if method == "fracbits":  # keep the learned widths seen just before the hard assignment
        hook, lams = train_kw["on_epoch"], {}

        def on_epoch(m, epoch, epochs):
            if not is_hard(m):
                lams.update({n: round(float(mod.wq.lam.detach()), 3) for n, mod in m.named_modules()
                             if isinstance(getattr(mod, "wq", None), FracWeight)})
            hook(m, epoch, epochs)
        train_kw["on_epoch"] = on_epoch
        extra["lam_before_hard_assignment"] = lams
    row = _train(student.model, fp, x, y, args, args.width_lr if method == "fracbits" else 0.0,
                 val=(xt[:2000], yt[:2000]), evaluate=lambda metric: qm.evaluator(metric, bits), **train_kw)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ctx = ExportContext(Path(tmp), name, x, dict(student.extra))
        exports = qm.export(student.model, plan, bits, ctx)
        if method == "fracbits":
            lr_tag = f"-wlr{args.width_lr:g}" if args.width_lr != FRACBITS_WIDTH_LR else ""
            widths = _mixed_widths(args, fp, plan, load_plan(Path(tmp) / "plan.json"),
                                   f"{name}-{method}-{arg}{lr_tag}", name, method, arg)
    base = {**common, "model": name, "method": method, "fp_top1": fp_acc, "train_samples": len(x), **row, **extra}
    for e in exports:
        # F8Net is checked on the CPU: exact float32 arithmetic (no TF32 convolutions)
        on = torch.device("cpu") if method == "f8net" else dev
        q, xs, ys = e.model.eval().to(on), xt.to(on), yt.to(on)
        rec = {**base, "bits": bits.label, "w_bits": bits.weight, "a_bits": bits.act, "first_last_bits": 8}
        if method == "adabits":
            rec.update(bits=f"W{e.fields['width']}A{e.fields['width']}", w_bits=e.fields["width"],
                       a_bits=e.fields["width"], widths=list(bits.widths))
        elif method == "fracbits":
            rec.update(widths)
        elif method == "f8net":
            rec.update(bits="W8A8-fixed", **_integer_check(q, xs, ys, args.integer_images))
        elif method == "adabin":
            rec.update(bits="W1A1", note=BINARY_NOTE)
        rec.update(top1=classifier_top1(q, xs, ys), seconds=seconds)
        rec["delta"] = rec["top1"] - fp_acc
        print(f"  {name} {method} {rec['bits']}: top-1 {rec['top1']:.2f} ({rec['delta']:+.2f})", flush=True)
        _write(args, rec)


def _mixed_widths(args, fp, plan, final, stem: str, name: str, method: str, arg: str) -> dict:
    """FracBits and the sensitivity baseline: save ``final`` (the learned or ranked widths) as
    DIR/plans/<stem>.json and return the record's fields: the average weight width over the layers
    between the 8-bit first and last ones, and each layer's width."""
    target = float(arg)  # the run's average weight width, e.g. fracbits:3
    (args.out / "plans").mkdir(exist_ok=True)
    plan_file = args.out / "plans" / f"{stem}.json"
    save_plan(plan_file, final, {"model": name, "method": method, "target_weight_bits": target})
    sizes = {n: fp.get_submodule(n).weight.numel() for n in final}
    inner = [n for n in final if plan[n].weight.bits != 8]
    avg = sum(final[n].weight.bits * sizes[n] for n in inner) / sum(sizes[n] for n in inner)
    return {"bits": f"W{arg}avgA8", "w_bits": avg, "a_bits": 8, "target_weight_bits": target,
            "layer_bits": {n: final[n].weight.bits for n in final}, "plan_file": plan_file.name}


BINARY_NOTE = "binary 3x3 convs in the residual blocks; stem, 1x1 shortcuts and fc in float"


def _integer_check(q, xt, yt, images: int) -> dict:
    """F8Net: the integer-only forward against the fake-quantized one on the first ``images`` test images
    (CPU tensors)."""
    xc, yc = xt, yt
    accs, equal, worst, n = [], 0, 0.0, 0
    for i in range(0, images, 100):  # int64 matmuls on the CPU: a subset
        with torch.no_grad():
            ref = q(xc[i:i + 100]).double()
        acc, fl = integer_forward(q, xc[i:i + 100])
        lsb = (acc.double() / 2.0**fl - ref).abs() * 2.0**fl
        equal += int((lsb == 0).all(-1).sum())
        worst, n = max(worst, float(lsb.max())), n + len(ref)
        accs.append(((acc.argmax(-1) == yc[i:i + 100]).double(), (ref.argmax(-1) == yc[i:i + 100]).double()))
    return {"w_bits": 8, "a_bits": 8, "integer_top1_subset": float(torch.cat([a for a, _ in accs]).mean() * 100),
            "fake_top1_subset": float(torch.cat([b for _, b in accs]).mean() * 100), "integer_equal_rows": equal,
            "integer_rows": n, "integer_max_lsb_diff": worst}


def extra_run(name, fp, fp_acc, method, arg, x, y, xt, yt, args, common) -> None:
    """Experiments that compare several models rather than train one method: ``sensitivity`` (widths
    from a sensitivity ranking, then LSQ), ``sign`` (W1A1 with plain sign, AdaBin's baseline) and ``pim``
    (digital LSQ, that model on the simulated array, and PIM-QAT)."""
    dev = next(fp.parameters()).device
    x, y = x.to(dev), y.to(dev)
    val = (xt[:2000], yt[:2000])
    t0 = time.perf_counter()
    base = {**common, "model": name, "method": method, "fp_top1": fp_acc, "train_samples": len(x)}
    recs = []
    if method == "sensitivity":
        target = float(arg)
        plan = qat_plan(fp, round(target), 8, (x[:256],))
        bits = sensitivity_bits(copy.deepcopy(fp), plan, x[:512], target)
        final = with_weight_bits(plan, bits)
        q = prepare_qat(copy.deepcopy(fp), final, "lsq")
        row = _train(q, fp, x, y, args, val=val)
        recs.append({**_mixed_widths(args, fp, plan, final, f"{name}-{method}-{arg}", name, method, arg),
                     "top1": classifier_top1(q, xt, yt), **row})
    elif method == "sign":
        q = binarize_cnn(copy.deepcopy(fp), method).to(dev)
        row = _train(q, fp, x, y, args, val=val)
        recs.append({"bits": "W1A1", "w_bits": 1, "a_bits": 1, "top1": classifier_top1(q, xt, yt),
                     "note": BINARY_NOTE, **row})
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


EXTRA = ("sensitivity", "sign", "pim")


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
            if method != "rtn":
                method_run(name, fp, fp_acc, method, bits, x, y, xt, yt, args, common)
                continue
            w, a = parse_bits(bits)  # post-training RTN at QAT's plan, on the CPU: it needs no GPU
            plan = qat_plan(fp, w, a, (x[:256].to(dev),))
            t0 = time.perf_counter()
            q = copy.deepcopy(fp).cpu()
            calib = [(x[i:i + 128],) for i in range(0, min(1024, len(x)), 128)]
            quantize_plan_(q, {n: p for n, p in plan.items()}, calib, "rtn")
            acc = classifier_top1(q.to(dev), xt, yt)
            rec = {**common, "model": name, "method": method, "bits": bits, "w_bits": w, "a_bits": a,
                   "first_last_bits": 8, "fp_top1": fp_acc, "top1": acc, "delta": acc - fp_acc,
                   "seconds": time.perf_counter() - t0, "train_samples": len(x)}
            print(f"  {name} {method} {bits}: top-1 {acc:.2f} ({acc - fp_acc:+.2f}) in {rec['seconds']:.0f} s",
                  flush=True)
            _write(args, rec)


if __name__ == "__main__":
    main()
