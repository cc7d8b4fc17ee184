"""Sparse training: MEST's mutation against a hand-worked case, exact mask counts, the memory bound held
through a real (small) training run, forgetting events, the lottery-ticket loop's rewinding and sparsity
schedule, and the weight correlation against closed forms."""

import pytest
import torch
from torch import nn

from slimtorch.distill.trainer import TrainConfig
from slimtorch.errors import SlimError
from slimtorch.sparsity.lottery import imp, snapshot, weight_correlation
from slimtorch.sparsity.mest import (
    Forgetting,
    MESTConfig,
    masked_layers_sparsity,
    mutate,
    train_mest,
)
from slimtorch.sparsity.training_masks import MaskSet, keep_count, prunable


def test_mutation_prunes_the_smallest_active_and_grows_only_free_positions():
    w = torch.tensor([5.0, -4.0, 0.5, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    new = mutate(w, None, mask, prune_to=0.8, grow_to=0.6, lam=0.0, generator=gen)  # keep 2, then 4
    assert new[:2].all() and int(new.sum()) == 4
    assert int(new[2:].sum()) == 2  # two grown, among positions 2..9 (3 and 2 were just pruned: free again)
    g = torch.tensor([0.0, 0.0, 10.0, 0.0, 0, 0, 0, 0, 0, 0])  # a large gradient rescues weight 2 when lam > 0
    keep2 = mutate(w, g, mask, prune_to=0.8, grow_to=0.8, lam=1.0, generator=gen)
    assert keep2.tolist()[:4] == [True, False, True, False] and int(keep2.sum()) == 2


def test_mask_sets_keep_exact_counts():
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))  # 2048 and 128 weights
    assert prunable(net) == ["0"]
    r = MaskSet.random(net, 0.9, seed=1)
    assert int(r.masks["0"].sum()) == keep_count(2048, 0.9) == 205
    r.apply_(net)
    m = MaskSet.magnitude(net, 0.95, within=r)
    assert int(m.masks["0"].sum()) == 102 and not (m.masks["0"] & ~r.masks["0"]).any()
    with pytest.raises(SlimError):
        MaskSet.random(net, 1.0)


def test_forgetting_events():
    f = Forgetting(4)
    for correct in ([1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]):
        f.update(torch.tensor(correct, dtype=torch.bool))
    assert f.events.tolist() == [0, 0, 1, 0]
    assert f.unforgettable().tolist() == [0, 1]  # 2 was forgotten once, 3 never learned


def _data(n=2048, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 4, generator=g)
    return x, (x @ w).argmax(1)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))


@pytest.mark.parametrize("variant", ["em", "ems"])
def test_mest_holds_its_memory_bound_and_ends_at_the_target(variant):
    x, y = _data()
    model = _mlp()
    cfg = TrainConfig(epochs=8, batch_size=128, lr=1e-2, kd_weight=0.0)
    mest = MESTConfig(variant=variant, sparsity=0.9, every=3, drop=0.5, drop_after=0.5)
    hist, rec = train_mest(model, x, y, cfg, mest, evaluate=lambda m: float((m(x).argmax(1) == y).float().mean()))
    assert rec["peak_density"] <= rec["memory_bound_density"] + 1e-9
    assert rec["memory_bound_density"] == pytest.approx(0.10 if variant == "em" else 0.12, abs=1e-4)
    assert len(rec["mutations"]) == 2 and rec["masked_layers"] == 3
    assert masked_layers_sparsity(model, ["0", "2", "4"]) >= 0.9 - 1e-3  # zeros in the trained weights
    assert rec["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert rec["dropped_samples"] > 0 and rec["samples_seen"] < 8 * 2048
    assert hist.epochs[-1]["metric"] > 0.8  # a separable problem, learned at 90% sparsity (chance: 0.25)


def test_weight_correlation_closed_forms():
    net = nn.Sequential(nn.Linear(64, 32))
    init = snapshot(net)
    masks = MaskSet.random(net, 0.5, seed=0)
    lin = {k: 2 * v + 1 for k, v in init.items()}
    neg = {k: -v for k, v in init.items()}
    assert weight_correlation(init, lin, masks)["kept"] == pytest.approx(1.0)
    assert weight_correlation(init, neg, masks)["all"] == pytest.approx(-1.0)


def test_imp_rewinds_and_follows_the_sparsity_schedule():
    net = nn.Sequential(nn.Linear(64, 32))
    init = snapshot(net)
    seen = []

    def train(model, masks):  # "training" doubles the weights; checks what it starts from
        w = model[0].weight.detach()
        if masks is not None:
            seen.append(torch.equal(w, init["0.weight"] * masks.masks["0"]) or "reinit")
        with torch.no_grad():
            model[0].weight.mul_(2.0)
        return float(masks.density()) if masks is not None else 1.0

    fresh = {k: torch.randn_like(v) for k, v in init.items()}
    recs = imp(net, train, rounds=3, rate=0.2, control=lambda r: r == 2, reinit=lambda: fresh)
    assert [round(r["sparsity"], 3) for r in recs] == [0.0, 0.2, 0.36, 0.488]
    assert seen == [True, "reinit", True, True]  # round 2 trains the control first, then the rewound ticket
    assert recs[2]["reinit_accuracy"] == pytest.approx(0.64, abs=1e-3) and recs[1]["correlation"]["kept"] == pytest.approx(1.0)
