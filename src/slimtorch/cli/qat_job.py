"""The ``slimtorch train-qat`` job: plan, prepare, train with distillation from the float model, convert,
evaluate FP vs quantized, write DIR/model.safetensors and DIR/report.json (the ``quantize`` report's
format plus a ``training`` section). Checkpoints go to DIR/checkpoints/ after every epoch; ``resume``
continues from there. The final files are written only once training and evaluation succeeded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import re
import time
from functools import partial
from pathlib import Path

import torch

from slimtorch.cli.quantize_job import compare_and_save
from slimtorch.errors import SlimError, shown
from slimtorch.eval.metrics import classifier_top1
from slimtorch.io.checkpoint import atomic_write_bytes, save_tensors
from slimtorch.io.json_text import json_text
from slimtorch.distill import TrainConfig, train_student
from slimtorch.qat import METHODS, convert, prepare_qat, qat_plan
from slimtorch.qat.adabin import binarize_cnn, set_ede
from slimtorch.qat.adabits import evaluate_widths, export_width, prepare_adabits, widths_variants
from slimtorch.qat.dorefa import DoReFaWeight
from slimtorch.qat.f8net import F8CNN
from slimtorch.qat.fracbits import FRACBITS_WIDTH_LR, final_plan, prepare_fracbits, save_plan, training_hooks
from slimtorch.qat.pim import PIMConfig, calibrate_bn, calibration_batches, to_pim
from slimtorch.quantize import weight_bits
from slimtorch.spec import spec_to_dict
from slimtorch.zoo import data, get_entry, load_model
from slimtorch.zoo.augment import shift_flip


def parse_bits(text: str) -> tuple[int, int | None]:
    """``4`` -> (4, 4); ``W4A8`` -> (4, 8); ``W4`` / ``W4A16`` -> (4, None): weight-only."""
    t = text.strip().upper()
    m = re.fullmatch(r"(\d{1,2})|W(\d{1,2})(?:A(\d{1,2}))?", t)
    if not m:
        raise SlimError(f"--bits {shown(text)}: write N (weights and inputs), WnAm, or Wn (weights only)")
    w = int(m.group(1) or m.group(2))
    a = w if m.group(1) else None if m.group(3) in (None, "16", "32") else int(m.group(3))
    if not all(2 <= b <= 8 for b in (w, a) if b is not None):
        raise SlimError(f"--bits {shown(text)}: widths are from 2 to 8 bits (inputs may also be 16 or 32: float)")
    return w, a


RESEARCH = ("adabits", "fracbits", "f8net", "adabin", "pim")
ALL_METHODS = (*METHODS, *RESEARCH)
CNN_ONLY = ("f8net", "adabin")


def _save_state(q: torch.nn.Module, path: Path, meta: dict) -> None:
    """Research models outside the quantize format (fixed point, binary, PIM): their state dict."""
    save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in q.state_dict().items()}, meta)


def _method_notes(method: str, widths: tuple[int, ...], extra: dict) -> list[str]:
    state = "model.safetensors holds the trained model's state dict (not the quantize format)"
    return {
        "adabits": [f"one AdaBits model for widths {'/'.join(map(str, widths))}: each width's model and report are in "
                    "DIR/w<bits>/; this report is the lowest width's"],
        "fracbits": [f"FracBits widths after hard assignment: {extra.get('layer_bits')}; the Plan is DIR/plan.json"],
        "f8net": ["8-bit fixed point (F8Net) with batch norm folded; " + state + ": load it into "
                  "slimtorch.qat.f8net.F8CNN; integer_forward runs it with integers only"],
        "adabin": ["W1A1 (AdaBin) 3x3 convolutions in the residual blocks; stem, 1x1 shortcuts and classifier in "
                   "float; " + state + " (slimtorch.qat.adabin.binarize_cnn)"],
        "pim": [f"accuracy on the simulated PIM array ({extra.get('pim', {}).get('adc_bits')}-bit ADC over "
                f"{extra.get('pim', {}).get('rows')}-row partial sums; first and last layers digital)"
                + (", after BN calibration on the simulation; " if extra.get('pim', {}).get('bn_layers_calibrated')
                   else " (no BatchNorm to calibrate); ") + state],
    }.get(method, [])


def check_train_qat(model: str, method: str, bits: str, width_lr: float | None) -> tuple[tuple[int, ...], int,
                                                                                        int | None]:
    """The checks of :func:`run_train_qat` that need no model or data: run them before any work. Returns
    ``--bits`` parsed for ``method`` (AdaBits widths or (), weight bits, input bits or None)."""
    if method not in ALL_METHODS:
        raise SlimError(f"unknown QAT method {method!r}; choose one of: {', '.join(ALL_METHODS)}")
    entry = get_entry(model)
    if entry.task != "fmnist-classification":
        raise SlimError(f"train-qat trains the Fashion-MNIST classifiers (fmnist-cnn, fmnist-vit); {model} is a "
                        f"{entry.task} model")
    if width_lr and method != "fracbits":
        raise SlimError("--width-lr is the learning rate of FracBits' widths: use it with --method fracbits")
    if method in CNN_ONLY and model != "fmnist-cnn":
        raise SlimError(f"--method {method} is built for the batch-normalised residual CNN (fmnist-cnn)")
    return _bits(method, bits)


def _bits(method: str, bits: str) -> tuple[tuple[int, ...], int, int | None]:
    """(AdaBits widths or (), weight bits, input bits or None) of ``--bits`` for ``method``."""
    if method == "adabits":
        try:
            widths = tuple(int(b) for b in bits.split("/"))
        except ValueError:
            raise SlimError(f"--bits {bits!r}: adabits takes widths such as 8/6/4/2") from None
        if not widths or not all(2 <= b <= 8 for b in widths):
            raise SlimError(f"--bits {bits!r}: adabits widths are from 2 to 8 bits")
        return widths, min(widths), min(widths)
    if method == "f8net":
        if bits not in ("8", "W8A8"):
            raise SlimError("--method f8net is 8-bit fixed point: use --bits 8")
        return (), 8, 8
    if method == "adabin":
        if bits not in ("1", "W1A1"):
            raise SlimError("--method adabin binarizes weights and inputs: use --bits 1")
        return (), 1, 1
    w_bits, a_bits = parse_bits(bits)
    if method == "pim" and a_bits is None:
        raise SlimError("--method pim needs quantized inputs: --bits WnAm")
    return (), w_bits, a_bits


def run_train_qat(model: str, method: str, bits: str, out: Path, cfg: TrainConfig, limit_train: int | None = None,
                  limit: int | None = None, device: str | None = None, resume: bool = False,
                  first_last_bits: int | None = 8, progress=None, log=None, adc_bits: int = 6,
                  rows: int = 64) -> dict:
    widths, w_bits, a_bits = check_train_qat(model, method, bits, cfg.width_lr)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlimError("--device cuda: no CUDA device here")
    kw = {} if progress is None else {"progress": progress}
    fp = load_model(model)
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    x, y = train.normalized(), train.labels
    if limit_train:
        x, y = x[:limit_train], y[:limit_train]
    plan = {} if method in ("f8net", "adabin") else qat_plan(fp, w_bits, a_bits, (x[:256],), first_last_bits)
    extra: dict = {}
    train_kw: dict = {}
    if method in METHODS:
        student = prepare_qat(copy.deepcopy(fp), plan, method)
    elif method == "adabits":
        student = prepare_adabits(copy.deepcopy(fp), plan, widths)
        train_kw["variants"] = widths_variants(widths)
    elif method == "fracbits":
        student = prepare_fracbits(copy.deepcopy(fp), plan, w_bits + 0.5)
        hook, penalty = training_hooks(float(w_bits), cfg.epochs)
        train_kw.update(on_epoch=hook, penalty=penalty)
        cfg = dataclasses.replace(cfg, width_lr=cfg.width_lr or FRACBITS_WIDTH_LR)
    elif method == "f8net":
        student = F8CNN(fp)
    elif method == "adabin":
        student = binarize_cnn(copy.deepcopy(fp), "adabin")
        train_kw["on_epoch"] = set_ede
    else:  # pim
        edges = (next(iter(plan)), list(plan)[-1])
        student = to_pim(prepare_qat(copy.deepcopy(fp), plan, "lsq"), PIMConfig(rows=rows, adc_bits=adc_bits),
                         rescale=True, skip=edges)
        extra["pim"] = {"rows": rows, "adc_bits": adc_bits, "scheme": "native", "digital_layers": list(edges)}
    student = student.to(dev)
    teacher = copy.deepcopy(fp).to(dev)
    meta = {"model": model, "method": method, "bits": bits,
            "plan": {n: {"weight": spec_to_dict(p.weight), "act": spec_to_dict(p.act)} for n, p in plan.items()}}
    xt, yt = test.normalized(), test.labels
    t0 = time.perf_counter()
    evaluate = partial(classifier_top1, x=xt[:2000].to(dev), y=yt[:2000].to(dev))
    if method == "adabits":
        evaluate = evaluate_widths(evaluate, widths)
    history = train_student(student, teacher, x.to(dev), y.to(dev), cfg, ckpt_dir=out / "checkpoints", resume=resume,
                        augment=shift_flip, evaluate=evaluate, meta=meta, log=log, **train_kw, **kw)
    train_seconds = time.perf_counter() - t0
    student = student.cpu()
    # DoReFa weights rescaled to the float spread (prepare_qat's choice for models without BatchNorm)
    matched_std = any(isinstance(m, DoReFaWeight) and m.match_std for m in student.modules())
    save = None
    if method == "adabits":
        reports = {}
        for b in widths:
            qb = export_width(copy.deepcopy(student), b)
            rb = compare_and_save(model, fp, qb, out / f"w{b}", f"QAT-adabits-W{b}A{b}", "qat-adabits", limit,
                                  weight_bits(qb), **kw)
            rb.update({"width": b, "notes": [f"width {b} of one AdaBits model for widths "
                                             f"{'/'.join(map(str, widths))}; first and last layers at 8 bits"],
                       "skipped_layers": {}, "quantized_layers": {
                           n: f"W:int{8 if p.weight.bits == 8 else b} A:{p.act.dtype if p.act else '-'}"
                           for n, p in plan.items()}})
            _write_report(out / f"w{b}", rb)
            reports[str(b)] = rb
        extra["widths"] = {b: {"metrics": r["metrics"], "folder": f"w{b}"} for b, r in reports.items()}
        out_model = f"w{min(widths)}"
        result = {**reports[str(min(widths))], "model_folder": out_model}
    else:
        if method in ("f8net", "adabin", "pim"):
            q = student.eval()
            if method == "pim":
                calib = calibration_batches(x)
                extra["pim"]["bn_layers_calibrated"] = calibrate_bn(q, calib)
                extra["pim"]["bn_calibration_batches"] = len(calib)
            meta_save = {"model": model, "method": method, "format": f"slimtorch-{method}-state",
                         **({"pim": json.dumps(extra["pim"])} if method == "pim" else {})}
            save = partial(_save_state, meta=meta_save)
            wbits = float(w_bits)
        else:
            if method == "fracbits":
                final = final_plan(student, plan, float(w_bits))
                out.mkdir(parents=True, exist_ok=True)
                save_plan(out / "plan.json", final, {"model": model, "method": "fracbits", "target": w_bits})
                extra["layer_bits"] = {n: p.weight.bits for n, p in final.items()}
                extra["plan_file"] = "plan.json"
            q = convert(student)
            wbits = weight_bits(q)
        label = f"QAT-{method}-W{w_bits}" + (f"A{a_bits}" if a_bits else "A16")
        result = compare_and_save(model, fp, q, out, label, f"qat-{method}", limit, wbits, save=save, **kw)
    result["time_s"] = {"train": train_seconds, **result["time_s"]}
    result.update({
        "seed": cfg.seed, "limit": limit,
        "notes": ([f"first and last layers at {first_last_bits} bits" if first_last_bits else
                   "every layer at the same widths"] if plan else [])
                 + ["training.history's metric: top-1 on the first 2,000 test images, after each epoch"]
                 + ([f"{method} quantizes weights with DoReFa, whose levels lie in [-1, 1]: its paper uses it in "
                     "batch-normalised networks; this model has no BatchNorm, so each layer's DoReFa weights are "
                     "rescaled to the float weights' standard deviation (our extension, slimtorch.qat.dorefa)"]
                    if matched_std else [])
                 + _method_notes(method, widths, extra),
        "quantized_layers": {n: f"W:{p.weight.dtype} A:{p.act.dtype if p.act else '-'}" for n, p in plan.items()},
        "skipped_layers": {},
        "training": {"config": dataclasses.asdict(cfg),
                     "train_samples": len(x), "device": str(dev), "history": history.epochs},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        **extra,
    })
    _write_report(out, result)
    return result


def _write_report(folder: Path, report: dict) -> None:
    atomic_write_bytes(folder / "report.json", (json_text(report) + "\n").encode())
