"""Pruned models saved and loaded: bit-identical outputs, smaller files, hostile files refused."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtorch.api import apply_
from slimtorch.calib.data import calibration_set
from slimtorch.errors import SlimError
from slimtorch.export.pruned import load_pruned, save_pruned
from slimtorch.sparsity.prune import PruneConfig
from slimtorch.zoo import load_model


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    m = load_model("fmnist-vit")
    rep = apply_(m, PruneConfig(method="magnitude", sparsity=0.5, pattern="2:4"), [])
    path = tmp_path_factory.mktemp("p") / "vit.safetensors"
    sizes = save_pruned(m, path, "fmnist-vit", {"prune": {"pattern": rep.pattern, "sparsity": rep.sparsity}})
    return m, path, sizes


def test_round_trip_is_bit_identical_and_smaller(pruned):
    m, path, sizes = pruned
    back, meta = load_pruned(path)
    x = calibration_set("fmnist-vit", 8)[0][0]
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    assert meta["prune"]["pattern"] == "2:4" and sizes["compressed_tensors"] > 0
    # most weights are 2:4-pruned float32 matrices: bitmask + values is 53% of them; embeddings/norms stay
    assert sizes["bytes"] < 0.65 * sizes["dense_bytes"], sizes


def _rewrite(path, out, edit):
    import json

    from slimtorch.io.checkpoint import META_KEY, save_tensors
    from slimtorch.io.safetensors_header import read_header

    _, raw = read_header(path)
    tensors, meta = load_file(str(path)), json.loads(raw[META_KEY])
    edit(tensors, meta)
    save_tensors(out, tensors, meta)  # a consistent checksum: the damage is in the content


def test_damaged_files_are_one_clear_error(pruned, tmp_path):
    _, path, _ = pruned
    key = next(k for k in load_file(str(path)) if k.endswith(".values"))

    cases = {
        "values": lambda t, m: t.__setitem__(key, t[key][:-1]),
        "shape": lambda t, m: m["sparse"].__setitem__(key.removesuffix(".values"), [3, 3]),
        "missing": lambda t, m: t.pop(key),
        "format": lambda t, m: m.__setitem__("format", "other"),
    }
    for name, edit in cases.items():
        out = tmp_path / f"{name}.safetensors"
        _rewrite(path, out, edit)
        with pytest.raises(SlimError):
            load_pruned(out)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # flipped bits after writing: the checksum
    (tmp_path / "flip.safetensors").write_bytes(bytes(raw))
    with pytest.raises(SlimError, match="checksum"):
        load_pruned(tmp_path / "flip.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(SlimError):
        load_pruned(tmp_path / "foreign.safetensors")


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    """safetensors refuses shared tensors; before, a tied model (tinyllama-fm's embeddings) failed to save."""
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.mid, self.head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    m = Tied()
    apply_(m, PruneConfig(sparsity=0.5, targets=("Linear",), ignore=("head",)), [])
    save_pruned(m, tmp_path / "t.safetensors", "unused")
    back, meta = load_pruned(tmp_path / "t.safetensors", base_model=Tied())
    assert meta["aliases"] == {"head.weight": "emb.weight"}
    assert back.head.weight is back.emb.weight
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))


def test_dense_size_counts_tied_embeddings_once():
    from slimtorch.export.pruned import state_bytes
    from slimtorch.zoo import load_model

    m = load_model("tinyllama-fm")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied
    naive = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert state_bytes(m) == naive - m.lm_head.weight.numel() * m.lm_head.weight.element_size()
