"""FID against closed forms; the cache schedule's DP against exhaustive search and a hand-checked table;
the error correction against least squares."""

import itertools
import math

import pytest
import torch

from slimtorch.diffusion.cache_schedule import (
    dp_schedule,
    drift_cost,
    effect_weights,
    schedule_cost,
    uniform_schedule,
)
from slimtorch.diffusion.error_correction import apply_affine, fit_affine
from slimtorch.diffusion.fid import fid, frechet_distance
from slimtorch.errors import SlimError


def test_frechet_distance_closed_forms():
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    want = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(want, rel=1e-12)
    # a rotation of both leaves it unchanged; identical Gaussians are at distance 0
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rot = frechet_distance(q @ mu1.double(), q @ torch.diag(v1).double() @ q.T, q @ mu2.double(),
                           q @ torch.diag(v2).double() @ q.T)
    assert rot == pytest.approx(want, rel=1e-9)
    c = q @ torch.diag(v1).double() @ q.T
    assert frechet_distance(mu1, c, mu1, c) == pytest.approx(0, abs=1e-9)


def test_fid_of_samples_approaches_the_population_value():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2 + 0.5
    want = 4 * 0.25 + 4 * (2 - 1) ** 2  # 5
    assert fid(a, b) == pytest.approx(want, rel=0.03)
    with pytest.raises(SlimError):
        fid(a[:1], b)


def test_dp_schedule_hand_checked():
    # 4 steps, 2 groups: splits [0,1)[1,4), [0,2)[2,4), [0,3)[3,4) cost 0+9, 1+1, 5+0: the middle wins
    inf = math.inf
    cost = torch.tensor([[inf, 0, 1, 5, 12],
                         [inf, inf, 0, 4, 9],
                         [inf, inf, inf, 0, 1],
                         [inf, inf, inf, inf, 0],
                         [inf] * 5], dtype=torch.float64)
    assert dp_schedule(cost, 2) == [0, 2]
    assert schedule_cost(cost, [0, 2]) == 2
    assert dp_schedule(cost, 2, min_len=1, max_len=1 + 2) == [0, 2]
    assert dp_schedule(cost, 4) == [0, 1, 2, 3]
    with pytest.raises(SlimError):
        dp_schedule(cost, 2, min_len=3)


@pytest.mark.parametrize("seed", range(5))
def test_dp_schedule_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    steps, groups = 9, 3
    feats = torch.randn(steps, 6, generator=g).cumsum(0)  # a drifting feature
    cost = drift_cost(feats, torch.rand(steps, generator=g) + 0.5)
    got = dp_schedule(cost, groups, min_len=2, max_len=4)
    best = min((schedule_cost(cost, [0, *c]), [0, *c]) for c in itertools.combinations(range(1, steps), groups - 1)
               if all(2 <= n - j <= 4 for j, n in zip([0, *c], [*c, steps])))
    assert schedule_cost(cost, got) == pytest.approx(best[0])
    assert schedule_cost(cost, got) <= schedule_cost(cost, uniform_schedule(steps, 3)) + 1e-12


def test_drift_cost_is_the_sum_of_l1_drifts():
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    cost = drift_cost(f)
    assert cost[0, 3] == 0 + 1 + 3 and cost[1, 3] == 0 + 2 and cost[0, 1] == 0
    assert uniform_schedule(7, 3) == [0, 3, 6] and uniform_schedule(5, 1) == [0, 1, 2, 3, 4]


def test_effect_weights_are_sensitivity_per_drift_and_reweight_the_cost():
    change, drift = torch.tensor([0.0, 4.0, 2.0, 1.0]), torch.tensor([0.0, 2.0, 2.0, 2.0])
    w = effect_weights(change, drift)  # 2, 1, 0.5 per unit of drift; step 0 copies step 1; mean 1
    torch.testing.assert_close(w, torch.tensor([2.0, 2.0, 1.0, 0.5]) / 1.375)
    f = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    weighted, plain = drift_cost(f, w), drift_cost(f)
    assert weighted[0, 4] == pytest.approx(float(w[1] * 1 + w[2] * 3 + w[3] * 6))
    assert plain[0, 4] == 10
    with pytest.raises(SlimError):
        effect_weights(torch.ones(3), torch.ones(4))


def test_error_correction_is_the_least_squares_line():
    g = torch.Generator().manual_seed(0)
    approx = torch.randn(64, 3, 4, 4, generator=g)
    real = approx * torch.tensor([1.7, 0.5, -1.0]).view(1, 3, 1, 1) + torch.tensor([0.3, 0.0, 2.0]).view(1, 3, 1, 1)
    real = real + 0.05 * torch.randn(real.shape, generator=g)
    a, b = fit_affine(approx, real)
    for c in range(3):  # the closed form equals lstsq on [x, 1]
        x = approx[:, c].reshape(-1, 1).double()
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones_like(x)], 1), real[:, c].reshape(-1, 1).double()).solution
        assert float(a[c]) == pytest.approx(float(sol[0]), rel=1e-5) and float(b[c]) == pytest.approx(float(sol[1]), abs=1e-5)
    err_before = (real - approx).pow(2).mean()
    err_after = (real - apply_affine(approx, a, b)).pow(2).mean()
    assert err_after < 0.01 * err_before
    a0, b0 = fit_affine(torch.ones(8, 2), torch.full((8, 2), 3.0))  # constant input: a shift only
    assert torch.equal(a0, torch.ones(2)) and torch.allclose(b0, torch.full((2,), 2.0))


def test_fid_fmnist_on_real_images():
    """Real test images: the classifier's features classify as its recorded accuracy says, the noise floor
    between two disjoint halves is small, and shuffled pixels are far away."""
    from slimtorch.diffusion.quality import (
        class_accuracy,
        classifier_outputs,
        to_diffusion,
    )
    from slimtorch.zoo import load_model
    from slimtorch.zoo.data import fashion_mnist

    test = fashion_mnist("test")
    x = to_diffusion(test.images[:2000])
    assert x.shape == (2000, 1, 32, 32) and float(x.min()) == -1 and float(x.max()) <= 1
    feats, logits = classifier_outputs(load_model("fmnist-cnn"), x)
    assert feats.shape == (2000, 128) and class_accuracy(logits, test.labels[:2000]) > 0.9
    floor = fid(feats[:1000], feats[1000:])
    perm = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))
    noise = x.flatten(1)[:, perm].reshape(x.shape)
    far = fid(feats[:1000], classifier_outputs(load_model("fmnist-cnn"), noise[:1000])[0])
    assert far > 20 * floor


def test_cache_correction_fits_each_reused_step():
    from slimtorch.diffusion.error_correction import fit_cache_correction

    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(16, 3, 4, 4, generator=g)
    gains = torch.tensor([1.5, 0.5, 2.0]).view(1, 3, 1, 1)
    feats = torch.stack([f0, f0 * gains + 0.2, f0 * gains**2, torch.randn(16, 3, 4, 4, generator=g)])
    tables = fit_cache_correction(feats, [0, 3])
    assert sorted(tables) == [1, 2]
    a, b = tables[1]
    assert torch.allclose(a, gains.flatten(), atol=1e-5) and torch.allclose(b, torch.full((3,), 0.2), atol=1e-5)
    a, b = tables[2]
    assert torch.allclose(apply_affine(feats[0], a, b), feats[2], atol=1e-5)
    with pytest.raises(SlimError):
        fit_cache_correction(feats, [1, 2])
