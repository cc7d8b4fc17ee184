"""Coupled-channel groups found from the autograd graph of one forward pass.

Why the autograd graph: it records every operation between layers, whatever code the model runs (our zoo's
modules, transformers' classes, functional calls), without tracing Python (torch.fx breaks on much of it).

A *channel group* is a set of layers that share one channel dimension and can lose channel j together while
the model stays a correct dense model, only narrower:

* producers: Linear / Conv (groups=1) layers whose output channel j is the group's channel j;
* consumers: Linear / Conv (groups=1) layers whose input channel j is the group's channel j;
* members: per-channel layers on the way (BatchNorm, LayerNorm over the channels, depthwise Conv), sliced too.

Between them only channel-wise operations may stand: activations, dropout, products and sums of coupled
tensors (a gated MLP's ``silu(gate) * up``; a residual ``conv2(x) + shortcut(x)``, which couples every layer
that writes to or reads from the residual stream of a CNN stage), pooling over space, a flatten of a 1x1 map.
Any other reader of a group's tensors (a reshape into attention heads, a concatenation, the model's output,
the model's input, a parameter added on the way) makes the set not a group; the graph is searched from every
consumer, and what is not a group is left alone. Attention heads are pruned by their own rule (heads.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.hooks import TemporaryHooks
from slimtorch.sequential import first_tensor

# autograd nodes that act channel by channel on their channel-carrying inputs (the others are constants)
CHANNELWISE = {"GeluBackward0", "SiluBackward0", "ReluBackward0", "MulBackward0", "TanhBackward0",
               "SigmoidBackward0", "NativeDropoutBackward0", "CloneBackward0", "ToCopyBackward0", "DivBackward0",
               "LeakyReluBackward0", "HardswishBackward0", "EluBackward0", "PowBackward0", "AddBackward0",
               "SubBackward0", "HardtanhBackward0", "Relu6Backward0", "HardsigmoidBackward0",
               # per channel over space (NCHW)
               "AdaptiveAvgPool2DBackward0", "AvgPool2DBackward0", "MaxPool2DWithIndicesBackward0"}
# allowed only in the shapes of a global pool and the flatten after it (``_reshape_ok``)
RESHAPES = {"MeanBackward1", "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"}


def _reshape_ok(node) -> int | None:
    """The channel count of a global average pool over (N, C, H, W)'s space or of a flatten of (N, C, 1, 1);
    None for any other mean or reshape (which may mix or move channels)."""
    sizes = tuple(getattr(node, "_saved_self_sym_sizes", ()))
    if len(sizes) < 2:
        return None
    if type(node).__name__ == "MeanBackward1":
        dims = {d - 2**64 if d >= 2**63 else d for d in node._saved_dim}
        return sizes[1] if {d % len(sizes) for d in dims} == set(range(2, len(sizes))) and dims else None
    return sizes[1] if all(s == 1 for s in sizes[2:]) else None


@dataclass(frozen=True)
class ChannelGroup:
    producers: tuple[str, ...]  # layers whose output channel j is channel j
    consumers: tuple[str, ...]  # layers whose input channel j is channel j
    members: tuple[str, ...]  # per-channel layers on the way (norms, depthwise convs)
    width: int  # channels

    @property
    def name(self) -> str:
        return self.consumers[0]

    def channels(self, layer: str, units: torch.Tensor) -> torch.Tensor:
        """The channels of ``layer`` that ``units`` own: here a unit is one channel."""
        return units

    def per_unit(self, layer: str, per_channel: torch.Tensor) -> torch.Tensor:
        return per_channel


def _is_dense(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.groups == 1)


def _is_member(m: nn.Module) -> bool:
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        return True
    if isinstance(m, nn.LayerNorm):
        return len(m.normalized_shape) == 1
    return isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.groups == m.in_channels == m.out_channels > 1


def out_width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def member_width(m: nn.Module) -> int:
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[0]
    return m.num_features if hasattr(m, "num_features") else m.out_channels


def _graph(root) -> dict:
    """node -> the nodes that read it, over the graph reachable from ``root``."""
    readers: dict = {}
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                readers.setdefault(nxt, []).append(node)
                stack.append(nxt)
    return readers


def _inside(out_node, in_node) -> set:
    """The autograd nodes of one layer call: from its output back to (not including) its input."""
    found, stack = set(), [out_node]
    while stack:
        node = stack.pop()
        if node is None or node in found or node is in_node or type(node).__name__ == "AccumulateGrad":
            continue
        found.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return found


@contextmanager
def requires_grad_only(model: nn.Module, params) -> Iterator[None]:
    """Within: only ``params`` of ``model`` require gradients; after: every parameter as it was."""
    params = list(params)
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, r in was.items():
            p.requires_grad_(r)


def channel_groups(model: nn.Module, example: tuple) -> list[ChannelGroup]:
    """The channel groups of ``model`` (module docstring), from one forward pass on ``example``."""
    calls: dict[str, tuple] = {}  # layer name -> (input node, output node); the last call if several
    layers = {n: m for n, m in model.named_modules() if _is_dense(m) or _is_member(m)}
    called: dict[str, int] = {}
    with TemporaryHooks() as hooks, torch.enable_grad():
        def record(name: str, a: tuple, o: torch.Tensor) -> None:
            calls[name] = (a[0].grad_fn if torch.is_tensor(a[0]) else None, o.grad_fn)
            called[name] = called.get(name, 0) + 1

        for name, m in layers.items():
            hooks.after(m, lambda mod, a, o, name=name: record(name, a, o))
        with requires_grad_only(model, model.parameters()):
            out = model(*example)
    root = first_tensor(out).grad_fn
    readers = _graph(root)
    # a layer called more than once (shared weights) is left out of every group
    calls = {n: c for n, c in calls.items() if called[n] == 1 and c[1] is not None}
    producer_of = {c[1]: n for n, c in calls.items() if _is_dense(layers[n])}
    member_of = {c[1]: n for n, c in calls.items() if _is_member(layers[n])}
    consumers_of: dict = {}  # input node -> dense layers reading it
    inside: dict = {}  # node -> the dense layer whose call it belongs to
    member_inside: dict = {}  # node -> the member whose call it belongs to (its output, a padding before it)
    for n, (i, o) in calls.items():
        if _is_dense(layers[n]):
            consumers_of.setdefault(i, []).append(n)
            for node in _inside(o, i):
                inside[node] = n
        else:
            for node in _inside(o, i):
                member_inside[node] = n

    groups, done = [], set()
    for start in sorted(n for n in calls if _is_dense(layers[n])):
        if start in done or calls[start][0] is None:
            continue
        prods, cons, mems, ok = set(), {start}, set(), True
        nodes, stack = set(), [calls[start][0]]
        widths = {in_width(layers[start])}
        while ok and stack:
            cur = stack.pop()
            if cur is None or cur is root:
                ok = False  # the model's input or output carries the channels
                break
            if cur in nodes:
                continue
            nodes.add(cur)
            # backwards: what made this tensor
            if cur in producer_of:
                prods.add(producer_of[cur])
                widths.add(out_width(layers[producer_of[cur]]))
            elif cur in member_of:
                mems.add(member_of[cur])
                widths.add(member_width(layers[member_of[cur]]))
                stack.append(calls[member_of[cur]][0])
            elif type(cur).__name__ in CHANNELWISE or type(cur).__name__ in RESHAPES:
                if type(cur).__name__ in RESHAPES:
                    c = _reshape_ok(cur)
                    if c is None:
                        ok = False
                        break
                    widths.add(c)
                for nxt, _ in cur.next_functions:
                    if nxt is None:
                        continue
                    if type(nxt).__name__ == "AccumulateGrad":
                        if nxt.variable.numel() > 1:  # a parameter with channels (a scale, an embedding)
                            ok = False
                    else:
                        stack.append(nxt)
            else:
                ok = False
                break
            # forwards: who reads it
            dense_readers = set(consumers_of.get(cur, []))
            for r in readers.get(cur, []):
                if r in inside and inside[r] in dense_readers:
                    cons.add(inside[r])
                    widths.add(in_width(layers[inside[r]]))
                elif type(r).__name__ in CHANNELWISE or type(r).__name__ in RESHAPES:
                    stack.append(r)
                elif r in member_inside and calls[member_inside[r]][0] is cur:  # a member's first op (its
                    stack.append(calls[member_inside[r]][1])  # output node, or a padding before a conv)
                else:
                    ok = False
        done |= cons
        if ok and prods and len(widths) == 1:
            groups.append(ChannelGroup(tuple(sorted(prods)), tuple(sorted(cons)), tuple(sorted(mems)),
                                       widths.pop()))
    return groups
