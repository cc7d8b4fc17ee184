"""Bitmask storage of sparse tensors: exact round trip, sizes, damaged pairs refused."""

import pytest
import torch

from slimtorch.errors import SlimError
from slimtorch.sparsity.masks import nm_mask
from slimtorch.sparsity.storage import compress, decompress, worth_compressing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_round_trip_is_exact(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 13, generator=g)
    w = (w * (w.abs() > 0.7) * 3).to(dtype)  # about half zeros, an odd number of elements
    bits, vals = compress(w)
    assert bits.numel() == -(-91 // 8) and vals.numel() == int((w != 0).sum())
    assert torch.equal(decompress(bits, vals, tuple(w.shape)), w)


def test_bit_order_is_little_end_first_row_major():
    bits, vals = compress(torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]]))
    assert bits.tolist() == [0b00000010, 0b00000001] and vals.tolist() == [2.0, 5.0]


def test_worth_compressing_at_half_but_not_at_a_few_zeros():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    half = w * nm_mask(w.abs().float(), 2, 4)
    bits, vals = compress(half)
    assert worth_compressing(half) and (bits.numel() + vals.numel() * 2) / (w.numel() * 2) == pytest.approx(0.5625)
    few = w.clone()
    few[0, :4] = 0
    assert not worth_compressing(few)


def test_damaged_pairs_are_refused():
    bits, vals = compress(torch.tensor([1.0, 0.0, 3.0, 0.0, 0.0]))
    with pytest.raises(SlimError, match="stored values"):
        decompress(bits, vals[:1], (5,))
    with pytest.raises(SlimError, match="bitmask"):
        decompress(bits[:0], vals, (5,))
    with pytest.raises(SlimError, match="past the tensor"):
        decompress(bits | 0b10000000, torch.tensor([1.0, 3.0, 9.0]), (5,))
