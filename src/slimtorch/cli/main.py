"""The ``slimtorch`` command line. User mistakes print one line on stderr and exit with status 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import typer
from rich.table import Table

from slimtorch.calib.data import check_data_path
from slimtorch.cli import args
from slimtorch.cli.console import err, out, progress_bar
from slimtorch.cli.diffusion import register as register_diffusion
from slimtorch.cli.prune import register as register_prune
from slimtorch.cli.signals import Terminated, on_sigint, on_sigterm
from slimtorch.cli.train_sparse import register as register_train_sparse
from slimtorch.cost.hardware import HARDWARE
from slimtorch.errors import SlimError, shown
from slimtorch.io.json_text import json_text
from slimtorch.qat.methods import QAT_METHODS
from slimtorch.quant.recipe import PRESETS
from slimtorch.quantize import METHODS, RESUMABLE

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress trained PyTorch models and measure what you got.")
MAX_CALIB_SAMPLES = 1_000_000


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(message: str, code: int = 2, as_json: bool = False) -> None:
    """Print one line to stderr (and, with ``--json``, a JSON object on stdout) and exit with ``code``."""
    line = _one_line(message)
    if as_json:
        print(json.dumps({"error": line, "exit_code": code}))
    print(f"slimtorch: error: {line}", file=sys.stderr)
    raise SystemExit(code)


def _fmt(value: float) -> str:
    """Counts as integers, values in [-1, 1] (cosines) with 6 decimals, the rest with 2."""
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6f}" if abs(value) <= 1.0 else f"{value:,.2f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the model zoo with each model's FP metrics as recorded in the manifest."""
    from slimtorch.zoo import ZOO, manifest

    rows = manifest()
    if as_json:
        print(json.dumps({n: {"task": e.task, "description": e.description, "source": e.source, **rows.get(n, {})}
                          for n, e in ZOO.items()}, indent=2))
        return
    table = Table(title="slimtorch model zoo (FP metrics as measured by `slimtorch eval`)")
    table.add_column("model", no_wrap=True)
    table.add_column("task")
    table.add_column("params", justify="right")
    table.add_column("weights", justify="right", no_wrap=True)
    table.add_column("FP metrics")
    for name, e in ZOO.items():
        row = rows.get(name, {})
        metrics = "\n".join(f"{k} {_fmt(v)}" for k, v in row.get("fp_metrics", {}).items())
        task = e.task.replace("classification", "cls").replace("sentence-", "")
        table.add_row(name, task, f"{row.get('params', 0) / 1e6:.2f}M", _mib(row.get("weights_bytes", 0)), metrics)
    out.print(table)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Zoo model name (see `slimtorch models`) or a save_pretrained folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    limit: int = typer.Option(None, "--limit", help="Evaluate on the first N items only (quick check)."),
    eval_data: Path = typer.Option(None, "--eval", help="Data to evaluate on instead of the task's test data: a "
                                   "text file (language models), an .npz (x, y) or a folder of class folders."),
) -> None:
    """Evaluate a zoo model on its task: metrics, size, parameters and CPU latency."""
    from slimtorch.eval import evaluate
    from slimtorch.zoo import get_entry, manifest

    args.count("--limit", limit)
    get_entry(model)  # unknown names fail before any loading
    check_data_path("--eval", model, eval_data)
    res = evaluate(model, limit=limit, progress=progress_bar, data=eval_data)
    if as_json:
        print(json_text(res.to_dict()))
        return
    recorded = {} if eval_data is not None else manifest().get(model, {}).get("fp_metrics", {})  # other data
    table = Table(title=f"{model}: {res.dataset}")
    for col in ("metric", "value", "manifest"):
        table.add_column(col)
    for m in res.metrics:
        rec = recorded.get(m.name)
        table.add_row(m.name, f"{_fmt(m.value)} {m.unit}".strip(), "" if rec is None else _fmt(rec))
    table.add_row("parameters", f"{res.params:,}", "")
    table.add_row("size (params + buffers)", _mib(res.size_bytes), "")
    table.add_row("CPU latency (median)", f"{res.latency_ms:.2f} ms for input {res.latency_input}", "")
    out.print(table)
    for name, top5 in res.details.get("top5", {}).items():
        out.print(f"{name}: top-5 = {', '.join(top5)}")
    if res.task == "causal-lm":
        ppl, uni = res.metric("heldout_perplexity"), res.metric("unigram_perplexity")
        out.print(f"held-out perplexity {ppl:.2f} vs unigram baseline {uni:.2f} on the same tokens "
                  f"({uni / ppl:.1f}x lower)")
    out.print(f"evaluated in {res.seconds:.1f} s")


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Argument(..., help="Zoo model name (see `slimtorch models`) or a transformers "
                                "save_pretrained folder (a causal LM with its tokenizer)."),
    preset: str = typer.Option(None, "--preset", help=", ".join(PRESETS) + "."),
    recipe: Path = typer.Option(None, "--recipe", help="YAML recipe (targets/ignore regexes, weight/act specs)."),
    method: str = typer.Option("rtn", "--method", help=" | ".join(METHODS) + "."),
    out_dir: str = typer.Option(..., "--out", help="Folder for model.safetensors and report.json."),
    calib_samples: int = typer.Option(None, "--calib-samples", help="Calibration samples (default per task)."),
    calib_data: Path = typer.Option(None, "--calib", help="Data to calibrate on: a text file (language models), "
                                    "an .npz (x, y) or a folder of class folders (vision models)."),
    eval_data: Path = typer.Option(None, "--eval", help="Data to evaluate on instead of the task's test data: a "
                                   "text file (language models), an .npz (x, y) or a folder of class folders."),
    limit: int = typer.Option(None, "--limit", help="Evaluate on the first N items only (quick check)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration draw."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists and is not empty."),
    device: str = typer.Option(None, "--device", help="gptq, awq, smoothquant: run each block on this device "
                               "(cuda) in turn while the model stays in CPU memory (default: all on the CPU)."),
    resume: bool = typer.Option(False, "--resume", help="gptq, awq, smoothquant: continue an interrupted run from "
                                "the blocks it finished (kept in .DIR.partial/blocks/ beside DIR)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Calibrate and quantize a model, evaluate FP and quantized side by side, save both files."""
    from slimtorch.io.outdir import StagedOutput
    from slimtorch.jobs.quantize import run_quantize
    from slimtorch.quantize import resolve_recipe
    from slimtorch.zoo import get_entry

    if (preset is None) == (recipe is None):
        raise SlimError("give exactly one of --preset NAME or --recipe FILE")
    args.choice("--method", method, list(METHODS))
    args.count("--calib-samples", calib_samples, MAX_CALIB_SAMPLES)
    args.count("--limit", limit)
    args.seed(seed)
    rec = resolve_recipe(recipe if recipe is not None else preset)
    get_entry(model)  # unknown names fail before any work
    check_data_path("--calib", model, calib_data)
    check_data_path("--eval", model, eval_data)
    dev = args.device(device)
    layered = method in RESUMABLE  # the layer-by-layer methods: their finished blocks are kept for --resume
    if resume and not layered:
        raise SlimError(f"--resume continues gptq, awq or smoothquant runs; {method} has no blocks to resume")
    stage = StagedOutput(out_dir, overwrite, resumable=layered)
    stage.check()
    blocks = stage.resume_folder / "blocks"
    if resume and not any(blocks.glob("block-*.safetensors")):
        raise SlimError(f"--resume: no finished blocks in {blocks}; run without --resume")
    if layered and not resume and stage.resume_folder.is_dir():
        shutil.rmtree(stage.resume_folder, ignore_errors=True)  # an old run's staging: this run starts afresh
    with stage as folder:
        res = run_quantize(model, rec, method, folder, calib_samples, limit, seed, progress=progress_bar,
                           calib_data=calib_data, eval_data=eval_data, device=dev,
                           blocks=blocks if layered else None)  # folder is stage.resume_folder here
    if as_json:
        print(json_text(res))
        return
    _print_report(model, res, stage.out)


def _print_report(model: str, res: dict, out_dir: Path) -> None:
    """The FP-vs-quantized table of a quantize or train-qat report, then its notes."""
    table = Table(title=f"{model} {res['recipe']} ({res['method']}): {res['dataset']}")
    for col in ("metric", "FP", "quantized"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for m in res["metrics"]:
        fp = "" if m["fp"] is None else _fmt(m["fp"])
        table.add_row(m["name"], fp, _fmt(m["quantized"]))
    size = res["size"]
    table.add_row("size", _mib(size["fp_bytes"]) + " (in memory)", _mib(size["quantized_file_bytes"]) + " (file)")
    table.add_row("bits per weight", "32", f"{size['bits_per_weight']:.2f}")
    lat = res["latency_ms"]
    spread = {k: " ({:.2f}-{:.2f})".format(*lat[k]) if k in lat else "" for k in ("fp_p10_p90", "quantized_p10_p90")}
    table.add_row("CPU latency, median (p10-p90)", f"{lat['fp']:.2f} ms{spread['fp_p10_p90']}",
                  f"{lat['quantized_reference_path']:.2f} ms{spread['quantized_p10_p90']}")
    if "runtime" in lat:
        table.caption = (f"latency: {lat['runtime']}; input {lat['input']}; {lat['trials']} timings of each model in "
                         f"turn after {lat['warmup']} warm-up calls; {lat['threads']} CPU threads")
    table.add_row("time", "", ", ".join(f"{k} {v:.1f} s" for k, v in res["time_s"].items()))
    out.print(table)
    if res["skipped_layers"]:
        out.print(f"{len(res['skipped_layers'])} layers kept in float:")
        for name, why in res["skipped_layers"].items():
            out.print(f"  {name}: {why}")
    for note in res["notes"]:
        out.print(f"note: {note}")
    out.print(f"wrote {out_dir / 'model.safetensors'}, {out_dir / 'report.json'} and {out_dir / 'report.html'}")


def _resume_checkpoint(stage) -> Path:
    """The checkpoint to resume from: an interrupted run's (kept in its staging folder) or a finished one's."""
    from slimtorch.distill.trainer import CHECKPOINT

    for folder in (stage.resume_folder, stage.out):
        if (folder / "checkpoints" / CHECKPOINT).is_file():
            return folder / "checkpoints" / CHECKPOINT
    raise SlimError(f"--resume: no checkpoint in {stage.resume_folder / 'checkpoints'} or "
                    f"{stage.out / 'checkpoints'}; run without --resume")


def _epoch_line(row: dict, epochs: int) -> str:
    metric = row.get("metric", float("nan"))
    shown = (", ".join(f"{b} bits {v:.2f}%" for b, v in metric.items()) if isinstance(metric, dict)
             else f"{metric:.2f}%")
    return (f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, top-1 on 2,000 test images {shown}, "
            f"{row['seconds']:.0f} s")


def _bits_help() -> str:
    """How --bits reads, per method (methods that read it alike share a line)."""
    readings: dict[str, list[str]] = {}
    for name, m in QAT_METHODS.items():
        readings.setdefault(m.bits_help, []).append(name)
    return "; ".join(f"{', '.join(names)}: {how}" for how, names in readings.items()) + "."


@app.command("train-qat")
def train_qat_cmd(
    model: str = typer.Argument(..., help="fmnist-cnn or fmnist-vit."),
    method: str = typer.Option("lsq", "--method", help="; ".join(f"{n}: {m.summary}" for n, m in QAT_METHODS.items())
                               + "."),
    bits: str = typer.Option("4", "--bits", help=_bits_help()),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs over Fashion-MNIST train."),
    out_dir: str = typer.Option(..., "--out", help="Folder for model.safetensors, report.json, checkpoints/."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default: 1e-3 with adam, 0.01 with sgd)."),
    optimizer: str = typer.Option("adam", "--optimizer", help="adam | sgd."),
    batch_size: int = typer.Option(256, "--batch-size"),
    kd: float = typer.Option(1.0, "--kd", help="Weight of distillation from the FP model (0: labels only)."),
    first_last_bits: int = typer.Option(8, "--first-last-bits", help="Bits of the first and last layers "
                                        "(0: same as the rest)."),
    limit_train: int = typer.Option(None, "--limit-train", help="Train on the first N images only."),
    limit: int = typer.Option(None, "--limit", help="Evaluate on the first N test images only."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when there is one)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint of an interrupted run "
                                "(kept in .DIR.partial/ beside DIR) or of DIR/checkpoints/; replaces DIR."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists and is not empty."),
    seed: int = typer.Option(0, "--seed"),
    adc_bits: int = typer.Option(6, "--adc-bits", help="pim: ADC resolution of the simulated array."),
    rows: int = typer.Option(64, "--rows", help="pim: products summed per analog partial sum."),
    width_lr: float = typer.Option(None, "--width-lr", help="fracbits: SGD learning rate of the learned widths "
                                   "(default 0.05, the paper's; larger spreads the widths further apart)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Quantization-aware training with distillation from the FP model; saves the quantize format (the
    fixed-point, binary and PIM methods save their state dict)."""
    from slimtorch.distill import TrainConfig
    from slimtorch.io.outdir import StagedOutput
    from slimtorch.jobs.qat import check_train_qat, run_train_qat

    check_train_qat(model, method, bits, width_lr)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, kd_weight=kd, seed=seed,
                      lr=lr if lr is not None else 1e-3 if optimizer == "adam" else 0.01,
                      weight_decay=0.0 if optimizer == "adam" else 5e-5, width_lr=width_lr or 0.0)
    args.count("--limit-train", limit_train, 60_000)
    args.count("--limit", limit)
    args.count("--rows", rows, 65_536)
    args.count("--adc-bits", adc_bits, 16)
    args.choice("--first-last-bits", str(first_last_bits), ("0", "2", "3", "4", "5", "6", "7", "8"))
    dev = args.device(device)
    stage = StagedOutput(out_dir, overwrite or resume, resumable=True)  # resuming DIR's run replaces DIR
    stage.check()
    resume_from = _resume_checkpoint(stage) if resume else None
    with stage as folder:
        if resume_from is not None and resume_from.parent.parent != folder:
            (folder / "checkpoints").mkdir(exist_ok=True)
            shutil.copy2(resume_from, folder / "checkpoints" / resume_from.name)
        res = run_train_qat(model, method, bits, folder, cfg, limit_train, limit, dev, resume,
                            first_last_bits or None, progress=progress_bar,
                            log=lambda line: err.print(_epoch_line(json.loads(line), epochs)), adc_bits=adc_bits,
                            rows=rows)
    out_dir = stage.out
    if as_json:
        print(json_text(res))
        return
    if "widths" in res:  # AdaBits: one report per width
        for folder in (w["folder"] for w in res["widths"].values()):
            _print_report(model, json.loads((out_dir / folder / "report.json").read_text()), out_dir / folder)
        return
    _print_report(model, res, out_dir)


EXPORT_FORMATS = ("onnx", "hf")
MAX_BATCH = 4096


def _batches(raw: str) -> tuple[int, ...]:
    parts = [p.strip() for p in raw.split(",")]
    if not raw.strip() or len(parts) > 8 or not all(p.isdigit() and 1 <= int(p) <= MAX_BATCH for p in parts):
        raise SlimError(f"--batch takes up to 8 comma-separated sizes from 1 to {MAX_BATCH}, got {shown(raw)}")
    return tuple(int(p) for p in parts)


@app.command("export")
def export_cmd(
    folder: Path = typer.Argument(..., help="A folder written by `slimtorch quantize` (model.safetensors)."),
    fmt: str = typer.Option(..., "--format", help="onnx: QDQ ONNX run in ONNX Runtime (vision models, encoders); "
                            "hf: a transformers folder in the compressed-tensors format (language models)."),
    out_dir: str = typer.Option(None, "--out", help="Output folder (default: FOLDER/onnx or FOLDER/hf)."),
    batch: str = typer.Option("1,256", "--batch", help="onnx: batch sizes to time, comma-separated."),
    limit: int = typer.Option(None, "--limit", help="Evaluate on the first N items only (quick check)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output folder if it is not empty."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Export a quantized model for another runtime, and measure it there."""
    from slimtorch.io.outdir import StagedOutput
    from slimtorch.jobs.export import saved_model_path

    args.choice("--format", fmt, EXPORT_FORMATS)
    args.count("--limit", limit)
    batches = _batches(batch)
    saved_model_path(folder)
    stage = StagedOutput(out_dir if out_dir is not None else folder / fmt, overwrite)
    stage.check()
    with stage as staging:
        if fmt == "onnx":
            from slimtorch.jobs.export import run_export_onnx

            res = run_export_onnx(folder, staging, batches, limit, progress=progress_bar)
        else:
            from slimtorch.jobs.export import run_export_hf

            res = run_export_hf(folder, staging, limit, progress=progress_bar)
    if as_json:
        print(json_text(res))
        return
    _print_export(res, stage.out)


def _print_export(res: dict, out_dir: Path) -> None:
    runtimes = [k for k in res["metrics"][0] if k not in ("name", "unit", "higher_is_better")]
    table = Table(title=f"{res['model']} {res.get('recipe') or ''} exported to {res['format']}: {res['dataset']}")
    table.add_column("metric")
    for r in runtimes:
        table.add_column(r.replace("_", " "), justify="right")
    for m in res["metrics"]:
        table.add_row(m["name"], *["" if m[r] is None else _fmt(m[r]) for r in runtimes])
    out.print(table)
    if res.get("latency"):
        lat = Table(title="CPU latency, median (p10-p90), and throughput")
        kind = "pruned" if "onnx_pruned" in res["runtimes"] else "int8"
        shown_kind = "pruned" if kind == "pruned" else "INT8"
        labels = {"pytorch_fp": "PyTorch FP32 eager", "onnx_fp": "ONNX Runtime FP32",
                  f"onnx_{kind}": f"ONNX Runtime {shown_kind}"}
        for col in ("batch", *labels.values(), f"{shown_kind} speed-up"):
            lat.add_column(col, justify="right")
        for b, row in res["latency"].items():
            cells = [f"{row[r]['median_ms']:.2f} ms ({row[r]['p10_ms']:.2f}-{row[r]['p90_ms']:.2f})\n"
                     f"{row[r]['items_per_s']:,.0f} items/s" for r in labels]
            lat.add_row(b, *cells, f"{row[f'speedup_{kind}_vs_onnx_fp']:.2f}x vs ORT FP32\n"
                                   f"{row[f'speedup_{kind}_vs_pytorch_fp']:.2f}x vs PyTorch")
        t = res["timing"]
        lat.caption = (f"{t['protocol']}; {t['trials']} timings each after {t['warmup']} warm-up calls; "
                       f"{t['threads']} threads; " + "; ".join(res["runtimes"].values()))
        out.print(lat)
    for note in res.get("notes", []):
        out.print(f"note: {note}")
    out.print(f"wrote {out_dir}: {', '.join(sorted(res['files']))} and report.json")


@app.command("cost")
def cost_cmd(
    model: str = typer.Argument(..., help="Zoo model name or a save_pretrained folder."),
    preset: str = typer.Option(None, "--preset", help="Quantization preset (default: bf16, nothing quantized)."),
    recipe: Path = typer.Option(None, "--recipe", help="YAML recipe instead of a preset."),
    hardware: str = typer.Option("h100", "--hardware", help=", ".join(HARDWARE) + "."),
    batch: int = typer.Option(1, "--batch", help="Sequences (or images) per call."),
    tokens: int = typer.Option(512, "--tokens", help="Language models: prompt tokens (prefill)."),
    context: int = typer.Option(512, "--context", help="Language models: KV-cache length during decode."),
    plot: Path = typer.Option(None, "--plot", help="Write the roofline plot of the layers to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Predict a model's cost on a chip with a roofline: per-layer FLOPs, bytes, bound and time."""
    from slimtorch.calib.data import calibration_set
    from slimtorch.cost.estimate import estimate
    from slimtorch.cost.hardware import get_hardware
    from slimtorch.cost.plot import roofline_png
    from slimtorch.quant.recipe import build_plan
    from slimtorch.quantize import resolve_recipe
    from slimtorch.zoo import get_entry, load_model

    if preset is not None and recipe is not None:
        raise SlimError("give at most one of --preset NAME or --recipe FILE")
    for opt, v in (("--batch", batch), ("--tokens", tokens), ("--context", context)):
        args.count(opt, v, 1 << 24)
    args.png_path("--plot", plot)
    hw = get_hardware(hardware)
    name = get_entry(model).name
    m = load_model(name)
    plan, label = {}, "bf16"
    if preset is not None or recipe is not None:
        rec = resolve_recipe(recipe if recipe is not None else preset)
        plan, label = build_plan(m, rec)[0], rec.name
    example = tuple(t[:1, :64] if t.ndim == 2 else t[:1] for t in calibration_set(name, 1, model=m)[0])
    phases = estimate(m, plan, example, hw, batch, tokens, context)
    if plot is not None:
        roofline_png(phases, hw, plot, f"{model} {label}")
    result = {"model": model, "recipe": label, "hardware": hw.name, "source": hw.source, "batch": batch,
              "phases": [{"phase": p.phase, **p.total(hw), "kv_cache_bytes": p.kv_cache_bytes, "notes": p.notes,
                          "layers": [{"name": c.name, "kind": c.kind, "flops": c.flops, "bytes": c.bytes,
                                      "intensity": c.intensity, "compute": c.compute, "bound": c.bound(hw),
                                      "time_s": c.time(hw)} for c in p.layers]} for p in phases]}
    if as_json:
        print(json_text(result))
        return
    for p, raw in zip(phases, result["phases"]):
        table = Table(title=f"{model} {label} on {hw.name}: {p.phase} (batch {batch})")
        table.add_column("layer", overflow="fold")
        for col in ("compute", "GFLOP", "MB moved", "FLOP/B", "bound", "time us"):
            table.add_column(col, justify="left" if col in ("bound", "compute") else "right")
        for c in raw["layers"]:
            table.add_row(c["name"], c["compute"], f"{c['flops'] / 1e9:.3f}", f"{c['bytes'] / 1e6:.3f}",
                          f"{c['intensity']:.1f}", c["bound"], f"{c['time_s'] * 1e6:.2f}")
        table.add_row("total", "", f"{raw['flops'] / 1e9:.3f}", f"{raw['bytes'] / 1e6:.3f}", "", "",
                      f"{raw['time_s'] * 1e6:.2f}")
        out.print(table)
        if p.kv_cache_bytes:
            out.print(f"KV cache: {_mib(int(p.kv_cache_bytes))}")
        for note in p.notes:
            out.print(f"note: {note}")
    if plot is not None:
        out.print(f"wrote {plot}")


register_diffusion(app)
register_prune(app)
register_train_sparse(app)


def main(argv: list[str] | None = None, release=None) -> None:
    """The command line: every failure is one line on stderr. A user mistake (SlimError, a usage error)
    exits 2; Ctrl-C 130 and SIGTERM 143, after the job removed what it had staged; a bug in slimtorch
    exits 1 with one line (``SLIMTORCH_DEBUG=1`` shows its traceback). ``release``: the signal mask to
    restore once inside the error handling (the executable holds SIGINT/SIGTERM until then)."""
    import typer.main

    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    # transformers' own weight-loading bars would interleave with ours and break one-line errors
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        if release is not None:  # the signal mask to restore: signals held since start-up arrive here
            signal.pthread_sigmask(signal.SIG_SETMASK, release)
        cmd = typer.main.get_command(app)
        # not cmd.main(): it turns Ctrl-C into a returned exit code, which would read as success
        with cmd.make_context("slimtorch", argv) as ctx:
            cmd.invoke(ctx)
    except _EXITS as exc:  # --help and friends
        raise SystemExit(exc.exit_code) from None
    except SlimError as exc:
        fail(str(exc), 2, as_json)
    except _CLICK_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise SystemExit(0) from None
        name = next((a for a in argv if not a.startswith("-")), None)
        hint = f" (see `slimtorch {name + ' ' if name in app_commands() else ''}--help`)"
        fail(exc.format_message() + hint, 2, as_json)
    except Terminated:
        fail("terminated", 143, as_json)
    except KeyboardInterrupt:
        fail("interrupted", 130, as_json)
    except BrokenPipeError:  # the reader of stdout went away (`slimtorch --help | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        raise SystemExit(141) from None
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if os.environ.get("SLIMTORCH_DEBUG"):
            raise
        fail(f"internal error (a bug in slimtorch; SLIMTORCH_DEBUG=1 shows the traceback): "
             f"{type(exc).__name__}: {shown(exc, 300)}", 1, as_json)


def app_commands() -> list[str]:
    return [c.name or c.callback.__name__ for c in app.registered_commands] + [g.name for g in app.registered_groups]


def _click_kinds(name: str, modules: tuple[str, ...]) -> tuple[type[Exception], ...]:
    """The classes called ``name`` in the click that typer runs on (typer >= 0.26 vendors its own copy)."""
    kinds = []
    for mod in modules:
        try:
            kinds.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(kinds)


_CLICK_ERRORS = _click_kinds("ClickException", ("typer._click.exceptions", "click.exceptions"))
_EXITS = _click_kinds("Exit", ("typer.exceptions", "click.exceptions"))


if __name__ == "__main__":
    main()
