"""Per-layer quantization error: each quantized layer of a compressed model against its float original,
alone (fed the float model's own input to that layer), so one layer's number does not include the error
of the layers before it."""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.hooks import TemporaryHooks
from slimtorch.quant.modules import QuantWeight


def _relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


@torch.no_grad()
def layer_errors(fp: nn.Module, q: nn.Module, example: tuple) -> list[dict]:
    """Per quantized layer of ``q`` (in model order): its weight and activation bits, the relative weight
    error ``||W_q - W|| / ||W||``, and the relative output error of the layer alone on the float model's
    input to it for ``example`` (None where the forward on ``example`` does not reach the layer)."""
    qlayers = {n: m for n, m in q.named_modules() if isinstance(m, QuantWeight)}
    fp_modules = dict(fp.named_modules())
    inputs: dict[str, tuple] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, args)
        return hook

    qlayers = {n: m for n, m in qlayers.items() if isinstance(getattr(fp_modules.get(n), "weight", None), torch.Tensor)}
    with TemporaryHooks() as hooks:
        for name in qlayers:
            hooks.before(fp_modules[name], keep(name))
        fp(*example)
    rows = []
    for name, m in qlayers.items():
        w = fp_modules[name].weight
        out_err = None
        if name in inputs:
            out_err = _relative(m(*inputs[name]), fp_modules[name](*inputs[name]))
        rows.append({"name": name, "kind": type(fp_modules[name]).__name__, "weight_bits": m.wspec.bits,
                     "weight_dtype": m.wspec.dtype, "act_bits": m.act.spec.bits if m.act is not None else None,
                     "params": w.numel(), "weight_relative_error": _relative(m.weight(w.dtype), w),
                     "output_relative_error": out_err})
    return rows
