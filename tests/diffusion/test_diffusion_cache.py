"""Caching hooks: interval 1 equals no caching bit for bit; refreshes happen where the schedule says; a
partial step computes what the split model computes with the kept feature; state resets between runs."""

import pytest
import torch

from slimtorch.api import apply_
from slimtorch.diffusion.cache import CacheConfig, cache_hook, reset, set_correction
from slimtorch.diffusion.dit import DiT
from slimtorch.diffusion.samplers import ddim, guided, timesteps
from slimtorch.diffusion.schedule import NoiseSchedule
from slimtorch.diffusion.unet import DDPMUNet
from slimtorch.errors import SlimError
from slimtorch.hooks import detach

SCHED = NoiseSchedule.linear()


def _models():
    torch.manual_seed(0)
    unet = DDPMUNet(ch=32, groups=8).eval()
    dit = DiT(dim=64, depth=3, heads=2).eval()
    for m in dit.modules():  # leave adaLN-Zero's identity start, as after training
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    return {"unet": unet, "dit": dit}


def _sample(model, steps: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        return ddim(guided(model, y, 2.0, model.num_classes), x, SCHED, timesteps(1000, steps))


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_interval_one_equals_no_cache_bit_for_bit(name):
    model = _models()[name]
    ref = _sample(model)
    apply_(model, CacheConfig(interval=1))
    assert torch.equal(_sample(model), ref)
    assert cache_hook(model).full_steps == list(range(8))


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_refresh_steps_follow_the_interval_or_schedule(name):
    model = _models()[name]
    ref = _sample(model)
    report = apply_(model, CacheConfig(interval=3))
    assert 0 < report.partial_fraction < 1 and report.family == "caching"
    got = _sample(model)
    assert cache_hook(model).full_steps == [0, 3, 6]
    assert not torch.equal(got, ref)  # partial steps do differ ...
    assert (got - ref).abs().mean() < (ref - _sample_noise()).abs().mean()  # ... but stay near the result
    reset(model)
    apply_(model, CacheConfig(schedule=(0, 1, 5)))  # replaces the hook
    _sample(model)
    assert cache_hook(model).full_steps == [0, 1, 5]


def _sample_noise():
    return torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def test_deepcache_partial_step_is_the_split_model():
    model = _models()["unet"]
    apply_(model, CacheConfig(interval=2, branch=1))
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([500, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        model(x, t, y)  # refresh: keeps the feature
        kept = cache_hook(model).feature
        x2, t2 = torch.randn(2, 1, 32, 32), torch.tensor([400, 400])
        got = model(x2, t2, y)
        emb = model.embed(t2, y)
        start = model.num_skips - 2
        want = model.decode(kept, model.encode(x2, emb, upto=1), emb, start=start)
    assert torch.equal(got, want)
    set_correction(model, {3: (torch.full((kept.shape[1],), 2.0), torch.zeros(kept.shape[1]))})
    with torch.no_grad():
        model(x2, t2, y)  # step 2: refresh
        kept = cache_hook(model).feature
        corrected = model(x2, t2, y)  # step 3: the feature doubled
        emb = model.embed(t2, y)
        assert torch.equal(corrected, model.decode(2 * kept, model.encode(x2, emb, upto=1), emb, start=start))


def test_adaptive_threshold_decides_per_step():
    model = _models()["dit"]
    ref = _sample(model)
    apply_(model, CacheConfig(method="adaptive", threshold=0.0))  # any change refreshes: no reuse
    assert torch.equal(_sample(model), ref) and cache_hook(model).full_steps == list(range(8))
    apply_(model, CacheConfig(method="adaptive", threshold=1e9))  # nothing refreshes after the first step
    _sample(model)
    assert cache_hook(model).full_steps == [0]
    apply_(model, CacheConfig(method="adaptive", threshold=0.2))
    _sample(model)
    assert 1 < len(cache_hook(model).full_steps) < 8  # in between on this model


def test_reset_between_runs_and_bad_configs():
    model = _models()["unet"]
    apply_(model, CacheConfig(interval=4))
    first = _sample(model, 6)
    reset(model)
    assert torch.equal(_sample(model, 6), first)  # the second run starts from a refresh again
    detach(model, "cache")
    with pytest.raises(SlimError):
        cache_hook(model)
    with pytest.raises(SlimError):
        CacheConfig(method="fora")
    with pytest.raises(SlimError):
        CacheConfig(schedule=(1, 3))
    with pytest.raises(SlimError):
        apply_(model, CacheConfig(method="blocks"))
    with pytest.raises(SlimError):
        apply_(model, CacheConfig(branch=99))
    with pytest.raises(SlimError):
        apply_(torch.nn.Linear(2, 2), CacheConfig())
