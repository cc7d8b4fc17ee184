"""Recipes (a preset name or a YAML file) and the Plan they give for a model.

A YAML recipe::

    preset: W4A16-g128          # optional: start from a preset, then override
    targets: [Linear]           # module class names, or regexes fully matching module names
    ignore: [lm_head, 're:.*\\.0\\..*']
    weight: {dtype: uint4, granularity: group:128, symmetric: false, observer: mse}
    act: null                   # or {dtype: int8, granularity: tensor, dynamic: false, ...}
    attention: {dtype: int8, granularity: tensor, symmetric: false}   # optional: Q, K, V, softmax output
    kv_cache: {dtype: uint4, granularity: token, symmetric: false, dynamic: true}  # optional: K and V only

Granularity strings: ``tensor``, ``channel`` (axis 0), ``channel:AXIS``, ``token``, ``group:N``.
``attention`` quantizes the matmul inputs that have no weight (attention Q, K, V and the softmax
probabilities), at the :class:`~slimtorch.quant.modules.MatmulInput` points a model defines; ``kv_cache``
quantizes K and V alone (what a KV cache stores: ``token`` granularity is one scale per token and head), and
wins over ``attention`` there.
Layers a recipe targets but that cannot take it (a group size that does not divide the input
width, say) are skipped and reported with the reason, never silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch.nn as nn

from slimtorch.errors import SlimError, shown
from slimtorch.quant.modules import MatmulInput, quant_type_for
from slimtorch.spec import (LayerPlan, PerChannel, PerGroup, PerTensor, PerToken, Plan, QuantSpec, mapping_of,
                            spec_from_dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    weight: QuantSpec | None
    act: QuantSpec | None = None
    targets: tuple[str, ...] = ("Linear", "Conv2d")
    ignore: tuple[str, ...] = ("lm_head",)
    attention: QuantSpec | None = None  # the spec of every MatmulInput point (Q, K, V, probabilities)
    kv_cache: QuantSpec | None = None  # the spec of the K and V points (the KV cache), over ``attention``'s

    @property
    def weight_only(self) -> bool:
        return self.act is None


def _w(dtype: str, gran, symmetric: bool = True) -> QuantSpec:
    return QuantSpec(dtype, gran, symmetric=symmetric)


_STATIC_ACT = QuantSpec("int8", PerTensor(), symmetric=False)
_DYN_TOKEN = QuantSpec("int8", PerToken(), dynamic=True)
PRESETS: dict[str, Recipe] = {
    r.name: r for r in (
        Recipe("W8A8", _w("int8", PerChannel(0)), _STATIC_ACT),
        Recipe("W8A8-dynamic", _w("int8", PerChannel(0)), _DYN_TOKEN),
        Recipe("W4A16-g128", _w("uint4", PerGroup(128), symmetric=False)),
        Recipe("W3A16-g128", _w("uint3", PerGroup(128), symmetric=False)),
        Recipe("W2A16-g64", _w("uint2", PerGroup(64), symmetric=False)),
        Recipe("W4A8", _w("int4", PerGroup(128)), _DYN_TOKEN),
        Recipe("FP8", _w("fp8_e4m3", PerChannel(0)), QuantSpec("fp8_e4m3", PerToken(), dynamic=True)),
        # 4-bit weights search their clipping range (mse), as QuaRot's do: at 4 bits the min-max range wastes
        # levels on the largest weight of each row (tinyllama-fm, rotated, GPTQ: perplexity 23.87 -> 23.47)
        Recipe("W4A4", QuantSpec("int4", PerChannel(0), observer="mse"), QuantSpec("int4", PerToken(), dynamic=True)),
    )
}


MAX_PATTERNS, MAX_PATTERN_CHARS = 1000, 500


def _spec(raw, where: str, role: str) -> QuantSpec | None:
    try:
        return spec_from_dict(raw, role)
    except SlimError as exc:
        raise SlimError(f"recipe field {where!r}: {exc}") from None


def _patterns(raw, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise SlimError(f"recipe field {where!r} must be a list of strings (class names or 're:' regexes), got "
                        f"{shown(raw)}")
    if len(raw) > MAX_PATTERNS or any(len(p) > MAX_PATTERN_CHARS for p in raw):
        raise SlimError(f"recipe field {where!r} holds at most {MAX_PATTERNS} patterns of at most "
                        f"{MAX_PATTERN_CHARS} characters")
    for p in raw:
        if not p.isidentifier():
            try:
                re.compile(p.removeprefix("re:"))
            except (re.error, RecursionError, OverflowError) as exc:
                raise SlimError(f"recipe {where} pattern {shown(p)} is not a valid regex: {shown(exc)}") from None
    return tuple(raw)


RECIPE_FIELDS = ("preset", "targets", "ignore", "weight", "act", "attention", "kv_cache")


def recipe_from_dict(raw, name: str) -> Recipe:
    """A Recipe from a recipe file's mapping; every problem is a SlimError naming the field."""
    mapping_of(raw, RECIPE_FIELDS, f"recipe {name}")
    if "preset" in raw and not isinstance(raw["preset"], str):
        raise SlimError(f"recipe field 'preset' must be a preset name, got {shown(raw['preset'])}")
    rec = replace(get_preset(raw["preset"]) if "preset" in raw else Recipe(name, None), name=name)
    for field, role in (("weight", "weight"), ("act", "act"), ("attention", "act"), ("kv_cache", "act")):
        if field in raw:
            rec = replace(rec, **{field: _spec(raw[field], field, role)})
    for field in ("targets", "ignore"):
        if field in raw:
            rec = replace(rec, **{field: _patterns(raw[field], field)})
    if rec.weight is None and rec.act is None and rec.attention is None and rec.kv_cache is None:
        raise SlimError(f"recipe {name} quantizes nothing: give it a preset, a weight or an act spec")
    if rec.weight is None and rec.act is not None:
        raise SlimError(f"recipe {name} quantizes layer inputs (act) but not their weights: a layer's input is "
                        f"quantized together with its weight, so give a weight spec too (attention inputs alone "
                        f"take attention:)")
    return rec


