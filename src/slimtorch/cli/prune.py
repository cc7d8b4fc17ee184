"""``slimtorch prune MODEL``: the prune job (slimtorch.jobs.prune) on the command line."""

from __future__ import annotations

import json

import typer

from slimtorch.progress import Progress, no_progress

_BAR: list[Progress] = []  # the CLI's progress bar, given by register()


def register(parent: typer.Typer, progress_bar: Progress) -> None:
    """Add ``prune`` to the main command line, with its progress bar."""
    _BAR[:] = [progress_bar]
    parent.command("prune")(prune_cmd)


def prune_cmd(
    model: str = typer.Argument(..., help="Zoo model name (see `slimtorch models`) or a transformers folder."),
    method: str = typer.Option("sparsegpt", "--method", help="magnitude | wanda | sparsegpt."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Fraction of weights removed (N:M fixes it at 1 - N/M)."),
    pattern: str = typer.Option("unstructured", "--pattern", help="unstructured | N:M (2:4) | block:RxC."),
    scope: str = typer.Option("layer", "--scope", help="layer | global (one threshold; magnitude only)."),
    comparison: str = typer.Option("row", "--comparison", help="Wanda's comparison group: row | layer."),
    quantize: str = typer.Option(None, "--quantize", help="Also quantize with this preset (SparseGPT: in the same "
                                 "pass; the others: RTN after pruning)."),
    out_dir: str = typer.Option(..., "--out", help="Folder for model.safetensors and report.json."),
    calib_samples: int = typer.Option(None, "--calib-samples", help="Calibration samples (default per task)."),
    limit: int = typer.Option(None, "--limit", help="Evaluate on the first N items only (quick check)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration draw."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists and is not empty."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Prune a model (magnitude, Wanda or SparseGPT), evaluate FP and pruned side by side, save the sparse file."""
    from slimtorch.cli import args
    from slimtorch.io.outdir import StagedOutput
    from slimtorch.jobs.prune import run_prune
    from slimtorch.sparsity.prune import PruneConfig
    from slimtorch.zoo import get_entry

    args.count("--calib-samples", calib_samples, 1 << 16)
    args.count("--limit", limit)
    args.seed(seed)
    config = PruneConfig(method=method, sparsity=sparsity, pattern=pattern, scope=scope, comparison=comparison,
                         quantize=quantize)
    get_entry(model)  # unknown names fail before any work
    stage = StagedOutput(out_dir, overwrite)
    stage.check()
    with stage as folder:
        res = run_prune(model, config, folder, calib_samples, limit, seed,
                        progress=no_progress if as_json or not _BAR else _BAR[0])
    if as_json:
        typer.echo(json.dumps(res))
        return
    for m in res["metrics"]:
        typer.echo(f"{m['name']}: FP {m['fp']:.4g}, pruned {m['pruned']:.4g}")
    size = res["size"]
    typer.echo(f"sparsity {res['sparsity']:.3f} ({res['pattern']}, {res['method']}); file {size['file_bytes'] / 2**20:.2f} MiB "
              f"against {size['dense_bytes'] / 2**20:.2f} MiB dense")
    for note in res["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {stage.out / 'model.safetensors'} and {stage.out / 'report.json'}")
