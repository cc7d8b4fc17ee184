"""Storage formats: integer codes packed into bytes along the last dimension.

Codes are stored offset to unsigned (``u = q - qmin``, so 0 .. 2**bits - 1) and packed
little-end first: for 4 bits, element ``2i`` is the low nibble of byte ``i`` and ``2i + 1`` the
high nibble; for 2 bits, element ``4i + j`` sits at bits ``2j .. 2j+1`` of byte ``i``; 3 bits pack
8 codes into 3 bytes as one little-endian bit stream; 5- to 8-bit codes take one byte each.
The last dimension is padded with zero codes to a whole number of bytes; unpacking takes the
true length back.
"""

from __future__ import annotations

import torch

from slimtorch.errors import SlimError

PACKABLE_BITS = (2, 3, 4, 5, 6, 7, 8)  # 5 to 8 bits: one byte per code


def packed_len(n: int, bits: int) -> int:
    """Bytes used by ``n`` codes of ``bits`` bits (padded to whole groups of 8 codes for 3 bits)."""
    if bits >= 5:
        return n
    per_group = 8 if bits == 3 else 8 // bits
    groups = -(-n // per_group)
    return groups * (3 if bits == 3 else 1)


def pack(q: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Pack integer codes ``q (..., n)`` (values in ``[qmin, qmin + 2**bits)``) into uint8 ``(..., packed_len)``."""
    if bits not in PACKABLE_BITS:
        raise SlimError(f"cannot pack {bits}-bit codes; supported: {PACKABLE_BITS}")
    u = (q.to(torch.int16) - qmin).to(torch.uint8)
    if bits >= 5:
        return u
    n = u.shape[-1]
    per = 8 if bits == 3 else 8 // bits
    pad = -n % per
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.unflatten(-1, (-1, per))  # (..., groups, per)
    if bits == 3:
        shifts = torch.arange(8, device=u.device, dtype=torch.int32) * 3
        word = (u.to(torch.int32) << shifts).sum(-1)  # (..., groups), 24 bits used
        out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(3)], dim=-1)
        return out.to(torch.uint8).flatten(-2)
    shifts = torch.arange(per, device=u.device, dtype=torch.uint8) * bits
    return (u << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, qmin: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int8 codes ``(..., n)`` (uint8 for 8-bit codes with qmin = 0)."""
    if bits not in PACKABLE_BITS:
        raise SlimError(f"cannot unpack {bits}-bit codes; supported: {PACKABLE_BITS}")
    if packed.shape[-1] != packed_len(n, bits):
        raise SlimError(f"packed tensor has {packed.shape[-1]} bytes per row, expected "
                        f"{packed_len(n, bits)} for {n} {bits}-bit codes: the file is corrupt")
    if bits >= 5:
        return packed if qmin == 0 and bits == 8 else (packed.to(torch.int16) + qmin).to(torch.int8)
    if bits == 3:
        b = packed.unflatten(-1, (-1, 3)).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * 3
        u = (word[..., None] >> shifts) & 0x7
    else:
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        u = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    u = u.flatten(-2)[..., :n]
    return (u.to(torch.int16) + qmin).to(torch.int8)
