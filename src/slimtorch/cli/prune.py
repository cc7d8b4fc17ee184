"""``slimtorch prune MODEL``: the prune job (slimtorch.jobs.prune) on the command line."""

from __future__ import annotations

import json

import typer

from slimtorch.cli.console import progress_bar
from slimtorch.progress import no_progress


def register(parent: typer.Typer) -> None:
    """Add ``prune`` to the main command line."""
    parent.command("prune")(prune_cmd)


def prune_cmd(
    model: str = typer.Argument(..., help="Zoo model name (see `slimtorch models`) or a transformers folder."),
    method: str = typer.Option("sparsegpt", "--method", help="magnitude | wanda | sparsegpt | structured | npas "
                               "(per-group widths searched under a modelled latency budget)."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Fraction of weights removed (N:M fixes it at 1 - N/M); "
                                   "structured: fraction of each group's channels removed."),
    pattern: str = typer.Option("unstructured", "--pattern", help="unstructured | N:M (2:4) | block:RxC."),
    scope: str = typer.Option("layer", "--scope", help="layer | global (one threshold; magnitude only)."),
    comparison: str = typer.Option("row", "--comparison", help="Wanda's comparison group: row | layer."),
    quantize: str = typer.Option(None, "--quantize", help="Also quantize with this preset (SparseGPT: in the same "
                                 "pass; the others: RTN after pruning)."),
    budget: float = typer.Option(None, "--budget", help="structured: fraction of FLOPs (or --measure params) kept, "
                                 "instead of --sparsity."),
    measure: str = typer.Option("flops", "--measure", help="structured: what --budget counts: flops | params."),
    importance: str = typer.Option("activation", "--importance",
                                   help="structured: activation | magnitude | taylor."),
    heads: bool = typer.Option(False, "--heads", help="structured, npas: prune attention heads too."),
    latency: float = typer.Option(0.5, "--latency", help="npas: fraction of the dense model's modelled latency kept."),
    hardware: str = typer.Option("h100-measured", "--hardware", help="npas: the chip of the latency model."),
    batch: int = typer.Option(256, "--batch", help="npas: the batch size the latency is modelled at."),
    search: str = typer.Option("greedy", "--search", help="npas: greedy (per-group widths) | uniform (one ratio)."),
    evaluate: str = typer.Option("loss", "--evaluate", help="npas: what a greedy step costs: loss (the "
                                 "candidate's adaptive-BN divergence from the original) | importance."),
    recover: int = typer.Option(0, "--recover", help="structured: distillation steps from the original after "
                                "pruning, on the calibration data."),
    recover_lr: float = typer.Option(1e-4, "--recover-lr", help="structured: learning rate of --recover."),
    out_dir: str = typer.Option(..., "--out", help="Folder for model.safetensors and report.json."),
    calib_samples: int = typer.Option(None, "--calib-samples", help="Calibration samples (default per task)."),
    limit: int = typer.Option(None, "--limit", help="Evaluate on the first N items only (quick check)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration draw."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists and is not empty."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Prune a model (magnitude, Wanda or SparseGPT masks, or structured width pruning into a smaller dense
    model), evaluate FP and pruned side by side, save the file."""
    from slimtorch.cli import args
    from slimtorch.errors import SlimError
    from slimtorch.io.outdir import StagedOutput
    from slimtorch.jobs.prune import run_prune
    from slimtorch.pruning.npas import NPASConfig
    from slimtorch.pruning.structured import StructuredConfig
    from slimtorch.sparsity.prune import PruneConfig
    from slimtorch.zoo import get_entry

    args.count("--calib-samples", calib_samples, 1 << 16)
    args.count("--limit", limit)
    args.count("--recover", recover or None, 1 << 20)
    args.seed(seed)
    if method in ("structured", "npas"):
        if quantize is not None or pattern != "unstructured":
            raise SlimError("--quantize and --pattern apply to masks; structured pruning makes a smaller dense model")
        if method == "npas":
            if budget is not None:
                raise SlimError("--budget applies to --method structured; npas takes --latency")
            config = NPASConfig(latency=latency, hardware=hardware, batch=batch, importance=importance,
                                heads=heads, search=search, evaluate=evaluate)
        else:
            config = StructuredConfig(ratio=sparsity, importance=importance, budget=budget, measure=measure,
                                      heads=heads)
    else:
        if recover or budget is not None or heads:
            raise SlimError("--budget, --heads and --recover apply to --method structured (and npas)")
        config = PruneConfig(method=method, sparsity=sparsity, pattern=pattern, scope=scope, comparison=comparison,
                             quantize=quantize)
    get_entry(model)  # unknown names fail before any work
    stage = StagedOutput(out_dir, overwrite)
    stage.check()
    with stage as folder:
        res = run_prune(model, config, folder, calib_samples, limit, seed,
                        progress=no_progress if as_json else progress_bar, recover_steps=recover,
                        recover_lr=recover_lr)
    if as_json:
        typer.echo(json.dumps(res))
        return
    for m in res["metrics"]:
        typer.echo(f"{m['name']}: FP {m['fp']:.4g}, pruned {m['pruned']:.4g}")
    size = res["size"]
    if method in ("structured", "npas"):
        p = res["params"]
        if method == "npas":
            lat = res["modelled_latency_s"]
            cost = f"modelled latency {lat['after'] / lat['before']:.1%} ({lat['hardware']}, batch {lat['batch']})"
        else:
            cost = f"FLOPs {res['flops']['after'] / res['flops']['before']:.1%}"
        typer.echo(f"parameters {p['after']:,} of {p['before']:,} ({p['after'] / p['before']:.1%}); {cost}; "
                   f"file {size['file_bytes'] / 2**20:.2f} MiB")
        typer.echo(f"wrote {stage.out / 'model.safetensors'} and {stage.out / 'report.json'}")
        return
    typer.echo(f"sparsity {res['sparsity']:.3f} ({res['pattern']}, {res['method']}); file {size['file_bytes'] / 2**20:.2f} MiB "
              f"against {size['dense_bytes'] / 2**20:.2f} MiB dense")
    for note in res["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {stage.out / 'model.safetensors'} and {stage.out / 'report.json'}")
