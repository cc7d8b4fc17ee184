"""The int4 kernels' weight layout, made once per layer from the saved format (no Triton needed here).

The saved format (reference.py: ``packed (N, K/2)`` uint8, ``scale``/``zero`` ``(N, K/G)`` float32) is
turned by :func:`prepare_int4` into :class:`Int4Weight`:

* ``words (N/16, K/8, 16)`` int32: the saved bytes read as int32 words (8 codes each, code i of word j
  is k = 8j + i), in blocks of 16 output channels, each block's words stored K-row after K-row. A
  row of a tile is 16 channels = 64 contiguous bytes (16-byte loads, consecutive threads on
  consecutive channels), and a program streams its blocks from one contiguous stretch of memory;
* ``a = 16 * scale`` and ``b = scale * zero``, ``(N/16, K/G, 16)`` float32, blocked the same way.

The address of channel n in row j of a blocked array is ``(n // 16) * block_stride + 16 j + n % 16``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Int4Weight:
    """An int4 weight in the kernels' layout (see the module docstring)."""

    words: torch.Tensor  # (N/16, K/8, 16) int32
    a: torch.Tensor  # (N/16, K/G, 16) float32: 16 * scale
    b: torch.Tensor  # (N/16, K/G, 16) float32: scale * zero
    group: int

    @property
    def n(self) -> int:
        return self.words.shape[0] * 16

    @property
    def k(self) -> int:
        return self.words.shape[1] * 8


def supported(n: int, k: int, group: int) -> bool:
    """Whether the kernels take this shape: blocks of 16 channels, and a group's words (group / 8) a
    power of two of at least 16, the K of one tensor-core product."""
    return n % 16 == 0 and group >= 128 and group & (group - 1) == 0 and k % group == 0


def prepare_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Weight:
    """The saved format -> the kernels' layout (one transpose of the weight; done once per layer)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if scale.shape != zero.shape or scale.shape[0] != n or k % scale.shape[1] \
            or not supported(n, k, k // scale.shape[1]):
        raise ValueError(f"int4 weight of shape {(n, k)} with scales {tuple(scale.shape)}: the kernels need N a "
                         "multiple of 16 and groups of 128, 256, 512... inputs that divide K")

    def blocked(t: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N/16, C, 16)
        return t.reshape(n // 16, 16, -1).transpose(1, 2).contiguous()

    words = packed.contiguous().view(torch.int32)  # (N, K/8); little-endian: byte 0 holds codes 0 and 1
    s, z = scale.float(), zero.float()
    return Int4Weight(blocked(words), blocked(16 * s), blocked(s * z), k // scale.shape[1])
