"""The layer-by-layer pipeline, with bounded memory, for any family that "gathers statistics of each
layer's inputs, then solves per layer" (GPTQ, AWQ, SmoothQuant, SparseGPT, Wanda, ...).

The model's repeated blocks (the largest ``nn.ModuleList`` holding the named layers: transformer
layers, ViT blocks) are processed one at a time: the inputs of block 0 are captured once, each
block is then handed to the family's ``process`` together with its stored inputs (a *scope*),
``process`` replaces or edits its layers (quantized, pruned, ...), and the block runs again to
produce the (now compressed) inputs of the next block. Only one block's inputs are held at a time.
Named layers outside the blocks (stems, heads, a model with no block list) form one scope first:
the whole model, run on the calibration batches.

Nothing here knows what the layers become: that is the ``solve`` of :func:`per_layer` or the
family's own ``process``.

:class:`Stream` says how the blocks run. ``device``: the model stays where it is (the CPU, for a model larger
than the GPU) and each block moves to ``device`` for its statistics, its solve and its run on the stored
inputs, then back; the stored inputs live on ``device``. Peak device memory is about one block plus the
calibration inputs and the layers outside the blocks (embeddings, final norm), which move there only for
the capture of block 0's inputs. ``checkpoints``: after each block, the finished block is saved; a later
run with the same checkpoints rebuilds the finished blocks from their files instead of solving them again,
runs them to recreate the inputs of the next one, and goes on from there (an interrupted calibration
resumes at its last finished block; the result is the same as an uninterrupted run's, as rebuilt blocks
compute exactly what the solved ones did).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from slimtorch.hooks import TemporaryHooks
from slimtorch.progress import Progress, no_progress

Batch = tuple[torch.Tensor, ...]  # the forward arguments of one calibration batch
# stored inputs of a scope: (args, kwargs) per call
Inputs = list[tuple[tuple, dict]]
# a method's work on one scope: (model, scope module, planned layer names in it, its inputs, progress)
ProcessScope = Callable[[nn.Module, nn.Module, list[str], Inputs, Progress], None]
# a per-layer solver: (layer name, layer, statistics) -> replacement module
Solver = Callable[[str, nn.Module, object], nn.Module]
# makes the statistics object for a layer and feeds it inputs: (layer) -> object with .add(x)
StatsFactory = Callable[[nn.Module], object]


class _Stop(Exception):
    pass


class BlockStore(Protocol):
    """Finished blocks of one run (slimtorch.export.block_checkpoint.BlockCheckpoints)."""

    def has(self, index: int) -> bool: ...

    def save(self, index: int, block: nn.Module) -> None: ...

    def load(self, index: int, block: nn.Module) -> None: ...


@dataclass(frozen=True)
class Stream:
    """How :func:`sequential` runs the blocks (module docstring): on ``device`` one at a time, and/or saved
    to and resumed from ``checkpoints``."""

    device: torch.device | str | None = None
    checkpoints: BlockStore | None = None


def _to(value, device):
    """Tensors in ``value`` (nested tuples, lists and dicts too) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _move_outside(model: nn.Module, prefix: str, device) -> dict[str, torch.device]:
    """Move the parameters and buffers of ``model`` outside the blocks (``prefix``) to ``device``; returns
    where each module's tensors were, to move them back."""
    were = {}
    for name, mod in model.named_modules():
        if name == prefix[:-1] or name.startswith(prefix):
            continue
        own = [t for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)) if t is not None]
        if own:
            were[name] = own[0].device
            mod._apply(lambda t: t.to(device), recurse=False)
    return were


