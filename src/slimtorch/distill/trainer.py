"""The student/teacher training loop for classifiers (QAT today; pruning recovery and step distillation
next): distillation from the float model, cosine learning rate per
step, a checkpoint after every epoch (atomic, no pickle) and exact resume.

Loss: ``(1 - kd) * CE(labels) + kd * T^2 KL(teacher || student) + feature_weight * feature_loss``.
The batch order and augmentation of epoch e come from generators seeded by ``(seed, e)``, so a run
resumed from its epoch-e checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.distill.losses import FeatureTaps, feature_loss, kd_loss
from slimtorch.errors import SlimError, shown
from slimtorch.io.checkpoint import load_tensors, save_tensors
from slimtorch.progress import Progress, no_progress

CHECKPOINT = "last.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd (nesterov, momentum 0.9)
    weight_decay: float = 0.0
    kd_weight: float = 1.0  # 0: labels only; 1: teacher only
    temperature: float = 1.0
    feature_layers: tuple[str, ...] = ()
    feature_weight: float = 0.0
    warmup_steps: int = 0
    seed: int = 0
    width_lr: float = 0.0  # plain SGD (cosine) for learned bit-widths (parameters named "lam"); 0: the main optimizer

    def __post_init__(self) -> None:
        if not (1 <= self.epochs <= 10_000 and 1 <= self.batch_size <= 65_536 and 0 < self.lr <= MAX_LR):
            raise SlimError(f"epochs (1 to 10,000), batch size (1 to 65,536) and learning rate (0 to {MAX_LR:g}) "
                            f"must be positive and in range (got {shown(self.epochs)}, {shown(self.batch_size)}, "
                            f"{shown(self.lr)})")
        if self.optimizer not in ("adam", "sgd"):
            raise SlimError(f"unknown optimizer {shown(self.optimizer)}; choose adam or sgd")
        if not 0 <= self.kd_weight <= 1:
            raise SlimError(f"kd_weight (--kd) must lie in [0, 1], got {shown(self.kd_weight)}")
        if not 0 <= self.width_lr <= MAX_LR:
            raise SlimError(f"width_lr (--width-lr) must be positive, at most {MAX_LR:g}, got {shown(self.width_lr)} "
                            "(0: the widths train with the main optimizer)")
        if not 0 <= self.seed < 2**63:
            raise SlimError(f"seed must be a whole number from 0 to 2^63-1, got {shown(self.seed)}")


MAX_LR = 10.0  # beyond it any of our models diverges; NaN and infinities fail every comparison above


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)  # per epoch: loss, lr, seconds, and the eval metric


def cosine_lr(step: int, total: int, peak: float, warmup: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weight matrices/kernels and on quantizer parameters (PACT's L2 on alpha); none
    on biases and norm parameters."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and not (cfg.width_lr > 0 and _is_width(name)):
            (decay if p.ndim >= 2 or name.endswith("alpha") else rest).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.Adam(groups, lr=cfg.lr)


def _is_width(name: str) -> bool:
    return name == "lam" or name.endswith(".lam")


def _width_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """FracBits' widths by plain SGD: Adam would move every width by about the same step whatever its
    gradient, and the layers' different sensitivities are what should set them apart."""
    widths = [p for n, p in model.named_parameters() if p.requires_grad and _is_width(n)]
    return torch.optim.SGD(widths, lr=cfg.width_lr) if cfg.width_lr > 0 and widths else None


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    scalars = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    save_tensors(path, tensors, {**meta, "opt_groups": sd["param_groups"], "opt_scalars": scalars})


