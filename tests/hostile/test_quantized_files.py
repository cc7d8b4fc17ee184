"""Tampered and damaged quantized files: load_quantized checks a checksum of every tensor and the metadata,
then validates specs and scales, so each is one SlimError, never a wrong model and never a traceback."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from slimtorch.calib.data import calibration_set
from slimtorch.errors import SlimError
from slimtorch.export.quantized import load_quantized, save_quantized
from slimtorch.quantize import quantize_
from slimtorch.zoo import load_model
from tests.hostile import tampered as T


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    q = load_model("fmnist-cnn")
    quantize_(q, "W8A8", calibration_set("fmnist-cnn", 128))
    path = tmp_path_factory.mktemp("q") / "q.safetensors"
    save_quantized(q, path, "fmnist-cnn", {"recipe": "W8A8", "method": "rtn"})
    return path, q


@pytest.fixture
def copy_(saved, tmp_path):
    p = tmp_path / "t.safetensors"
    shutil.copy(saved[0], p)
    return p


def refused(path, match: str) -> None:
    with pytest.raises(SlimError, match=match) as info:
        load_quantized(path)
    assert "\n" not in str(info.value)


def test_an_untouched_file_loads_bit_identical(saved):
    model, _ = load_quantized(saved[0])
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), saved[1](x))


def test_every_single_flipped_data_byte_is_caught(copy_):
    size = copy_.stat().st_size
    original = copy_.read_bytes()
    for offset in torch.randint(0, size, (40,), generator=torch.Generator().manual_seed(0)).tolist():
        copy_.write_bytes(original)
        T.flip_byte(copy_, offset)
        refused(copy_, "checksum|not a valid safetensors|cannot read|not UTF-8|metadata")


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.0, float("inf")])
def test_bad_scales_are_caught_even_with_a_recomputed_checksum(copy_, value):
    tensors, meta = T.read(copy_)
    key = next(k for k in tensors if k.endswith(".w_scale"))
    tensors[key] = tensors[key].clone().fill_(value)
    T.rewrite(copy_, tensors, meta)
    refused(copy_, "finite positive")


def test_a_stale_checksum_is_caught(copy_):
    tensors, meta = T.read(copy_)
    key = next(k for k in tensors if k.endswith(".w_scale"))
    tensors[key] = tensors[key] * 2
    T.rewrite(copy_, tensors, meta, fix_digest=False)
    refused(copy_, "fails its checksum")


def test_a_file_without_checksum_is_refused(copy_):
    from safetensors.torch import save_file

    tensors, meta = T.read(copy_)
    import json

    save_file(tensors, str(copy_), metadata={"slimtorch": json.dumps(meta)})
    refused(copy_, "no checksum")


def _layer(meta):
    return meta["layers"][next(iter(meta["layers"]))]


def _conv(meta):
    return next(v for v in meta["layers"].values() if "conv" in v)


@pytest.mark.parametrize("edit, match", [
    (lambda m: _layer(m)["weight"].update(dtype="int5x"), "unknown dtype"),
    (lambda m: _layer(m)["weight"].update(dtype="int4"), "bytes per row|damaged"),
    (lambda m: _layer(m)["weight"].update(granularity="token"), "weight granularity"),
    (lambda m: _layer(m)["weight"].update(symmetric="yes"), "true or false"),
    (lambda m: _layer(m)["act"].update(granularity="token"), "static activations"),
    (lambda m: _layer(m).pop("weight"), "damaged"),
    (lambda m: _layer(m).update(kind="lstm"), "unknown kind"),
    (lambda m: _layer(m).update(weight_shape=[10**12, 3]), "damaged|corrupt"),
    (lambda m: _layer(m).update(weight_shape="abc"), "damaged"),
    (lambda m: _conv(m)["conv"].update(groups=7), "damaged"),
    (lambda m: m.update(layers=[1, 2]), "damaged"),
    (lambda m: m.update(layers={"no.such.layer": _layer(m)}), "damaged"),
    (lambda m: m.update(version=99), "format version"),
    (lambda m: m.update(version="1"), "format version"),
    (lambda m: m.update(format="other"), "not a slimtorch quantized"),
    (lambda m: m.update(base=None), "names no base"),
    (lambda m: m.update(base="resnet50"), "unknown model"),
    (lambda m: m.update(aliases={"x": "nope"}), "damaged"),
    (lambda m: m.update(points={"stem": {"dtype": "int8"}}), "damaged|static|granularity"),
], ids=["int5", "int4", "token", "symmetric-str", "act-token", "no-weight", "kind", "huge-shape", "shape-str",
        "groups", "layers-list", "unknown-layer", "version-99", "version-str", "format", "base-none",
        "base-unknown", "alias", "point"])
def test_damaged_metadata_is_one_error_even_with_a_recomputed_checksum(copy_, edit, match):
    tensors, meta = T.read(copy_)
    edit(meta)
    T.rewrite(copy_, tensors, meta)
    refused(copy_, match)


def test_metadata_that_is_not_an_object_is_one_error(copy_):
    tensors, _ = T.read(copy_)
    T.rewrite(copy_, tensors, [1, 2, 3])
    refused(copy_, "not a JSON object")


def test_missing_tensor_is_one_error(copy_):
    tensors, meta = T.read(copy_)
    tensors.pop(next(k for k in tensors if k.endswith(".qweight")))
    T.rewrite(copy_, tensors, meta)
    refused(copy_, "damaged")


def test_a_pickle_under_the_name_never_runs(copy_, tmp_path, monkeypatch):
    from tests.hostile import folders as F

    marker = tmp_path / "pwned"
    monkeypatch.setenv(F.MARKER_ENV, str(marker))
    F.write_pickle_payload(copy_)
    refused(copy_, "not a valid safetensors")
    assert not marker.exists()
    with pytest.raises(SlimError):
        load_model(copy.copy("fmnist-cnn"))  # sanity: the zoo loader is unaffected
        raise SlimError("ok")


@pytest.mark.parametrize("damage", [
    lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
    lambda f: f.write_bytes(b""),
    lambda f: f.write_bytes(b"\x00" * 8),
    lambda f: f.write_bytes((2**62).to_bytes(8, "little") + f.read_bytes()[8:]),
    lambda f: f.write_bytes((6).to_bytes(8, "little") + b"notjso" + f.read_bytes()[14:]),
    lambda f: f.write_bytes(f.read_bytes() + b"trailing"),
], ids=["truncated", "empty", "zero-header", "header-2^62", "not-json", "trailing-bytes"])
def test_corrupt_quantized_files_are_one_error(copy_, damage):
    damage(copy_)
    refused(copy_, "not a valid safetensors file")


def test_a_resume_checkpoint_that_is_a_pickle_never_runs(tmp_path, monkeypatch):
    from slimtorch.io.checkpoint import load_tensors
    from tests.hostile import folders as F

    marker = tmp_path / "pwned"
    monkeypatch.setenv(F.MARKER_ENV, str(marker))
    ckpt = tmp_path / "last.safetensors"
    F.write_pickle_payload(ckpt)
    with pytest.raises(SlimError, match="not a valid safetensors"):
        load_tensors(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["efficientnet-lite0", "minilm", "fmnist-cnn", "tinyllama-fm"])
def test_a_swapped_zoo_weights_file_is_refused_before_it_is_read(tmp_path, monkeypatch, name):
    """Every zoo loader checks the file's sha256 before reading a byte (EfficientNet's legacy .pth is then
    decoded without an unpickler; minilm's package folder is read with use_safetensors, no remote code)."""
    from slimtorch.zoo import registry
    from tests.hostile import folders as F

    marker = tmp_path / "pwned"
    monkeypatch.setenv(F.MARKER_ENV, str(marker))
    (tmp_path / "config.json").write_text('{"auto_map": {"AutoModel": "evil.M"}, "model_type": "bert"}')
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    payload = tmp_path / "model.safetensors"
    F.write_pickle_payload(payload)
    entry = registry.ZOO[name]
    monkeypatch.setitem(registry.ZOO, name, registry.ZooEntry(
        entry.name, entry.task, entry.description, entry.source, lambda: payload, entry.build))
    with pytest.raises(SlimError, match="sha256"):
        load_model(name)
    assert not marker.exists()
