"""``slimtorch train-sparse MODEL``: the sparse-training job (slimtorch.jobs.train_sparse) on the command line."""

from __future__ import annotations

import json

import typer

from slimtorch.cli.console import progress_bar


def register(parent: typer.Typer) -> None:
    """Add ``train-sparse`` to the main command line."""
    parent.command("train-sparse")(train_sparse_cmd)


def train_sparse_cmd(
    model: str = typer.Argument(..., help="fmnist-cnn or fmnist-vit (trained from a fresh initialisation)."),
    method: str = typer.Option("mest", "--method", help="mest | mest-soft (soft memory bound) | static | lth."),
    sparsity: float = typer.Option(0.9, "--sparsity", help="Target fraction of zero weights in the masked layers."),
    epochs: int = typer.Option(30, "--epochs", help="Training epochs (lth: per round)."),
    out_dir: str = typer.Option(..., "--out", help="Folder for model.safetensors and report.json."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 0.1 with sgd, 1e-3 with adam)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd | adam."),
    drop: float = typer.Option(0.0, "--drop", help="MEST: fraction of the unforgettable samples left out "
                               "from half-way through."),
    limit_train: int = typer.Option(None, "--limit-train", help="Train on the first N images only."),
    limit: int = typer.Option(None, "--limit", help="Evaluate on the first N test images only."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when there is one)."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists and is not empty."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Sparse training from scratch (MEST, static masks) or a lottery ticket (IMP with rewinding); saves the
    sparse model compressed and reports its accuracy, sparsity and training memory bound."""
    from slimtorch.cli import args
    from slimtorch.distill import TrainConfig
    from slimtorch.errors import SlimError
    from slimtorch.io.outdir import StagedOutput
    from slimtorch.jobs.train_sparse import check_train_sparse, run_train_sparse

    check_train_sparse(model, method, sparsity, drop)
    if not 0.0 <= drop <= 1.0:
        raise SlimError(f"--drop must be in [0, 1], got {drop}")
    args.count("--limit-train", limit_train, 60_000)
    args.count("--limit", limit)
    args.seed(seed)
    dev = args.device(device)
    cfg = TrainConfig(epochs=epochs, optimizer=optimizer, kd_weight=0.0, seed=seed,
                      lr=lr if lr is not None else 0.1 if optimizer == "sgd" else 1e-3,
                      weight_decay=5e-4 if optimizer == "sgd" else 0.0)
    stage = StagedOutput(out_dir, overwrite)
    stage.check()
    with stage as folder:
        res = run_train_sparse(model, method, sparsity, folder, cfg, drop, limit_train, limit, dev,
                               progress=None if as_json else progress_bar,
                               log=None if as_json else (lambda line: typer.echo(line, err=True)))
    if as_json:
        typer.echo(json.dumps(res))
        return
    t = res["training"]
    typer.echo(f"top-1 {res['top1_accuracy']:.2f}% at sparsity {res['sparsity']:.3f} ({res['method']}; shipped "
               f"dense model {res['shipped_dense_top1']}%)")
    if "memory_bound_density" in t:
        typer.echo(f"training memory: at most {t['memory_bound_density']:.3f} of the masked weights held "
                   f"(peak {t['peak_density']:.3f}); {t['samples_seen']:,} samples seen")
    size = res["size"]
    typer.echo(f"file {size['file_bytes'] / 2**20:.2f} MiB against {size['dense_bytes'] / 2**20:.2f} MiB dense; "
               f"wrote {stage.out / 'model.safetensors'} and {stage.out / 'report.json'}")