def _load(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    tensors, meta = load_tensors(path)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SlimError(f"checkpoint {path} does not fit this model/plan/method: {str(exc).splitlines()[0]}") from None
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            idx, name = k.removeprefix("opt.").split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = v
    for k, v in meta.get("opt_scalars", {}).items():
        idx, name = k.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": meta["opt_groups"]})
    return meta


def _batches(n: int, bs: int, gen: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen).to(device)
    return [perm[i:i + bs] for i in range(0, n - bs + 1, bs)]  # full batches only


def train_student(model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
              ckpt_dir: Path | None = None, resume: bool = False,
              augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
              evaluate: Callable[[nn.Module], float | dict] | None = None, meta: dict | None = None,
              progress: Progress = no_progress, log: Callable[[str], None] | None = None,
              variants: list[Callable[[nn.Module], None]] | None = None,
              on_epoch: Callable[[nn.Module, int, int], None] | None = None,
              penalty: Callable[[nn.Module], torch.Tensor] | None = None,
              before_step: Callable[[nn.Module], None] | None = None,
              after_step: Callable[[nn.Module], None] | None = None,
              subset: Callable[[int], torch.Tensor | None] | None = None) -> History:
    """Train the student ``model`` (a QAT model from ``prepare_qat``, or any trainable model) on inputs ``x`` (N, ...) and labels ``y`` (N,).

    Args:
        teacher: the float model to distill from (eval mode, frozen); None trains on labels only.
        ckpt_dir: where ``last.safetensors`` is written after each epoch (model, optimizer, history).
        resume: continue from ``ckpt_dir``'s checkpoint when there is one.
        augment: ``(x_batch, generator) -> x_batch`` applied to each training batch.
        evaluate: ``model -> metric`` (e.g. test accuracy) recorded after each epoch, in eval mode.
        meta: JSON-able facts stored in the checkpoint (plan, method, ...); a resumed run checks them.
        variants: switches ``model -> None`` (AdaBits' widths): each batch runs forward and backward once
            per variant, gradients add up, then one optimizer step; the logged loss is their sum.
        on_epoch: ``(model, epoch, epochs) -> None`` called before each epoch (AdaBin's EDE schedule,
            FracBits' hard assignment).
        penalty: ``model -> scalar`` added to each batch's loss (FracBits' budget term).
        before_step / after_step: ``model -> None`` around each optimizer step (sparse training: mask the
            gradients before, the weights after).
        subset: ``epoch -> indices or None`` of the training samples that epoch draws from (MEST's dropping
            of unforgettable examples); the learning rate follows the fraction of epochs done, so a shorter
            epoch does not shift the schedule.
    """
    if teacher is None and cfg.kd_weight > 0:
        raise SlimError("distillation needs the float teacher model (or set kd_weight to 0)")
    if len(x) < cfg.batch_size:
        raise SlimError(f"{len(x)} training samples are fewer than one batch of {cfg.batch_size}")
    opt = make_optimizer(model, cfg)
    width_opt = _width_optimizer(model, cfg)  # no state (plain SGD): nothing to checkpoint
    steps_per_epoch = len(x) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    history, start = History(), 0
    meta = dict(meta or {})
    path = None if ckpt_dir is None else Path(ckpt_dir) / CHECKPOINT
    if resume and path is not None and path.is_file():
        saved = _load(path, model, opt)
        for key in ("config", *meta):
            want = asdict(cfg) if key == "config" else meta[key]
            if json.loads(json.dumps(want)) != saved.get(key):
                raise SlimError(f"checkpoint {path} was made with a different {key}; resume with the same "
                                "settings or use a new --out folder")
        history.epochs, start = saved["history"], saved["epoch"]
    if teacher is not None:
        teacher.eval()  # its forward runs under no_grad; its parameters are left as they are
    for epoch in range(start, cfg.epochs):
        model.train()
        if on_epoch is not None:
            on_epoch(model, epoch, cfg.epochs)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        aug_gen = torch.Generator(device=x.device).manual_seed(cfg.seed * 100_003 + epoch + 7)
        loss_sum, t0 = torch.zeros((), device=x.device), time.perf_counter()
        # the order goes to x's device once per epoch, and the loss is read once per epoch: a read per step
        # (or per layer) waits for the GPU, which is slow when it is shared
        pool = subset(epoch) if subset is not None else None
        if pool is None:
            batches = _batches(len(x), cfg.batch_size, gen, x.device)
        else:
            batches = [pool.to(x.device)[b] for b in _batches(len(pool), cfg.batch_size, gen, x.device)]
        for i, idx in enumerate(progress(batches, f"epoch {epoch + 1}/{cfg.epochs}")):
            step = epoch * steps_per_epoch + i * steps_per_epoch / max(1, len(batches))  # = the step, full epochs
            lr = cosine_lr(step, total, cfg.lr, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            if width_opt is not None:
                width_opt.param_groups[0]["lr"] = cosine_lr(step, total, cfg.width_lr, cfg.warmup_steps)
                width_opt.zero_grad(set_to_none=True)
            xb, yb = x[idx], y[idx.to(y.device)]
            if augment is not None:
                xb = augment(xb, aug_gen)
            opt.zero_grad(set_to_none=True)
            for switch in variants or [None]:
                if switch is not None:
                    switch(model)
                loss = _loss(model, teacher, xb, yb, cfg)
                if penalty is not None:
                    loss = loss + penalty(model)
                loss.backward()
                loss_sum += loss.detach().float()
            if before_step is not None:
                before_step(model)
            opt.step()
            if after_step is not None:
                after_step(model)
            if width_opt is not None:
                width_opt.step()
        row = {"epoch": epoch + 1, "loss": float(loss_sum) / max(1, len(batches)), "lr_end": lr,
               "seconds": time.perf_counter() - t0, "samples": len(batches) * cfg.batch_size}
        if evaluate is not None:
            model.eval()
            row["metric"] = evaluate(model)
        history.epochs.append(row)
        if path is not None:
            _save(path, model, opt, {**meta, "config": asdict(cfg), "epoch": epoch + 1, "history": history.epochs})
        if log is not None:
            log(json.dumps(row))
    model.eval()
    return history


def _loss(model: nn.Module, teacher: nn.Module | None, xb: torch.Tensor, yb: torch.Tensor,
          cfg: TrainConfig) -> torch.Tensor:
    feats = cfg.feature_layers if cfg.feature_weight > 0 else ()
    with FeatureTaps(model, feats) as taps:
        out = model(xb)
    loss = F.cross_entropy(out, yb) * (1 - cfg.kd_weight) if cfg.kd_weight < 1 else out.new_zeros(())
    if teacher is not None and (cfg.kd_weight > 0 or feats):
        with torch.no_grad(), FeatureTaps(teacher, feats) as ttaps:
            t_out = teacher(xb)
        if cfg.kd_weight > 0:
            loss = loss + cfg.kd_weight * kd_loss(out, t_out, cfg.temperature)
        if feats:
            loss = loss + cfg.feature_weight * feature_loss(taps.features, ttaps.features)
    return loss
