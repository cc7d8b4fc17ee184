"""The ``slimtorch train-qat`` job: plan, prepare, train with distillation from the float model, convert,
evaluate FP vs quantized, write DIR/model.safetensors and DIR/report.json (the ``quantize`` report's
format plus a ``training`` section). Checkpoints go to DIR/checkpoints/ after every epoch; ``resume``
continues from there. The final files are written only once training and evaluation succeeded.
"""

from __future__ import annotations

import copy
import json
import platform
import re
import time
from functools import partial
from pathlib import Path

import torch

from slimtorch.cli.quantize_job import check_out_dir, compare_and_save
from slimtorch.errors import SlimError
from slimtorch.eval.metrics import classifier_top1
from slimtorch.io.checkpoint import atomic_write_bytes
from slimtorch.qat import METHODS, TrainConfig, convert, prepare_qat, qat_plan, train_qat
from slimtorch.quantize import weight_bits
from slimtorch.spec import spec_to_dict
from slimtorch.zoo import data, get_entry, load_model
from slimtorch.zoo.augment import shift_flip


def parse_bits(text: str) -> tuple[int, int | None]:
    """``4`` -> (4, 4); ``W4A8`` -> (4, 8); ``W4`` / ``W4A16`` -> (4, None): weight-only."""
    t = text.strip().upper()
    if t.isdigit():
        return int(t), int(t)
    m = re.fullmatch(r"W(\d)(?:A(\d+))?", t)
    if not m:
        raise SlimError(f"--bits {text!r}: write N (weights and inputs), WnAm, or Wn (weights only)")
    a = None if m.group(2) in (None, "16", "32") else int(m.group(2))
    return int(m.group(1)), a


def run_train_qat(model: str, method: str, bits: str, out: Path, cfg: TrainConfig, limit_train: int | None = None,
                  limit: int | None = None, device: str | None = None, resume: bool = False,
                  first_last_bits: int | None = 8, progress=None, log=None) -> dict:
    out = check_out_dir(out)
    if method not in METHODS:
        raise SlimError(f"unknown QAT method {method!r}; choose one of: {', '.join(METHODS)}")
    entry = get_entry(model)
    if entry.task != "fmnist-classification":
        raise SlimError(f"train-qat trains the Fashion-MNIST classifiers (fmnist-cnn, fmnist-vit); {model} is a "
                        f"{entry.task} model")
    w_bits, a_bits = parse_bits(bits)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlimError("--device cuda: no CUDA device here")
    kw = {} if progress is None else {"progress": progress}
    fp = load_model(model)
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    x, y = train.normalized(), train.labels
    if limit_train:
        x, y = x[:limit_train], y[:limit_train]
    plan = qat_plan(fp, w_bits, a_bits, (x[:256],), first_last_bits)
    student = prepare_qat(copy.deepcopy(fp), plan, method).to(dev)
    teacher = copy.deepcopy(fp).to(dev)
    meta = {"model": model, "method": method, "plan": {n: {"weight": spec_to_dict(p.weight), "act": spec_to_dict(p.act)}
                                                        for n, p in plan.items()}}
    xt, yt = test.normalized(), test.labels
    t0 = time.perf_counter()
    on_epoch = partial(classifier_top1, x=xt[:2000].to(dev), y=yt[:2000].to(dev))
    history = train_qat(student, teacher, x.to(dev), y.to(dev), cfg, ckpt_dir=out / "checkpoints", resume=resume,
                        augment=shift_flip, evaluate=on_epoch, meta=meta, log=log, **kw)
    train_seconds = time.perf_counter() - t0
    q = convert(student.cpu())
    label = f"QAT-{method}-W{w_bits}" + (f"A{a_bits}" if a_bits else "A16")
    result = compare_and_save(model, fp, q, out, label, f"qat-{method}", limit, weight_bits(q), **kw)
    result["time_s"] = {"train": train_seconds, **result["time_s"]}
    result.update({
        "seed": cfg.seed, "limit": limit,
        "notes": [f"first and last layers at {first_last_bits} bits" if first_last_bits else
                  "every layer at the same widths",
                  "training.history's metric: top-1 on the first 2,000 test images, after each epoch"]
                 + ([f"{method} quantizes weights with DoReFa, whose levels lie in [-1, 1]: its paper uses it in "
                     "batch-normalised networks; this model has no BatchNorm, so each layer's DoReFa weights are "
                     "rescaled to the float weights' standard deviation (our extension, slimtorch.qat.dorefa)"]
                    if method in ("pact", "sat") and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fp.modules())
                    else []),
        "quantized_layers": {n: f"W:{p.weight.dtype} A:{p.act.dtype if p.act else '-'}" for n, p in plan.items()},
        "skipped_layers": {},
        "training": {"config": cfg.__dict__ | {"feature_layers": list(cfg.feature_layers)},
                     "train_samples": len(x), "device": str(dev), "history": history.epochs},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    })
    atomic_write_bytes(out / "report.json", (json.dumps(result, indent=2) + "\n").encode())
    return result
