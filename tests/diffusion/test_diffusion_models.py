"""The diffusion models: shapes, the split forward that caching uses, DiT's patch layout and its
identity-at-initialisation (adaLN-Zero)."""

import pytest
import torch

from slimtorch.diffusion.dit import DiT, patchify, unpatchify
from slimtorch.diffusion.unet import DDPMUNet
from slimtorch.hooks import TemporaryHooks


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, 32, 32, generator=g), torch.tensor([5, 900])[:b], torch.tensor([3, 10])[:b]


@pytest.mark.parametrize("start", [0, 2, 5, 8])
def test_unet_split_forward_equals_the_whole(start):
    """A partial step (shallow encoder + up path from up block ``start``) fed the feature that entered that
    up block in a full pass at the same inputs gives the full pass's output: the DeepCache split is exact."""
    torch.manual_seed(0)
    net = DDPMUNet(ch=32, groups=8).eval()
    x, t, y = _inputs()
    seen = {}
    with torch.no_grad():
        with TemporaryHooks() as hooks:
            hooks.before(net.up[start], lambda m, args: seen.update(h=args[0]))  # None: the arguments are kept
            full = net(x, t, y)
        emb = net.embed(t, y)
        k = net.num_skips - 1 - start
        skips = net.encode(x, emb, upto=k)
        assert len(skips) == k + 1
        h_in = seen["h"][:, : seen["h"].shape[1] - skips[-1].shape[1]]  # the running tensor before the concat
        part = net.decode(h_in, skips, emb, start=start)
    assert torch.equal(part, full)
    assert full.shape == x.shape


def test_unet_class_and_time_condition_the_output():
    torch.manual_seed(0)
    net = DDPMUNet(ch=32, groups=8).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        base = net(x, t, y)
        assert not torch.allclose(base, net(x, t, (y + 1) % 11))
        assert not torch.allclose(base, net(x, t + 1, y))


def test_dit_patches_round_trip_and_order():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 4) and p[0, 1].tolist() == [2, 3, 6, 7]  # second patch: top row, columns 2-3
    assert torch.equal(unpatchify(p, 2, 1), x)
    x3 = torch.randn(2, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(x3, 2), 2, 3), x3)


def test_dit_starts_as_zero_output_and_then_conditions():
    torch.manual_seed(0)
    net = DiT(dim=64, depth=2, heads=2).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, y), torch.zeros_like(x))  # adaLN-Zero: zero output layer at init
        for m in net.modules():  # as after training: every layer active
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.05)
        out = net(x, t, y)
        assert out.shape == x.shape and not torch.allclose(out, net(x, t, (y + 1) % 11))


def test_load_diffusion_round_trip(tmp_path):
    from slimtorch.diffusion.models import load_diffusion
    from slimtorch.errors import SlimError
    from slimtorch.io.checkpoint import save_tensors

    torch.manual_seed(0)
    cfg = {"dim": 64, "depth": 2, "heads": 2}
    net = DiT(**cfg)
    save_tensors(tmp_path / "fmnist-dit.safetensors", {k: v.half() for k, v in net.state_dict().items()}, {"config": cfg})
    back = load_diffusion(tmp_path / "fmnist-dit.safetensors")
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.half().float())
    save_tensors(tmp_path / "fmnist-dit-bad.safetensors", {"x": torch.zeros(1)}, {"config": cfg})
    with pytest.raises(SlimError):
        load_diffusion(tmp_path / "fmnist-dit-bad.safetensors")
    with pytest.raises(SlimError):
        load_diffusion(tmp_path / "other.safetensors")


def test_zoo_name_loads_shipped_weights_checked_by_sha256(tmp_path, monkeypatch):
    import hashlib

    import slimtorch.zoo.registry as registry
    from slimtorch.diffusion.models import load_diffusion
    from slimtorch.errors import SlimError
    from slimtorch.io.checkpoint import save_tensors

    cfg = {"dim": 64, "depth": 1, "heads": 2}
    net = DiT(**cfg)
    path = tmp_path / "fmnist-dit.safetensors"
    save_tensors(path, {k: v.half() for k, v in net.state_dict().items()}, {"config": cfg})
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(SlimError, match="not shipped"):  # no manifest row
        monkeypatch.setattr(registry, "manifest", lambda: {})
        load_diffusion("fmnist-dit")
    monkeypatch.setattr(registry, "manifest", lambda: {"fmnist-dit": {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}})
    assert isinstance(load_diffusion("fmnist-dit"), DiT)
    monkeypatch.setattr(registry, "manifest", lambda: {"fmnist-dit": {"sha256": "0" * 64}})
    with pytest.raises(SlimError):
        load_diffusion("fmnist-dit")
