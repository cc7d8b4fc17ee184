"""SmoothQuant and AWQ applied to a calibration scope (a block, or the whole model).

For each shared-input group of planned Linear layers (groups.py), a scale ``s`` is chosen on the
float scope (SmoothQuant: closed form; AWQ: grid search on the output of the smallest module
holding the group), ``W <- W s`` for every layer of the group, and ``1 / s`` is folded into the
group's producer when that is exact, or else kept as the layers' explicit ``inv_smooth``. Groups
are processed in execution order on the float scope, so each search sees the function it will
change. Then every layer is quantized (AWQ: with its clipping search), and swapped in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtorch.calib.groups import InputGroup, find_groups, fold_output_scale, scale_input_columns
from slimtorch.hooks import TemporaryHooks
from slimtorch.sequential import Inputs, ProcessScope, collect, first_tensor, run_scope, set_module
from slimtorch.calib.smoothing import InputStats, awq_search, clip_search, fake_scaled_weight, smoothquant_scales
from slimtorch.progress import Progress
from slimtorch.quant.modules import QuantLinear, quant_type_for, quantize_weight
from slimtorch.spec import Plan

# layers whose outputs form attention scores: AWQ's reference leaves their clipping alone
QK_NAMES = ("q_", "k_", "query", "key", "qkv")

# chooses s for a group: (model, scope, group, stats per layer, scope inputs) -> s (in,) or None
ChooseScale = Callable[[nn.Module, nn.Module, InputGroup, dict[str, InputStats], Inputs], torch.Tensor | None]


def _search_inputs(inputs: Inputs, rows: int) -> Inputs:
    """The first stored inputs holding at least ``rows`` rows (tokens, or image rows)."""
    out, n = [], 0
    for args, kwargs in inputs:
        out.append((args, kwargs))
        x = args[0]
        n += x.numel() // max(x.shape[-1], 1)
        if n >= rows:
            break
    return out


def _capture_calls(module: nn.Module, scope: nn.Module, inputs: Inputs) -> tuple[Inputs, list[torch.Tensor]]:
    """The (args, kwargs) ``module`` receives, and its outputs, when ``scope`` runs on ``inputs``."""
    calls, outs = [], []
    with TemporaryHooks() as hooks:
        hooks.before(module, lambda m, a, k: calls.append((a, k)), with_kwargs=True)
        hooks.after(module, lambda m, a, o: outs.append(first_tensor(o)))
        run_scope(scope, inputs)
    return calls, outs


def awq_choice(plan: Plan, grid: int = 20, search_rows: int = 8192) -> ChooseScale:
    def choose(model, scope, group, stats, inputs):
        inspect = model.get_submodule(group.inspect)
        calls, ref = _capture_calls(inspect, scope, _search_inputs(inputs, search_rows))
        mods = [model.get_submodule(n) for n in group.layers]
        originals = [m.weight.detach().clone() for m in mods]

        @torch.no_grad()
        def loss(s: torch.Tensor) -> float:
            try:
                for m, w, n in zip(mods, originals, group.layers):
                    m.weight.copy_(fake_scaled_weight(w, s, plan[n].weight))
                outs = [first_tensor(inspect(*a, **k)) for a, k in calls]
            finally:
                for m, w in zip(mods, originals):
                    m.weight.copy_(w)
            return sum((o.float() - r.float()).pow(2).sum().item() for o, r in zip(outs, ref)) / \
                max(sum(r.numel() for r in ref), 1)

        return awq_search(stats[group.layers[0]].absmean, loss, grid)[0]

    return choose


def smoothquant_choice(alpha: float = 0.5) -> ChooseScale:
    def choose(model, scope, group, stats, inputs):
        weights = torch.cat([model.get_submodule(n).weight.detach() for n in group.layers])
        return smoothquant_scales(stats[group.layers[0]].absmax, weights, alpha)

    return choose


def rescale_method(plan: Plan, choose: ChooseScale, clip: bool, notes: list[str]) -> ProcessScope:
    """A scope method: rescale each shared-input group by ``choose``, then quantize (with AWQ clipping if ``clip``)."""

    def process(model: nn.Module, scope: nn.Module, names: list[str], inputs: Inputs, progress: Progress) -> None:
        linear = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
        for n in names:  # convs: plain RTN
            if n not in linear:
                layer = model.get_submodule(n)
                set_module(model, n, quant_type_for(layer).from_float(layer, plan[n].weight, None))
        if not linear:
            return
        groups = find_groups(model, scope, linear, inputs)
        layers = {n: model.get_submodule(n) for n in linear}
        stats = collect(layers, InputStats, lambda: run_scope(scope, inputs, progress, "calibrating"))
        smooth: dict[str, torch.Tensor] = {}
        explicit: dict[str, torch.Tensor] = {}
        with TemporaryHooks() as hooks:  # explicit input multiplies, while later groups are searched
            for group in groups:
                if stats[group.layers[0]].n == 0:
                    continue
                s = choose(model, scope, group, stats, inputs)
                if s is None:
                    continue
                if group.producer is not None:
                    fold_output_scale(model.get_submodule(group.producer), 1.0 / s)
                else:
                    notes.append(f"{', '.join(group.layers)}: no module to fold the input scale into "
                                 f"(kept as an input multiply)")
                for n in group.layers:
                    scale_input_columns(layers[n], s)
                    smooth[n] = s
                    if group.producer is None:
                        explicit[n] = 1.0 / s
                        hooks.before(layers[n], lambda mod, args, inv=explicit[n]:
                                     (args[0] * inv.to(args[0].dtype), *args[1:]))
        for n, layer in layers.items():
            spec = plan[n].weight
            qparams = None
            if clip and stats[n].rows is not None and not any(k in n.rsplit(".", 1)[-1] for k in QK_NAMES):
                rows = stats[n].rows / smooth[n] if n in smooth else stats[n].rows
                clipped = clip_search(layer.weight, rows, spec)
                qparams = None if clipped is None else quantize_weight(layer.weight, spec, *clipped)
            q = QuantLinear.from_float(layer, spec, None, qparams)
            if n in explicit:
                q.inv_smooth = explicit[n]
            set_module(model, n, q)

    return process


