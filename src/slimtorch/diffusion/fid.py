"""Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

FID-FMNIST (issue 21) applies it to the penultimate features of our own Fashion-MNIST classifier, so its
values are comparable with each other, not with Inception FID. ``d^2 = |mu1 - mu2|^2 + tr(C1) + tr(C2)
- 2 tr((C1^1/2 C2 C1^1/2)^1/2)``, computed in float64 with symmetric eigendecompositions (the matrix in the
trace is symmetric positive semi-definite, so no general matrix square root is needed).
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and covariance (D, D) (unbiased), float64, of features (N, D) with N >= 2."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise SlimError(f"FID needs features (N, D) with N >= 2; got {tuple(features.shape)}")
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """The squared Fréchet distance between N(mu1, cov1) and N(mu2, cov2) (module docstring)."""
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    r1 = _sqrt_psd(cov1)
    cross = torch.linalg.eigvalsh(r1 @ cov2 @ r1).clamp(min=0).sqrt().sum()
    d = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross
    return float(d.clamp(min=0))


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D)."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))
