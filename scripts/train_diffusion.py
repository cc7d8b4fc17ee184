"""Train the Fashion-MNIST diffusion models (fmnist-ddpm-unet, fmnist-dit) on a GPU. Seeded.

    PYTHONPATH=src python scripts/train_diffusion.py --out DIR [unet dit] [--steps N] [--check 2000]
    PYTHONPATH=src python scripts/train_diffusion.py --out DIR distill-unet [distill-dit] [--teacher FILE] [--rounds 64,32,16,8,4]

``lowdiff`` trains one UNet for LowDiff's two-stage cascade (slimtorch.diffusion.cascade: 16x16, then 32x32
conditioned on it), each sample of a batch training one stage.

DDPM training (T = 1000 linear betas, eps prediction, uniform t), class-conditional with the label dropped
to the "no class" id with probability 0.1 (classifier-free guidance), AdamW with warm-up and cosine decay,
bf16 autocast, an EMA of the weights (what is saved, as float16). Images: Fashion-MNIST train, padded to
32x32 in [-1, 1]. After training, ``--check N`` samples N class-balanced images with DDIM (50 steps,
guidance 2) and reports FID-FMNIST against the test set and the class accuracy of the samples, as a
GPU-side check; the shipped figures are measured by the benchmarks.

``distill-unet`` / ``distill-dit``: progressive distillation (slimtorch.diffusion.distill) from the teacher
file's model, starting at the first of ``--rounds`` DDIM steps and halving to the last, ``--round-steps``
iterations per round (the student starts as a copy of its teacher, without dropout: with the UNet's 0.1 the
first round's loss at step 0 is 0.83-1.90 on three batches of 64 test images, without it 0.02-0.07),
CFG-aware batches with probability 0.5;
each student is saved as <name>-distilled-<steps>.safetensors and checked with its own step count. One JSON line per model goes to
DIR/train_log.jsonl; weights to DIR/<name>.safetensors with config and record in the metadata.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from train_zoo import _git_commit  # scripts/ is on the path of a script run from it

from slimtorch.diffusion.cascade import sample_model, training_batch
from slimtorch.diffusion.distill import distill_loss, student_grid
from slimtorch.diffusion.dit import DiT
from slimtorch.diffusion.fid import fid
from slimtorch.diffusion.models import load_diffusion
from slimtorch.diffusion.quality import class_accuracy, classifier_outputs, to_diffusion
from slimtorch.diffusion.samplers import timesteps
from slimtorch.diffusion.schedule import NoiseSchedule
from slimtorch.diffusion.unet import DDPMUNet
from slimtorch.io.checkpoint import save_tensors
from slimtorch.zoo import load_model
from slimtorch.zoo.data import fashion_mnist

# Sizes: the three fp16 weight files together stay near 25 MB, so that the repository with its zoo still fits
# the 64 MiB that a GPU run's working tree may hold (the other zoo weights take 29 MB). The DiT keeps width 256
# (every linear's K a multiple of 128, as the W4A8 kernel's groups need).
MODELS = {
    "unet": ("fmnist-ddpm-unet", DDPMUNet,
             {"ch": 48, "mult": [1, 2, 2], "blocks": 2, "attn_res": [8], "groups": 16}, 2e-4),
    "dit": ("fmnist-dit", DiT, {"dim": 256, "depth": 4, "heads": 4, "patch": 2}, 3e-4),
    "lowdiff": ("fmnist-lowdiff-unet", DDPMUNet,
                {"ch": 48, "mult": [1, 2, 2], "blocks": 2, "attn_res": [8], "groups": 16, "cond_ch": 1,
                 "resolutions": 2}, 2e-4),
}
NULL_P = 0.1


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def check(model: torch.nn.Module, n: int, device: str, guidance: float = 2.0, steps: int = 50,
          grid: list[int] | None = None) -> dict:
    """FID-FMNIST and class accuracy of ``n`` class-balanced DDIM samples (module docstring)."""
    model.eval()
    sched = NoiseSchedule.linear()
    g = torch.Generator(device=device).manual_seed(1234)
    labels = torch.arange(n, device=device) % model.num_classes
    out = []
    for i in range(0, n, 500):
        y = labels[i:i + 500]
        x = torch.randn(len(y), 1, 32, 32, device=device, generator=g)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out.append(sample_model(model, y, x, sched, steps, guidance, "ddim",
                                    torch.Generator().manual_seed(1234 + i), grid).float())
    samples = torch.cat(out).clamp(-1, 1).cpu()
    clf = load_model("fmnist-cnn")
    fake, logits = classifier_outputs(clf, samples)
    real, _ = classifier_outputs(clf, to_diffusion(fashion_mnist("test").images))
    return {"check_samples": n, "check_steps": steps, "check_guidance": guidance,
            "fid_fmnist": fid(fake, real), "class_accuracy": class_accuracy(logits, labels.cpu())}


def train(which: str, steps: int, batch: int, out: Path, device: str, check_n: int, compile_: bool,
          seconds: float = 0.0) -> dict:
    """Train one model; with ``seconds`` > 0 the step count is cut, from the speed of steps 20..60 and again
    of steps 20..500, to what fits that many seconds of training (the cosine decay then ends there, so a short
    run is a finished run)."""
    name, cls, cfg, peak = MODELS[which]
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    tr = fashion_mnist("train")
    x_all, y_all = to_diffusion(tr.images).to(device), tr.labels.to(device)
    model = cls(**cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = NoiseSchedule.linear()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.999))
    step_fn = torch.compile(model) if compile_ else model
    ema_decay, warmup, log, t0 = 0.9995, min(500, steps // 10 + 1), [], time.time()
    model.train()
    step, steps0 = 0, steps
    while step < steps:
        if seconds and step in (20, 60, 500) and step < steps:
            if device == "cuda":
                torch.cuda.synchronize()
            if step == 20:
                t20 = time.time()
            else:  # estimated at 60, then again at the end of the warm-up (the cosine decay starts after it)
                per_step = (time.time() - t20) / (step - 20)
                steps = min(steps0, max(step + 1, int((seconds - (time.time() - t0)) / per_step) + step))
                print(f"{name}: {per_step * 1e3:.1f} ms/step, training {steps} steps", flush=True)
        idx = torch.randint(0, len(x_all), (batch,), device=device, generator=gen)
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(batch, device=device, generator=gen) < NULL_P, torch.full_like(y, model.num_classes), y)
        t = torch.randint(0, sched.steps, (batch,), device=device, generator=gen)
        eps = torch.randn(x0.shape, device=device, generator=gen)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, warmup, peak)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            if cfg.get("cond_ch"):  # LowDiff: each sample trains one stage of the cascade
                loss = 0.0
                for target, cond, stage, ys in training_batch(x0, y, cpu_gen):
                    e, tt = eps[: len(target), :, : target.shape[-2], : target.shape[-1]], t[: len(target)]
                    pred = step_fn(sched.add_noise(target, e, tt), tt, ys, cond=cond, stage=stage)
                    loss = loss + F.mse_loss(pred.float(), e, reduction="sum") / e[0].numel() / batch
            else:
                loss = F.mse_loss(step_fn(sched.add_noise(x0, eps, t), t, y).float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
        if step % 500 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 5), "seconds": round(time.time() - t0, 1)})
            print(f"{name} step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        step += 1
    secs = time.time() - t0
    record = {"model": name, "config": cfg, "steps": steps, "batch": batch, "lr": peak, "ema": ema_decay,
              "prediction": "eps", "schedule": "linear 1e-4..0.02, T=1000", "null_label_p": NULL_P,
              "train_seconds": round(secs, 1), "params": sum(p.numel() for p in model.parameters()),
              "device": torch.cuda.get_device_name() if device == "cuda" else device, "log": log}
    sd = {k: v.half() if v.is_floating_point() else v for k, v in ema.state_dict().items()}

    def save() -> None:
        save_tensors(out / f"{name}.safetensors", sd, {"config": cfg, "train": {k: v for k, v in record.items()
                                                                                   if k != "log"}})

    save()  # before the check too, so that a run cut short during the check still leaves its weights
    if check_n:
        record.update(check(ema, check_n, device))
        save()
    return record


DISTILL_LR = 1e-4


def distill(which: str, teacher_file: Path | str, rounds: list[int], round_steps: int, batch: int, out: Path, device: str,
            check_n: int, seconds: float = 0.0) -> list[dict]:
    """Progressive distillation rounds (module docstring); one record per round. ``seconds`` > 0 caps each
    round's training time (its iterations then stop early; the record says how many ran)."""
    name = MODELS[which][0]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tr = fashion_mnist("train")
    x_all, y_all = to_diffusion(tr.images), tr.labels
    teacher = load_diffusion(teacher_file).to(device).eval().requires_grad_(False)
    sched = NoiseSchedule.linear()
    grid = timesteps(1000, rounds[0])
    records = []
    for target in rounds[1:]:
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        for m in student.modules():  # the target is deterministic and the teacher runs without dropout
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        opt = torch.optim.AdamW(student.parameters(), lr=DISTILL_LR, weight_decay=0.0)
        t0 = time.time()
        ran = 0
        for step in range(round_steps):
            done = (time.time() - t0) / seconds if seconds else step / round_steps
            if done >= 1:
                break
            for group in opt.param_groups:  # warm-up over 100 steps (Adam's first steps are sign-sized),
                group["lr"] = DISTILL_LR * min(1.0, (step + 1) / 100) * (1 - done)  # then linear decay to 0
            ran = step + 1
            idx = torch.randint(0, len(x_all), (batch,), generator=gen)
            y = y_all[idx].to(device)
            y = torch.where(torch.rand(batch, generator=gen).to(device) < NULL_P, torch.full_like(y, student.num_classes), y)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = distill_loss(student, teacher, x_all[idx].to(device), y, grid, sched, student.num_classes, gen,
                                    cfg_prob=0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            if step % 500 == 0 or step == round_steps - 1:
                print(f"{name} {len(grid)} -> {len(grid) // 2} steps: step {step}/{round_steps} loss {loss.item():.4f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
        grid = student_grid(grid)
        assert len(grid) == target, (len(grid), target)
        student.eval().requires_grad_(False)
        rec = {"model": f"{name}-distilled-{target}", "teacher": str(teacher_file), "steps": target, "grid": grid,
               "round_steps": ran, "batch": batch, "lr": DISTILL_LR, "train_seconds": round(time.time() - t0, 1)}
        if check_n:
            rec.update(check(student, check_n, device, steps=target, grid=grid))
        sd = {k: v.half() if v.is_floating_point() else v for k, v in student.state_dict().items()}
        save_tensors(out / f"{name}-distilled-{target}.safetensors", sd,
                     {"config": MODELS[which][2], "train": rec})
        records.append(rec)
        teacher = student
    return records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--check", type=int, default=2000, help="samples for the FID check after training (0: none)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--teacher", type=Path, help="distill-*: the teacher's weights file (default: the shipped "
                    "zoo model of that kind; give it with one distill-* target only)")
    ap.add_argument("--rounds", default="64,32,16,8,4", help="distill-*: DDIM steps, halving")
    ap.add_argument("--round-steps", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="training-time cap: per model (its step count is cut to fit), or per distillation round")
    ap.add_argument("what", nargs="*", default=["unet", "dit"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for what in args.what:
        if what.startswith("distill-"):
            rounds = [int(r) for r in args.rounds.split(",")]
            which = what.removeprefix("distill-")
            recs = distill(which, args.teacher or MODELS[which][0], rounds, args.round_steps, args.batch, args.out,
                           args.device, args.check, args.seconds)
        else:
            recs = [train(what, args.steps, args.batch, args.out, args.device, args.check, args.compile,
                           args.seconds)]
        for rec in recs:
            _log(args.out, rec)


def _log(out: Path, rec: dict) -> None:
    rec = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "git_commit": _git_commit(), "torch": torch.__version__, "command": "python " + " ".join(sys.argv), **rec}
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k != "log"}), flush=True)


if __name__ == "__main__":
    main()
