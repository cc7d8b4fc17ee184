"""Diffusion quality and speed on the Fashion-MNIST models (issue 21): FID-FMNIST against the 10,000 test
images, class accuracy of the conditional samples, and samples/s, per sampler, step count and cache setting.

    PYTHONPATH=../src python diffusion.py --weights DIR [--models unet,dit] [--samples 10000] [--batch 1000]
        [--parts floor,fp,ptq,cache,front,distilled,composed] [--students DIR] [--mode both|quality|speed]
        [--device cuda] [--out FILE]

Parts run in the order given (all models for one part, then the next), each record written as it is made,
so that a run cut short keeps what it finished. ``--mode quality`` measures FID only (GPU shared with other
jobs is fine); ``--mode speed`` times ``--speed-batches`` batches after a warm-up and computes no FID (run it
on a quiet GPU); ``both`` does both on the full sample count.

* floor: FID-FMNIST of real against real (two disjoint halves of the test set; 10k train against the test set).
* fp: the full-precision model at 100 DDIM steps (the baseline), two noise seeds.
* front: DDIM and DPM-Solver++(2M) at 5..100 steps (the FID vs samples/s front that any acceleration must beat).
* ptq: W8A8 and W4A8 (slimtorch.diffusion.ptq.RECIPES: RTN per-channel weights, static activations) calibrated across the trajectory (TDAC, uniform per
  step), TDAC with per-timestep-group ranges (4 groups) and shortcut splitting (``tdac+ranges``), or naively
  (pure noise at random steps, off the trajectory); bf16 weights and inputs, so that the
  DiT's linears run on our GPU kernels (its speed-up is measured against the bf16 model in the same run; the
  UNet's convolutions have no kernel and run the reference: quality only).
* cache: 100 DDIM steps with DeepCache (UNet) or block reuse (DiT) at intervals 2..5, the adaptive criterion
  (DiT), and CacheQuant's DP schedule at the same number of full steps as interval 5, with and without its
  per-step error correction (fitted on one calibration run), and interval 5 with the correction; the DP
  schedule again with each step's drift weighted by its measured effect on the final sample
  (cache_schedule.effect_weights): ``dp-20-effect``.
* distilled: the progressive-distillation students in ``--students`` (<name>-distilled-<N>.safetensors from
  scripts/train_diffusion.py), each on its own step grid.
* composed: each student with W8A8 (tdac+ranges, calibrated on its own grid), with interval-2 caching and the
  error correction, and all three; beside it the naive combination (naive PTQ, no correction); and with
  ``dynamic``: the per-token W8A8 preset, the one our int8 kernels run (static per-tensor activation ranges,
  which timestep-aware calibration sets, have no GPU kernel: they run the fake-quant reference, so their
  samples/s is not a kernel figure).
  ``--calibrations dynamic`` in ptq: W8A8-dynamic and FP8 (per-token, calibration-free; kernels on the GPU).
``--models lowdiff``: the LowDiff cascade (slimtorch.diffusion.cascade: 80% of the steps at 16x16, the rest
at 32x32), for the front part, against the single-resolution UNet's front at equal wall-clock.
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
from slimtorch.diffusion.cache_schedule import dp_schedule, drift_cost, effect_weights, uniform_schedule
from slimtorch.diffusion.cascade import sample_model
from slimtorch.diffusion.error_correction import fit_cache_correction
from slimtorch.diffusion.fid import fid
from slimtorch.diffusion.models import load_diffusion
from slimtorch.diffusion.ptq import RECIPES, calibration_batches
from slimtorch.diffusion.quality import class_accuracy, classifier_outputs, to_diffusion
from slimtorch.diffusion.samplers import guided, sample, timesteps
from slimtorch.diffusion.schedule import NoiseSchedule
from slimtorch.io.checkpoint import read_metadata
from slimtorch.hooks import attached, detach
from slimtorch.quant.recipe import PRESETS
from slimtorch.quantize import PTQConfig
from slimtorch.zoo import load_model
from slimtorch.zoo.data import fashion_mnist

FILES = {"unet": "fmnist-ddpm-unet.safetensors", "dit": "fmnist-dit.safetensors",
         "lowdiff": "fmnist-lowdiff-unet.safetensors"}
SCHED = NoiseSchedule.linear()


def generate(model, n: int, batch: int, sampler: str, steps: int, device: str, seed: int = 0,
             guidance: float = 2.0, bf16: bool = False, grid: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
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
                                torch.Generator().manual_seed(seed + i), grid, net=net).float()

    run(0)  # warm-up (kernels, autotuning)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = [run(i) for i in range(0, n, batch)]
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return torch.cat(out).clamp(-1, 1).cpu(), labels, secs


def calibration_inputs(device: str, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, x_T) of the calibration runs: the same for the features, the effect runs and the correction."""
    y = torch.arange(batch, device=device) % 10
    return y, torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(99)).to(device)


