"""``slimtorch diffusion sample|eval WEIGHTS``: the diffusion jobs (slimtorch.jobs.diffusion) on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from slimtorch.cli.console import progress_bar
from slimtorch.progress import no_progress

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Sample or evaluate a Fashion-MNIST diffusion model (weights from scripts/train_diffusion.py).")


def register(parent: typer.Typer) -> None:
    """Add ``diffusion`` to the main command line."""
    parent.add_typer(app, name="diffusion")


WEIGHTS_HELP = ("A zoo name (fmnist-ddpm-unet, fmnist-dit, fmnist-lowdiff-unet) or a .safetensors file written by "
                "scripts/train_diffusion.py.")


def _run(weights: Path, out: Path, samples: int, steps: int, sampler: str, guidance: float, cache: int | None,
         preset: str | None, seed: int, as_json: bool, evaluate: bool) -> None:
    from slimtorch.jobs.diffusion import run_diffusion

    res = run_diffusion(weights, out, samples, steps, sampler, guidance, cache, preset, seed, evaluate=evaluate,
                        progress=no_progress if as_json else progress_bar)
    if as_json:
        typer.echo(json.dumps(res))
        return
    line = (f"{res['samples']} samples, {res['steps']} {res['sampler']} steps: {res['samples_per_s']:.2f} samples/s "
            f"on {res['device']}")
    if evaluate:
        line += f"; FID-FMNIST {res['fid_fmnist']:.4f}, class accuracy {100 * res['class_accuracy']:.1f}%"
    typer.echo(line)
    typer.echo(f"wrote {out}/grid.png and report.json")


OPTS = {
    "out": typer.Option(Path("out/diffusion"), "--out", help="Folder for grid.png and report.json."),
    "steps": typer.Option(50, "--steps", help="Sampling steps."),
    "sampler": typer.Option("ddim", "--sampler", help="ddim, ddpm or dpmpp-2m."),
    "guidance": typer.Option(2.0, "--guidance", help="Classifier-free guidance scale (1: conditional only)."),
    "cache": typer.Option(None, "--cache", help="Feature caching: refresh every N steps (DeepCache / block reuse)."),
    "preset": typer.Option(None, "--preset", help="Quantize first (e.g. W8A8), calibrated across the trajectory."),
    "seed": typer.Option(0, "--seed"),
    "json": typer.Option(False, "--json", help="Print the report as JSON."),
}


@app.command("sample")
def sample_cmd(weights: Path = typer.Argument(..., help=WEIGHTS_HELP),
               out: Path = OPTS["out"], samples: int = typer.Option(100, "--samples"), steps: int = OPTS["steps"],
               sampler: str = OPTS["sampler"], guidance: float = OPTS["guidance"], cache: int | None = OPTS["cache"],
               preset: str | None = OPTS["preset"], seed: int = OPTS["seed"], as_json: bool = OPTS["json"]) -> None:
    """Sample class-balanced images; write an image grid and a report (samples/s)."""
    _run(weights, out, samples, steps, sampler, guidance, cache, preset, seed, as_json, evaluate=False)


@app.command("eval")
def eval_cmd(weights: Path = typer.Argument(..., help=WEIGHTS_HELP),
             out: Path = OPTS["out"], samples: int = typer.Option(10000, "--samples"), steps: int = OPTS["steps"],
             sampler: str = OPTS["sampler"], guidance: float = OPTS["guidance"], cache: int | None = OPTS["cache"],
             preset: str | None = OPTS["preset"], seed: int = OPTS["seed"], as_json: bool = OPTS["json"]) -> None:
    """Sample and measure: FID-FMNIST against the test set, class accuracy, samples/s."""
    _run(weights, out, samples, steps, sampler, guidance, cache, preset, seed, as_json, evaluate=True)
