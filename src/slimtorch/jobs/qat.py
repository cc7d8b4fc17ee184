"""The QAT job (``slimtorch train-qat``): plan, prepare (``apply_`` with a ``QATConfig``), train with
distillation from the float model, export, evaluate FP vs quantized, write DIR/model.safetensors and
DIR/report.json (the quantize report's format plus a ``training`` section). Checkpoints go to
DIR/checkpoints/ after every epoch; ``resume`` continues from there. The final files are written only
once training and evaluation succeeded. What differs between methods lives in ``qat.methods``.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import time
from functools import partial
from pathlib import Path

import torch

from slimtorch.api import apply_
from slimtorch.distill import TrainConfig, train_student
from slimtorch.errors import SlimError
from slimtorch.eval.metrics import classifier_top1
from slimtorch.jobs.compare import compare_and_save, write_report
from slimtorch.qat.dorefa import DoReFaWeight
from slimtorch.qat.methods import Bits, ExportContext, QATConfig, QATMethod, get_method
from slimtorch.qat.pim import PIMConfig
from slimtorch.spec import spec_to_dict
from slimtorch.zoo import data, get_entry, load_model
from slimtorch.zoo.augment import shift_flip


def check_train_qat(model: str, method: str, bits: str, width_lr: float | None) -> tuple[QATMethod, Bits]:
    """The checks of :func:`run_train_qat` that need no model or data: run them before any work. Returns
    the method and ``--bits`` as it reads for that method."""
    qm = get_method(method)
    entry = get_entry(model)
    if entry.task != "fmnist-classification":
        raise SlimError(f"train-qat trains the Fashion-MNIST classifiers (fmnist-cnn, fmnist-vit); {model} is a "
                        f"{entry.task} model")
    if width_lr and method != "fracbits":
        raise SlimError("--width-lr is the learning rate of FracBits' widths: use it with --method fracbits")
    if qm.models is not None and model not in qm.models:
        raise SlimError(f"--method {method} is built for the batch-normalised residual CNN (fmnist-cnn)")
    return qm, qm.bits(bits)


def run_train_qat(model: str, method: str, bits: str, out: Path, cfg: TrainConfig, limit_train: int | None = None,
                  limit: int | None = None, device: str | None = None, resume: bool = False,
                  first_last_bits: int | None = 8, progress=None, log=None, adc_bits: int = 6,
                  rows: int = 64) -> dict:
    qm, b = check_train_qat(model, method, bits, cfg.width_lr)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlimError("--device cuda: no CUDA device here")
    kw = {} if progress is None else {"progress": progress}
    fp = load_model(model)
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    x, y = train.normalized(), train.labels
    if limit_train:
        x, y = x[:limit_train], y[:limit_train]
    config = QATConfig(method, b, first_last_bits=first_last_bits, epochs=cfg.epochs,
                       pim=PIMConfig(rows=rows, adc_bits=adc_bits))
    prepared = apply_(copy.deepcopy(fp), config, [(x[:256],)])
    student, plan, extra = prepared.student, prepared.plan, dict(prepared.student.extra)
    cfg = dataclasses.replace(cfg, width_lr=cfg.width_lr or student.width_lr)
    teacher = copy.deepcopy(fp).to(dev)
    meta = {"model": model, "method": method, "bits": bits,
            "plan": {n: {"weight": spec_to_dict(p.weight), "act": spec_to_dict(p.act)} for n, p in plan.items()}}
    xt, yt = test.normalized(), test.labels
    t0 = time.perf_counter()
    evaluate = qm.evaluator(partial(classifier_top1, x=xt[:2000].to(dev), y=yt[:2000].to(dev)), b)
    history = train_student(student.model.to(dev), teacher, x.to(dev), y.to(dev), cfg, ckpt_dir=out / "checkpoints",
                            resume=resume, augment=shift_flip, evaluate=evaluate, meta=meta, log=log,
                            **student.train, **kw)
    train_seconds = time.perf_counter() - t0
    trained = student.model.cpu()
    # DoReFa weights rescaled to the float spread (prepare_qat's choice for models without BatchNorm)
    matched_std = any(isinstance(m, DoReFaWeight) and m.match_std for m in trained.modules())
    exports = qm.export(trained, plan, b, ExportContext(out, model, x, extra))
    reports = []
    for e in exports:
        folder = out / e.folder if e.folder else out
        r = compare_and_save(model, fp, e.model, folder, e.label, f"qat-{method}", limit, e.bits_per_weight,
                             save=e.save, **kw)
        r.update(e.fields)
        if e.folder:
            write_report(folder, r)
        reports.append(r)
    result = dict(next(r for e, r in zip(exports, reports) if e.primary))
    extra.update(qm.summary_fields(exports, reports))
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
                 + qm.notes(b, extra),
        "quantized_layers": {n: f"W:{p.weight.dtype} A:{p.act.dtype if p.act else '-'}" for n, p in plan.items()},
        "skipped_layers": {},
        "training": {"config": dataclasses.asdict(cfg),
                     "train_samples": len(x), "device": str(dev), "history": history.epochs},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        **extra,
    })
    write_report(out, result)
    return result
