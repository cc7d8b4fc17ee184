"""Width pruning of channel groups: the groups found from the autograd graph (MLPs, CNN blocks and residual
stages), dead channels removed without changing the output, the pruned model equal to the masked original,
exact parameter and FLOP counts, budgets met."""

import pytest
import torch
from torch import nn

from slimtorch.api import apply_
from slimtorch.calib.data import calibration_set
from slimtorch.errors import SlimError
from slimtorch.pruning.graph import channel_groups
from slimtorch.pruning.structured import StructuredConfig, kept_width, prune_group_
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
    groups = {g.name: g for g in channel_groups(Net(), (torch.randn(2, 8),))}
    assert set(groups) == {"fc2", "down"}
    assert groups["fc2"].producers == ("fc1",) and groups["down"].producers == ("gate", "up")
    assert groups["down"].width == 16


def test_zoo_transformers_mlps_are_found():
    for name, n, producers in (("tinyllama-fm", 6, 2), ("fmnist-vit", 6, 1)):
        m = load_model(name)
        groups = channel_groups(m, tuple(t[:1] for t in calibration_set(name, 1, model=m)[0]))
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
    for kw in ({"ratio": 1.0}, {"importance": "taylor2"}, {"align": 0}, {"budget": 0.0}, {"measure": "bytes"}):
        with pytest.raises(SlimError):
            StructuredConfig(**kw)
    with pytest.raises(SlimError, match="no channel groups"):
        apply_(nn.Sequential(nn.Linear(4, 4)), StructuredConfig(), [(torch.randn(2, 4),)])


def test_cnn_groups_follow_batchnorm_and_residual_stages():
    m = load_model("fmnist-cnn")
    groups = {g.name: g for g in channel_groups(m, (torch.randn(1, 1, 28, 28),))}
    assert len(groups) == 6
    stage1 = groups["layer1.conv1.0"]  # stem and layer1 write the stage-1 residual stream; three layers read it
    assert stage1.producers == ("layer1.conv2", "stem.0") and stage1.members == ("layer1.bn2", "stem.1")
    assert stage1.consumers == ("layer1.conv1.0", "layer2.conv1.0", "layer2.shortcut.0") and stage1.width == 32
    last = groups["fc"]  # through the global pool and the flatten into the classifier
    assert last.producers == ("layer3.conv2", "layer3.shortcut.0") and last.width == 128
    assert groups["layer2.conv2"].producers == ("layer2.conv1.0",) and groups["layer2.conv2"].width == 64


def _mask_(model, group, idx):
    """Zero the channels of ``group`` outside ``idx`` where they are made (the BN after a conv, else the
    producer's rows), leaving every shape as it is."""
    drop = torch.ones(group.width, dtype=torch.bool)
    drop[idx] = False
    with torch.no_grad():
        for name in group.members or group.producers:
            mod = model.get_submodule(name)
            mod.weight[drop] = 0.0
            if mod.bias is not None:
                mod.bias[drop] = 0.0