def correction_tables(feats: torch.Tensor, refresh: list[int], device: str, dtype: torch.dtype | None = None) -> dict:
    """CacheQuant's per-step corrections fitted on ``feats``, on ``device`` (in ``dtype`` if given)."""
    return {i: (a.to(device, dtype), b.to(device, dtype)) for i, (a, b) in fit_cache_correction(feats, refresh).items()}


def calibration_run(model, device: str, grid: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One uncached DDIM run of the calibration inputs on ``grid``: (the cached feature at each step (S,
    2 batch, ...), the final sample), for the DP schedule and the error correction."""
    feats = []
    apply_(model, CacheConfig(interval=1))
    hook = cache_hook(model)
    y, x = calibration_inputs(device)

    def capture(xx, tt):
        out = guided(model, y, 2.0, 10)(xx, tt)
        feats.append(hook.feature.float().cpu())
        return out

    with torch.no_grad():
        final = sample("ddim", capture, x, SCHED, grid)
    detach(model, "cache")
    return torch.stack(feats), final.float().cpu()


def measured_effect(model, device: str, grid: list[int], feats: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """effect_weights from runs of the calibration inputs in which step i alone reuses step i-1's feature
    (i = 1 .. S-1)."""
    s = len(grid)
    y, x = calibration_inputs(device)
    change = torch.zeros(s)
    for i in range(1, s):
        apply_(model, CacheConfig(schedule=tuple(j for j in range(s) if j != i)))
        with torch.no_grad():
            out = sample("ddim", guided(model, y, 2.0, 10), x, SCHED, grid).float().cpu()
        detach(model, "cache")
        change[i] = (out - final).abs().sum()
    drift = torch.zeros(s)
    drift[1:] = (feats[1:] - feats[:-1]).flatten(1).abs().sum(1)
    return effect_weights(change, drift)


def dp_bounds(steps: int, groups: int) -> dict:
    return {"min_len": max(1, steps // groups // 2), "max_len": 2 * -(-steps // groups)}


def naive_batches(dev: str) -> list[tuple]:
    """Calibration off the trajectory: pure noise at random steps."""
    g = torch.Generator().manual_seed(5)
    return [tuple(t.to(dev) for t in (torch.randn(64, 1, 32, 32, generator=g), torch.randint(0, 1000, (64,), generator=g),
                                      torch.arange(64) % 10)) for _ in range(8)]


def quantized(model, preset: str, calib: str, dev: str, steps: int = 100,
              grid: list[int] | None = None) -> tuple[torch.nn.Module, dict]:
    """A W8A8/W4A8 copy of ``model`` (float32, on ``dev``) and the fields that describe it; calibrated on
    512 samples from its trajectory of ``steps`` (or ``grid``)."""
    q = copy.deepcopy(model)
    if calib == "dynamic":  # per-token activations, no ranges to calibrate: the path our GPU kernels run
        recipe = PRESETS[f"{preset}-dynamic" if preset == "W8A8" else preset]
        notes = apply_(q, PTQConfig(recipe, "rtn"), naive_batches(dev)[:1]).notes
        return q, {"quant": recipe.name, "calibration": "none (dynamic)", "notes": notes[:3]}
    if calib == "naive":
        batches = naive_batches(dev)
    else:
        batches = calibration_batches(q, samples=512, steps=steps, method=calib.split("+")[0],
                                      trajectory_batch=max(64, -(-512 // steps)), grid=grid,
                                      generator=torch.Generator().manual_seed(5))
        batches = [tuple(t.to(dev) for t in b) for b in batches]
    notes = apply_(q, PTQConfig(RECIPES[preset], "rtn"), batches).notes
    extra = {"quant": preset, "calibration": calib, "notes": notes[:3]}
    if calib.endswith("+ranges"):
        groups = min(4, steps)  # a 2-step student's grid leaves two of four spans empty
        info = refine_activation_ranges_(q, batches, groups=groups, split=True)
        extra.update({"range_groups": groups, "split_layers": info["split_layers"],
                      "max_range_spread": max(info["range_spread"].values(), default=1.0)})
    return q, extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--models", default="unet,dit")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--parts", default="floor,fp,ptq,cache,front,distilled,composed")
    ap.add_argument("--steps", type=int, default=100, help="the baseline's DDIM steps (fp, ptq, cache)")
    ap.add_argument("--front-steps", default="5,8,10,15,20,30,50,100")
    ap.add_argument("--calibrations", default="tdac+ranges,naive,tdac,uniform", help="ptq: which calibrations")
    ap.add_argument("--presets", default="W8A8,W4A8,FP8", help="ptq: which presets")
    ap.add_argument("--skip", default="", help="ptq: preset:calibration pairs to leave out (W8A8:naive,...)")
    ap.add_argument("--composed-calibrations", default="tdac+ranges,naive,dynamic",
                    help="composed: W8A8 calibrations (dynamic: the per-token preset our kernels run)")
    ap.add_argument("--students", type=Path, help="distilled/composed: folder of the distilled students")
    ap.add_argument("--mode", choices=["both", "quality", "speed"], default="both")
    ap.add_argument("--speed-batches", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusion.jsonl")
    args = ap.parse_args()
    dev, parts, skip = args.device, args.parts.split(","), set(args.skip.split(","))
    head = run_header(torch.cuda.get_device_name() if dev == "cuda" else dev)
    clf = load_model("fmnist-cnn").to(dev)
    test = fashion_mnist("test")
    real, _ = classifier_outputs(clf, to_diffusion(test.images)) if args.mode != "speed" else (None, None)

    def record(rec: dict) -> None:
        rec = {**head, "mode": args.mode, **rec}
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k not in head}), flush=True)

    def measure(model, name: str, sampler: str, steps: int, seed: int = 0, bf16: bool = False,
                grid: list[int] | None = None, **extra) -> None:
        n = args.samples if args.mode != "speed" else args.batch * args.speed_batches
        x, labels, secs = generate(model, n, args.batch, sampler, steps, dev, seed, bf16=bf16, grid=grid)
        if "cache" in attached(model):  # the full steps of the last batch's trajectory
            extra["full_steps_last_batch"] = len(cache_hook(model).full_steps)
        rec = {"model": name, "sampler": sampler, "steps": steps, "seed": seed, "guidance": 2.0, "samples": n,
               "batch": args.batch, **extra}
        if args.mode != "speed":
            feats, logits = classifier_outputs(clf, x)
            rec.update({"fid_fmnist": fid(feats, real), "class_accuracy": class_accuracy(logits, labels)})
        if args.mode != "quality":
            rec.update({"seconds": secs, "samples_per_s": n / secs})
        record(rec)

    def cache_runs(model, name: str, key: str, grid: list[int], groups: int, **extra) -> None:
        steps = len(grid)
        for interval in (2, 3, 4, 5):
            apply_(model, CacheConfig(interval=interval))
            measure(model, name, "ddim", steps, grid=grid, cache=f"uniform-{interval}",
                    full_steps=len(uniform_schedule(steps, interval)), **extra)
            detach(model, "cache")
        if key == "dit":
            for thr in (0.05, 0.1, 0.2):
                apply_(model, CacheConfig(method="adaptive", threshold=thr))
                measure(model, name, "ddim", steps, grid=grid, cache=f"adaptive-{thr}", **extra)
                detach(model, "cache")
        if args.mode == "speed":  # the DP schedules run as many full steps as uniform-(S / groups)
            return
        feats, final = calibration_run(model, dev, grid)
        tag = f"dp-{groups}"
        refresh = dp_schedule(drift_cost(feats), groups, **dp_bounds(steps, groups))
        weights = measured_effect(model, dev, grid, feats, final)
        refresh_w = dp_schedule(drift_cost(feats, weights), groups, **dp_bounds(steps, groups))
        uniform = uniform_schedule(steps, -(-steps // groups))
        for label, sched in ((tag, refresh), (f"{tag}-effect", refresh_w), (f"uniform-{steps // groups}", uniform)):
            apply_(model, CacheConfig(schedule=tuple(sched)))
            if label.startswith("dp"):
                measure(model, name, "ddim", steps, grid=grid, cache=label, full_steps=len(sched), schedule=sched,
                        **({"effect_weights": [round(float(w), 3) for w in weights]} if "effect" in label else {}),
                        **extra)
            set_correction(model, correction_tables(feats, sched, dev))
            measure(model, name, "ddim", steps, grid=grid, cache=f"{label}+correction", full_steps=len(sched), **extra)
            detach(model, "cache")

    models = {key: load_diffusion(args.weights / FILES[key]).to(dev) for key in args.models.split(",")}

    loaded: dict[str, list] = {}

    def students(key: str) -> list[tuple[str, torch.nn.Module, list[int]]]:
        """The distilled students of ``key``, most steps first (each file read once per run)."""
        if key not in loaded:
            name = FILES[key].removesuffix(".safetensors")
            files = sorted(args.students.glob(f"{name}-distilled-*.safetensors"),
                           key=lambda p: -int(p.stem.rsplit("-", 1)[1]))
            loaded[key] = [(f.stem, load_diffusion(f).to(dev), read_metadata(f)["train"]["grid"]) for f in files]
        return loaded[key]

    for part in parts:
        if part == "floor" and args.mode != "speed":
            train, _ = classifier_outputs(clf, to_diffusion(fashion_mnist("train").images[:10000]))
            record({"what": "noise floor", "fid_test_half_vs_half": fid(real[:5000], real[5000:]),
                    "fid_train10k_vs_test": fid(train, real)})
        for key, model in models.items() if part != "floor" else ():
            name = FILES[key].removesuffix(".safetensors")
            if part == "fp":
                for seed in (0, 1) if args.mode != "speed" else (0,):
                    measure(model, name, "ddim", args.steps, seed, cache="none")
            elif part == "front":
                for sampler in ("ddim", "dpmpp-2m"):
                    for steps in (int(s) for s in args.front_steps.split(",")):
                        measure(model, name, sampler, steps, cache="none")
            elif part == "ptq":
                base = copy.deepcopy(model).to(torch.bfloat16)
                measure(base, name, "ddim", args.steps, bf16=True, cache="none", quant="bf16")
                del base
                for preset in args.presets.split(","):
                    for calib in args.calibrations.split(","):
                        if (preset == "FP8") and calib != "dynamic" or (preset == "W4A8" and calib == "dynamic") \
                                or f"{preset}:{calib}" in skip:
                            continue  # FP8 is dynamic only; our W4A8 kernel takes group-128 weights (no static)
                        q, extra = quantized(model, preset, calib, dev, args.steps)
                        measure(q.to(torch.bfloat16), name, "ddim", args.steps, bf16=True, cache="none", **extra)
                        del q
            elif part == "cache":
                cache_runs(model, name, key, timesteps(1000, args.steps), args.steps // 5)
            elif part == "distilled":
                for sname, student, grid in students(key):
                    measure(student, sname, "ddim", len(grid), grid=grid, cache="none", teacher_steps=2 * len(grid))
            elif part == "composed":
                for sname, student, grid in students(key):
                    if len(grid) > 8:
                        continue
                    steps = len(grid)
                    for calib in args.composed_calibrations.split(","):
                        q, extra = quantized(student, "W8A8", calib, dev, steps, grid)
                        q16 = copy.deepcopy(q).to(torch.bfloat16)
                        measure(q16, sname, "ddim", steps, grid=grid, bf16=True, cache="none", **extra)
                        del q16
                        feats, _ = calibration_run(q, dev, grid)
                        sched = uniform_schedule(steps, 2)
                        q = q.to(torch.bfloat16)
                        apply_(q, CacheConfig(schedule=tuple(sched)))
                        label = "uniform-2"
                        if calib != "naive":
                            set_correction(q, correction_tables(feats, sched, dev, torch.bfloat16))
                            label += "+correction"  # fitted on the float32 reference of the same model
                        measure(q, sname, "ddim", steps, grid=grid, bf16=True, cache=label, full_steps=len(sched),
                                composed="naive" if calib == "naive" else "ours", **extra)
                        detach(q, "cache")
                        del q
                    apply_(student, CacheConfig(interval=2))
                    measure(student, sname, "ddim", steps, grid=grid, cache="uniform-2", full_steps=-(-steps // 2))
                    detach(student, "cache")


if __name__ == "__main__":
    main()
