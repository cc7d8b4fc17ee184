"""The export job (``slimtorch export DIR --format onnx|hf``): a quantized model saved by ``quantize`` turned
into a file another runtime loads, and measured there. ``onnx`` also takes a pruned model (``prune``,
``train-sparse``): a structured pruning's narrower model is where ONNX Runtime's speed-up shows.

``onnx``: DIR/model.safetensors becomes QDQ ONNX (``model.onnx``) beside the float model's ONNX
(``fp.onnx``); both run in ONNX Runtime on the CPU on the model's evaluation data, next to PyTorch (FP
eager and our quantized reference path), and each runtime is timed in turn at the requested batch sizes.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from slimtorch.errors import SlimError
from slimtorch.eval import evaluate
from slimtorch.eval.harness import task_batch
from slimtorch.eval.metrics import interleaved_latency
from slimtorch.export.quantized import load_quantized
from slimtorch.jobs.compare import write_report
from slimtorch.zoo import get_entry, load_model

ONNX_TASKS = ("fmnist-classification", "imagenet-classification", "sentence-embedding")
LATENCY_TRIALS, LATENCY_WARMUP = 10, 3


def onnx_io(task: str) -> tuple[list[str], dict[str, dict[int, str]]]:
    """Input names and free dimensions of a task's models in ONNX."""
    if task == "sentence-embedding":
        return ["input_ids", "attention_mask"], {n: {0: "batch", 1: "tokens"} for n in ("input_ids", "attention_mask")}
    return ["x"], {"x": {0: "batch"}}