def load_recipe(path: Path) -> Recipe:
    """Parse a YAML recipe (bounded: see io.bounded_yaml); every problem is a SlimError naming the field."""
    from slimtorch.io.bounded_yaml import load_yaml_file

    path = Path(path)
    return recipe_from_dict(load_yaml_file(path, "recipe"), path.name)


def get_preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise SlimError(f"unknown preset {shown(name)}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def _matches(name: str, module: nn.Module, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if p.isidentifier() and any(p == c.__name__ for c in type(module).__mro__):  # the class or a base
            return True
        if re.fullmatch(p.removeprefix("re:"), name):
            return True
    return False


def _why_not(module: nn.Module, spec: QuantSpec | None) -> str | None:
    """Why ``module`` cannot take the weight spec, or None."""
    width = module.weight[0].numel()  # input elements per output row (conv: in/groups * kh * kw)
    if spec is not None and isinstance(spec.granularity, PerGroup) and width % spec.granularity.size:
        return f"input width {width} is not a multiple of group size {spec.granularity.size}"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r}"
    if quant_type_for(module) is None:
        return f"{type(module).__name__} overrides forward; a quantized Linear/Conv2d would not reproduce it"
    return None


def build_plan(model: nn.Module, recipe: Recipe) -> tuple[Plan, dict[str, str]]:
    """The plan for ``model`` and the layers skipped (name -> reason)."""
    plan: Plan = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, MatmulInput):
            spec = recipe.kv_cache if recipe.kv_cache is not None and module.role in ("k", "v") \
                else recipe.attention
            if spec is None:
                continue
            if _matches(name, module, recipe.ignore):
                skipped[name] = "ignored by the recipe"
            else:
                plan[name] = LayerPlan(weight=None, act=spec)
            continue
        if recipe.weight is None or not isinstance(module, nn.Linear | nn.Conv2d) \
                or not _matches(name, module, recipe.targets):
            continue
        if _matches(name, module, recipe.ignore):
            skipped[name] = "ignored by the recipe"
            continue
        reason = _why_not(module, recipe.weight)
        if reason:
            skipped[name] = f"cannot be quantized: {reason}"
            continue
        act = recipe.act
        if act is not None and isinstance(module, nn.Conv2d) and isinstance(act.granularity, PerToken):
            act = replace(act, granularity=PerTensor())  # a conv input has no tokens: one scale per call
        plan[name] = LayerPlan(weight=recipe.weight, act=act)
    return plan, skipped
