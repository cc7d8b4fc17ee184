"""Shared-input groups and where a per-input-channel scale can be folded.

SmoothQuant and AWQ rescale a layer's input channels: ``y = (x / s) (W s)^T``. Layers that read
the same tensor (q/k/v after a norm, gate/up) must share one ``s``, and ``1 / s`` is best folded
into the module that produced that tensor (a norm's weight and bias, or a Linear's output rows),
so that inference pays nothing for it. Which module that is, and whether folding is exact, is
found by running the scope, not by module names:

* a group is the set of planned Linear layers whose forward received the *same tensor object*;
* a candidate producer is a norm-like module (a 1-D ``weight`` of the group's width) or a float
  Linear with that many outputs that ran before the group; folding a random ``s`` into it (and
  ``s`` into the group's weight columns) must turn the group's input into exactly ``x / s`` *and*
  leave the scope's output unchanged (a norm whose output also feeds a residual fails this).

Where no producer passes, the layer keeps an explicit input multiply (``inv_smooth``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.hooks import TemporaryHooks
from slimtorch.sequential import Inputs, first_tensor, run_scope


@dataclass
class InputGroup:
    layers: list[str]  # planned Linear layers that read one tensor, in execution order
    producer: str | None  # the module whose output channels absorb 1 / s exactly, or None
    inspect: str  # the smallest module holding all the layers: what the AWQ search compares


def _common_parent(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _width(m: nn.Module) -> int | None:
    """How many output channels ``m`` can rescale: norm-like (1-D weight) or Linear; None otherwise."""
    if isinstance(m, nn.Linear):
        return m.out_features
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 1 and not isinstance(m, nn.Conv2d | nn.Embedding):
        return w.numel()
    return None


def fold_output_scale(m: nn.Module, factor: torch.Tensor) -> None:
    """Multiply ``m``'s output channels by ``factor`` (a norm's weight and bias, a Linear's rows)."""
    with torch.no_grad():
        w = m.weight
        w.mul_(factor.to(w.dtype)[:, None] if w.ndim == 2 else factor.to(w.dtype))
        b = getattr(m, "bias", None)
        if isinstance(b, torch.Tensor):
            b.mul_(factor.to(b.dtype))


def scale_input_columns(layer: nn.Linear, s: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.mul_(s.to(layer.weight.dtype))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def find_groups(model: nn.Module, scope: nn.Module, names: list[str], sample: Inputs,
                max_candidates: int = 4, seed: int = 0) -> list[InputGroup]:
    """The shared-input groups among ``names`` (Linear layers of ``scope``), each with its foldable producer.

    ``sample``: one or a few stored scope inputs to run on. Parameters are left as they were.
    """
    prefix = next((n for n, m in model.named_modules() if m is scope), "")
    pre = f"{prefix}." if prefix else ""
    name_set = set(names)
    counts: dict[int, int] = {}  # never fold into a weight that is tied to another module
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    tied = {n for n, m in model.named_modules()
            if any(counts.get(id(p), 0) > 1 for p in m.parameters(recurse=False))}
    order: list[tuple[str, str]] = []  # ("end", candidate) / ("in", layer) events
    by_tensor: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []  # keeps ids unique during the run
    inputs_of: dict[str, torch.Tensor] = {}
    hooks = TemporaryHooks()
    for n, m in scope.named_modules():
        full = pre + n if n else prefix
        if full in name_set:
            def pre_hook(mod, args, full=full):
                x = args[0]
                keep.append(x)
                inputs_of.setdefault(full, x)
                by_tensor.setdefault(id(x), [])
                if full not in by_tensor[id(x)]:
                    by_tensor[id(x)].append(full)
                order.append(("in", full))
            hooks.before(m, pre_hook)
        if _width(m) is not None and full not in tied and m is not scope:
            hooks.after(m, lambda mod, a, o, full=full: order.append(("end", full)))
    with hooks:
        ref = first_tensor(run_scope(scope, sample[:1])[0])
    seen_twice = {n for n in names if sum(n in g for g in by_tensor.values()) > 1}
    groups = []
    gen = torch.Generator().manual_seed(seed)
    for layers in by_tensor.values():
        layers = [n for n in layers if n not in seen_twice]
        if not layers or not all(isinstance(model.get_submodule(n), nn.Linear) for n in layers):
            continue
        first = next(i for i, (kind, n) in enumerate(order) if kind == "in" and n in layers)
        width = model.get_submodule(layers[0]).in_features
        before = [n for kind, n in order[:first] if kind == "end" and n not in layers]
        candidates = list(dict.fromkeys(reversed(before)))  # nearest first
        candidates = [c for c in candidates if _width(model.get_submodule(c)) == width][:max_candidates]
        x = inputs_of[layers[0]]
        producer = next((c for c in candidates if _foldable(model, scope, layers, c, sample, x, ref, gen)), None)
        groups.append(InputGroup(layers, producer, _common_parent(layers)))
    return groups


def _foldable(model: nn.Module, scope: nn.Module, layers: list[str], producer: str, sample: Inputs,
              x_ref: torch.Tensor, out_ref: torch.Tensor, gen: torch.Generator, tol: float = 1e-4) -> bool:
    prod = model.get_submodule(producer)
    mods = [model.get_submodule(n) for n in layers]
    backup = [t.detach().clone() for t in (*prod.parameters(recurse=False), *(m.weight for m in mods))]
    s = torch.empty(mods[0].in_features).uniform_(0.5, 2.0, generator=gen)
    seen = []
    try:
        fold_output_scale(prod, 1.0 / s)
        for m in mods:
            scale_input_columns(m, s)
        with TemporaryHooks() as hooks:
            hooks.before(mods[0], lambda mod, args: seen.append(args[0]))
            out = first_tensor(run_scope(scope, sample[:1])[0])
        ok = bool(seen) and _rel(seen[0], x_ref / s.to(x_ref.dtype)) < tol and _rel(out, out_ref) < tol
    finally:
        with torch.no_grad():
            for t, b in zip((*prod.parameters(recurse=False), *(m.weight for m in mods)), backup):
                t.copy_(b)
    return ok
