"""Post-training quantization: the ``PTQConfig`` family of ``apply_``, its methods, and ``quantize_``.

1. Turn the recipe (preset name, YAML file or Recipe) into a Plan for the model.
2. Run the method, which swaps the planned layers for quantized modules (rtn, gptq, ...).
3. Calibrate static activation quantizers: observers see the calibration set flowing through
   the already-quantized model (so each observes what it will see at inference), then freeze.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimtorch.api import Report, apply_, handler
from slimtorch.calib.gptq import Hessian, gptq_quantize
from slimtorch.calib.hqq import hqq_quantize
from slimtorch.calib.rescale import ChooseScale, awq_choice, rescale_method, smoothquant_choice
from slimtorch.errors import SlimError, shown
from slimtorch.progress import Progress, no_progress
from slimtorch.quant.modules import ActQuant, QuantWeight, quant_type_for
from slimtorch.quant.recipe import Recipe, build_plan, get_preset, load_recipe
from slimtorch.sequential import Batch, Stream, per_layer, sequential, set_module
from slimtorch.spec import Plan, QuantSpec


@dataclass(kw_only=True)
class QuantReport(Report):
    recipe: str
    method: str
    quantized: dict[str, str]  # layer -> "W:<dtype> A:<dtype>"
    skipped: dict[str, str]  # layer -> why it stayed in float
    bits_per_weight: float  # over every Linear/Conv2d weight, scales and zero-points included


def _each_weight(model: nn.Module, plan: Plan, progress: Progress, label: str,
                 fit: Callable[[str, nn.Module, QuantSpec], tuple | None]) -> None:
    """Quantize each planned weight on its own, with the qparams ``fit(name, layer, spec)`` gives (None: the
    spec's observer). A layer that is quantized already (a joint sparsity + quantization pass) is left as it is."""
    for name in progress(_weight_layers(plan), label):
        layer = model.get_submodule(name)
        if isinstance(layer, QuantWeight):
            continue
        spec = plan[name].weight
        set_module(model, name, quant_type_for(layer).from_float(layer, spec, None, fit(name, layer, spec)))


def rtn(model: nn.Module, plan: Plan, calib: list[Batch], progress: Progress, stream: Stream | None = None) -> list[str]:
    """Round-to-nearest: each planned layer's weight quantized on its own with its observer."""
    _each_weight(model, plan, progress, "rtn", lambda name, layer, spec: None)
    return []


def gptq(model: nn.Module, plan: Plan, calib: list[Batch], progress: Progress, stream: Stream | None = None,
         act_order: bool = True) -> list[str]:
    """GPTQ, block by block: each layer's Hessian comes from inputs that already went through the
    quantized layers before it. ``stream``: blocks streamed to a device and/or checkpointed (sequential)."""
    if not calib:
        raise SlimError("gptq needs calibration data")

    notes: list[str] = []

    def solve(name: str, layer: nn.Module, stats: Hessian) -> nn.Module:
        spec = plan[name].weight
        if stats.H is None:
            notes.append(f"{name}: grouped (depthwise) convolution, GPTQ does not apply; rounded to nearest"
                         if stats.grouped else f"{name}: received no calibration input; rounded to nearest")
            return quant_type_for(layer).from_float(layer, spec, None)
        w2 = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        qparams = gptq_quantize(w2, stats.H, spec, act_order=act_order)
        return quant_type_for(layer).from_float(layer, spec, None, qparams)

    sequential(model, _weight_layers(plan), calib, per_layer(Hessian, solve), progress, stream)
    return notes


def hqq(model: nn.Module, plan: Plan, calib: list[Batch], progress: Progress, stream: Stream | None = None) -> list[str]:
    """HQQ (calib.hqq): each planned weight fitted under an l_p error, with no data; fp8 weights and layers
    quantized already keep what rtn would give them."""
    notes = []

    def fit(name: str, layer: nn.Module, spec: QuantSpec) -> tuple | None:
        if spec.is_float:
            notes.append(f"{name}: {spec.dtype} has no zero-point for hqq to fit; rounded to nearest")
            return None
        r = hqq_quantize(layer.weight, spec)
        return r.codes, r.scale, r.zero

    _each_weight(model, plan, progress, "hqq", fit)
    return notes


def _reconstruction(window: int, overlap: int):
    def method(model: nn.Module, plan: Plan, calib: list[Batch], progress: Progress,
               stream: Stream | None = None) -> list[str]:
        from slimtorch.calib.cbq import cbq

        if stream is not None and (stream.device is not None or stream.checkpoints is not None):
            raise SlimError("cbq / blockrec run where the model is: no --device streaming or --resume yet")
        return cbq(model, plan, calib, progress, window=window, overlap=overlap)

    return method


def _weight_layers(plan: Plan) -> list[str]:
    return [n for n, p in plan.items() if p.weight is not None]


def _rescaling(name: str, choose: Callable[[Plan], ChooseScale], clip: bool):
    """A method that rescales shared-input groups (folded where exact), then quantizes, block by block."""

    def method(model: nn.Module, plan: Plan, calib: list[Batch], progress: Progress,
               stream: Stream | None = None) -> list[str]:
        if not calib:
            raise SlimError(f"{name} needs calibration data")
        notes: list[str] = []
        sequential(model, _weight_layers(plan), calib, rescale_method(plan, choose(plan), clip, notes), progress,
                   stream)
        return notes

    return method


def smoothquant(alpha: float = 0.5):
    """SmoothQuant with migration strength ``alpha``, then RTN weights."""
    return _rescaling("smoothquant", lambda plan: smoothquant_choice(alpha), clip=False)


def awq(grid: int = 20):
    """AWQ: activation-aware scale search per shared-input group, clipping search, then the weights."""
    return _rescaling("awq", lambda plan: awq_choice(plan, grid), clip=True)


METHODS: dict[str, Callable[..., list[str]]] = {  # (model, plan, calib, progress, stream=None) -> notes
    "rtn": rtn, "gptq": gptq, "smoothquant": smoothquant(), "awq": awq(), "hqq": hqq,
    "cbq": _reconstruction(window=2, overlap=1), "blockrec": _reconstruction(window=1, overlap=0),
}


RESUMABLE = ("gptq", "awq", "smoothquant")
"""Methods that run block by block through ``sequential`` and so may stream blocks to a device and resume."""


def resolve_recipe(recipe: Recipe | str | Path) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Path) or str(recipe).endswith((".yaml", ".yml")):
        return load_recipe(Path(recipe))
    return get_preset(str(recipe))


