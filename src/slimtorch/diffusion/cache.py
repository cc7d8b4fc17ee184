"""Feature caching for diffusion models, as named stateful hooks (:mod:`slimtorch.hooks`) configured by
:class:`CacheConfig` (the "caching" family of :func:`slimtorch.api.apply_`).

Sampling calls the network once per step (:func:`slimtorch.diffusion.samplers.guided` puts both
classifier-free-guidance branches in one batch, so each branch's rows keep their own cached values). The
hook counts the calls: at a refresh step it runs the whole network and keeps a feature; at the other steps
it runs only part of the network and reuses the feature. :func:`slimtorch.hooks.reset_state` (or
:func:`reset`) must be called between two sampling runs.

* UNet (:class:`~slimtorch.diffusion.unet.DDPMUNet`), DeepCache: the feature is the tensor entering the up
  block that consumes skip ``branch`` (0 = the shallowest); a partial step runs the encoder down to that
  skip and the up path from that block (``DDPMUNet.encode`` / ``decode``).
* DiT (:class:`~slimtorch.diffusion.dit.DiT`), block reuse (FORA / Delta-DiT): a partial step runs the
  first ``first_blocks`` blocks and adds the residual that the remaining blocks added at the last refresh.
* ``adaptive`` (DiT; TeaCache / first-block-cache style): every step runs the first ``first_blocks`` blocks;
  the rest are skipped while their output differs from its value at the last refresh by less than
  ``threshold`` (relative mean absolute difference), so the model decides per step.

Refresh steps: ``schedule`` (for example :func:`~slimtorch.diffusion.cache_schedule.dp_schedule`'s), else
every ``interval``-th step. An optional per-step, per-channel affine correction of the reused feature
(:mod:`~slimtorch.diffusion.error_correction`, CacheQuant's decoupled error correction) is set with
:func:`set_correction`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.api import Report, handler
from slimtorch.diffusion.dit import DiT
from slimtorch.diffusion.error_correction import apply_affine
from slimtorch.diffusion.unet import DDPMUNet
from slimtorch.errors import SlimError
from slimtorch.hooks import ModuleHook, attach, attached, detach

METHODS = ("deepcache", "blocks", "adaptive")


@dataclass(frozen=True)
class CacheConfig:
    """How to cache (module docstring). ``method`` None picks deepcache for a UNet and blocks for a DiT."""

    interval: int = 3
    method: str | None = None
    branch: int = 1
    first_blocks: int = 1
    schedule: tuple[int, ...] | None = None
    threshold: float = 0.1

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise SlimError(f"unknown cache method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.interval < 1 or self.first_blocks < 1 or self.branch < 0 or self.threshold < 0:
            raise SlimError("cache config: interval and first_blocks must be >= 1, branch and threshold >= 0")
        if self.schedule is not None and (not self.schedule or self.schedule[0] != 0
                                          or any(b <= a for a, b in zip(self.schedule, self.schedule[1:]))):
            raise SlimError(f"cache schedule {self.schedule}: refresh steps must increase from 0")


@dataclass(kw_only=True)
class CacheReport(Report):
    method: str = ""
    partial_fraction: float = 0.0  # share of the network a partial step runs, by parameter count


class _CacheHook(ModuleHook):
    name = "cache"
    replaces_forward = True

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.refresh = None if config.schedule is None else set(config.schedule)
        self.correction: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_state(None)

    def reset_state(self, module) -> None:
        self.step, self.feature, self.full_steps = 0, None, []

    def is_refresh(self, step: int) -> bool:
        if self.feature is None:
            return True
        return step in self.refresh if self.refresh is not None else step % self.config.interval == 0

    def reused(self, step: int) -> torch.Tensor:
        ab = self.correction.get(step)
        return self.feature if ab is None else apply_affine(self.feature, *ab, channel_dim=1)


class DeepCacheHook(_CacheHook):
    def new_forward(self, module: DDPMUNet, forward, x, t, y, cond=None, stage=None):
        step, self.step = self.step, self.step + 1
        k = self.config.branch
        start = module.num_skips - 1 - k
        emb = module.embed(t, y, stage)
        if self.is_refresh(step):
            self.full_steps.append(step)
            hs = module.encode(x, emb, cond=cond)
            h = module.mid(hs[-1], emb)
            for block in module.up[:start]:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            self.feature = h
            return module.decode(h, hs, emb, start=start)
        return module.decode(self.reused(step), module.encode(x, emb, upto=k, cond=cond), emb, start=start)


class BlockCacheHook(_CacheHook):
    def new_forward(self, module: DiT, forward, x, t, y):
        step, self.step = self.step, self.step + 1
        n = self.config.first_blocks
        c = module.condition(t, y)
        h = module.tokens(x)
        for blk in module.blocks[:n]:
            h = blk(h, c)
        if self.refresh_now(step, h):
            self.full_steps.append(step)
            first = h
            for blk in module.blocks[n:]:
                h = blk(h, c)
            self.feature = (h - first).transpose(1, 2)  # (B, D, N): channels on dim 1 for the correction
            self.first = first
            return module.head(h, c)
        return module.head(h + self.reused(step).transpose(1, 2), c)

    def refresh_now(self, step: int, first: torch.Tensor) -> bool:
        if self.config.method != "adaptive":
            return self.is_refresh(step)
        if self.feature is None:
            return True
        change = (first - self.first).abs().mean() / self.first.abs().mean().clamp(min=1e-12)
        return bool(change >= self.config.threshold)


def _method(model: nn.Module, config: CacheConfig) -> str:
    if isinstance(model, DDPMUNet):
        if config.method not in (None, "deepcache"):
            raise SlimError(f"cache method {config.method!r} is for DiT models; a UNet caches with deepcache")
        if config.branch >= model.num_skips - 1:
            raise SlimError(f"cache branch {config.branch}: this UNet has skips 0..{model.num_skips - 2} to cache at")
        return "deepcache"
    if isinstance(model, DiT):
        if config.method == "deepcache":
            raise SlimError("deepcache needs a UNet; a DiT caches with blocks or adaptive")
        if config.first_blocks >= len(model.blocks):
            raise SlimError(f"cache first_blocks {config.first_blocks}: this DiT has {len(model.blocks)} blocks")
        return config.method or "blocks"
    raise SlimError(f"caching applies to slimtorch.diffusion models (DDPMUNet, DiT); got {type(model).__name__}")


def _partial_fraction(model: nn.Module, config: CacheConfig, method: str) -> float:
    total = sum(p.numel() for p in model.parameters())
    if method == "deepcache":
        k = config.branch
        start = model.num_skips - 1 - k
        parts = [model.conv_in, *model.down[:k], *model.up[start:], model.norm_out, model.conv_out]
    else:
        parts = [model.embed_patches, *model.blocks[:config.first_blocks], model.ada_out, model.out]
    return sum(p.numel() for m in parts for p in m.parameters()) / total


@handler(CacheConfig, "caching")
def _apply_cache(model: nn.Module, config: CacheConfig, calib: list, progress) -> CacheReport:
    method = _method(model, config)
    if "cache" in attached(model):
        detach(model, "cache")
    attach(model, DeepCacheHook(config) if method == "deepcache" else BlockCacheHook(config))
    frac = _partial_fraction(model, config, method)
    return CacheReport(method=method, partial_fraction=frac,
                       notes=[f"{method}: a partial step runs {frac:.0%} of the parameters"])


def cache_hook(model: nn.Module) -> _CacheHook:
    """The caching hook attached to ``model`` (after ``apply_(model, CacheConfig(...))``)."""
    hook = attached(model).get("cache")
    if hook is None:
        raise SlimError("no cache is applied to this model; apply_(model, CacheConfig(...)) first")
    return hook


def reset(model: nn.Module) -> None:
    """Forget the cached feature and the step count (between two sampling runs)."""
    cache_hook(model).reset_state(model)


def set_correction(model: nn.Module, tables: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Per-step affine corrections (a (C,), b (C,)) of the reused feature, by step index."""
    cache_hook(model).correction = dict(tables)
