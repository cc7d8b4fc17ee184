"""Progressive distillation: the target makes one DDIM step land on the teacher's two; for data at a single
point (where DDIM is exact at any step size: the trajectories are straight) a student equal to the teacher
has zero loss, and for Gaussian data of positive variance it does not; training lowers the loss."""

import pytest
import torch

from slimtorch.diffusion.distill import (
    ddim_one,
    distill_loss,
    one_step_target,
    student_grid,
)
from slimtorch.diffusion.samplers import timesteps
from slimtorch.diffusion.schedule import NoiseSchedule
from slimtorch.errors import SlimError

SCHED = NoiseSchedule.linear()


def gaussian_net(mu: float, sd: float, gain: torch.Tensor | float = 1.0):
    def net(x, t, y):
        ab = SCHED.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return gain * s * (x - a * mu) / (a * a * sd * sd + s * s)
    return net


def test_one_step_target_lands_on_the_teachers_result():
    g = torch.Generator().manual_seed(0)
    x_t, x_next = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    ab = SCHED.alphas_cumprod
    t, tn = torch.tensor([900, 500, 40]), torch.tensor([700, 100, 10])
    x0 = one_step_target(x_t, x_next, ab[t], ab[tn])
    a_t, s_t = ab[t].sqrt()[:, None], (1 - ab[t]).sqrt()[:, None]
    a_n, s_n = ab[tn].sqrt()[:, None], (1 - ab[tn]).sqrt()[:, None]
    assert torch.allclose(a_n * x0 + s_n * (x_t - a_t * x0) / s_t, x_next, atol=1e-9)


@pytest.mark.parametrize("sd, zero", [(0.0, True), (0.5, False)])
def test_a_copy_of_the_teacher_has_zero_loss_only_where_ddim_is_exact(sd, zero):
    net = gaussian_net(0.3, sd)
    x0 = 0.3 + sd * torch.randn(256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = timesteps(1000, 8)
    loss = float(distill_loss(net, net, x0, torch.zeros(256, dtype=torch.long), grid, SCHED, 10,
                              torch.Generator().manual_seed(1)))
    assert (loss < 1e-20) if zero else (loss > 1e-6), loss


def test_training_lowers_the_loss_and_grids():
    gain = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    teacher, student = gaussian_net(0.3, 0.5), gaussian_net(0.3, 0.5, gain)
    x0 = 0.3 + 0.5 * torch.randn(512, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = timesteps(1000, 8)
    losses = []
    opt = torch.optim.Adam([gain], lr=0.02)
    for step in range(40):
        loss = distill_loss(student, teacher, x0, torch.zeros(512, dtype=torch.long), grid, SCHED, 10,
                            torch.Generator().manual_seed(step), cfg_prob=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert student_grid(grid) == grid[1::2] and len(student_grid(grid)) == 4
    with pytest.raises(SlimError):
        distill_loss(student, teacher, x0, torch.zeros(512, dtype=torch.long), grid[:3], SCHED, 10)
    x = torch.randn(2, 1, dtype=torch.float64)
    assert ddim_one(lambda xx, tt: teacher(xx, tt, None), x, SCHED, 999, -1).shape == x.shape


def test_state_weighting_is_the_error_of_the_landing_point():
    # the default loss equals the MSE between the student's one-step DDIM landing point and the teacher's two-step
    # one, computed here directly; the "snr" weighting differs from it (and from c^2) on the early steps
    teacher, student = gaussian_net(0.3, 0.5), gaussian_net(0.3, 0.5, torch.tensor(0.9, dtype=torch.float64))
    x0 = 0.3 + 0.5 * torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = timesteps(1000, 2)  # one student step 999 -> x_0 through the teacher's grid[0]
    y = torch.zeros(64, dtype=torch.long)
    loss = float(distill_loss(student, teacher, x0, y, grid, SCHED, 10, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    torch.randint(0, 1, (64,), generator=g)
    eps = torch.randn(x0.shape, generator=g).double()  # drawn as distill_loss draws it
    t = torch.full((64,), grid[1])
    x_t = SCHED.add_noise(x0, eps, t)
    want = ddim_one(lambda xx, tt: teacher(xx, tt, None), ddim_one(lambda xx, tt: teacher(xx, tt, None), x_t, SCHED,
                    grid[1], grid[0]), SCHED, grid[0], -1)
    got = ddim_one(lambda xx, tt: student(xx, tt, None), x_t, SCHED, grid[1], -1)
    assert loss == pytest.approx(float((got - want).pow(2).mean()), rel=1e-9)
    grid8 = timesteps(1000, 8)  # with steps that end above x_0, the two weightings differ
    snr, state = (float(distill_loss(student, teacher, x0, y, grid8, SCHED, 10, torch.Generator().manual_seed(3),
                                     weighting=w)) for w in ("snr", "state"))
    assert snr != pytest.approx(state, rel=1e-3)
    with pytest.raises(SlimError):
        distill_loss(student, teacher, x0, y, grid, SCHED, 10, weighting="x0")
