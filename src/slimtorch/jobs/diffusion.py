"""The diffusion jobs (``slimtorch diffusion sample|eval WEIGHTS``): load a model written by
``scripts/train_diffusion.py``, optionally quantize it (timestep-aware calibration) and cache features,
sample class-balanced images with a progress bar, and write an image grid and a report. The report's
``modelled_cost`` is the roofline model's figure for a batch on an H100 (:mod:`slimtorch.diffusion.cost`),
labelled as such: never a measurement.

``eval`` also measures FID-FMNIST against the 10,000 test images and the class accuracy of the samples
(the zoo's fmnist-cnn; :mod:`slimtorch.diffusion.quality`). Samples/s is the wall-clock of the sampling
alone; on the CPU it is a CPU figure, never a GPU claim.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch

from slimtorch.api import apply_
from slimtorch.diffusion.cache import CacheConfig, reset
from slimtorch.diffusion.cascade import sample_model
from slimtorch.diffusion.cost import sampling_cost
from slimtorch.diffusion.models import load_diffusion
from slimtorch.diffusion.samplers import SAMPLERS
from slimtorch.diffusion.schedule import NoiseSchedule
from slimtorch.errors import SlimError
from slimtorch.io.checkpoint import atomic_write_bytes
from slimtorch.jobs.compare import write_report
from slimtorch.progress import Progress, no_progress

SCHEDULE = NoiseSchedule.linear()


def check_options(samples: int, steps: int, sampler: str, guidance: float, cache: int | None, evaluate: bool) -> None:
    """Every option checked before any work (one clear error each)."""
    if sampler not in SAMPLERS:
        raise SlimError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= SCHEDULE.steps:
        raise SlimError(f"--steps must be between 1 and {SCHEDULE.steps}; got {steps}")
    if samples < (2 if evaluate else 1) or samples > 100_000:
        raise SlimError(f"--samples must be between {2 if evaluate else 1} and 100000; got {samples}")
    if not 0 <= guidance <= 50:
        raise SlimError(f"--guidance must be between 0 and 50; got {guidance}")
    if cache is not None and not 1 <= cache <= steps:
        raise SlimError(f"--cache (the refresh interval) must be between 1 and the steps ({steps}); got {cache}")


def grid_png(images: torch.Tensor, columns: int = 10) -> bytes:
    """(N, 1, H, W) in [-1, 1] -> a PNG of the images in rows of ``columns`` (one class per column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.full((rows * (h + 2), columns * (w + 2)), -1.0)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = images[i, 0]
    buf = io.BytesIO()
    plt.imsave(buf, ((canvas.clamp(-1, 1) + 1) / 2).numpy(), cmap="gray", vmin=0, vmax=1, format="png")
    return buf.getvalue()


def run_diffusion(weights: Path, out_dir: Path, samples: int = 100, steps: int = 50, sampler: str = "ddim",
                  guidance: float = 2.0, cache: int | None = None, preset: str | None = None, seed: int = 0,
                  batch: int = 256, evaluate: bool = False, calib_samples: int = 256,
                  progress: Progress = no_progress) -> dict:
    """Sample (and with ``evaluate``, measure) the model in ``weights``; writes ``out_dir/grid.png`` and
    ``out_dir/report.json``; returns the report."""
    check_options(samples, steps, sampler, guidance, cache, evaluate)
    model = load_diffusion(weights)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev)
    notes = []
    if preset is not None:
        from slimtorch.diffusion.ptq import calibration_batches
        from slimtorch.quantize import PTQConfig

        if getattr(model, "cond_ch", 0):
            raise SlimError("quantizing a LowDiff cascade model is not supported yet; sample it without --preset")
        config = PTQConfig(preset, "rtn")
        batches = calibration_batches(model, samples=calib_samples, steps=min(steps, 50), trajectory_batch=32,
                                      generator=torch.Generator().manual_seed(seed))
        notes += apply_(model, config, [tuple(t.to(dev) for t in b) for b in batches]).notes
    if cache is not None:
        notes += apply_(model, CacheConfig(interval=cache)).notes
    labels = torch.arange(samples) % model.num_classes
    noise = torch.randn(samples, 1, 32, 32, generator=torch.Generator().manual_seed(seed))

    def run(i: int, n: int) -> torch.Tensor:
        """Samples i .. i + n (a fresh trajectory: the cache is reset)."""
        if cache is not None:
            reset(model)
        y = labels[i:i + n].to(dev)
        with torch.no_grad():
            return sample_model(model, y, noise[i:i + n].to(dev), SCHEDULE, steps, guidance, sampler,
                                torch.Generator().manual_seed(seed + i))

    outs = []
    t0 = time.perf_counter()
    for i in progress(range(0, samples, batch), "sampling"):
        outs.append(run(i, batch).float().clamp(-1, 1).cpu())
    if dev == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    images = torch.cat(outs)
    report = {"weights": str(weights), "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "samples": samples, "steps": steps, "sampler": sampler, "guidance": guidance, "cache_interval": cache,
              "preset": preset, "seed": seed, "seconds": round(secs, 3), "samples_per_s": samples / secs,
              "modelled_cost": sampling_cost(model, lambda: run(0, 1), min(batch, samples)), "notes": notes}
    if evaluate:
        from slimtorch.diffusion.fid import fid
        from slimtorch.diffusion.quality import (
            class_accuracy,
            classifier_outputs,
            to_diffusion,
        )
        from slimtorch.zoo import load_model
        from slimtorch.zoo.data import fashion_mnist

        clf = load_model("fmnist-cnn")
        feats, logits = classifier_outputs(clf, images)
        real, _ = classifier_outputs(clf, to_diffusion(fashion_mnist("test").images))
        report.update(fid_fmnist=fid(feats, real), class_accuracy=class_accuracy(logits, labels))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "grid.png", grid_png(images[:100]))
    write_report(out_dir, report, page=False)
    return report