@torch.no_grad()
def run_batches(model: nn.Module, calib: list[Batch], progress: Progress, description: str) -> None:
    for batch in progress(calib, description):
        model(*batch)


def calibrate_activations(model: nn.Module, calib: list[Batch], progress: Progress = no_progress,
                          quantizers: list[ActQuant] | None = None) -> int:
    """Observe every static ActQuant (or those of ``quantizers``) over ``calib``, then freeze them. Returns how
    many were calibrated."""
    static = [m for m in (model.modules() if quantizers is None else quantizers)
              if isinstance(m, ActQuant) and not m.spec.dynamic]
    if not static:
        return 0
    if not calib:
        raise SlimError("this recipe has static activation quantizers: it needs calibration data")
    for m in static:
        m.start_observing()
    run_batches(model, calib, progress, "calibrating activations")
    for m in static:
        m.freeze()
    return len(static)


def weight_bits(model: nn.Module) -> float:
    """Average stored bits per weight element over all Linear/Conv2d layers (float ones at 32)."""
    bits = elems = 0
    for m in model.modules():
        if isinstance(m, QuantWeight):
            n = m.qweight.numel()
            overhead = 32 * m.w_scale.numel() * (1 if m.wspec.symmetric else 2)
            bits, elems = bits + m.wspec.bits * n + overhead, elems + n
        elif isinstance(m, nn.Linear | nn.Conv2d):
            bits, elems = bits + 32 * m.weight.numel(), elems + m.weight.numel()
    return bits / max(elems, 1)


