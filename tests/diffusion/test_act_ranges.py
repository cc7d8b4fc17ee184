"""Timestep-group activation ranges and shortcut splitting (slimtorch.diffusion.act_ranges), against
closed-form ranges: the W8A8 preset's activations are asymmetric int8 with a min/max observer, so a
range's scale is (max(x, 0) - min(x, 0)) / 255."""

import pytest
import torch
from torch import nn

from slimtorch.api import apply_
from slimtorch.diffusion.act_ranges import (
    GroupedActQuant,
    SplitActQuant,
    TimestepGroups,
    refine_activation_ranges_,
    shortcut_splits,
)
from slimtorch.diffusion.unet import DDPMUNet
from slimtorch.errors import SlimError
from slimtorch.hooks import TemporaryHooks
from slimtorch.quant.modules import ActQuant
from slimtorch.quantize import PTQConfig


class Drift(nn.Module):
    """y = W (x * (1 + t / 100)): the input of ``lin`` grows with t, so each timestep group has its own range."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x, t, y=None):
        return self.lin(x * (1 + t.float()[:, None] / 100))


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(16, 8, generator=g) * 2 - 1, torch.randint(0, 1000, (16,), generator=g), None)
            for _ in range(n)]


def test_groups_bucket_timesteps():
    tg = TimestepGroups(4, 1000)
    assert tg.of(torch.tensor([0, 249, 250, 499, 500, 999])).tolist() == [0, 0, 1, 1, 2, 3]
    with pytest.raises(SlimError):
        TimestepGroups(0)


def test_grouped_ranges_are_each_groups_maximum():
    model = Drift()
    batches = _batches()
    apply_(model, PTQConfig("W8A8", "rtn"), batches)
    info = refine_activation_ranges_(model, batches, groups=4, split=False)
    q = model.lin.act
    assert isinstance(q, GroupedActQuant)
    tg = q.state
    for g in range(4):
        seen = torch.cat([(x * (1 + t.float()[:, None] / 100))[tg.of(t) == g] for x, t, _ in batches])
        expect = (seen.max().clamp(min=0) - seen.min().clamp(max=0)) / 255
        assert float(q.scale[g]) == pytest.approx(float(expect), rel=1e-6)
    assert info["range_spread"]["lin"] > 2  # t ~ 999 doubles the input against t ~ 0


def test_one_group_equals_plain_static_calibration():
    """groups=1 without split reproduces apply_'s own static calibration bit for bit."""
    a, b = Drift(), Drift()
    batches = _batches()
    apply_(a, PTQConfig("W8A8", "rtn"), batches)
    apply_(b, PTQConfig("W8A8", "rtn"), batches)
    refine_activation_ranges_(b, batches, groups=1, split=False)
    assert isinstance(b.lin.act, ActQuant)
    x, t, _ = batches[0]
    assert torch.equal(a(x, t), b(x, t))


def test_grouped_forward_uses_each_samples_own_range():
    """A mixed-t batch quantizes each row as that row alone does (the matmul after it may round its last
    bit differently by batch size, so the quantizer's output is compared)."""
    model = Drift()
    batches = _batches()
    apply_(model, PTQConfig("W8A8", "rtn"), batches)
    refine_activation_ranges_(model, batches, groups=3, split=False)
    x, t, _ = batches[0]
    out = []
    with TemporaryHooks() as hooks:
        hooks.after(model.lin.act, lambda m, a, o: out.append(o))
        model(x, t)
        for i in range(len(t)):
            model(x[i:i + 1], t[i:i + 1])
            assert torch.equal(out[0][i:i + 1], out[-1])
    # and a sample's output changes with its group's range: the coarse range of a late step quantizes
    # an early step's input differently
    late_scale = model.lin.act.scale[-1]
    assert late_scale > model.lin.act.scale[0]


def test_unet_shortcut_split_ranges_per_part():
    torch.manual_seed(0)
    model = DDPMUNet(ch=32, mult=(1, 2), blocks=1, attn_res=(), groups=8).eval()
    splits = shortcut_splits(model)
    assert splits and all(k.startswith("up.") for k in splits)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 32, 32, generator=g), torch.randint(0, 1000, (4,), generator=g),
                torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    seen: dict[str, torch.Tensor] = {}  # per layer, every input value seen, by channel: (C, N)

    def keep(n, a):
        v = a[0].transpose(0, 1).reshape(a[0].shape[1], -1)
        seen[n] = torch.cat([seen[n], v], 1) if n in seen else v

    with TemporaryHooks() as hooks, torch.no_grad():
        for n in splits:
            hooks.before(model.get_submodule(n), lambda m, a, n=n: keep(n, a))
        for b in batches:
            model(*b)
    apply_(model, PTQConfig("W8A8", "rtn"), batches)
    info = refine_activation_ranges_(model, batches, groups=1, split=True)
    assert info["split_layers"] == len(splits)
    for n, c in splits.items():
        q = model.get_submodule(n).act
        assert isinstance(q, SplitActQuant) and q.split == c
        # the quantized model's earlier layers change what reaches this conv a little: compare loosely
        lo_hi = {part: (float(v.min()), float(v.max())) for part, v in (("head", seen[n][:c]), ("tail", seen[n][c:]))}
        for part, (lo, hi) in lo_hi.items():
            expect = (max(hi, 0) - min(lo, 0)) / 255
            assert float(getattr(q, part).scale) == pytest.approx(expect, rel=0.05)
    out = model(*batches[0])
    assert out.shape == (4, 1, 32, 32) and torch.isfinite(out).all()


def test_refine_needs_static_quantizers_and_samples_per_group():
    model = Drift()
    with pytest.raises(SlimError, match="static"):
        refine_activation_ranges_(model, _batches(), groups=2)
    apply_(model, PTQConfig("W8A8", "rtn"), _batches())
    early = [(torch.rand(8, 8), torch.full((8,), 10), None)]
    with pytest.raises(SlimError, match="no calibration samples"):
        refine_activation_ranges_(model, early, groups=2)
