"""Hadamard matrices of the sizes transformer layers have, and the random orthogonal rotations built on them.

Why: a rotation ``Q`` (``Q Q^T = I``) folded into a network's weights leaves its function unchanged but
spreads each activation outlier over all channels, so 4-bit activations lose little (QuaRot, SpinQuant). A
normalised Hadamard matrix is the rotation that spreads best (every entry has the same magnitude) and is
cheap to apply online; a random sign flip of its columns makes it a random rotation with that property.

Sizes: Sylvester's doubling gives the powers of two; widths like 384 = 12 x 32 and 896 = 28 x 32 need a
Hadamard matrix of order 12 or 28 first, which Paley's constructions give from a prime q: order q + 1 for
q = 3 (mod 4) (construction I) and 2 (q + 1) for q = 1 (mod 4) (construction II). ``hadamard(n)`` finds
``n = 2^k m`` with such an m; other widths get a random orthogonal matrix (``random_orthogonal``), which
spreads outliers as well in expectation but has no fast transform.
"""

from __future__ import annotations

import functools

import torch

from slimtorch.errors import SlimError


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = the Legendre symbol of (j - i) mod q (0 on the diagonal)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Paley's constructions, or None where neither applies."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # construction I: I + S, S skew with S S^T = q I
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # construction II from the symmetric conference matrix
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)
    return None


@functools.lru_cache(maxsize=32)
def _hadamard(n: int) -> torch.Tensor | None:
    k = 0
    while n % 2 == 0 and n > 1:
        base = _paley(n)
        if base is not None:
            break
        n //= 2
        k += 1
    base = _paley(n)
    if base is None:
        return None
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(k):
        base = torch.kron(h2, base)
    return base


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard` knows a construction for order ``n``."""
    return n >= 1 and _hadamard(n) is not None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``), float64; SlimError for an order that
    has no construction here (see module docstring)."""
    h = _hadamard(n) if isinstance(n, int) and n >= 1 else None
    if h is None:
        raise SlimError(f"no Hadamard matrix of order {n} is built here (orders 2^k m with m - 1 a prime = 3 "
                        f"mod 4 or m / 2 - 1 a prime = 1 mod 4); use a random orthogonal rotation")
    return h.clone()


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_hadamard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A normalised Hadamard matrix with randomly flipped rows, ``diag(+-1) H / sqrt(n)`` (orthogonal, float64);
    a random orthogonal matrix where no Hadamard of order ``n`` is built."""
    if not has_hadamard(n):
        return random_orthogonal(n, generator)
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n) / n**0.5