def find_blocks(model: nn.Module, names: set[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` with the most planned layers below it (at least two blocks), or None."""
    best, best_count = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
            count = sum(1 for n in names if n.startswith(f"{name}."))
            if count > best_count:
                best, best_count = (name, mod), count
    return best


@torch.no_grad()
def run_scope(scope: nn.Module, inputs: Inputs, progress: Progress = no_progress, description: str = "") -> list:
    """Run ``scope`` on each stored input; returns the outputs."""
    return [scope(*args, **kwargs) for args, kwargs in progress(inputs, description)]


def advance(block: nn.Module, inputs: Inputs) -> Inputs:
    """The inputs of the block after ``block``: its outputs on ``inputs``, with their other arguments."""
    outs = run_scope(block, inputs)
    return [((first_tensor(o), *args[1:]), kwargs) for o, (args, kwargs) in zip(outs, inputs)]


def first_tensor(out) -> torch.Tensor:
    """The main tensor of a module output (a tensor, a tuple's first item, a transformers ModelOutput)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def collect(layers: dict[str, nn.Module], make_stats: StatsFactory, run: Callable[[], object]) -> dict[str, object]:
    """Statistics of each layer's input over ``run()``."""
    stats = {n: make_stats(m) for n, m in layers.items()}
    shared: dict = {}  # statistics that take ``products`` share the work on an input several layers read
    for s in stats.values():
        if hasattr(s, "products"):
            s.products = shared
    with TemporaryHooks() as hooks, torch.no_grad():
        for n, m in layers.items():
            hooks.before(m, lambda mod, args, s=stats[n]: s.add(args[0]))
        run()
    shared.clear()
    return stats


def per_layer(make_stats: StatsFactory, solve: Solver) -> ProcessScope:
    """A scope method that replaces each layer by ``solve(name, layer, stats of its inputs)``."""

    def process(model: nn.Module, scope: nn.Module, names: list[str], inputs: Inputs, progress: Progress) -> None:
        layers = {n: model.get_submodule(n) for n in names}
        stats = collect(layers, make_stats, lambda: run_scope(scope, inputs, progress, "calibrating"))
        for n, layer in layers.items():
            set_module(model, n, solve(n, layer, stats[n]))

    return process


def sequential(model: nn.Module, names: list[str], calib: list[Batch], process: ProcessScope,
               progress: Progress = no_progress, stream: Stream | None = None) -> None:
    """Hand each scope (layers ``names`` outside the blocks with the whole model, then each block, with
    the inputs it receives from the already-processed blocks before it) to ``process``. ``stream``: see
    :class:`Stream` (the scope outside the blocks runs where the model is)."""
    stream = stream or Stream()
    blocks = find_blocks(model, set(names))
    prefix = f"{blocks[0]}." if blocks else None
    outside = [n for n in names if prefix is None or not n.startswith(prefix)]
    if outside:
        process(model, model, outside, [(tuple(b), {}) for b in calib], progress)
    if blocks is None:
        return
    list_name, block_list = blocks
    dev = stream.device
    inputs = block_inputs(model, blocks, calib, dev)
    store = stream.checkpoints
    for i in progress(range(len(block_list)), "block by block"):
        block, bname = block_list[i], f"{list_name}.{i}"
        home = next((t.device for t in (*block.parameters(), *block.buffers())), None)
        if dev is not None:
            block.to(dev)
        layers = [n for n in names if n.startswith(f"{bname}.")]
        if layers and store is not None and store.has(i):
            store.load(i, block)  # rebuilt modules come from the file on the CPU: back where the block runs
            if dev is not None or home is not None:
                block.to(dev if dev is not None else home)
        elif layers:
            process(model, block, layers, inputs, no_progress)
            if store is not None:
                store.save(i, block)
        inputs = advance(block, inputs)
        if dev is not None and home is not None:
            block.to(home)


def block_inputs(model: nn.Module, blocks: tuple[str, nn.ModuleList], calib: list[Batch], device=None) -> Inputs:
    """The inputs (args, kwargs) that the first of ``blocks`` (from :func:`find_blocks`) receives for each
    calibration batch; the model runs only up to it. ``device``: run the layers before the blocks there."""
    list_name, block_list = blocks
    inputs: Inputs = []

    def catch(mod, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    were = _move_outside(model, f"{list_name}.", device) if device is not None else {}
    try:
        with TemporaryHooks() as hooks, torch.no_grad():
            hooks.before(block_list[0], catch, with_kwargs=True)
            for batch in calib:
                try:
                    model(*(_to(batch, device) if device is not None else batch))
                except _Stop:
                    pass
    finally:
        for name, where in were.items():
            model.get_submodule(name)._apply(lambda t, w=where: t.to(w), recurse=False)
    return inputs


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
