"""Which sampling steps run the whole network ("refresh" steps) when the others reuse a cached feature.

Steps are indexed in sampling order, 0 .. S-1 (step 0 is the noisiest and always refreshes). A schedule is
the increasing list of refresh steps; the steps after a refresh and before the next reuse its feature.

* :func:`uniform_schedule`: every N-th step (DeepCache's 1:N).
* :func:`dp_schedule`: CacheQuant's dynamic-programming schedule: the S steps split into K contiguous
  groups, each starting with a refresh, with the least total cost, where ``cost[j, n]`` is what a group
  covering steps j .. n-1 with its refresh at j costs. L[n, k] = min_j L[j, k-1] + cost[j, n], group
  lengths within [min_len, max_len]; O(K S^2).
* :func:`drift_cost`: CacheQuant's cost, the L1 drift of the cached feature: cost[j, n] =
  sum_{i=j}^{n-1} |F_i - F_j|_1, from the features F_i (S, ...) of one calibration run. Step weights scale
  each step's term (a step whose error matters more for the final sample can weigh more).
* :func:`effect_weights`: such weights, measured: how much the final sample moves when step i alone reuses
  step i-1's feature, per unit of that step's feature drift. The plain L1 drift treats an error at a noisy
  early step like one near the end; on our models the early errors propagate further (the benchmark
  records both schedules).
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError


def uniform_schedule(steps: int, interval: int) -> list[int]:
    """Refresh at 0, N, 2N, ... (N = ``interval``; 1 refreshes every step)."""
    if steps < 1 or interval < 1:
        raise SlimError(f"cache schedule: need steps >= 1 and interval >= 1; got {steps}, {interval}")
    return list(range(0, steps, interval))


def drift_cost(features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """cost (S + 1, S + 1) float64 with cost[j, n] for 0 <= j < n <= S (module docstring); other entries inf.
    features (S, ...): the cached feature at each step of a full (uncached) run; weights (S,) or None."""
    s = features.shape[0]
    f = features.reshape(s, -1).double()
    drift = torch.cdist(f, f, p=1)  # drift[j, i] = |F_i - F_j|_1
    if weights is not None:
        drift = drift * weights.double().view(1, s)
    cum = torch.cat([torch.zeros(s, 1, dtype=torch.float64), drift.cumsum(1)], 1)  # cum[j, n] = sum_{i<n} drift[j, i]
    cost = torch.full((s + 1, s + 1), float("inf"), dtype=torch.float64)
    for j in range(s):
        cost[j, j + 1:] = cum[j, j + 1:] - cum[j, j]
    return cost


def effect_weights(final_change: torch.Tensor, step_drift: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Step weights (S,) for :func:`drift_cost`, mean 1: w_i = final_change[i] / step_drift[i], where
    final_change[i] is the change of the final sample when only step i reuses the previous step's feature
    and step_drift[i] = |F_i - F_{i-1}|_1. Step 0 (always a refresh) takes step 1's weight."""
    if final_change.shape != step_drift.shape or final_change.dim() != 1 or len(final_change) < 2:
        raise SlimError(f"effect weights: need two (S,) tensors with S >= 2; got {tuple(final_change.shape)}, "
                        f"{tuple(step_drift.shape)}")
    w = final_change.double() / step_drift.double().clamp(min=eps)
    w[0] = w[1]
    return (w / w.mean().clamp(min=eps)).float()


def dp_schedule(cost: torch.Tensor, groups: int, min_len: int = 1, max_len: int | None = None) -> list[int]:
    """The refresh steps of the K = ``groups`` contiguous groups of least total ``cost`` (S + 1, S + 1)."""
    s = cost.shape[0] - 1
    max_len = s if max_len is None else max_len
    if not 1 <= groups <= s or min_len < 1 or max_len < min_len or groups * min_len > s or groups * max_len < s:
        raise SlimError(f"cache schedule: {groups} groups of {min_len}..{max_len} steps cannot cover {s} steps")
    inf = float("inf")
    best = [[inf] * (groups + 1) for _ in range(s + 1)]  # best[n][k]: steps 0..n-1 in k groups
    back = [[-1] * (groups + 1) for _ in range(s + 1)]
    best[0][0] = 0.0
    c = cost.tolist()
    for k in range(1, groups + 1):
        for n in range(k * min_len, s + 1):
            for j in range(max(0, n - max_len), n - min_len + 1):
                v = best[j][k - 1] + c[j][n]
                if v < best[n][k]:
                    best[n][k], back[n][k] = v, j
    if best[s][groups] == inf:
        raise SlimError(f"cache schedule: no split of {s} steps into {groups} groups of {min_len}..{max_len}")
    starts, n = [], s
    for k in range(groups, 0, -1):
        n = back[n][k]
        starts.append(n)
    return starts[::-1]


def schedule_cost(cost: torch.Tensor, refresh: list[int]) -> float:
    """The total cost of a schedule (its groups run from each refresh to the next, the last to the end)."""
    ends = [*refresh[1:], cost.shape[0] - 1]
    return float(sum(cost[j, n] for j, n in zip(refresh, ends)))
