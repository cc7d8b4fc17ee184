"""Coupled-neuron groups found from the autograd graph of one forward pass.

Why the autograd graph: it records every operation between layers, whatever code the model runs (our zoo's
modules, transformers' classes, functional calls), without tracing Python (torch.fx breaks on much of it).
A *neuron group* is a set of producer Linears whose outputs reach one consumer Linear's input only through
elementwise operations (activations, dropout, a gate product), with nothing else reading them: channel j
of every producer and input column j of the consumer can then go together, and the model stays a correct
dense model, only narrower. That is the MLP of a transformer (fc1 -> GELU -> fc2; gate, up -> SiLU x ->
down) and of most other networks. Paths through residual additions, concatenations, norms or reshapes are
not groups (they couple channels across layers and need their own rules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.hooks import TemporaryHooks
from slimtorch.sequential import first_tensor

# autograd nodes that act element by element on one channel-carrying input (others may be constants)
ELEMENTWISE = {"GeluBackward0", "SiluBackward0", "ReluBackward0", "MulBackward0", "TanhBackward0",
               "SigmoidBackward0", "NativeDropoutBackward0", "CloneBackward0", "ToCopyBackward0", "DivBackward0",
               "LeakyReluBackward0", "HardswishBackward0", "EluBackward0", "PowBackward0"}


@dataclass(frozen=True)
class NeuronGroup:
    producers: tuple[str, ...]  # Linears whose output channel j is neuron j
    consumer: str  # the Linear whose input column j is neuron j
    width: int  # neurons


def _consumers(root) -> dict:
    """node -> number of nodes that take it as an input, over the graph reachable from ``root``."""
    count: dict = {}
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                count[nxt] = count.get(nxt, 0) + 1
                stack.append(nxt)
    return count


def neuron_groups(model: nn.Module, example: tuple) -> list[NeuronGroup]:
    """The neuron groups of ``model`` (module docstring), from one forward pass on ``example``."""
    out_node: dict = {}  # autograd node of a Linear's output -> its name
    in_node: dict[str, object] = {}  # Linear name -> the node that produced its input
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with TemporaryHooks() as hooks, torch.enable_grad():
        def record(name: str, a: tuple, o: torch.Tensor) -> None:
            out_node[o.grad_fn] = name
            in_node[name] = a[0].grad_fn

        for name, m in linears.items():
            hooks.after(m, lambda mod, a, o, name=name: record(name, a, o))
        was = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            out = model(*example)
        finally:
            for p, r in was.items():
                p.requires_grad_(r)
    uses = _consumers(first_tensor(out).grad_fn)
    groups = []
    for consumer, node in in_node.items():
        producers, ok, stack, seen = [], node is not None, [node], set()
        while ok and stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            if uses.get(cur, 0) != 1:  # read by something else too (a residual, another layer)
                ok = False
            elif cur in out_node:
                producers.append(out_node[cur])
            elif type(cur).__name__ in ELEMENTWISE:
                stack.extend(n for n, _ in cur.next_functions if n is not None and type(n).__name__ != "AccumulateGrad")
            else:
                ok = False
        width = linears[consumer].in_features
        if ok and producers and all(linears[p].out_features == width for p in producers):
            groups.append(NeuronGroup(tuple(sorted(producers)), consumer, width))
    return groups
