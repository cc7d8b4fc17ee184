"""Train the zoo models we ship (fmnist-cnn, fmnist-vit, tinyllama-fm) on a GPU. Seeded.

    PYTHONPATH=src python scripts/train_zoo.py --out DIR [cnn vit llama]

Data comes from the Debian packages, or from the folders named by SLIMTORCH_FMNIST_DIR /
SLIMTORCH_CORPUS_DIR on a machine without them. Each model is written to
DIR/<name>.safetensors as soon as it is trained, with its config and training log in the
metadata; one JSON line per model goes to DIR/train_log.jsonl. The figures printed here are
GPU-side checks; the shipped figures are re-measured on the CPU by ``slimtorch eval``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from slimtorch.io.checkpoint import save_tensors
from slimtorch.zoo.augment import shift_flip
from slimtorch.zoo.cnn import FmnistCNN
from slimtorch.zoo.data import fashion_mnist
from slimtorch.zoo.llama import LlamaConfig, TinyLlama
from slimtorch.zoo.lm_data import corpus_tokens, load_tokenizer
from slimtorch.zoo.vit import FmnistViT

DEV = "cuda"


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000))
    return 100.0 * correct / len(x)


def train_classifier(name: str, model: torch.nn.Module, epochs: int, opt_name: str, lr: float, wd: float,
                     out: Path, config: dict) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator(device=DEV).manual_seed(0)
    tr, te = fashion_mnist("train"), fashion_mnist("test")
    xtr, ytr = tr.normalized().to(DEV), tr.labels.to(DEV)
    xte, yte = te.normalized().to(DEV), te.labels.to(DEV)
    model = model.to(DEV)
    bs = 256
    steps_per_epoch = len(xtr) // bs
    total = epochs * steps_per_epoch
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    else:
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.999))
    t0, step = time.time(), 0
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), device=DEV, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, warmup=2 * steps_per_epoch, peak=lr)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(shift_flip(xtr[idx, 0], gen)), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if ep % 5 == 4 or ep == epochs - 1:
            print(f"{name} epoch {ep + 1}/{epochs} loss {loss.item():.3f} test acc {accuracy(model, xte, yte):.2f}% "
                  f"({time.time() - t0:.0f}s)", flush=True)
    secs = time.time() - t0
    acc = accuracy(model.float(), xte, yte)
    record = {"model": name, "test_accuracy": acc, "train_seconds": round(secs, 1), "epochs": epochs,
              "params": sum(p.numel() for p in model.parameters()), "device": torch.cuda.get_device_name()}
    sd = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_tensors(out / f"{name}.safetensors", sd, {"config": config, "train": record})
    return record


@torch.no_grad()
def lm_loss(model: TinyLlama, tokens: torch.Tensor, seq: int, max_windows: int | None = None) -> float:
    model.eval()
    n = (len(tokens) - 1) // seq
    if max_windows:
        n = min(n, max_windows)
    x = tokens[: n * seq].view(n, seq)
    total, count = 0.0, 0
    for i in range(0, n, 64):
        xb = x[i:i + 64]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(xb)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1),
                              reduction="sum")
        total += nll.item()
        count += xb[:, 1:].numel()
    return total / count


def train_llama(out: Path, steps: int, eval_every: int) -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig()
    tok = load_tokenizer()
    train_all = corpus_tokens("train", tok)
    heldout = corpus_tokens("heldout", tok).to(DEV)
    n_val = len(train_all) // 30  # the last ~3% of the train stream picks the checkpoint; held-out is never seen
    train, val = train_all[:-n_val].to(DEV), train_all[-n_val:].to(DEV)
    model = TinyLlama(cfg).to(DEV)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    peak = 2e-3
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.95), fused=True)
    bs, seq = 64, cfg.max_seq_len
    gen = torch.Generator(device=DEV).manual_seed(0)
    print(f"llama: {n_params / 1e6:.2f}M params, train {len(train)} tokens, val {len(val)}, heldout {len(heldout)}",
          flush=True)
    best, best_sd, best_step, t0, log = float("inf"), None, 0, time.time(), []
    for step in range(steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, warmup=200, peak=peak, floor=peak / 10)
        starts = torch.randint(0, len(train) - seq - 1, (bs,), device=DEV, generator=gen)
        idx = starts[:, None] + torch.arange(seq + 1, device=DEV)[None]
        chunk = train[idx]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step == steps - 1:
            vl = lm_loss(model, val, seq)
            log.append({"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(vl, 4)})
            print(f"llama step {step + 1}/{steps} loss {loss.item():.3f} val {vl:.3f} ({time.time() - t0:.0f}s)",
                  flush=True)
            if vl < best:
                best, best_step = vl, step + 1
                best_sd = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    secs = time.time() - t0
    model.load_state_dict({k: v.float() for k, v in best_sd.items()})
    ppl = math.exp(lm_loss(model, heldout, seq))
    record = {"model": "tinyllama-fm", "heldout_ppl_gpu": round(ppl, 3), "best_step": best_step,
              "best_val_loss": round(best, 4), "train_seconds": round(secs, 1), "steps": steps,
              "batch_tokens": bs * seq, "params": n_params, "device": torch.cuda.get_device_name(), "log": log}
    best_sd.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    save_tensors(out / "tinyllama-fm.safetensors", best_sd, {"config": asdict(cfg), "train": record})
    return record


def _git_commit() -> str | None:
    """$SLIMTORCH_COMMIT when set (the device tool's copy of the tree may report another HEAD), else HEAD."""
    if os.environ.get("SLIMTORCH_COMMIT"):
        return os.environ["SLIMTORCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--llama-steps", type=int, default=1200)
    ap.add_argument("what", nargs="*", default=["cnn", "vit", "llama"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for what in args.what:
        if what == "cnn":
            cfg = {"widths": [32, 64, 128]}
            rec = train_classifier("fmnist-cnn", FmnistCNN(), epochs=30, opt_name="sgd", lr=0.1, wd=5e-4,
                                   out=args.out, config=cfg)
        elif what == "vit":
            cfg = {"dim": 192, "depth": 6, "heads": 3, "mlp_ratio": 2, "patch": 4}
            rec = train_classifier("fmnist-vit", FmnistViT(), epochs=40, opt_name="adamw", lr=1e-3, wd=0.05,
                                   out=args.out, config=cfg)
        else:
            rec = train_llama(args.out, steps=args.llama_steps, eval_every=100)
        rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "git_commit": _git_commit(), "torch": torch.__version__,
               "command": "python " + " ".join(sys.argv), **rec}
        with open(args.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "log"}), flush=True)


if __name__ == "__main__":
    main()
