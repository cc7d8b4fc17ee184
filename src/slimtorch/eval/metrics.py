"""Metrics as pure functions on tensors (and, for latency, on a callable)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of rows whose arg-max equals the label. logits (N, K), labels (N,)."""
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def classifier_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy (%) of ``model`` (in the mode it is in) on inputs x (N, ...), labels y (N,), in batches."""
    return top1_accuracy(torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]), y)


def topk_hits(logits: torch.Tensor, allowed: list[set[int]], k: int) -> int:
    """How many rows have one of their ``allowed`` classes among the top ``k``. logits (N, K)."""
    top = logits.topk(k, dim=-1).indices.tolist()
    return sum(bool(set(t) & a) for t, a in zip(top, allowed))


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Percent of rows where the arg-max matches the reference model's. Both (N, K)."""
    return 100.0 * (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the number of predicted tokens. logits (B, T, V), ids (B, T)."""
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="sum")
    return nll.item(), ids[:, 1:].numel()


def windows(tokens: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(W, seq_len)`` of a token stream (the tail shorter than a window is dropped)."""
    n = len(tokens) // seq_len
    if limit is not None:
        n = min(n, limit)
    return tokens[: n * seq_len].view(n, seq_len)


def unigram_perplexity(train_tokens: torch.Tensor, eval_windows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one unigram model fit on ``train_tokens`` over the tokens a causal LM
    predicts in ``eval_windows`` (W, T): every position but the first of each window."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = eval_windows[:, 1:].reshape(-1)
    return math.exp(-logp[targets].mean().item())


def cosine_to_reference(emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two embedding sets ``(N, C)`` -> ``(N,)``."""
    return F.cosine_similarity(emb.double(), ref.double(), dim=-1)


def nearest(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index of each query's nearest key by cosine. queries (Q, C), keys (K, C) -> (Q,)."""
    return (F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T).argmax(-1)


def retrieval_agreement(q: torch.Tensor, k: torch.Tensor, ref_q: torch.Tensor, ref_k: torch.Tensor) -> float:
    """Percent of queries whose top-1 neighbour is the same under the model and the reference."""
    return 100.0 * (nearest(q, k) == nearest(ref_q, ref_k)).float().mean().item()


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def param_count(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Latency:
    """Wall time of one call: the median and the 10th/90th percentiles over ``trials`` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    trials: int


def _latency(times: list[float]) -> Latency:
    s = sorted(times)
    return Latency(statistics.median(s), s[int(0.1 * (len(s) - 1))], s[math.ceil(0.9 * (len(s) - 1))], len(s))


@torch.no_grad()
def interleaved_latency(fns: dict[str, Callable[[], object]], trials: int = 20,
                        warmup: int = 3) -> dict[str, Latency]:
    """Wall time of each ``fn()`` in milliseconds: every function is called ``warmup`` times untimed, then
    the functions are timed in turn (a, b, a, b, ...) ``trials`` times each, so that all of them meet the
    same machine state (clock, caches, other load): the same protocol for an FP and a compressed model."""
    if trials < 1 or warmup < 0:
        raise ValueError(f"trials must be at least 1 and warmup at least 0, got {trials} and {warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(trials):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _latency(t) for name, t in times.items()}


def cpu_latency_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    return interleaved_latency({"fn": fn}, repeats, warmup)["fn"].median_ms
