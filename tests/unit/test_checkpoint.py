import hashlib
import shutil

import pytest
import torch

from slimtorch.errors import SlimError
from slimtorch.io.checkpoint import load_tensors, save_tensors, sha256_file
from slimtorch.zoo import registry


def test_round_trip_is_bit_identical(tmp_path):
    tensors = {"w": torch.randn(7, 5), "h": torch.randn(3).half(), "b": torch.randn(4).bfloat16(),
               "i": torch.randint(-8, 8, (9,), dtype=torch.int8)}
    save_tensors(tmp_path / "m.safetensors", tensors, {"plan": {"fc": "int8"}})
    back, meta = load_tensors(tmp_path / "m.safetensors")
    assert meta == {"plan": {"fc": "int8"}}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8))


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "m.safetensors"
    save_tensors(target, {"w": torch.ones(2)})
    before = target.read_bytes()
    with pytest.raises(Exception):
        save_tensors(target, {"w": "not a tensor"})
    assert target.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_not_safetensors_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x80\x04pickle")
    with pytest.raises(SlimError, match="not a valid safetensors file"):
        load_tensors(bad)


def test_tampered_zoo_weights_fail_sha256(tmp_path, monkeypatch):
    copy = tmp_path / "fmnist-cnn.safetensors"
    shutil.copy(registry.WEIGHTS_DIR / "fmnist-cnn.safetensors", copy)
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    registry.load_model("fmnist-cnn")  # the intact copy loads
    raw = bytearray(copy.read_bytes())
    raw[-1] ^= 0x01  # flip one bit of one weight
    copy.write_bytes(bytes(raw))
    with pytest.raises(SlimError, match="fails its sha256 check"):
        registry.load_model("fmnist-cnn")


def test_manifest_hashes_match_shipped_files():
    rows = registry.manifest()
    for name in ("fmnist-cnn", "fmnist-vit", "tinyllama-fm"):
        path = registry.ZOO[name].weights_path()
        assert sha256_file(path) == rows[name]["sha256"]
        assert path.stat().st_size < 20 * 2**20  # shipped weights stay under 20 MiB


def test_unknown_model_names_valid_ones():
    with pytest.raises(SlimError, match="choose one of: fmnist-cnn, fmnist-vit, tinyllama-fm"):
        registry.get_entry("resnet50")


def test_diffusion_weights_are_shipped_and_load_by_name():
    from slimtorch.diffusion.models import load_diffusion, zoo_weights

    rows = registry.manifest()
    for name, params in (("fmnist-ddpm-unet", 3645697), ("fmnist-dit", 5067780), ("fmnist-lowdiff-unet", 3646513)):
        path, sha = zoo_weights(name)
        assert sha256_file(path) == sha == rows[name]["sha256"] and path.stat().st_size == rows[name]["weights_bytes"]
        assert sum(p.numel() for p in load_diffusion(name).parameters()) == params == rows[name]["params"]


def test_the_same_tensors_and_metadata_give_the_same_file_in_every_process(tmp_path):
    # the safetensors library orders the header's metadata map at random per process: before, one of two
    # files (a resumed quantization's file differed from an uninterrupted run's in those bytes alone)
    import subprocess
    import sys

    code = ("import sys, torch; from pathlib import Path; from slimtorch.io.checkpoint import save_tensors; "
            "save_tensors(Path(sys.argv[1]), {'b': torch.arange(5.0), 'a': torch.ones(3, dtype=torch.int8)}, "
            "{'x': 1, 'y': [1, 2]})")
    digests = set()
    for i in range(6):  # a random order would agree 6 times with probability 1/32
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
