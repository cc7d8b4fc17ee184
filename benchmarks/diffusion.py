"""Diffusion quality and speed on the Fashion-MNIST models (issue 21): FID-FMNIST against the 10,000 test
images, class accuracy of the conditional samples, and samples/s, per sampler, step count and cache setting.

    PYTHONPATH=../src python diffusion.py --weights DIR [--models unet,dit] [--samples 10000] [--batch 1000]
        [--parts floor,fp,front,ptq,cache] [--device cuda] [--out FILE]

* floor: FID-FMNIST of real against real (two disjoint halves of the test set; 10k train against the test set).
* fp: the full-precision model at 100 DDIM steps (the baseline), two noise seeds.
* front: DDIM and DPM-Solver++(2M) at 5..100 steps (the FID vs samples/s front that any acceleration must beat).
* ptq: W8A8 and W4A8 (RTN weights, static activations) calibrated across the trajectory (TDAC, uniform per
  step), TDAC with per-timestep-group ranges (4 groups) and shortcut splitting (``tdac+ranges``), or naively
  (pure noise at random steps, off the trajectory); bf16 weights and inputs, so that the
  DiT's linears run on our GPU kernels (its speed-up is measured against the bf16 model in the same run; the
  UNet's convolutions have no kernel and run the reference: quality only).
* cache: 100 DDIM steps with DeepCache (UNet) or block reuse (DiT) at intervals 2..5, the adaptive criterion
  (DiT), and CacheQuant's DP schedule at the same number of full steps as interval 5, with and without its
  per-step error correction (fitted on one calibration run), and interval 5 with the correction.
Samples are class-balanced, guidance 2, the same x_T for every setting of one seed (paired comparisons).
Samples/s is the wall-clock of the whole generation after one warm-up batch, with CUDA synchronisation.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from records import run_header

from slimtorch.api import apply_
from slimtorch.diffusion.act_ranges import refine_activation_ranges_
from slimtorch.diffusion.cache import CacheConfig, cache_hook, reset, set_correction
from slimtorch.diffusion.cache_schedule import dp_schedule, drift_cost, uniform_schedule
from slimtorch.diffusion.cascade import sample_model
from slimtorch.diffusion.error_correction import fit_cache_correction
from slimtorch.diffusion.fid import fid
from slimtorch.diffusion.models import load_diffusion
from slimtorch.diffusion.ptq import calibration_batches
from slimtorch.diffusion.quality import class_accuracy, classifier_outputs, to_diffusion
from slimtorch.diffusion.samplers import guided, sample, timesteps
from slimtorch.diffusion.schedule import NoiseSchedule
from slimtorch.hooks import attached, detach
from slimtorch.quantize import PTQConfig
from slimtorch.zoo import load_model
from slimtorch.zoo.data import fashion_mnist

FILES = {"unet": "fmnist-ddpm-unet.safetensors", "dit": "fmnist-dit.safetensors"}
SCHED = NoiseSchedule.linear()


def generate(model, n: int, batch: int, sampler: str, steps: int, device: str, seed: int = 0,
             guidance: float = 2.0, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(samples (n, 1, 32, 32) on the CPU, labels, seconds of generation). ``bf16``: the model's weights are
    bf16 and it gets bf16 inputs (what our GPU kernels take), the sampler's state stays float32; otherwise
    bf16 autocast on CUDA."""
    labels = torch.arange(n) % 10
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 32, 32, generator=g)

    def run(i: int) -> torch.Tensor:
        if "cache" in attached(model):
            reset(model)  # each batch is a fresh trajectory
        y = labels[i:i + batch].to(device)
        net = (lambda x, t, yy: model(x.to(torch.bfloat16), t, yy).float()) if bf16 else model
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" and not bf16):
            return sample_model(model, y, noise[i:i + batch].to(device), SCHED, steps, guidance, sampler,
                                torch.Generator().manual_seed(seed + i), net=net).float()

    run(0)  # warm-up (kernels, autotuning)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = [run(i) for i in range(0, n, batch)]
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return torch.cat(out).clamp(-1, 1).cpu(), labels, secs


