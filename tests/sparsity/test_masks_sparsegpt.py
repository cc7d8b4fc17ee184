"""Sparsity masks and SparseGPT against brute force and closed forms."""

import itertools

import pytest
import torch

from slimtorch.errors import SlimError
from slimtorch.sparsity.masks import (
    block_mask,
    global_masks,
    magnitude,
    nm_mask,
    unstructured_mask,
    wanda,
)
from slimtorch.sparsity.sparsegpt import sparsegpt_prune


def test_nm_mask_keeps_the_n_largest_of_every_m():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(6, 16, generator=g)
    mask = nm_mask(s, 2, 4)
    for r, c0 in itertools.product(range(6), range(0, 16, 4)):
        group = s[r, c0:c0 + 4]
        assert mask[r, c0:c0 + 4].sum() == 2
        assert set(torch.nonzero(mask[r, c0:c0 + 4]).flatten().tolist()) == set(group.topk(2).indices.tolist())
    with pytest.raises(SlimError):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(SlimError):
        nm_mask(s, 4, 4)


@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_mask_removes_exactly_the_lowest(per_row):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(8, 10, generator=g)
    mask = unstructured_mask(s, 0.3, per_row=per_row)
    rows = [(s[r], mask[r]) for r in range(8)] if per_row else [(s.reshape(-1), mask.reshape(-1))]
    for sc, mk in rows:
        assert int((~mk).sum()) == round(0.3 * sc.numel())
        assert sc[mk].min() >= sc[~mk].max()  # every kept score above every removed one
    with pytest.raises(SlimError):
        unstructured_mask(s, 1.0)


def test_block_and_global_masks():
    s = torch.arange(16.0).reshape(4, 4)  # tiles of 2x2: sums 10, 18, 42, 50
    mask = block_mask(s, 0.5, (2, 2))
    assert mask[:2].sum() == 0 and mask[2:].all()
    a, b = torch.tensor([[1.0, 5.0]]), torch.tensor([[2.0, 3.0, 4.0]])
    got = global_masks({"a": a, "b": b}, 0.4)  # 2 of 5 removed: 1 and 2
    assert got["a"].tolist() == [[False, True]] and got["b"].tolist() == [[False, True, True]]


def test_wanda_score_is_weight_times_input_norm():
    w = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    norm = torch.tensor([2.0, 0.25])
    assert torch.equal(wanda(w, norm), torch.tensor([[2.0, 0.5], [6.0, 0.125]]))
    assert torch.equal(magnitude(w), w.abs())
    with pytest.raises(SlimError):
        wanda(w, torch.ones(3))


def test_sparsegpt_one_pruned_weight_is_the_obs_closed_form():
    """Remove one weight of a row: the rest moves by -w_q / [H^-1]_qq * H^-1[q, :], the least-squares
    optimum of (w - v)^T H (w - v) subject to v_q = 0."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(200, 5, generator=g, dtype=torch.float64)
    X[:, 1:] += 0.8 * X[:, :1]  # correlated inputs, so the update is not trivial
    H = 2 / 200 * X.T @ X
    w = torch.tensor([[0.01, 1.0, -0.7, 0.9, 0.5]], dtype=torch.float64)  # column 0: the lowest saliency
    got, keep, _ = sparsegpt_prune(w, H, sparsity=0.2, damp=0.0)
    Hinv = torch.linalg.inv(H)
    expect = w - (w[0, 0] / Hinv[0, 0]) * Hinv[0:1, :]
    assert keep.tolist() == [[False, True, True, True, True]]
    assert torch.allclose(got.double(), expect, atol=1e-6)


def test_sparsegpt_with_identity_hessian_is_blockwise_magnitude():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 32, generator=g)
    got, keep, _ = sparsegpt_prune(w, torch.eye(32), sparsity=0.5, block_size=16, damp=0.0)
    for c in (0, 16):  # the mask is chosen per block of columns
        blk = w[:, c:c + 16]
        assert torch.equal(keep[:, c:c + 16], unstructured_mask(blk.abs(), 0.5))
    assert torch.equal(got, w * keep)  # no update: uncorrelated inputs
    got24, keep24, _ = sparsegpt_prune(w, torch.eye(32), nm=(2, 4), block_size=16, damp=0.0)
    assert torch.equal(keep24, nm_mask(w.abs(), 2, 4)) and torch.equal(got24, w * keep24)


def test_sparsegpt_beats_magnitude_on_correlated_inputs():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(512, 8, generator=g)
    X = base @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    w = torch.randn(16, 64, generator=g)
    H = 2 / 512 * X.T @ X
    for nm in (None, (2, 4)):
        got, keep, _ = sparsegpt_prune(w, H, sparsity=0.5, nm=nm)
        assert (~keep).float().mean() == 0.5
        mag_keep = nm_mask(w.abs(), 2, 4) if nm else unstructured_mask(w.abs(), 0.5)
        err = (X @ (w - got).T).norm()
        mag_err = (X @ (w - w * mag_keep).T).norm()
        assert err < 0.5 * mag_err, (float(err), float(mag_err))


def test_sparsegpt_joint_quantization_puts_kept_weights_on_the_grid():
    from slimtorch.quant import primitives as P
    from slimtorch.quant.observers import make_observer
    from slimtorch.spec import PerChannel, PerGroup, QuantSpec

    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 16, generator=g)
    spec = QuantSpec(dtype="int4", granularity=PerChannel(0), symmetric=True)
    obs = make_observer(spec)
    obs.update(w)
    scale, zero = obs.qparams()
    got, keep, (codes, s, z) = sparsegpt_prune(w, torch.eye(16), sparsity=0.5, damp=0.0, quant=spec)
    rtn = P.dequantize(P.quantize(w, scale, zero, spec), scale, zero, spec)
    # identity Hessian: the error of one column does not move the others, so the kept weights are RTN's
    assert torch.allclose(got[keep], rtn[keep]) and (got[~keep] == 0).all()
    assert torch.equal(P.dequantize(codes, s, z, spec), got)  # the codes are the returned weight
    # per group, asymmetric: a pruned weight is the zero-point's code, which dequantizes to exactly 0
    gspec = QuantSpec(dtype="uint4", granularity=PerGroup(8), symmetric=False)
    H = torch.eye(16) + 0.3
    got, keep, (codes, s, z) = sparsegpt_prune(w, H, sparsity=0.5, damp=0.01, quant=gspec, block_size=8)
    assert s.shape == (4, 2, 1) and torch.equal(P.dequantize(codes, s, z, gspec), got)
    assert (got[~keep] == 0).all() and int((~keep).sum()) == 32
