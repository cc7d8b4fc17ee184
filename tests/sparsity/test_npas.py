"""Latency-aware width search: the modelled latency of narrowed widths equals re-tracing the narrowed model,
the budget is met, the greedy search spends its cuts where latency is cheap to save and importance is low,
and it keeps more importance than one uniform ratio at the same modelled latency."""

import pytest
import torch

from slimtorch.api import apply_
from slimtorch.calib.data import calibration_set
from slimtorch.errors import SlimError
from slimtorch.pruning.npas import LatencyModel, NPASConfig, modelled_latency
from slimtorch.pruning.structured import find_groups, prune_group_
from slimtorch.zoo import load_model


def test_latency_model_equals_retracing_the_narrowed_model():
    m = load_model("efficientnet-lite0").eval()
    x = (torch.randn(1, 3, 224, 224),)
    groups = find_groups(m, x, False)
    lat = LatencyModel(m, groups, x, "h100-measured", 64)
    keep = {g.name: max(1, g.width * 5 // 8) for g in groups}
    modelled = lat(keep)
    for g in groups:
        prune_group_(m, g, torch.arange(keep[g.name]))
    assert modelled == pytest.approx(modelled_latency(m, x, "h100-measured", 64), rel=1e-9)
    assert modelled < lat({g.name: g.width for g in groups})


@pytest.mark.parametrize("search", ["greedy", "uniform"])
def test_budget_is_met(search):
    m = load_model("fmnist-cnn")
    calib = calibration_set("fmnist-cnn", 2, model=m)
    rep = apply_(m, NPASConfig(latency=0.5, batch=1024, search=search, importance="magnitude"), calib)
    assert rep.latency_after_s <= 0.5 * rep.latency_before_s
    x = (calib[0][0][:1],)
    assert rep.latency_after_s == pytest.approx(modelled_latency(m, x, "h100-measured", 1024), rel=1e-9)
    with torch.no_grad():
        assert m(calib[0][0]).shape[1] == 10


def test_greedy_keeps_more_importance_than_uniform_at_the_same_latency():
    from slimtorch.pruning.npas import importance_cost, search_widths, uniform_widths

    m = load_model("fmnist-cnn").eval()
    x = (torch.randn(1, 1, 28, 28),)
    groups = find_groups(m, x, False)
    lat = LatencyModel(m, groups, x, "h100-measured", 1024)
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.width, generator=gen) * (10.0 if g.name == "fc" else 1.0) for g in groups}
    budget = 0.6 * lat({g.name: g.width for g in groups})
    greedy = search_widths(groups, importance_cost(scores, "taylor"), lat, budget, 0.0625, 1)
    uniform = uniform_widths(groups, lat, budget, 1)

    def kept(keep):
        return sum(float(torch.sort(scores[g.name], descending=True).values[: keep[g.name]].sum()) for g in groups)

    assert lat(greedy) <= budget and lat(uniform) <= budget
    assert kept(greedy) > kept(uniform)
    assert greedy["fc"] == 128  # the important, cheap group (the classifier's input) is left whole


def test_bad_configs():
    for kw in ({"latency": 0.0}, {"hardware": "tpu9"}, {"search": "rl"}, {"step": 0.9}, {"evaluate": "acc"},
               {"eval_samples": 0}):
        with pytest.raises(SlimError):
            NPASConfig(**kw)


def test_loss_evaluation_is_zero_for_the_dense_model_and_the_kl_of_a_narrowed_one():
    from slimtorch.pruning.npas import LossCost
    from slimtorch.pruning.structured import unit_scores

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    batches = [(torch.randn(32, 8),)]
    groups = find_groups(m, batches[0], False)
    scores = unit_scores(m, groups, "magnitude", batches)
    cost = LossCost(m, groups, scores, batches)
    full = {g.name: g.width for g in groups}
    assert cost.divergence(full) == pytest.approx(0.0, abs=1e-7)
    # the oracle: KL(p_dense || p_narrow) by hand on the model narrowed to its 8 most important neurons
    narrow = {groups[0].name: 8}
    small = __import__("copy").deepcopy(m)
    idx = torch.sort(torch.topk(scores[groups[0].name], 8).indices).values
    prune_group_(small, groups[0], idx)
    with torch.no_grad():
        p, q = m(batches[0][0]).softmax(-1), small(batches[0][0]).softmax(-1)
    want = float((p * (p.log() - q.log())).sum(-1).mean())
    assert cost.divergence(narrow) == pytest.approx(want, rel=1e-5)
    assert cost(full, groups[0].name, 8) == pytest.approx(want, rel=1e-5)


def test_loss_aware_search_meets_the_budget_closer_to_the_dense_outputs_than_uniform():
    from slimtorch.pruning.npas import LossCost, search_widths, uniform_widths
    from slimtorch.pruning.structured import unit_scores

    m = load_model("fmnist-cnn").eval()
    calib = [tuple(t[:256] for t in b) for b in calibration_set("fmnist-cnn", 1, model=m)]
    groups = find_groups(m, calib[0], False)
    lat = LatencyModel(m, groups, (calib[0][0][:1],), "h100-measured", 1024)
    budget = 0.6 * lat({g.name: g.width for g in groups})
    scores = unit_scores(m, groups, "magnitude", calib)
    cost = LossCost(m, groups, scores, calib)
    greedy = search_widths(groups, cost, lat, budget, 0.125, 1)
    uniform = uniform_widths(groups, lat, budget, 1)
    assert lat(greedy) <= budget and lat(uniform) <= budget
    assert cost.divergence(greedy) < cost.divergence(uniform)