def dp_refresh_steps(model, device: str, steps: int, groups: int, batch: int = 64) -> tuple[list[int], torch.Tensor]:
    """CacheQuant's DP schedule from the cached feature's drift along one calibration run of ``steps``, and
    the features of that run (S, 2 batch, ...) for the error correction."""
    feats = []
    apply_(model, CacheConfig(interval=1))
    hook = cache_hook(model)
    y = torch.arange(batch, device=device) % 10
    x = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(99)).to(device)

    def capture(xx, tt):
        out = guided(model, y, 2.0, 10)(xx, tt)
        feats.append(hook.feature.float().cpu())
        return out

    with torch.no_grad():
        sample("ddim", capture, x, SCHED, timesteps(1000, steps))
    detach(model, "cache")
    feats = torch.stack(feats)
    return dp_schedule(drift_cost(feats), groups, min_len=max(1, steps // groups // 2),
                       max_len=2 * -(-steps // groups)), feats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--models", default="unet,dit")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--parts", default="floor,fp,front,ptq,cache")
    ap.add_argument("--front-steps", default="5,8,10,15,20,30,50,100")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusion.jsonl")
    args = ap.parse_args()
    dev, parts = args.device, args.parts.split(",")
    head = run_header(torch.cuda.get_device_name() if dev == "cuda" else dev)
    clf = load_model("fmnist-cnn").to(dev)
    test = fashion_mnist("test")
    real, _ = classifier_outputs(clf, to_diffusion(test.images))

    def record(rec: dict) -> None:
        rec = {**head, **rec}
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k not in head}), flush=True)

    if "floor" in parts:
        train, _ = classifier_outputs(clf, to_diffusion(fashion_mnist("train").images[:10000]))
        record({"what": "noise floor", "fid_test_half_vs_half": fid(real[:5000], real[5000:]),
                "fid_train10k_vs_test": fid(train, real)})

    def measure(model, name: str, sampler: str, steps: int, seed: int = 0, bf16: bool = False, **extra) -> None:
        x, labels, secs = generate(model, args.samples, args.batch, sampler, steps, dev, seed, bf16=bf16)
        if "cache" in attached(model):  # the full steps of the last batch's trajectory
            extra["full_steps_last_batch"] = len(cache_hook(model).full_steps)
        feats, logits = classifier_outputs(clf, x)
        record({"model": name, "sampler": sampler, "steps": steps, "seed": seed, "guidance": 2.0,
                "samples": args.samples, "batch": args.batch, "fid_fmnist": fid(feats, real),
                "class_accuracy": class_accuracy(logits, labels), "seconds": secs,
                "samples_per_s": args.samples / secs, **extra})

    for key in args.models.split(","):
        name = FILES[key].removesuffix(".safetensors")
        model = load_diffusion(args.weights / FILES[key]).to(dev)
        if "fp" in parts:
            for seed in (0, 1):
                measure(model, name, "ddim", 100, seed, cache="none")
        if "front" in parts:
            for sampler in ("ddim", "dpmpp-2m"):
                for steps in (int(s) for s in args.front_steps.split(",")):
                    measure(model, name, sampler, steps, cache="none")
        if "ptq" in parts:
            base = copy.deepcopy(model).to(torch.bfloat16)
            measure(base, name, "ddim", 100, bf16=True, cache="none", quant="bf16")
            del base
            for preset in ("W8A8", "W4A8"):
                for calib in ("tdac", "tdac+ranges", "uniform", "naive"):
                    q = copy.deepcopy(model)
                    if calib == "naive":
                        g = torch.Generator().manual_seed(5)
                        batches = [(torch.randn(64, 1, 32, 32, generator=g), torch.randint(0, 1000, (64,), generator=g),
                                    torch.arange(64) % 10) for _ in range(8)]
                    else:
                        batches = calibration_batches(q, samples=512, steps=100, method=calib.split("+")[0],
                                                      trajectory_batch=64, generator=torch.Generator().manual_seed(5))
                    batches = [tuple(t.to(dev) for t in b) for b in batches]
                    notes = apply_(q, PTQConfig(preset, "rtn"), batches).notes
                    extra = {}
                    if calib.endswith("+ranges"):
                        info = refine_activation_ranges_(q, batches, groups=4, split=True)
                        extra = {"range_groups": 4, "split_layers": info["split_layers"],
                                 "max_range_spread": max(info["range_spread"].values(), default=1.0)}
                    measure(q.to(torch.bfloat16), name, "ddim", 100, bf16=True, cache="none", quant=preset,
                            calibration=calib, notes=notes[:3], **extra)
                    del q
        if "cache" in parts:
            for interval in (2, 3, 4, 5):
                apply_(model, CacheConfig(interval=interval))
                measure(model, name, "ddim", 100, cache=f"uniform-{interval}", full_steps=len(uniform_schedule(100, interval)))
                detach(model, "cache")
            if key == "dit":
                for thr in (0.05, 0.1, 0.2):
                    apply_(model, CacheConfig(method="adaptive", threshold=thr))
                    measure(model, name, "ddim", 100, cache=f"adaptive-{thr}")
                    detach(model, "cache")
            refresh, feats = dp_refresh_steps(model, dev, 100, 20)
            apply_(model, CacheConfig(schedule=tuple(refresh)))
            measure(model, name, "ddim", 100, cache="dp-20", full_steps=len(refresh), schedule=refresh)
            set_correction(model, {i: (a.to(dev), b.to(dev)) for i, (a, b) in fit_cache_correction(feats, refresh).items()})
            measure(model, name, "ddim", 100, cache="dp-20+correction", full_steps=len(refresh))
            detach(model, "cache")
            uniform = uniform_schedule(100, 5)
            apply_(model, CacheConfig(interval=5))
            set_correction(model, {i: (a.to(dev), b.to(dev)) for i, (a, b) in fit_cache_correction(feats, uniform).items()})
            measure(model, name, "ddim", 100, cache="uniform-5+correction", full_steps=len(uniform))
            detach(model, "cache")


if __name__ == "__main__":
    main()