def saved_model_path(folder: Path) -> Path:
    """``folder``'s model.safetensors, or SlimError if it holds none (checked before any work)."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise SlimError(f"{folder} holds no model.safetensors; give a folder written by `slimtorch quantize`")
    return path


def load_saved(folder: Path, pruned_ok: bool = False) -> tuple[torch.nn.Module, dict, bool]:
    """The model of a ``quantize`` (or, with ``pruned_ok``, a ``prune`` / ``train-sparse``) output folder, its
    metadata, and whether it is a pruned (float) model."""
    from slimtorch.export.pruned import FORMAT as PRUNED, load_pruned
    from slimtorch.io.checkpoint import read_metadata

    path = saved_model_path(folder)
    if read_metadata(path).get("format") == PRUNED:
        if not pruned_ok:
            raise SlimError(f"{folder} holds a pruned model; this export takes quantized ones (use --format onnx)")
        model, meta = load_pruned(path)
        return model, meta, True
    model, meta = load_quantized(path)
    return model, meta, False


def run_export_onnx(folder: Path, out: Path, batches: tuple[int, ...] = (1, 256), limit: int | None = None,
                    progress=None) -> dict:
    """Export ``folder``'s quantized model and its float base to ONNX in ``out`` (a staging folder), measure
    both in ONNX Runtime beside PyTorch, write ``out/report.json``; returns the report."""
    from slimtorch.calib.data import calibration_set
    from slimtorch.eval.onnx_runtime import OnnxModel, OnnxSentenceEncoder
    from slimtorch.export.onnx import export_onnx

    kw = {} if progress is None else {"progress": progress}
    q, meta, pruned = load_saved(folder, pruned_ok=True)
    kind = "pruned" if pruned else "int8"  # the exported model's column: onnx_<kind>
    base = meta["base"]
    entry = get_entry(base)
    if entry.task not in ONNX_TASKS:
        raise SlimError(f"ONNX export covers vision models and sentence encoders; {base} is a {entry.task} model "
                        f"(use --format hf)")
    fp = load_model(base)
    t0 = time.perf_counter()
    names, dynamic = onnx_io(entry.task)
    tokenizer = getattr(fp, "tokenizer", None)
    example = task_batch(base, 2, tokenizer)
    calib = calibration_set(base, None, seed=0, model=fp)
    out.mkdir(parents=True, exist_ok=True)
    info_fp = export_onnx(fp, example, out / "fp.onnx", names, dynamic)
    info_q = export_onnx(q, example, out / "model.onnx", names, dynamic, calib=() if pruned else calib)
    export_s = time.perf_counter() - t0
    wrap = OnnxSentenceEncoder if entry.task == "sentence-embedding" else OnnxModel
    ort_fp, ort_q = wrap(out / "fp.onnx", tokenizer), wrap(out / "model.onnx", tokenizer)

    t0 = time.perf_counter()
    fp_res = evaluate(base, model=fp, limit=limit, latency=False, **kw)  # its predictions are the reference
    results = {name: evaluate(base, model=m, reference=fp_res, reference_model=fp, limit=limit, latency=False, **kw)
               for name, m in (("onnx_fp", ort_fp), (f"onnx_{kind}", ort_q))}
    quantized = None if pruned else _quantize_report_metrics(folder, limit, fp_res.dataset)
    if quantized is None:  # no quantize report measured on the same data: measure here
        q_res = evaluate(base, model=q, reference=fp_res, reference_model=fp, limit=limit, latency=False, **kw)
        quantized = {m.name: m.value for m in q_res.metrics}
    pytorch = {"pytorch_fp": {m.name: m.value for m in fp_res.metrics},
               "pytorch_pruned" if pruned else "pytorch_quantized": quantized}
    eval_s = time.perf_counter() - t0
    metrics = []
    for m in results[f"onnx_{kind}"].metrics:
        row = {"name": m.name, "unit": m.unit, "higher_is_better": m.higher_is_better,
               **{k: v.get(m.name) for k, v in pytorch.items()}}
        for runtime, res in results.items():
            row[runtime] = next((x.value for x in res.metrics if x.name == m.name), None)
        metrics.append(row)

    t0 = time.perf_counter()
    latency = {}
    for b in batches:
        args = task_batch(base, b, tokenizer)
        with torch.inference_mode():
            lat = interleaved_latency({"pytorch_fp": lambda: fp(*args), "onnx_fp": lambda: ort_fp(*args),
                                       f"onnx_{kind}": lambda: ort_q(*args)}, LATENCY_TRIALS, LATENCY_WARMUP)
        latency[str(b)] = {
            "input": " x ".join(str(tuple(a.shape)) for a in args),
            **{k: {"median_ms": v.median_ms, "p10_ms": v.p10_ms, "p90_ms": v.p90_ms,
                   "items_per_s": 1e3 * b / v.median_ms} for k, v in lat.items()},
            f"speedup_{kind}_vs_onnx_fp": lat["onnx_fp"].median_ms / lat[f"onnx_{kind}"].median_ms,
            f"speedup_{kind}_vs_pytorch_fp": lat["pytorch_fp"].median_ms / lat[f"onnx_{kind}"].median_ms,
        }
    import onnxruntime

    report = {
        "model": base, "source": str(Path(folder).absolute()), "format": "onnx", "recipe": meta.get("recipe"),
        "method": meta.get("method") or (meta.get("prune") or {}).get("method"),
        "dataset": results[f"onnx_{kind}"].dataset, "metrics": metrics,
        "files": {"model.onnx": info_q["bytes"], "fp.onnx": info_fp["bytes"]},
        "export": {k: v for k, v in info_q.items() if k != "path"},
        "latency": latency,
        "timing": {"trials": LATENCY_TRIALS, "warmup": LATENCY_WARMUP, "threads": torch.get_num_threads(),
                   "protocol": "each runtime warmed up, then all timed in turn on the same batch"},
        "runtimes": {"pytorch_fp": f"PyTorch {torch.__version__} eager, float32",
                     "onnx_fp": f"ONNX Runtime {onnxruntime.__version__} CPU, float32",
                     f"onnx_{kind}": f"ONNX Runtime {onnxruntime.__version__} CPU, " + (
                         "float32, the pruned model (narrower layers; zeros of a mask are not skipped)" if pruned
                         else "QDQ int8 fused into integer kernels")},
        "notes": _notes(info_q),
        "time_s": {"export": export_s, "evaluate": eval_s, "latency": time.perf_counter() - t0},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
    }
    write_report(out, report, page=False)
    return report


def _quantize_report_metrics(folder: Path, limit: int | None, dataset: str) -> dict | None:
    """The quantized model's metrics in ``folder``'s report.json, where they were measured on the same data
    (same dataset line and limit); None otherwise (then the export job measures them itself)."""
    import json

    from slimtorch.io.files import regular_file

    path = Path(folder) / "report.json"
    try:
        regular_file("report", path, 1 << 24)
        rep = json.loads(path.read_text(encoding="utf-8"))
        if rep.get("dataset") != dataset or rep.get("limit") != limit:
            return None
        out = {m["name"]: float(m["quantized"]) for m in rep["metrics"] if isinstance(m.get("name"), str)}
    except (SlimError, OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return out


def _notes(info: dict) -> list[str]:
    notes = []
    if info["added_points"]:
        notes.append(f"{info['added_points']} activation points quantized in ONNX beyond the model's own (outputs of "
                     f"convolutions and residual additions, uint8, min/max on the calibration set) so that ONNX "
                     f"Runtime runs integer kernels; the onnx_int8 column measures their effect")
    if info["batchnorms_folded"]:
        notes.append(f"{info['batchnorms_folded']} batch norms folded into the int8 convolutions' per-channel scales "
                     f"(exact in real numbers)")
    return notes


def _hf_base(base: str, fp: torch.nn.Module):
    """The float transformers model our base model is (module names shared) and its tokenizer."""
    from slimtorch.zoo.llama import TinyLlama

    if isinstance(fp, TinyLlama):
        from slimtorch.zoo.llama import to_hf
        from slimtorch.zoo.lm_data import hf_tokenizer

        return to_hf(fp), hf_tokenizer()
    from slimtorch.zoo.local import local_tokenizer

    return fp, local_tokenizer(Path(base))


def run_export_hf(folder: Path, out: Path, limit: int | None = None, progress=None) -> dict:
    """Write ``folder``'s quantized language model as a compressed-tensors transformers folder in ``out``,
    reload it with transformers and compressed-tensors, and compare its perplexity and logits with ours."""
    from slimtorch.export.hf import load_compressed_tensors, save_compressed_tensors

    kw = {} if progress is None else {"progress": progress}
    q, meta, _ = load_saved(folder)
    base = meta["base"]
    entry = get_entry(base)
    if entry.task != "causal-lm":
        raise SlimError(f"hf export covers language models; {base} is a {entry.task} model (use --format onnx)")
    fp = load_model(base)
    fp_hf, tokenizer = _hf_base(base, fp)
    t0 = time.perf_counter()
    info = save_compressed_tensors(q, fp_hf, out, tokenizer)
    export_s = time.perf_counter() - t0
    reloaded, route = load_compressed_tensors(out)
    ours = evaluate(base, model=q, limit=limit, latency=False, **kw)
    metrics = [{"name": m.name, "unit": m.unit, "higher_is_better": m.higher_is_better, "slimtorch_quantized": m.value}
               for m in ours.metrics]
    notes: list[str] = []
    theirs = evaluate(base, model=reloaded, reference=q, limit=limit, latency=False, **kw)
    for m in theirs.metrics:
        row = next((r for r in metrics if r["name"] == m.name), None)
        if row is None:  # agreement with our model: theirs only
            metrics.append(row := {"name": m.name, "unit": m.unit, "higher_is_better": m.higher_is_better,
                                   "slimtorch_quantized": None})
        row["transformers_compressed_tensors"] = m.value
    from slimtorch.zoo.lm_data import logits_of

    x = ours.example[0]
    with torch.no_grad():
        a, b = logits_of(q(x)), logits_of(reloaded(x))
    ppl = [r for r in metrics if r["name"] == "heldout_perplexity"][0]
    check = {"route": route, "max_abs_logit_difference": float((a - b).abs().max()), "logits_compared_on": list(x.shape),
             "perplexity_relative_difference": abs(ppl["transformers_compressed_tensors"] /
                                                   ppl["slimtorch_quantized"] - 1)}
    if not route.startswith("transformers"):
        notes.append(f"reloaded through {route}")
    import transformers

    report = {
        "model": base, "source": str(Path(folder).absolute()), "format": "hf", "recipe": meta.get("recipe"),
        "method": meta.get("method"), "dataset": ours.dataset, "metrics": metrics,
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
        "export": info, "reload_check": check, "notes": notes, "time_s": {"export": export_s},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "compressed_tensors": _version("compressed-tensors"), "python": platform.python_version()},
    }
    write_report(out, report, page=False)
    return report


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
