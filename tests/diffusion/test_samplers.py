"""Samplers against the closed-form Gaussian case: for data x_0 ~ N(mu, sd^2) the best denoiser is known
exactly, E[eps | x_t] = s (x_t - a mu) / (a^2 sd^2 + s^2), and the probability-flow ODE maps x_T to
mu + (sd / S_T)(x_T - a_T mu) with S_T^2 = a_T^2 sd^2 + s_T^2. Deterministic samplers are then affine maps
of x_T whose slope we compare with sd / S_T."""

import itertools

import pytest
import torch

from slimtorch.diffusion import samplers as S
from slimtorch.diffusion.schedule import NoiseSchedule, split
from slimtorch.errors import SlimError

MU, SD = 0.3, 0.5
SCHED = NoiseSchedule.linear()


def gaussian_denoiser(prediction: str = "eps"):
    def fn(x, t):
        ab = SCHED.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = s * (x - a * MU) / (a * a * SD * SD + s * s)
        x0 = (x - s * eps) / a
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
    return fn


def slope_error(sampler, n: int, spacing: str = "uniform", prediction: str = "eps") -> float:
    ab_t = float(SCHED.alphas_cumprod[-1])
    exact = SD / (ab_t * SD * SD + 1 - ab_t) ** 0.5
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = S.sample(sampler, gaussian_denoiser(prediction), x, SCHED, S.timesteps(1000, n, spacing), prediction)
    return abs(float(y[1] - y[0]) - exact) / exact


def test_ddim_is_first_order_and_dpm_solver_second_order():
    # halving the step size halves DDIM's error (an Euler method in lambda) and quarters DPM-Solver++(2M)'s
    ddim = [slope_error("ddim", n) for n in (10, 20, 40)]
    assert all(1.9 < ddim[i] / ddim[i + 1] < 2.1 for i in range(2)), ddim
    dpm = [slope_error("dpmpp-2m", n, "quadratic") for n in (20, 40, 80)]
    assert all(dpm[i] / dpm[i + 1] > 3.5 for i in range(2)), dpm
    assert dpm[0] < ddim[1] / 5  # and far more accurate at equal steps
    assert slope_error("ddim", 1000) < 5e-3 and slope_error("dpmpp-2m", 1000) < 1e-4


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_prediction_types_give_the_same_samples(prediction):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = S.timesteps(1000, 20)
    ref = S.ddim(gaussian_denoiser("eps"), x, SCHED, steps, "eps")
    got = S.ddim(gaussian_denoiser(prediction), x, SCHED, steps, prediction)
    assert torch.allclose(got, ref, atol=1e-9)


def test_split_inverts_the_training_targets():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 300, 700, 999])
    xt = SCHED.add_noise(x0, eps, t)
    a, s = SCHED.coefficients(t, x0)
    for p in ("eps", "x0", "v"):
        got_x0, got_eps = split(SCHED.target(x0, eps, t, p), xt, a, s, p)
        assert torch.allclose(got_x0, x0, atol=1e-9) and torch.allclose(got_eps, eps, atol=1e-9)


def test_ddpm_step_is_the_posterior_of_ddpm():
    """Over consecutive steps, DDIM with eta = 1 has DDPM's posterior mean and variance beta~_t."""
    ab = SCHED.alphas_cumprod
    t = 400
    beta = 1 - float(ab[t] / ab[t - 1])
    x0, xt = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.2], dtype=torch.float64)
    eps = (xt - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()  # the output whose x_0 estimate is x0
    mean = S.ddim_step(xt, eps, float(ab[t]), float(ab[t - 1]), "eps", 1.0, torch.zeros(1, dtype=torch.float64))
    post_mean = (ab[t - 1].sqrt() * beta / (1 - ab[t])) * x0 + ((1 - beta) ** 0.5 * (1 - ab[t - 1]) / (1 - ab[t])) * xt
    assert torch.allclose(mean, post_mean, atol=1e-12)
    one = S.ddim_step(xt, eps, float(ab[t]), float(ab[t - 1]), "eps", 1.0, torch.ones(1, dtype=torch.float64))
    assert float(one - mean) ** 2 == pytest.approx(float((1 - ab[t - 1]) / (1 - ab[t]) * beta), rel=1e-9)


def test_ddpm_samples_have_the_data_distribution():
    x = torch.randn(40000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = S.ddpm(gaussian_denoiser(), x, SCHED, S.timesteps(1000, 1000), generator=torch.Generator().manual_seed(1))
    assert float(y.mean()) == pytest.approx(MU, abs=0.01)
    assert float(y.std()) == pytest.approx(SD, rel=0.02)  # sampling error of the std here: about 0.4%


def test_timesteps():
    assert S.timesteps(1000, 1000) == list(range(1000))
    for n in (1, 2, 7, 50, 999):
        for spacing in ("uniform", "quadratic"):
            ts = S.timesteps(1000, n, spacing)
            assert len(ts) == n and ts[-1] == 999 and all(b > a for a, b in itertools.pairwise(ts)) and ts[0] >= 0
    with pytest.raises(SlimError):
        S.timesteps(1000, 0)
    with pytest.raises(SlimError):
        S.sample("euler", gaussian_denoiser(), torch.zeros(1, 1), SCHED, [0])


def test_guidance_combines_the_branches():
    def net(x, t, y):  # conditional output y, unconditional output -1
        return torch.where(y[:, None] >= 0, y[:, None].to(x.dtype), -torch.ones_like(x))

    x, t = torch.zeros(3, 1), torch.zeros(3, dtype=torch.long)
    labels = torch.tensor([0, 1, 2])
    out = S.guided(net, labels, 3.0, -1)(x, t)
    assert torch.equal(out, (-1 + 3.0 * (labels[:, None] + 1)).float())  # uncond + s (cond - uncond)
    assert torch.equal(S.guided(net, labels, 1.0, -1)(x, t), labels[:, None].float())
