"""Recipes (a preset name or a YAML file) and the Plan they give for a model.

A YAML recipe::

    preset: W4A16-g128          # optional: start from a preset, then override
    targets: [Linear]           # module class names, or regexes fully matching module names
    ignore: [lm_head, 're:.*\\.0\\..*']
    weight: {dtype: uint4, granularity: group:128, symmetric: false, observer: mse}
    act: null                   # or {dtype: int8, granularity: tensor, dynamic: false, ...}
    attention: {dtype: int8, granularity: tensor, symmetric: false}   # optional: Q, K, V, softmax output

Granularity strings: ``tensor``, ``channel`` (axis 0), ``channel:AXIS``, ``token``, ``group:N``.
``attention`` quantizes the matmul inputs that have no weight (attention Q, K, V and the softmax
probabilities), at the :class:`~slimtorch.quant.modules.MatmulInput` points a model defines.
Layers a recipe targets but that cannot take it (a group size that does not divide the input
width, say) are skipped and reported with the reason, never silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch.nn as nn

from slimtorch.errors import SlimError
from slimtorch.quant.modules import MatmulInput, quant_type_for
from slimtorch.spec import LayerPlan, PerChannel, PerGroup, PerTensor, PerToken, Plan, QuantSpec, granularity_from_str


@dataclass(frozen=True)
class Recipe:
    name: str
    weight: QuantSpec | None
    act: QuantSpec | None = None
    targets: tuple[str, ...] = ("Linear", "Conv2d")
    ignore: tuple[str, ...] = ("lm_head",)
    attention: QuantSpec | None = None  # the spec of every MatmulInput point (Q, K, V, probabilities)

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
    )
}


_SPEC_FIELDS = {"dtype", "granularity", "symmetric", "observer", "dynamic"}


def _spec(raw, where: str) -> QuantSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SlimError(f"recipe field {where!r} must be a mapping or null, got {raw!r}")
    unknown = set(raw) - _SPEC_FIELDS
    if unknown:
        raise SlimError(f"recipe field {where!r} has unknown keys {sorted(unknown)}; allowed: {sorted(_SPEC_FIELDS)}")
    kw = dict(raw)
    if "granularity" in kw:
        kw["granularity"] = granularity_from_str(kw["granularity"])
    return QuantSpec(**kw)


def _patterns(raw, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str) or not all(isinstance(p, str) for p in raw):
        raise SlimError(f"recipe field {where!r} must be a list of strings")
    for p in raw:
        if not p.isidentifier():
            try:
                re.compile(p.removeprefix("re:"))
            except re.error as exc:
                raise SlimError(f"recipe {where} pattern {p!r} is not a valid regex: {exc}") from None
    return tuple(raw)


def load_recipe(path: Path) -> Recipe:
    """Parse a YAML recipe; every problem is a SlimError naming the field."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SlimError(f"cannot read recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SlimError(f"recipe {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise SlimError(f"recipe {path} must be a YAML mapping")
    allowed = {"preset", "targets", "ignore", "weight", "act", "attention"}
    unknown = set(raw) - allowed
    if unknown:
        raise SlimError(f"recipe {path} has unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
    base = get_preset(raw["preset"]) if "preset" in raw else Recipe(path.stem, None)
    rec = replace(base, name=f"{path.name}")
    if "weight" in raw:
        rec = replace(rec, weight=_spec(raw["weight"], "weight"))
    if "act" in raw:
        rec = replace(rec, act=_spec(raw["act"], "act"))
    if "attention" in raw:
        rec = replace(rec, attention=_spec(raw["attention"], "attention"))
    if "targets" in raw:
        rec = replace(rec, targets=_patterns(raw["targets"], "targets"))
    if "ignore" in raw:
        rec = replace(rec, ignore=_patterns(raw["ignore"], "ignore"))
    if rec.weight is None and rec.act is None and rec.attention is None:
        raise SlimError(f"recipe {path} quantizes nothing: give it a preset, a weight or an act spec")
    return rec


def get_preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise SlimError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
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
        if isinstance(module, MatmulInput) and recipe.attention is not None:
            if _matches(name, module, recipe.ignore):
                skipped[name] = "ignored by the recipe"
            else:
                plan[name] = LayerPlan(weight=None, act=recipe.attention)
            continue
        if not isinstance(module, nn.Linear | nn.Conv2d) or not _matches(name, module, recipe.targets):
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