def test_pruned_cnn_equals_the_masked_original():
    m = load_model("fmnist-cnn").eval()
    x = torch.randn(4, 1, 28, 28)
    groups = channel_groups(m, (x[:1],))
    gen = torch.Generator().manual_seed(0)
    keep = {g.name: torch.sort(torch.randperm(g.width, generator=gen)[: g.width // 2]).values for g in groups}
    for g in groups:
        _mask_(m, g, keep[g.name])
    with torch.no_grad():
        ref = m(x)
    for g in groups:
        prune_group_(m, g, keep[g.name])
    assert m.layer2.conv1[0].in_channels == 16 and m.layer2.conv1[0].out_channels == 32 and m.fc.in_features == 64
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-5)


@pytest.mark.parametrize("measure,budget", [("flops", 0.5), ("params", 0.4)])
def test_budget_is_met_and_counts_are_exact(measure, budget):
    m = load_model("fmnist-cnn")
    calib = calibration_set("fmnist-cnn", 2, model=m)
    rep = apply_(m, StructuredConfig(budget=budget, measure=measure, importance="magnitude", align=1), calib)
    kept = (rep.flops_after / rep.flops_before) if measure == "flops" else rep.params_after / rep.params_before
    assert budget - 0.05 < kept <= budget
    assert rep.params_after == sum(p.numel() for p in m.parameters())
    # closed form for one conv: out x in x 9 x 28 x 28 per image (layer1.conv2 keeps all its MACs' factors)
    c1 = m.layer1.conv1[0]
    assert (c1.out_channels, c1.in_channels) == (rep.groups["layer1.conv2"][1], rep.groups["layer1.conv1.0"][1])
    with torch.no_grad():
        assert m(calib[0][0]).shape == (calib[0][0].shape[0], 10)


def test_taylor_importance_ranks_a_dead_channel_last():
    net = Net()
    with torch.no_grad():
        net.fc2.weight[:, 3] = 0.0  # neuron 3 of fc1/fc2 never reaches the output: zero gradient and w*g
        net.fc1.weight[3] = 0.0
        net.fc1.bias[3] = 0.0
    x = torch.randn(32, 8)
    from slimtorch.pruning.structured import _taylor_grads, importance

    groups = {g.name: g for g in channel_groups(net, (x[:1],))}
    grads = _taylor_grads(net, list(groups.values()), [(x,)])
    score = importance(net, groups["fc2"], "taylor", grads=grads)
    assert score[3] == 0.0 and (score[torch.arange(32) != 3] > 0).all()


@pytest.mark.parametrize("name,unit,q_per_kv", [("fmnist-vit", 3, 1), ("tinyllama-fm", 2, 3)])
def test_head_pruning_equals_the_masked_original(name, unit, q_per_kv):
    from slimtorch.pruning.heads import head_groups

    m = load_model(name).eval()
    groups = head_groups(m)
    assert len(groups) == 6 and all(g.width == unit and g.q_per_kv == q_per_kv for g in groups)
    x = calibration_set(name, 1, model=m)[0][0][:2]
    keep = torch.tensor([1])  # unit 1 of every layer stays (one head, or one KV head with its 3 query heads)
    with torch.no_grad():
        for g in groups:  # mask: the output projection ignores the other units' channels
            cols = torch.ones(m.get_submodule(g.consumers[0]).in_features, dtype=torch.bool)
            cols[g.channels(g.consumers[0], keep)] = False
            m.get_submodule(g.consumers[0]).weight[:, cols] = 0.0
        ref = m(x)
    for g in groups:
        prune_group_(m, g, keep)
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-5)
    g = groups[0]
    q = m.get_submodule(g.producers[0])
    assert q.out_features == (3 if g.fused else q_per_kv) * g.head_dim


def test_vit_at_a_parameter_budget_with_heads():
    m = load_model("fmnist-vit")
    calib = calibration_set("fmnist-vit", 2, model=m)
    rep = apply_(m, StructuredConfig(budget=0.6, measure="params", heads=True, importance="magnitude"), calib)
    assert 0.55 < rep.params_after / rep.params_before <= 0.6
    assert rep.params_after == sum(p.numel() for p in m.parameters())
    assert any(v[1] < v[0] for k, v in rep.groups.items() if k.endswith("attn"))
    with torch.no_grad():
        assert torch.isfinite(m(calib[0][0])).all()


def test_narrow_to_rejects_widths_of_another_model():
    from slimtorch.pruning.structured import narrow_to_

    m = load_model("fmnist-cnn")
    x = (torch.randn(1, 1, 28, 28),)
    widths = {g.name: g.width // 2 for g in channel_groups(m, x)}
    with pytest.raises(SlimError, match="not a pruning of this model"):
        narrow_to_(m, {**widths, "blocks.0.mlp.2": 8}, False, x)
    with pytest.raises(SlimError, match="keeps"):
        narrow_to_(m, {**widths, "fc": 129}, False, x)
    narrow_to_(m, widths, False, x)
    assert m.fc.in_features == 64


def test_inverted_residuals_prune_through_depthwise_convs():
    m = load_model("efficientnet-lite0").eval()
    x = torch.randn(2, 3, 224, 224)
    groups = {g.name: g for g in channel_groups(m, (x[:1],))}
    assert len(groups) == 24  # 16 blocks' inner channels, 6 residual stages, block 0 -> 1, head -> classifier
    g = groups["_blocks.3._project_conv"]  # expand -> BN -> ReLU6 -> (same-padded) depthwise -> BN -> ReLU6 -> project
    assert g.producers == ("_blocks.3._expand_conv",) and g.width == 144
    assert g.members == ("_blocks.3._bn0", "_blocks.3._bn1", "_blocks.3._depthwise_conv")
    gen = torch.Generator().manual_seed(0)
    keep = {n: torch.sort(torch.randperm(g.width, generator=gen)[: g.width // 2]).values for n, g in groups.items()}
    for n, g in groups.items():
        _mask_(m, g, keep[n])
    with torch.no_grad():
        ref = m(x)
    for n, g in groups.items():
        prune_group_(m, g, keep[n])
    assert m._blocks[3]._depthwise_conv.groups == 72 and m._fc.in_features == 640
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-4)


def test_transformers_qwen2_mlp_and_gqa_heads_prune_to_the_masked_original(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from families import save_family
    from transformers import AutoModelForCausalLM

    from slimtorch.pruning.heads import head_groups

    folder = save_family("qwen2", tmp_path / "qwen2")
    m = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.randint(0, 200, (2, 12))
    groups = channel_groups(m, (ids[:1],)) + head_groups(m)
    heads = [g for g in groups if hasattr(g, "q_per_kv")]
    assert len(groups) == 4 and len(heads) == 2 and heads[0].width == 2 and heads[0].q_per_kv == 2
    keep = {g.name: torch.tensor([1]) if g in heads else torch.arange(0, g.width, 2) for g in groups}
    with torch.no_grad():
        for g in groups:  # mask: the consumer ignores the dropped units' columns
            cols = torch.ones(m.get_submodule(g.consumers[0]).in_features, dtype=torch.bool)
            cols[g.channels(g.consumers[0], keep[g.name])] = False
            m.get_submodule(g.consumers[0]).weight[:, cols] = 0.0
        ref = m(ids).logits
    for g in groups:
        prune_group_(m, g, keep[g.name])
    assert m.config.num_attention_heads == 2 and m.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, ref, atol=1e-4)
        assert m.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)  # with its KV cache
