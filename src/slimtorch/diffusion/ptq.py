"""Timestep-aware calibration for quantizing a diffusion model with :func:`slimtorch.api.apply_`.

One FP sampling run records, at every step, the network's input x_t and a feature for TDAC (the middle of
the network: the UNet's mid block output, or the DiT's middle block output); calibration batches
``(x_t, t, y)`` are then drawn across the whole trajectory, per step as TDAC's weights or uniformly
(:mod:`slimtorch.diffusion.calibration`), and passed to ``apply_(model, PTQConfig(...), batches)``.
Class labels ride along with their samples; guidance is off during the run (one branch).

:data:`RECIPES`: the diffusion settings, as the diffusion PTQ papers (Q-Diffusion, PTQ4DM, EDA-DM) use them:
per-channel weights and *static* per-tensor int8 activations, whose ranges come from the calibration (a
dynamic per-token preset such as the LLM ``W4A8`` would make the calibration moot for activations).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.diffusion.calibration import allocate, draw, tdac_weights
from slimtorch.diffusion.dit import DiT
from slimtorch.diffusion.samplers import ddim, timesteps
from slimtorch.diffusion.schedule import NoiseSchedule
from slimtorch.errors import SlimError
from slimtorch.hooks import TemporaryHooks
from slimtorch.quant.recipe import PRESETS, Recipe
from slimtorch.spec import PerChannel, QuantSpec

RECIPES: dict[str, Recipe] = {
    "W8A8": PRESETS["W8A8"],
    "W4A8": Recipe("W4A8-static", QuantSpec("int4", PerChannel(0), symmetric=True), PRESETS["W8A8"].act),
}


def _feature_module(model: nn.Module) -> nn.Module:
    if isinstance(model, DiT):
        return model.blocks[len(model.blocks) // 2]
    if hasattr(model, "mid"):
        return model.mid
    raise SlimError(f"timestep-aware calibration takes slimtorch.diffusion models; got {type(model).__name__}")


@torch.no_grad()
def record_trajectory(model: nn.Module, n: int, steps: int, schedule: NoiseSchedule,
                      generator: torch.Generator | None = None, grid: list[int] | None = None) -> dict:
    """One DDIM run of ``n`` class-balanced samples: {"x": (S, n, C, H, W) inputs in evaluation order,
    "t": (S,) steps, "y": (n,) labels, "features": (S, n, ...) the middle feature}."""
    dev = next(model.parameters()).device
    y = (torch.arange(n) % model.num_classes).to(dev)
    x = torch.randn(n, 1, 32, 32, generator=generator).to(dev)
    xs, ts, feats = [], [], []

    def denoise(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xs.append(xt.cpu())
        ts.append(int(t[0]))
        return model(xt, t, y)

    with TemporaryHooks() as hooks:
        hooks.after(_feature_module(model), lambda m, args, out: feats.append(out.float().cpu()))
        ddim(denoise, x, schedule, grid or timesteps(schedule.steps, steps))
    return {"x": torch.stack(xs), "t": torch.tensor(ts), "y": y.cpu(), "features": torch.stack(feats)}


def calibration_batches(model: nn.Module, samples: int = 1024, steps: int = 100, method: str = "tdac",
                        trajectory_batch: int = 64, batch: int = 64, radius: float = 3.0,
                        schedule: NoiseSchedule | None = None,
                        generator: torch.Generator | None = None,
                        grid: list[int] | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Batches ``(x_t, t, y)`` covering the trajectory (module docstring); ``method`` tdac or uniform.
    ``grid``: the sampling steps (a distilled student's), else ``steps`` evenly spaced."""
    if method not in ("tdac", "uniform"):
        raise SlimError(f"calibration method {method!r}: choose tdac or uniform")
    schedule = schedule or NoiseSchedule.linear()
    run = record_trajectory(model, trajectory_batch, steps, schedule, generator, grid)
    n_steps = run["x"].shape[0]
    weights = tdac_weights(run["features"], radius) if method == "tdac" else torch.ones(n_steps)
    counts = allocate(weights, samples, cap=trajectory_batch)  # a step gives at most the samples the run holds
    perm_gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x, step_idx, row = draw(run["x"], counts, perm_gen)
    t, y = run["t"][step_idx], run["y"][row]
    order = torch.randperm(len(x), generator=perm_gen)
    x, t, y = x[order], t[order], y[order]
    return [(x[i:i + batch], t[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
