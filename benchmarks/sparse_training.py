"""Sparse training from scratch on fmnist-cnn: MEST against dense, static random sparse and prune-after-
training at the same sparsity and epochs; lottery tickets (IMP with rewinding) at a small and a large
learning rate, with random-reinitialisation and prune-and-finetune controls and the weight correlations.

    PYTHONPATH=src python benchmarks/sparse_training.py mest [--epochs 30] [--sparsity 0.9] [--runs dense,static,after,em,ems,em-drop]
    PYTHONPATH=src python benchmarks/sparse_training.py lth --lr 0.01 [--epochs 10] [--rounds 10] [--rewind-steps 0]

Training for every row: SGD (nesterov, momentum 0.9), cosine from ``--lr`` with 2 warm-up epochs' steps,
weight decay 5e-4, batch 256, labels only (no teacher), random shifts and flips: the zoo's own recipe for
fmnist-cnn (scripts/train_zoo.py) at fewer epochs. Masked layers: every conv/linear with >= 1024 weights
(the 288-weight stem stays dense). "after": dense training, then magnitude pruning of each layer to the
sparsity, no further training. One JSON line per run to benchmarks/results/sparse_training.jsonl (a GPU
makes this minutes; the CPU, hours).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from records import run_header

from slimtorch.distill.trainer import TrainConfig, train_student
from slimtorch.sparsity.lottery import imp, snapshot
from slimtorch.sparsity.mest import MESTConfig, train_mest
from slimtorch.sparsity.training_masks import MaskSet
from slimtorch.zoo.augment import shift_flip
from slimtorch.zoo.cnn import FmnistCNN
from slimtorch.zoo.data import fashion_mnist

RESULTS = Path(__file__).parent / "results" / "sparse_training.jsonl"


def data(dev: str):
    tr, te = fashion_mnist("train"), fashion_mnist("test")
    return tr.normalized().to(dev), tr.labels.to(dev), te.normalized().to(dev), te.labels.to(dev)



@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return 100.0 * sum((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum().item()
                       for i in range(0, len(x), 2000)) / len(x)


def fresh(seed: int, dev: str) -> FmnistCNN:
    torch.manual_seed(seed)
    return FmnistCNN().to(dev)


def mest_part(args, dev, xtr, ytr, xte, yte, common) -> None:
    cfg = TrainConfig(epochs=args.epochs, batch_size=256, lr=args.lr, optimizer="sgd", weight_decay=5e-4,
                      kd_weight=0.0, warmup_steps=2 * (len(xtr) // 256), seed=args.seed)
    for run in args.runs.split(","):
        model, t0, extra = fresh(args.seed, dev), time.perf_counter(), {}
        ev = (lambda m: accuracy(m, xte, yte))
        if run in ("dense", "after"):
            hist = train_student(model, None, xtr, ytr, cfg, augment=shift_flip, evaluate=ev)
            if run == "after":
                extra["dense_accuracy"] = accuracy(model, xte, yte)
                masks = MaskSet.magnitude(model, args.sparsity)
                masks.apply_(model)
                extra["sparsity"] = 1 - masks.density()
        else:
            variant, drop = (run.removesuffix("-drop"), 0.5) if run.endswith("-drop") else (run, 0.0)
            mest = MESTConfig(variant=variant, sparsity=args.sparsity, every=max(1, args.epochs // 8), drop=drop,
                              drop_after=0.5, seed=args.seed)
            hist, extra = train_mest(model, xtr, ytr, cfg, mest, augment=shift_flip, evaluate=ev)
        rec = {**common, "part": "mest", "run": run, "epochs": args.epochs, "lr": args.lr,
               "target_sparsity": args.sparsity, "accuracy": accuracy(model, xte, yte),
               "curve": [round(r["metric"], 2) for r in hist.epochs], "seconds": round(time.perf_counter() - t0, 1),
               **extra}
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"mest {run}: {rec['accuracy']:.2f}% sparsity {rec.get('sparsity', 0):.3f} "
              f"peak density {rec.get('peak_density', 1):.3f} ({rec['seconds']:.0f}s)", flush=True)


def lth_part(args, dev, xtr, ytr, xte, yte, common) -> None:
    steps_per_epoch = len(xtr) // 256
    cfg = TrainConfig(epochs=args.epochs, batch_size=256, lr=args.lr, optimizer="sgd", weight_decay=5e-4,
                      kd_weight=0.0, warmup_steps=2 * steps_per_epoch, seed=args.seed)
    model = fresh(args.seed, dev)
    kept: dict = {}
    calls = [0]

    def train(m, masks) -> float:
        calls[0] += 1
        step = [0]

        def after(mm):
            if masks is not None:
                masks.apply_(mm)
            step[0] += 1
            if calls[0] == 1 and step[0] == args.rewind_steps:  # the dense run: keep iteration k
                kept["state"] = snapshot(mm)

        train_student(m, None, xtr, ytr, cfg, augment=shift_flip,
                      before_step=masks.mask_grads_ if masks is not None else None, after_step=after)
        return accuracy(m, xte, yte)

    t0 = time.perf_counter()
    controls = {int(r) for r in args.controls.split(",") if r}

    def log(r: dict) -> None:  # one record per round as it ends, so that a run cut short keeps its rounds
        row = {k: v for k, v in r.items() if k != "correlation"}
        if "correlation" in r:
            row["correlation"] = {"kept": r["correlation"]["kept"], "all": r["correlation"]["all"]}
        with open(args.out, "a") as f:
            f.write(json.dumps({**common, "part": "lth-round", "lr": args.lr, "epochs": args.epochs,
                                "rewind_steps": args.rewind_steps, **row}) + "\n")
        print("lth", json.dumps({k: v for k, v in r.items() if k != "correlation"}), flush=True)

    recs = imp(model, train, rounds=args.rounds, rate=0.2,
               rewind_point=(lambda: kept["state"]) if args.rewind_steps else None,
               control=lambda r: r in controls, reinit=lambda: snapshot(fresh(args.seed + 1000, dev)),
               finetune=True, log=log)
    for r in recs:
        if "correlation" in r:
            r["correlation"] = {"kept": r["correlation"]["kept"], "all": r["correlation"]["all"]}
    rec = {**common, "part": "lth", "lr": args.lr, "epochs": args.epochs, "rewind_steps": args.rewind_steps,
           "rate": 0.2, "rounds": recs, "seconds": round(time.perf_counter() - t0, 1)}
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["mest", "lth"])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--runs", default="dense,static,after,em,ems,em-drop")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rewind-steps", type=int, default=0, help="0: rewind to the initialisation")
    ap.add_argument("--controls", default="5,8,10", help="IMP rounds that also train the reinit/finetune controls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None, help="first N training images only (a smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    common = run_header(torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = data(args.device)
    if args.train_limit:
        xtr, ytr, common["train_limit"] = xtr[:args.train_limit], ytr[:args.train_limit], args.train_limit
    (mest_part if args.part == "mest" else lth_part)(args, args.device, xtr, ytr, xte, yte, common)


if __name__ == "__main__":
    main()
