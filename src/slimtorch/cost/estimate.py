"""Roofline cost of a whole model under a Plan, on a chip: per layer and in total.

The layer shapes come from one probe forward pass (hooks record each Linear/Conv2d's input and
output shapes, and the Q/K shapes at attention's MatmulInput points); counts are then scaled to the
workload. Language models get two phases: ``prefill`` (``batch x tokens`` rows through every
layer, causal attention over the prompt) and ``decode`` (one token per sequence, attention over a
``context``-token KV cache); other models one ``forward`` phase at ``batch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimtorch.cost.hardware import Hardware
from slimtorch.cost.roofline import LayerCost, attention_cost, conv2d_cost, kv_cache_bytes, linear_cost
from slimtorch.hooks import TemporaryHooks
from slimtorch.quant.modules import MatmulInput
from slimtorch.spec import Plan


@dataclass
class PhaseCost:
    phase: str  # prefill | decode | forward
    hardware: str
    layers: list[LayerCost]
    kv_cache_bytes: float = 0.0
    notes: list[str] = field(default_factory=list)

    def total(self, hw: Hardware) -> dict[str, float]:
        t = sum(c.time(hw) for c in self.layers)
        return {"flops": sum(c.flops for c in self.layers), "bytes": sum(c.bytes for c in self.layers),
                "time_s": t, "memory_bound_time_s": sum(c.time(hw) for c in self.layers if c.bound(hw) == "memory")}


def lm_attention_shape(model: nn.Module) -> tuple[int, int, int, int] | None:
    """(layers, heads, kv heads, head dim) of our TinyLlama or a transformers decoder; None otherwise."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "n_kv_heads"):
        return cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    c = getattr(model, "config", None)
    if c is not None and hasattr(c, "num_attention_heads") and hasattr(c, "num_hidden_layers"):
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        hd = getattr(c, "head_dim", None) or c.hidden_size // heads
        return c.num_hidden_layers, heads, kv, hd
    return None


def _probe(model: nn.Module, example: tuple) -> tuple[list[tuple[str, nn.Module, tuple, tuple]], list[tuple]]:
    """Each Linear/Conv2d (float or quantized) with its input and output shapes, and each attention's
    (Q shape, K shape) from its q_in/k_in points, from one forward pass."""
    return trace(model, lambda: model.eval()(*example))


@torch.no_grad()
def trace(model: nn.Module, run) -> tuple[list[tuple[str, nn.Module, tuple, tuple]], list[tuple]]:
    """What :func:`_probe` records, over every call that ``run()`` makes of ``model``'s layers (a sampling
    loop calls each many times, a cached step only some)."""
    from slimtorch.quant.modules import QuantConv2d, QuantLinear

    seen, qk = [], {}
    with TemporaryHooks() as hooks:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear | nn.Conv2d | QuantLinear | QuantConv2d):
                hooks.after(m, lambda mod, a, o, name=name: seen.append((name, mod, tuple(a[0].shape),
                                                                         tuple(o.shape))))
            elif isinstance(m, MatmulInput) and name.endswith(("q_in", "k_in")):
                parent = name.rsplit(".", 1)[0]
                hooks.after(m, lambda mod, a, o, key=(parent, name[-4:]): qk.__setitem__(key, tuple(o.shape)))
        run()
    attn = [(p, qk[(p, "q_in")], qk[(p, "k_in")]) for p, kind in qk if kind == "q_in" and (p, "k_in") in qk]
    return seen, attn


def layer_costs(seen, plan: Plan, rows_scale: float) -> list[LayerCost]:
    out = []
    for name, mod, ishape, oshape in seen:
        p = plan.get(name)
        w, a = (p.weight, p.act) if p is not None else (None, None)
        if len(oshape) == 4:  # conv: (B, C, H, W); scale the batch
            wshape = getattr(mod, "weight_shape", None) or tuple(mod.weight.shape)
            groups = mod.groups
            batch = max(1, round(ishape[0] * rows_scale))
            out.append(conv2d_cost(name, batch, ishape[1], oshape[1], tuple(wshape[2:]), groups, ishape[2:],
                                   oshape[2:], w, a))
        else:
            k, n = ishape[-1], oshape[-1]
            rows = max(1, round(torch.Size(ishape[:-1]).numel() * rows_scale))
            out.append(linear_cost(name, rows, k, n, w, a))
    return out


def estimate(model: nn.Module, plan: Plan, example: tuple, hw: Hardware, batch: int = 1, tokens: int = 512,
             context: int = 512) -> list[PhaseCost]:
    """Phases of ``model`` (quantized per ``plan``; layers not in it in bf16) on ``hw``.

    ``example``: the probe input (a language model: token ids ``(1, T0)``; others: a batch of one).
    """
    seen, attn = _probe(model, example)
    lm = lm_attention_shape(model)
    if lm is None:
        layers = layer_costs(seen, plan, batch / example[0].shape[0])
        for parent, q, k in attn:  # (B, H, Tq, D), (B, KV, Tk, D)
            layers.append(attention_cost(f"{parent}.sdpa", batch, q[1], k[1], q[-1], q[2], k[2], causal=False))
        notes = [] if attn else ["no attention points (MatmulInput) found: any attention matmul is not counted"]
        return [PhaseCost("forward", hw.name, layers, notes=notes)]
    n_layers, heads, kv, hd = lm
    t0 = example[0].shape[1]
    phases = []
    for phase, rows, q_len in (("prefill", batch * tokens, tokens), ("decode", batch, 1)):
        layers = layer_costs(seen, plan, rows / (example[0].shape[0] * t0))
        kv_len = tokens if phase == "prefill" else context
        layers += [attention_cost(f"layers.{i}.sdpa", batch, heads, kv, hd, q_len, kv_len) for i in range(n_layers)]
        cache = kv_cache_bytes(n_layers, batch, kv, hd, tokens if phase == "prefill" else context)
        phases.append(PhaseCost(phase, hw.name, layers, cache, ["embedding lookups are not counted"]))
    return phases
