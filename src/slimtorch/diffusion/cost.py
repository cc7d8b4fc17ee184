"""Modelled cost of sampling (the roofline model, never a measurement): the FLOPs and bytes of every
Linear/Conv2d call that one sample's sampling loop makes, scaled to a batch, on a chip of the cost model.

Why: the UNet's convolutions have no quantized kernel, so what W8A8 would buy them can only be modelled; and
caching or a cascade changes which layers run at which step, which a per-forward estimate cannot see. The
calls are traced from a real sampling run of one sample (classifier-free guidance, cached steps and the
LowDiff stages included), so the model follows what the sampler actually does. Attention matmuls, norms and
elementwise work are not counted.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from slimtorch.cost.estimate import layer_costs, trace
from slimtorch.cost.hardware import HARDWARE
from slimtorch.quant.modules import QuantWeight
from slimtorch.spec import LayerPlan

NOTE = ("roofline model of the Linear/Conv2d calls of one traced sampling run (attention matmuls, norms and "
        "elementwise work not counted); not a measurement")


def sampling_cost(model: nn.Module, run_one: Callable[[], object], batch: int, hardware: str = "h100") -> dict:
    """Cost per batch of ``batch`` samples; ``run_one()`` samples one (the probe). Quantized layers are
    costed at their weight and activation formats, the others in bf16."""
    seen, _ = trace(model, run_one)
    plan = {n: LayerPlan(m.wspec, m.act.spec if m.act is not None else None)
            for n, m in model.named_modules() if isinstance(m, QuantWeight)}
    layers = layer_costs(seen, plan, rows_scale=batch)
    hw = HARDWARE[hardware]
    time_s = sum(c.time(hw) for c in layers)
    conv = sum(c.time(hw) for c in layers if c.kind == "conv2d")
    return {"hardware": hw.name, "batch": batch, "layer_calls_per_sample": len(seen),
            "flops": sum(c.flops for c in layers), "bytes": sum(c.bytes for c in layers), "time_s": time_s,
            "samples_per_s": batch / time_s if time_s else float("inf"),
            "conv_share_of_time": conv / time_s if time_s else 0.0, "note": NOTE}
