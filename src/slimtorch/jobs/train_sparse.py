"""The sparse-training job (``slimtorch train-sparse``): train a Fashion-MNIST classifier sparse from scratch
(MEST, or static random masks) or find a lottery ticket (iterative magnitude pruning with rewinding to the
initialisation), evaluate it against the shipped dense model, write DIR/model.safetensors (the sparse
tensors compressed: export/pruned.py) and DIR/report.json.

The model starts from a fresh random initialisation of the zoo architecture (seeded): sparse training from
scratch is the point. The shipped dense model is the reference in the report, trained with more epochs;
benchmarks/sparse_training.py compares against dense training at the same epochs.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

from slimtorch.distill import TrainConfig, train_student
from slimtorch.errors import SlimError
from slimtorch.eval.metrics import classifier_top1
from slimtorch.export.pruned import save_pruned
from slimtorch.jobs.compare import write_report
from slimtorch.sparsity.lottery import imp
from slimtorch.sparsity.mest import MESTConfig, train_mest
from slimtorch.zoo import data, get_entry, load_model, manifest
from slimtorch.zoo.augment import shift_flip

METHODS = {"mest": "MEST, elastic mutation", "mest-soft": "MEST with the soft memory bound",
           "static": "static random masks (no mutation)", "lth": "lottery ticket: IMP, 20% a round, rewound to init"}


def check_train_sparse(model: str, method: str, sparsity: float, drop: float) -> None:
    """The checks that need no model or data."""
    if method not in METHODS:
        raise SlimError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if get_entry(model).task != "fmnist-classification":
        raise SlimError(f"train-sparse trains the Fashion-MNIST classifiers (fmnist-cnn, fmnist-vit); not {model}")
    if not 0.05 <= sparsity <= 0.99:
        raise SlimError(f"--sparsity must be from 0.05 to 0.99, got {sparsity}")
    if drop and method == "lth":
        raise SlimError("--drop (leaving out unforgettable samples) applies to MEST and static training")


def fresh_init_(model: nn.Module, seed: int) -> None:
    """A new random initialisation: each module's own ``reset_parameters``; parameters held directly by a
    module without one (a ViT's class token and position table) drawn from N(0, 0.02)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
        else:
            with torch.no_grad():
                for p in m.parameters(recurse=False):
                    p.normal_(0.0, 0.02)


def run_train_sparse(model: str, method: str, sparsity: float, out: Path, cfg: TrainConfig, drop: float = 0.0,
                     limit_train: int | None = None, limit: int | None = None, device: str | None = None,
                     progress=None, log=None) -> dict:
    check_train_sparse(model, method, sparsity, drop)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    x, y = train.normalized().to(dev), train.labels.to(dev)
    if limit_train:
        x, y = x[:limit_train], y[:limit_train]
    xt, yt = test.normalized(), test.labels
    if limit:
        xt, yt = xt[:limit], yt[:limit]
    net = load_model(model).to(dev)
    fresh_init_(net, cfg.seed)
    kw = {} if progress is None else {"progress": progress}

    def acc(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return classifier_top1(m, xt.to(dev), yt.to(dev))

    t0 = time.perf_counter()
    if method == "lth":
        rounds = max(1, math.ceil(math.log(1.0 - sparsity) / math.log(0.8) - 1e-9))  # 0.36: two rounds
        record = {"rounds": imp(net, lambda m, masks: _train_masked(m, masks, x, y, cfg, acc, kw, log), rounds,
                                rate=0.2)}
        record["sparsity"] = record["rounds"][-1]["sparsity"]
    else:
        variant = {"mest": "em", "mest-soft": "ems", "static": "static"}[method]
        mest = MESTConfig(variant=variant, sparsity=sparsity, every=max(1, cfg.epochs // 8), drop=drop,
                          seed=cfg.seed)
        _, record = train_mest(net, x, y, cfg, mest, augment=shift_flip, log=log, **kw)
    seconds = time.perf_counter() - t0
    accuracy = acc(net)
    size = save_pruned(net.cpu(), out / "model.safetensors", model,
                       {"prune": {"method": f"train-sparse:{method}", "sparsity": record["sparsity"]}})
    dense = manifest().get(model, {}).get("fp_metrics", {}).get("top1_accuracy")
    result = {"model": model, "method": method, "description": METHODS[method], "target_sparsity": sparsity,
              "sparsity": record["sparsity"], "top1_accuracy": accuracy,
              "dataset": f"Fashion-MNIST test ({len(xt)} images)", "shipped_dense_top1": dense,
              "training": {**{k: v for k, v in record.items() if k != "rounds"}, "epochs": cfg.epochs,
                           "lr": cfg.lr, "optimizer": cfg.optimizer, "train_samples": len(x),
                           "seconds": round(seconds, 1), "device": str(dev)},
              "rounds": record.get("rounds"),
              "size": {"file_bytes": size["bytes"], "dense_bytes": size["dense_bytes"],
                       "compressed_tensors": size["compressed_tensors"]},
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    write_report(out, result, page=False)
    return result


def _train_masked(m: nn.Module, masks, x, y, cfg: TrainConfig, acc, kw: dict, log) -> float:
    train_student(m, None, x, y, cfg, augment=shift_flip, log=log,
                  before_step=masks.mask_grads_ if masks is not None else None,
                  after_step=masks.apply_ if masks is not None else None, **kw)
    return acc(m)
