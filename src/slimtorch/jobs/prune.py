"""The prune job (``slimtorch prune``): calibrate, prune, evaluate FP vs pruned, write DIR/model.safetensors
(sparse tensors compressed: export/pruned.py) and DIR/report.json. Returns the report as a dict.

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
from slimtorch.export.pruned import save_pruned
from slimtorch.export.quantized import save_quantized
from slimtorch.jobs.compare import write_report
from slimtorch.sparsity.prune import PruneConfig
from slimtorch.zoo import get_entry, load_model


def run_prune(model: str, config: PruneConfig, out: Path, calib_samples: int | None = None, limit: int | None = None,
              seed: int = 0, progress=None) -> dict:
    """``model``: a zoo name or a local transformers folder. Writes into ``out`` directly."""
    model = get_entry(model).name
    kw = {} if progress is None else {"progress": progress}
    fp = load_model(model)
    calib = calibration_set(model, calib_samples, seed=seed, model=fp) if config.method != "magnitude" else []
    pruned = copy.deepcopy(fp)
    report = apply_(pruned, config, calib, **kw)
    fp_res = evaluate(model, model=fp, limit=limit, latency=False, **kw)
    res = evaluate(model, model=pruned, limit=limit, latency=False, **kw)
    extra = {"prune": {"method": config.method, "pattern": config.pattern, "sparsity": report.sparsity}}
    if config.quantize is None:
        size = save_pruned(pruned, out / "model.safetensors", model, extra)
    else:  # a quantized file (export/quantized.py): its codes are stored packed, zeros included, not compressed
        save_quantized(pruned, out / "model.safetensors", model, {"recipe": config.quantize, **extra})
        size = {"bytes": (out / "model.safetensors").stat().st_size, "compressed_tensors": 0,
                "dense_bytes": sum(t.numel() * t.element_size() for t in fp.state_dict().values())}
    fp_metrics = {m.name: m.value for m in fp_res.metrics}
    result = {
        "model": model, "method": config.method, "pattern": config.pattern, "scope": config.scope,
        "comparison": config.comparison, "target_sparsity": config.sparsity, "sparsity": report.sparsity,
        "quantized": config.quantize, "bits_per_weight": report.bits_per_weight,
        "dataset": res.dataset,
        "metrics": [{"name": m.name, "fp": fp_metrics.get(m.name), "pruned": m.value} for m in res.metrics],
        "size": {"dense_bytes": size["dense_bytes"], "file_bytes": size["bytes"],
                 "compressed_tensors": size["compressed_tensors"]},
        "layers": report.layers, "notes": report.notes, "calib_samples": report.calib_samples, "seed": seed,
        "limit": limit, "time_s": {"prune": report.seconds, "evaluate": fp_res.seconds + res.seconds},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    write_report(out, result, page=False)
    return result
