"""The ``slimtorch quantize`` job: calibrate, quantize, evaluate FP vs quantized, write DIR/model.safetensors
and DIR/report.json. Returns the report as a dict; rendering is the CLI's job.

Nothing is written until everything else succeeded, and each file is written atomically; the CLI runs the
job in a staging folder (io.outdir), so the output folder appears whole or not at all.
"""

from __future__ import annotations

import copy
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from slimtorch.calib.data import calibration_set
from slimtorch.eval import evaluate
from slimtorch.eval.metrics import model_size_bytes
from slimtorch.io.checkpoint import atomic_write_bytes
from slimtorch.io.json_text import json_text
from slimtorch.io.quantized import save_quantized
from slimtorch.quantize import quantize_, resolve_recipe
from slimtorch.zoo import get_entry, load_model


def compare_and_save(model: str, fp: nn.Module, q: nn.Module, out: Path, recipe: str, method: str,
                     limit: int | None, bits_per_weight: float, progress=None, save=None) -> dict:
    """Evaluate the FP and quantized models side by side, save ``q`` to DIR/model.safetensors (with
    ``save(q, path)`` when given, else the quantize format), and return the report's shared fields (model,
    recipe, method, metrics, dataset, size, latency, evaluation time)."""
    kw = {} if progress is None else {"progress": progress}
    t0 = time.perf_counter()
    fp_res = evaluate(model, model=fp, limit=limit, **kw)
    q_res = evaluate(model, model=q, reference=fp, limit=limit, **kw)
    eval_seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.safetensors"
    if save is None:
        save_quantized(q, model_path, model, {"recipe": recipe, "method": method})
    else:
        save(q, model_path)
    fp_metrics = {m.name: m.value for m in fp_res.metrics}
    return {
        "model": model, "recipe": recipe, "method": method,
        "metrics": [{"name": m.name, "fp": fp_metrics.get(m.name), "quantized": m.value, "unit": m.unit,
                     "higher_is_better": m.higher_is_better} for m in q_res.metrics],
        "dataset": q_res.dataset,
        "size": {"fp_bytes": model_size_bytes(fp), "quantized_file_bytes": model_path.stat().st_size,
                 "bits_per_weight": bits_per_weight},
        "latency_ms": {"fp": fp_res.latency_ms, "quantized_reference_path": q_res.latency_ms,
                       "input": fp_res.latency_input},
        "time_s": {"evaluate": eval_seconds},
    }


def run_quantize(model: str, recipe: str | Path, method: str, out: Path, calib_samples: int | None = None,
                 limit: int | None = None, seed: int = 0, progress=None, calib_text: Path | None = None) -> dict:
    """``model``: a zoo name or a local transformers folder; ``calib_text``: text to calibrate a language model on.
    Writes into ``out`` directly: the CLI passes a staging folder (io.outdir)."""
    model = get_entry(model).name  # a folder becomes its absolute path: the saved model's base
    rec = resolve_recipe(recipe)
    kw = {} if progress is None else {"progress": progress}
    fp = load_model(model)
    calib = calibration_set(model, calib_samples, seed=seed, model=fp, text_file=calib_text)
    q = copy.deepcopy(fp)
    report = quantize_(q, rec, calib, method=method, **kw)
    result = compare_and_save(model, fp, q, out, rec.name, method, limit, report.bits_per_weight, **kw)
    result["time_s"] = {"quantize": report.seconds, **result["time_s"]}
    result.update({
        "calib_samples": report.calib_samples, "calib_text": None if calib_text is None else str(calib_text),
        "seed": seed, "limit": limit, "notes": report.notes,
        "quantized_layers": report.quantized, "skipped_layers": report.skipped,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "report": {k: v for k, v in asdict(report).items() if k not in ("quantized", "skipped")},
    })
    atomic_write_bytes(out / "report.json", (json_text(result) + "\n").encode())
    return result
