"""Layer-by-layer calibration with bounded memory.

The model's repeated blocks (the largest ``nn.ModuleList`` holding planned layers: transformer
layers, ViT blocks) are calibrated one at a time: the inputs of block 0 are captured once, each
block then runs on the stored inputs with hooks collecting statistics for its layers, its layers
are quantized, and the block runs again to produce the (now quantized) inputs of the next block.
Only one block's inputs are held at a time. Planned layers outside the blocks (stems, heads, a
model with no block list) are handled first, in one pass of the whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtorch.calib.data import Batch
from slimtorch.progress import Progress
from slimtorch.quant.modules import set_module

# a per-layer solver: (layer name, layer, statistics) -> replacement module
Solver = Callable[[str, nn.Module, object], nn.Module]
# makes the statistics object for a layer and feeds it inputs: (layer) -> object with .add(x)
StatsFactory = Callable[[nn.Module], object]


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module, names: set[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` with the most planned layers below it (at least two blocks), or None."""
    best, best_count = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
            count = sum(1 for n in names if n.startswith(f"{name}."))
            if count > best_count:
                best, best_count = (name, mod), count
    return best


def _collect(layers: dict[str, nn.Module], make_stats: StatsFactory, run: Callable[[], None]):
    stats = {n: make_stats(m) for n, m in layers.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, s=stats[n]: s.add(args[0]))
               for n, m in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return stats


def sequential_calibrate(model: nn.Module, names: list[str], calib: list[Batch], make_stats: StatsFactory,
                         solve: Solver, progress: Progress) -> None:
    """Replace each layer in ``names`` by ``solve(name, layer, stats)``, block by block."""
    blocks = find_blocks(model, set(names))
    prefix = f"{blocks[0]}." if blocks else None
    outside = {n: model.get_submodule(n) for n in names if prefix is None or not n.startswith(prefix)}
    if outside:
        def full() -> None:
            for batch in progress(calib, "calibrating (whole model)"):
                model(*batch)
        stats = _collect(outside, make_stats, full)
        for n, layer in outside.items():
            set_module(model, n, solve(n, layer, stats[n]))
    if blocks is None:
        return
    list_name, block_list = blocks
    inputs: list[tuple[tuple, dict]] = []

    def catch(mod, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    handle = block_list[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in calib:
                try:
                    model(*batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    for i in progress(range(len(block_list)), "calibrating blocks"):
        block, bname = block_list[i], f"{list_name}.{i}"
        layers = {n: model.get_submodule(n) for n in names if n.startswith(f"{bname}.")}

        def run_block() -> None:
            for args, kwargs in inputs:
                block(*args, **kwargs)

        if layers:
            stats = _collect(layers, make_stats, run_block)
            for n, layer in layers.items():
                set_module(model, n, solve(n, layer, stats[n]))
        with torch.no_grad():
            outs = [block(*args, **kwargs) for args, kwargs in inputs]
        inputs = [((o[0] if isinstance(o, tuple) else o, *args[1:]), kwargs) for o, (args, kwargs) in zip(outs, inputs)]
