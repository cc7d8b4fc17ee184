"""The prune job (``slimtorch prune``): calibrate, prune (masks, or structured width pruning with optional
distillation), evaluate FP vs pruned, write DIR/model.safetensors (sparse tensors compressed, a narrower
model's shapes recorded: export/pruned.py) and DIR/report.json. Returns the report as a dict.

The CLI runs it in a staging folder (io.outdir), so the output folder appears whole or not at all.
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import torch

from slimtorch.api import apply_
from slimtorch.calib.data import calibration_set
from slimtorch.eval import evaluate
from slimtorch.export.pruned import save_pruned, state_bytes
from slimtorch.export.quantized import save_quantized
from slimtorch.jobs.compare import write_report
from slimtorch.pruning.recovery import recover_
from slimtorch.pruning.npas import NPASConfig
from slimtorch.pruning.structured import StructuredConfig
from slimtorch.sparsity.prune import PruneConfig
from slimtorch.zoo import get_entry, load_model


def run_prune(model: str, config: PruneConfig | StructuredConfig | NPASConfig, out: Path,
              calib_samples: int | None = None, limit: int | None = None, seed: int = 0, progress=None,
              recover_steps: int = 0, recover_lr: float = 1e-4) -> dict:
    """``model``: a zoo name or a local transformers folder. Writes into ``out`` directly. A structured or
    latency-aware (NPAS) config gives a narrower dense model, distilled from the original for
    ``recover_steps`` steps on the calibration data if asked."""
    model = get_entry(model).name
    kw = {} if progress is None else {"progress": progress}
    fp = load_model(model)
    if isinstance(config, StructuredConfig | NPASConfig):
        return _run_structured(model, fp, config, out, calib_samples, limit, seed, kw, recover_steps, recover_lr)
    calib = calibration_set(model, calib_samples, seed=seed, model=fp) if config.method != "magnitude" else []
    pruned = copy.deepcopy(fp)
    report = apply_(pruned, config, calib, **kw)
    measured = _side_by_side(model, fp, pruned, limit, kw)
    extra = {"prune": {"method": config.method, "pattern": config.pattern, "sparsity": report.sparsity}}
    if config.quantize is None:
        size = save_pruned(pruned, out / "model.safetensors", model, extra)
    else:  # a quantized file (export/quantized.py): its codes are stored packed, zeros included, not compressed
        save_quantized(pruned, out / "model.safetensors", model, {"recipe": config.quantize, **extra})
        size = {"bytes": (out / "model.safetensors").stat().st_size, "compressed_tensors": 0,
                "dense_bytes": state_bytes(fp)}
    result = {
        "model": model, "method": config.method, "pattern": config.pattern, "scope": config.scope,
        "comparison": config.comparison, "target_sparsity": config.sparsity, "sparsity": report.sparsity,
        "quantized": config.quantize, "bits_per_weight": report.bits_per_weight,
        **measured["compared"],
        "size": {"dense_bytes": size["dense_bytes"], "file_bytes": size["bytes"],
                 "compressed_tensors": size["compressed_tensors"]},
        "layers": report.layers, **_run_facts(report, seed, limit, measured["evaluate_s"]),
    }
    write_report(out, result, page=False)
    return result


def _side_by_side(model: str, fp, pruned, limit, kw: dict) -> dict:
    """FP and pruned evaluated on the same data: {"compared": {dataset, metrics}, "evaluate_s"}."""
    fp_res = evaluate(model, model=fp, limit=limit, latency=False, **kw)
    res = evaluate(model, model=pruned, limit=limit, latency=False, **kw)
    fp_metrics = {m.name: m.value for m in fp_res.metrics}
    return {"compared": {"dataset": res.dataset, "metrics": [{"name": m.name, "fp": fp_metrics.get(m.name),
                                                             "pruned": m.value} for m in res.metrics]},
            "evaluate_s": fp_res.seconds + res.seconds}


def _run_facts(report, seed: int, limit, evaluate_s: float) -> dict:
    """The report fields every prune job ends with: notes, data, timings, versions."""
    return {"notes": report.notes, "calib_samples": report.calib_samples, "seed": seed, "limit": limit,
            "time_s": {"prune": report.seconds, "evaluate": evaluate_s},
            "versions": {"torch": torch.__version__, "python": platform.python_version()}}


def _run_structured(model: str, fp, config: StructuredConfig | NPASConfig, out: Path, calib_samples, limit, seed,
                    kw, recover_steps: int, recover_lr: float) -> dict:
    calib = calibration_set(model, calib_samples, seed=seed, model=fp)
    pruned = copy.deepcopy(fp)
    report = apply_(pruned, config, calib, **kw)
    recovery = None
    if recover_steps:
        losses = recover_(pruned, fp, calib, steps=recover_steps, lr=recover_lr, seed=seed, **kw)
        recovery = {"steps": recover_steps, "lr": recover_lr, "loss_first": losses[0], "loss_last": losses[-1],
                    "data": "the calibration batches"}
    measured = _side_by_side(model, fp, pruned, limit, kw)
    widths = {name: after for name, (_, after) in report.groups.items()}
    if isinstance(config, NPASConfig):
        record = {"method": "npas", "importance": config.importance, "latency": config.latency,
                  "search": config.search, "evaluate": config.evaluate, "hardware": config.hardware,
                  "batch": config.batch, "heads": config.heads}
        cost = {"modelled_latency_s": {"before": report.latency_before_s, "after": report.latency_after_s,
                                       "hardware": config.hardware, "batch": config.batch,
                                       "counted": "roofline model of the Linear/Conv calls, not a measurement"}}
    else:
        record = {"method": "structured", "importance": config.importance, "ratio": report.ratio,
                  "budget": config.budget, "measure": config.measure, "heads": config.heads}
        cost = {"flops": {"before": report.flops_before, "after": report.flops_after,
                          "counted": "multiply-adds of the Linear/Conv calls on one calibration batch"}}
    size = save_pruned(pruned, out / "model.safetensors", model,
                       {"prune": record, "structured": {"widths": widths, "heads": config.heads}})
    result = {
        "model": model, **record, "sparsity": 1 - report.params_after / report.params_before,
        **measured["compared"],
        "params": {"before": report.params_before, "after": report.params_after}, **cost,
        "groups": {k: list(v) for k, v in report.groups.items()}, "recovery": recovery,
        "size": {"dense_bytes": state_bytes(fp),
                 "file_bytes": size["bytes"], "compressed_tensors": size["compressed_tensors"]},
        **_run_facts(report, seed, limit, measured["evaluate_s"]),
    }
    write_report(out, result, page=False)
    return result
