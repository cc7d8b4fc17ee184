"""The modelled sampling cost (slimtorch.diffusion.cost) against the closed form of a one-linear model:
DDIM with guidance calls it once per step on the doubled batch."""

import pytest
import torch
from torch import nn

from slimtorch.cost.hardware import HARDWARE
from slimtorch.diffusion.cost import sampling_cost
from slimtorch.diffusion.samplers import guided, sample, timesteps
from slimtorch.diffusion.schedule import NoiseSchedule


class Toy(nn.Module):
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1024, 1024)

    def forward(self, x, t, y):
        return self.lin(x.flatten(1)).view_as(x)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_cost_is_steps_times_one_linear_on_the_guided_batch(guidance):
    model, steps, batch = Toy(), 5, 64
    sched = NoiseSchedule.linear()

    def run_one():
        y = torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            return sample("ddim", guided(model, y, guidance, 10), torch.randn(1, 1, 32, 32), sched,
                          timesteps(1000, steps))

    got = sampling_cost(model, run_one, batch)
    rows = batch * (2 if guidance != 1.0 else 1)
    flops = steps * 2.0 * rows * 1024 * 1024
    moved = steps * (1024 * 1024 * 2 + rows * 1024 * 2 * 2)  # bf16 weight, input and output
    hw = HARDWARE["h100"]
    assert got["layer_calls_per_sample"] == steps
    assert got["flops"] == pytest.approx(flops) and got["bytes"] == pytest.approx(moved)
    step = max(2.0 * rows * 1024 * 1024 / hw.peak("bf16"), (1024 * 1024 * 2 + rows * 1024 * 4) / hw.mem_bandwidth)
    assert got["time_s"] == pytest.approx(steps * step)
    assert got["samples_per_s"] == pytest.approx(batch / (steps * step))
    assert "not a measurement" in got["note"]
