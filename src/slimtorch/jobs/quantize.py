"""The quantize job (``slimtorch quantize``): calibrate, quantize, evaluate FP vs quantized, write
DIR/model.safetensors and DIR/report.json. Returns the report as a dict; rendering is the CLI's job.

Nothing is written until everything else succeeded, and each file is written atomically; the CLI runs the
job in a staging folder (io.outdir), so the output folder appears whole or not at all.
"""

from __future__ import annotations

import copy
import hashlib
import platform
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from slimtorch.api import apply_
from slimtorch.calib.data import calibration_set
from slimtorch.export.block_checkpoint import BlockCheckpoints, calib_digest
from slimtorch.jobs.compare import compare_and_save, write_report
from slimtorch.quantize import PTQConfig
from slimtorch.sequential import Stream
from slimtorch.zoo import get_entry, load_model


def run_quantize(model: str, recipe: str | Path, method: str, out: Path, calib_samples: int | None = None,
                 limit: int | None = None, seed: int = 0, progress=None, calib_data: Path | None = None,
                 eval_data: Path | None = None, device: str | None = None, blocks: Path | None = None) -> dict:
    """``model``: a zoo name or a local transformers folder; ``calib_data``: what to calibrate on instead of the
    task's training data (a text file for a language model, an .npz or image folder for a vision model);
    ``eval_data``: what to evaluate on instead of the task's test data (same kinds). ``device``: the blocks
    of a layer-by-layer method run there one at a time while the model stays on the CPU; ``blocks``: a folder
    for the finished blocks of such a method (a rerun with the same settings resumes from them; removed once
    the quantization is done).
    Writes into ``out`` directly: the CLI passes a staging folder (io.outdir)."""
    model = get_entry(model).name  # a folder becomes its absolute path: the saved model's base
    config = PTQConfig(recipe, method)
    kw = {} if progress is None else {"progress": progress}
    fp = load_model(model)
    calib = calibration_set(model, calib_samples, seed=seed, model=fp, data_file=calib_data)
    if device is not None or blocks is not None:
        key = {"model": model, "method": method, "calib": calib_digest(calib),
               "recipe": hashlib.sha256(repr(config.recipe).encode()).hexdigest()}
        config = replace(config, stream=Stream(device, None if blocks is None else BlockCheckpoints(blocks, key)))
    q = copy.deepcopy(fp)
    report = apply_(q, config, calib, **kw)
    if blocks is not None:
        shutil.rmtree(blocks, ignore_errors=True)  # the model file holds them all now
    result = compare_and_save(model, fp, q, out, report.recipe, method, limit, report.bits_per_weight,
                              data=eval_data, **kw)
    result["time_s"] = {"quantize": report.seconds, **result["time_s"]}
    result.update({
        "calib_samples": report.calib_samples, "calib_data": None if calib_data is None else str(calib_data),
        "eval_data": None if eval_data is None else str(eval_data),
        "seed": seed, "limit": limit, "notes": report.notes,
        "quantized_layers": report.quantized, "skipped_layers": report.skipped,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "report": {k: v for k, v in asdict(report).items() if k not in ("quantized", "skipped")},
    })
    write_report(out, result)
    return result
