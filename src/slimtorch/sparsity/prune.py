"""Unstructured, N:M and block pruning as a family of ``apply_``: ``PruneConfig`` and its handler.

Methods: ``magnitude`` (|W|, per layer or with one global threshold), ``wanda`` (|W| * ||x_j||, compared
per output row as in the paper's LLM setting, or per layer with ``comparison="layer"``; its input norms
gathered block by block through the already-pruned model; on our small vision models per row is much worse:
fmnist-vit 67.1% against 81.6% per layer at 50%, benchmarks/results/sparsity_accuracy.jsonl)
and ``sparsegpt`` (:mod:`slimtorch.sparsity.sparsegpt`, on GPTQ's Hessians, block by block). Patterns:
``unstructured``, ``N:M`` (``"2:4"``) and ``block:RxC`` (``"block:4x4"``). With ``quantize`` (a preset or
recipe) the model is also quantized: SparseGPT quantizes the kept weights in its own column pass (joint
sparsity + quantization, as in the paper); after the other methods the recipe runs as RTN, which keeps every
zero (it quantizes to the zero-point and back to exactly 0).

The pruned weights are zeros in the layers' own ``weight`` tensors; the report gives each layer's achieved
sparsity. Grouped (depthwise) convolutions have no single input Hessian: wanda and sparsegpt prune them by
magnitude (a note says so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.api import Report, handler
from slimtorch.calib.gptq import Hessian
from slimtorch.errors import SlimError
from slimtorch.progress import Progress
from slimtorch.quant.modules import quant_type_for
from slimtorch.quant.recipe import build_plan
from slimtorch.quantize import quantize_plan_, resolve_recipe, weight_bits
from slimtorch.sequential import Batch, per_layer, sequential
from slimtorch.sparsity.masks import (
    block_mask,
    global_masks,
    magnitude,
    nm_mask,
    unstructured_mask,
    wanda,
)
from slimtorch.sparsity.sparsegpt import sparsegpt_prune

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class PruneConfig:
    """``method`` (magnitude, wanda, sparsegpt), ``sparsity`` (fraction removed; fixed at N/M for N:M),
    ``pattern`` (unstructured, "N:M", "block:RxC"), ``scope`` (layer, or global for magnitude), ``targets``
    (module classes or ``re:`` name patterns), ``ignore`` (the same, kept dense)."""

    method: str = "magnitude"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    scope: str = "layer"
    targets: tuple[str, ...] = ("Linear", "Conv2d")
    ignore: tuple[str, ...] = ("lm_head",)
    comparison: str = "row"  # wanda, unstructured: compare scores per output row (the paper's LLM setting) or per layer
    quantize: str | None = None  # a preset or recipe: quantize too (sparsegpt: in the same pass; others: RTN after)

    def __post_init__(self) -> None:
        if self.comparison not in ("row", "layer"):
            raise SlimError(f"comparison group {self.comparison!r}: choose row or layer")
        if self.method not in METHODS:
            raise SlimError(f"pruning method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.scope not in ("layer", "global"):
            raise SlimError(f"pruning scope {self.scope!r}: choose layer or global")
        if self.scope == "global" and (self.method != "magnitude" or self.pattern != "unstructured"):
            raise SlimError("a global threshold applies to unstructured magnitude pruning only")
        parse_pattern(self.pattern)
        if not 0.0 <= self.sparsity < 1.0:
            raise SlimError(f"sparsity must be in [0, 1); got {self.sparsity}")
        if self.quantize is not None:
            resolve_recipe(self.quantize)  # an unknown preset or a bad recipe fails here, before any work

    @property
    def nm(self) -> tuple[int, int] | None:
        p = parse_pattern(self.pattern)
        return p[1] if p[0] == "nm" else None


def parse_pattern(pattern: str) -> tuple[str, tuple[int, int] | None]:
    """("unstructured", None), ("nm", (N, M)) or ("block", (R, C)); SlimError for anything else."""
    if pattern == "unstructured":
        return "unstructured", None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if m and 0 < int(m[1]) < int(m[2]) <= 64:
        return "nm", (int(m[1]), int(m[2]))
    m = re.fullmatch(r"block:(\d+)x(\d+)", pattern)
    if m and int(m[1]) > 0 and int(m[2]) > 0:
        return "block", (int(m[1]), int(m[2]))
    raise SlimError(f"sparsity pattern {pattern!r}: use unstructured, N:M with 0 < N < M <= 64 (2:4), or block:RxC")


@dataclass(kw_only=True)
class PruneReport(Report):
    method: str
    pattern: str
    target_sparsity: float
    sparsity: float  # achieved, over the pruned layers' weights
    layers: dict[str, float]  # layer -> achieved sparsity
    quantized: str | None = None  # the recipe also applied
    bits_per_weight: float = 32.0  # stored bits per weight (quantize.weight_bits), zeros counted as stored


class InputNorms(Hessian):
    """Sum of squares of each input feature over the rows a layer sees (Wanda's ||x_j||^2): Hessian's input
    rows (conv inputs unfolded), without its (in, in) matrix. Grouped convolutions never get here (pruned by
    magnitude)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.sq = torch.zeros(layer.weight[0].numel(), dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        self.sq += (self.rows(x.detach()).double() ** 2).sum(0)


def _mask(score: torch.Tensor, config: PruneConfig, per_row: bool = False) -> torch.Tensor:
    kind, arg = parse_pattern(config.pattern)
    if kind == "nm":
        return nm_mask(score, *arg)
    if kind == "block":
        return block_mask(score, config.sparsity, arg)
    return unstructured_mask(score, config.sparsity, per_row=per_row)


def _layers(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    from slimtorch.quant.recipe import _matches

    out = {n: m for n, m in model.named_modules()
           if isinstance(m, nn.Linear | nn.Conv2d) and _matches(n, m, config.targets) and not _matches(n, m, config.ignore)}
    if not out:
        raise SlimError(f"no layer of this model matches the pruning targets {list(config.targets)}")
    return out


@torch.no_grad()
def _set(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
    return layer


@handler(PruneConfig, "prune")
def _apply_prune(model: nn.Module, config: PruneConfig, calib: list[Batch], progress: Progress) -> PruneReport:
    layers = _layers(model, config)
    notes: list[str] = []
    plan = {}
    if config.quantize is not None:
        plan, _ = build_plan(model, resolve_recipe(config.quantize))
    sparse_counts: dict[str, int] = {}  # layers quantized in the pass: their removed weights
    kind, arg = parse_pattern(config.pattern)
    if kind != "unstructured":  # a layer the pattern does not tile stays dense
        misfit = [n for n, m in layers.items()
                  if m.weight[0].numel() % arg[1] or (kind == "block" and m.weight.shape[0] % arg[0])]
        for n in misfit:
            del layers[n]
        if misfit:
            notes.append(f"kept dense (the {config.pattern} pattern does not tile their weights): {', '.join(misfit)}")
        if not layers:
            raise SlimError(f"no target layer's weight tiles into the {config.pattern} pattern")
    grouped = [n for n, m in layers.items() if isinstance(m, nn.Conv2d) and m.groups != 1]
    if config.method != "magnitude" and grouped:
        notes.append(f"{len(grouped)} grouped convolutions: pruned by magnitude ({config.method} needs one input "
                     f"Hessian per layer)")
    if config.method == "magnitude":
        scores = {n: magnitude(m.weight) for n, m in layers.items()}
        masks = global_masks(scores, config.sparsity) if config.scope == "global" else \
            {n: _mask(s, config) for n, s in progress(scores.items(), "magnitude")}
        for n, mk in masks.items():
            _set(layers[n], layers[n].weight * mk)
    else:
        if not calib:
            raise SlimError(f"{config.method} needs calibration data")
        if config.method == "sparsegpt" and kind == "block":
            raise SlimError("sparsegpt prunes unstructured or N:M; for blocks use magnitude or wanda")
        for n in grouped:
            _set(layers[n], layers[n].weight * _mask(magnitude(layers[n].weight), config))

        def solve_wanda(name: str, layer: nn.Module, stats: InputNorms) -> nn.Module:
            score = wanda(layer.weight.reshape(layer.weight.shape[0], -1), stats.sq.sqrt())
            return _set(layer, layer.weight.reshape(score.shape) * _mask(score, config,
                                                                          per_row=config.comparison == "row"))

        def solve_sparsegpt(name: str, layer: nn.Module, stats: Hessian) -> nn.Module:
            w2 = layer.weight.detach().reshape(layer.weight.shape[0], -1)
            block = 128 if config.nm is None else (128 - 128 % config.nm[1]) or config.nm[1]
            wspec = plan[name].weight if name in plan else None
            if stats.H is None:
                raise SlimError(f"sparsegpt: layer {name} received no calibration input")
            new, keep, qparams = sparsegpt_prune(w2, stats.H, config.sparsity, config.nm, block_size=block, quant=wspec)
            sparse_counts[name] = int((~keep).sum())
            if qparams is None:
                return _set(layer, new)
            return quant_type_for(layer).from_float(layer, wspec, None, qparams)

        dense = [n for n in layers if n not in grouped]
        if dense:
            stats, solve = (InputNorms, solve_wanda) if config.method == "wanda" else (Hessian, solve_sparsegpt)
            sequential(model, dense, calib, per_layer(stats, solve), progress)
    achieved = {n: float((layers[n].weight == 0).float().mean()) if n not in sparse_counts
                else sparse_counts[n] / layers[n].weight.numel() for n in layers}
    total = sum(layers[n].weight.numel() for n in layers)
    overall = sum(achieved[n] * layers[n].weight.numel() for n in layers) / total
    if plan:  # the rest of the plan by RTN (zeros stay zeros: 0 quantizes to the zero-point), activations calibrated
        notes += quantize_plan_(model, plan, calib, "rtn", progress)
    return PruneReport(method=config.method, pattern=config.pattern, target_sparsity=config.sparsity,
                       sparsity=overall, layers=achieved, notes=notes, quantized=config.quantize,
                       bits_per_weight=weight_bits(model))