def quantize_plan_(model: nn.Module, plan: Plan, calib: list[Batch], method: str = "rtn",
                   progress: Progress = no_progress, stream: Stream | None = None) -> list[str]:
    """Quantize ``model`` in place by an explicit Plan (layer name -> LayerPlan): the method quantizes the
    weights, then the input quantizers go in and are calibrated. Returns the method's notes."""
    check_method(method)
    model.eval()
    notes = METHODS[method](model, plan, calib, progress, stream=stream)
    for name, p in plan.items():  # methods quantize weights; activation quantizers go in afterwards
        if p.act is not None and p.weight is None:  # a MatmulInput point becomes the quantizer
            set_module(model, name, ActQuant(p.act))
        elif p.act is not None:
            model.get_submodule(name).act = ActQuant(p.act)
    calibrate_activations(model, calib, progress)
    return notes


def check_method(method: str) -> None:
    if method not in METHODS:
        raise SlimError(f"unknown method {shown(method)}; choose one of: {', '.join(METHODS)}")


@dataclass(frozen=True)
class PTQConfig:
    """Post-training quantization: ``recipe`` (a preset name such as ``W8A8`` or ``W4A16-g128``, a YAML
    recipe path, or a Recipe; resolved when the config is made) by ``method`` (a key of ``METHODS``).
    ``stream``: how the layer-by-layer methods run, not what they compute (sequential.Stream: each block on
    a device in turn, finished blocks checkpointed for resuming)."""

    recipe: Recipe | str | Path
    method: str = "rtn"
    stream: Stream | None = None

    def __post_init__(self) -> None:
        check_method(self.method)
        object.__setattr__(self, "recipe", resolve_recipe(self.recipe))


@handler(PTQConfig, "quantize")
def _apply_ptq(model: nn.Module, config: PTQConfig, calib: list[Batch], progress: Progress) -> QuantReport:
    rec = config.recipe
    plan, skipped = build_plan(model, rec)
    if not plan and rec.weight is None:
        raise SlimError(f"recipe {rec.name} quantizes only attention inputs, and this model has no MatmulInput "
                        f"points (attention Q/K/V and softmax inputs): nothing to quantize")
    if not plan:
        raise SlimError(f"recipe {rec.name} matches no quantizable layer of this model (targets {list(rec.targets)})")
    method_notes = quantize_plan_(model, plan, calib, config.method, progress, config.stream)
    quantized = {n: f"W:{p.weight.dtype if p.weight else '-'} A:{p.act.dtype if p.act else '-'}" for n, p in plan.items()}
    notes = [] if (rec.attention is None and rec.kv_cache is None) or any(p.weight is None for p in plan.values()) else [
        "the recipe quantizes attention, but this model has no MatmulInput points (attention Q/K/V and "
        "softmax inputs): only its layers were quantized"]
    notes += [f"{n}: a conv input has no tokens, so its activations use one scale per call (per tensor)"
             for n, p in plan.items() if p.weight is not None and p.act is not None and rec.act is not None
             and p.act != rec.act]
    notes += list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", note) for note in method_notes))  # once per block kind
    return QuantReport(recipe=rec.name, method=config.method, quantized=quantized, skipped=skipped,
                       bits_per_weight=weight_bits(model), notes=notes)


def quantize_(model: nn.Module, recipe: Recipe | str | Path, calib: list[Batch] | None = None,
              method: str = "rtn", progress: Progress = no_progress, stream: Stream | None = None) -> QuantReport:
    """Quantize ``model`` in place: the shorthand of ``apply_(model, PTQConfig(recipe, method), calib)``.

    Args:
        model: a float model in eval mode.
        recipe: a preset name (``W8A8``, ``W4A16-g128``, ...), a YAML recipe path, or a Recipe.
        calib: calibration batches (tuples of forward arguments); needed by static activations
            and by data-driven methods.
        method: a key of ``METHODS`` (``rtn``, ``gptq``, ``awq``, ``smoothquant``, ``hqq``).
        stream: blocks run one at a time on a device and/or are checkpointed (``sequential.Stream``).
    """
    return apply_(model, PTQConfig(recipe, method, stream), calib, progress)
