"""Width pruning of neuron groups: the groups found from the autograd graph, dead neurons removed without
changing the output, exact parameter counts on the zoo's transformers."""

import pytest
import torch
from torch import nn

from slimtorch.api import apply_
from slimtorch.calib.data import calibration_set
from slimtorch.errors import SlimError
from slimtorch.pruning.graph import neuron_groups
from slimtorch.pruning.structured import StructuredConfig, kept_width
from slimtorch.zoo import load_model


class Net(nn.Module):
    """A residual MLP block (a group), a gated MLP (a group of two producers), a layer whose output is
    also a residual (not a group)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(x)))
        x = x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        h = self.a(x)
        return self.b(h + x) + h.sum(-1, keepdim=True)


def test_groups_are_the_mlps_only():
    groups = {g.consumer: g for g in neuron_groups(Net(), (torch.randn(2, 8),))}
    assert set(groups) == {"fc2", "down"}
    assert groups["fc2"].producers == ("fc1",) and groups["down"].producers == ("gate", "up")
    assert groups["down"].width == 16


def test_zoo_transformers_mlps_are_found():
    for name, n, producers in (("tinyllama-fm", 6, 2), ("fmnist-vit", 6, 1)):
        m = load_model(name)
        groups = neuron_groups(m, tuple(t[:1] for t in calibration_set(name, 1, model=m)[0]))
        assert len(groups) == n and all(len(g.producers) == producers for g in groups)


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_dead_neurons_go_first_and_change_nothing(importance):
    net = Net()
    with torch.no_grad():
        net.fc2.weight[:, 8:] = 0.0  # neurons 8..31 of fc1/fc2 are dead
        net.fc1.weight[8:] *= 0.01
        net.down.weight[:, :8] = 0.0
        net.gate.weight[:8] *= 0.01
        net.up.weight[:8] *= 0.01
    x = torch.randn(64, 8)
    with torch.no_grad():
        ref = net(x)
    rep = apply_(net, StructuredConfig(ratio=0.5, importance=importance, align=8), [(x,)])
    # fc: 32 -> 16 keeps the 8 live neurons and 8 dead; gated: 16 -> 8 keeps exactly the live ones
    assert rep.groups == {"fc2": (32, 16), "down": (16, 8)}
    assert net.fc1.out_features == 16 and net.fc2.in_features == 16 and net.down.in_features == 8
    with torch.no_grad():
        assert torch.allclose(net(x), ref, atol=1e-6)
    removed = 16 * (8 + 1) + 16 * 8 + 8 * 2 * (8 + 1) + 8 * 8
    assert rep.params_before - rep.params_after == removed


def test_tinyllama_width_pruning_removes_exact_parameters():
    m = load_model("tinyllama-fm")
    calib = calibration_set("tinyllama-fm", 4, model=m)
    dim = m.lm_head.in_features
    rep = apply_(m, StructuredConfig(ratio=0.25), calib)
    assert all(v == (896, 672) for v in rep.groups.values())
    assert rep.params_before - rep.params_after == 6 * 224 * 3 * dim
    with torch.no_grad():
        assert torch.isfinite(m(calib[0][0][:1])).all()


def test_kept_width_and_bad_configs():
    assert kept_width(896, 0.25, 8) == 672 and kept_width(10, 0.9, 8) == 8 and kept_width(4, 0.5, 8) == 4
    for kw in ({"ratio": 1.0}, {"importance": "taylor2"}, {"align": 0}):
        with pytest.raises(SlimError):
            StructuredConfig(**kw)
    with pytest.raises(SlimError, match="no neuron groups"):
        apply_(nn.Sequential(nn.Linear(4, 4)), StructuredConfig(), [(torch.randn(2, 4),)])
