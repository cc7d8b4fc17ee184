"""What every job ends with: the float and compressed models evaluated side by side, the compressed one saved
as DIR/model.safetensors, and DIR/report.json written atomically."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from slimtorch.eval import evaluate
from slimtorch.eval.metrics import interleaved_latency, model_size_bytes
from slimtorch.io.checkpoint import atomic_write_bytes
from slimtorch.io.json_text import json_text
from slimtorch.eval.layer_error import layer_errors
from slimtorch.export.quantized import save_quantized
from slimtorch.quant.modules import QuantWeight


# Latency: both models on the FP evaluation's example, warmed up, then timed in turn (fp, quantized, fp, ...)
LATENCY_TRIALS, LATENCY_WARMUP = 20, 3
ROOFLINE_HARDWARE = "h100"  # the report's roofline plot: the chip our kernels target
RUNTIME = ("PyTorch eager on the CPU; the quantized model on its reference path (weights dequantized at every "
           "call, float matmul)")


def compare_and_save(model: str, fp: nn.Module, q: nn.Module, out: Path, recipe: str, method: str,
                     limit: int | None, bits_per_weight: float, progress=None, save=None,
                     data: Path | None = None) -> dict:
    """Evaluate the FP and quantized models side by side, save ``q`` to DIR/model.safetensors (with
    ``save(q, path)`` when given, else the quantize format), and return the report's shared fields (model,
    recipe, method, metrics, dataset, size, latency, evaluation time). ``data``: the user's evaluation data
    (eval.user_data) instead of the task's."""
    kw = {} if progress is None else {"progress": progress}
    t0 = time.perf_counter()
    fp_res = evaluate(model, model=fp, limit=limit, latency=False, data=data, **kw)
    q_res = evaluate(model, model=q, reference=fp_res, reference_model=fp, limit=limit, latency=False, data=data,
                     **kw)
    eval_seconds = time.perf_counter() - t0
    example = fp_res.example
    lat = interleaved_latency({"fp": lambda: fp(*example), "quantized": lambda: q(*example)}, LATENCY_TRIALS,
                              LATENCY_WARMUP)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.safetensors"
    if save is None:
        save_quantized(q, model_path, model, {"recipe": recipe, "method": method})
    else:
        save(q, model_path)
    fp_metrics = {m.name: m.value for m in fp_res.metrics}
    layers = layer_errors(fp, q, example)
    return {
        "model": model, "recipe": recipe, "method": method,
        "metrics": [{"name": m.name, "fp": fp_metrics.get(m.name), "quantized": m.value, "unit": m.unit,
                     "higher_is_better": m.higher_is_better} for m in q_res.metrics],
        "dataset": q_res.dataset,
        "size": {"fp_bytes": model_size_bytes(fp), "quantized_file_bytes": model_path.stat().st_size,
                 "bits_per_weight": bits_per_weight},
        "latency_ms": {"fp": lat["fp"].median_ms, "quantized_reference_path": lat["quantized"].median_ms,
                       "input": fp_res.latency_input, "fp_p10_p90": [lat["fp"].p10_ms, lat["fp"].p90_ms],
                       "quantized_p10_p90": [lat["quantized"].p10_ms, lat["quantized"].p90_ms],
                       "trials": LATENCY_TRIALS, "warmup": LATENCY_WARMUP, "threads": torch.get_num_threads(),
                       "runtime": RUNTIME},
        "time_s": {"evaluate": eval_seconds},
        "layers": layers,
        "roofline": _roofline(fp, q, example),
    }


def _roofline(fp: nn.Module, q: nn.Module, example: tuple) -> dict:
    """The cost model's roofline points for the quantized plan on an H100 (a model, not a measurement)."""
    from slimtorch.cost.estimate import estimate
    from slimtorch.cost.hardware import HARDWARE
    from slimtorch.cost.plot import roofline_data
    from slimtorch.spec import LayerPlan

    plan = {n: LayerPlan(m.wspec, m.act.spec if m.act is not None else None)
            for n, m in q.named_modules() if isinstance(m, QuantWeight)}
    hw = HARDWARE[ROOFLINE_HARDWARE]
    return roofline_data(estimate(fp, plan, example, hw), hw)


def write_report(folder: Path, report: dict, page: bool = True) -> None:
    """``folder/report.json`` and, with ``page``, ``folder/report.html`` (eval.report_html), each atomically."""
    atomic_write_bytes(folder / "report.json", (json_text(report) + "\n").encode())
    if page:
        from slimtorch.eval.report_html import render_html

        atomic_write_bytes(folder / "report.html", render_html(report).encode())
