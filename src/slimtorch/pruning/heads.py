"""Attention heads as prunable units: a head group is one attention layer whose unit is a key/value head with
the query heads that read it (grouped-query attention keeps its query-per-KV ratio), or one head of plain
multi-head attention.

Why its own rule: the channels of q, k, v and the output projection are coupled through reshapes into heads,
the attention matmuls and RoPE, which the channel-group search (graph.py) rightly refuses. Heads are found by
layout instead, for the two layouts in use:

* separate ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` Linears (Llama-family: ours and transformers'),
  with ``head_dim`` (or ``hd``) on the module;
* one fused ``qkv`` Linear laid out as (3, heads, head_dim) and a ``proj`` (the zoo's ViT), with ``heads``.

The attention code must infer the number of heads from the projections' widths or read it from the module
attributes that ``set_heads_`` updates (``n_heads``/``num_heads``/``heads``, ``n_kv``/``num_key_value_heads``);
a transformers model's shared config is updated too, with ``head_dim`` made explicit so that it survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Q_ATTRS = ("n_heads", "num_heads", "heads", "num_attention_heads")
KV_ATTRS = ("n_kv", "n_kv_heads", "num_key_value_heads")


@dataclass(frozen=True)
class HeadGroup:
    attention: str  # the attention module
    producers: tuple[str, ...]  # q, k, v (or the fused qkv)
    consumers: tuple[str, ...]  # the output projection
    width: int  # units: KV heads (each with its query heads)
    head_dim: int
    q_per_kv: int
    fused: bool
    members: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.attention

    def channels(self, layer: str, units: torch.Tensor) -> torch.Tensor:
        """The channels of ``layer`` (rows of a producer, columns of the consumer) that ``units`` own."""
        hd = self.head_dim
        if self.fused:  # (3, heads, hd) rows; one query head per unit
            base = (units[:, None] * hd + torch.arange(hd)).reshape(-1)
            n = self.width * hd
            return base if layer in self.consumers else torch.cat([base, base + n, base + 2 * n])
        per = hd * (self.q_per_kv if layer.endswith("q_proj") or layer in self.consumers else 1)
        return (units[:, None] * per + torch.arange(per)).reshape(-1)

    def per_unit(self, layer: str, per_channel: torch.Tensor) -> torch.Tensor:
        """(width,) sums of a per-channel score of ``layer`` over each unit's channels."""
        out = torch.zeros(self.width, dtype=per_channel.dtype)
        for u in range(self.width):
            out[u] = per_channel[self.channels(layer, torch.tensor([u]))].sum()
        return out


def _head_dim(mod: nn.Module) -> int | None:
    for attr in ("head_dim", "hd", "attention_head_size"):
        v = getattr(mod, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def head_groups(model: nn.Module) -> list[HeadGroup]:
    """The attention layers of ``model`` in a layout this module knows (module docstring)."""
    groups = []
    for name, mod in model.named_modules():
        hd = _head_dim(mod)
        if hd is None:
            continue
        lin = {k: getattr(mod, k, None) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "proj")}
        pre = f"{name}." if name else ""
        if all(isinstance(lin[k], nn.Linear) for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
            q, kv = lin["q_proj"].out_features // hd, lin["k_proj"].out_features // hd
            if q * hd != lin["q_proj"].out_features or kv < 1 or q % kv or lin["o_proj"].in_features != q * hd:
                continue
            groups.append(HeadGroup(name, tuple(pre + k for k in ("q_proj", "k_proj", "v_proj")), (pre + "o_proj",),
                                    kv, hd, q // kv, fused=False))
        elif isinstance(lin["qkv"], nn.Linear) and isinstance(lin["proj"], nn.Linear):
            h = lin["qkv"].out_features // (3 * hd)
            if 3 * h * hd != lin["qkv"].out_features or lin["proj"].in_features != h * hd:
                continue
            groups.append(HeadGroup(name, (pre + "qkv",), (pre + "proj",), h, hd, 1, fused=True))
    return groups


def set_heads_(model: nn.Module, group: HeadGroup, kept_units: int) -> None:
    """Update the head counts that the attention code reads, after ``group`` keeps ``kept_units``."""
    mod = model.get_submodule(group.attention)
    q, kv = kept_units * group.q_per_kv, kept_units
    for attr in Q_ATTRS:
        if isinstance(getattr(mod, attr, None), int):
            setattr(mod, attr, q)
    for attr in KV_ATTRS:
        if isinstance(getattr(mod, attr, None), int):
            setattr(mod, attr, kv)
    cfg = getattr(mod, "config", None)
    if cfg is not None and hasattr(cfg, "num_attention_heads"):
        cfg.head_dim = group.head_dim  # no longer hidden_size // heads
        cfg.num_attention_heads = q
        if hasattr(cfg, "num_key_value_heads"):
            cfg.num_key_value_heads = kv
