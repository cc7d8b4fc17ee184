"""Damaged and hostile transformers folders: each is one SlimError (one line, exit 2 in the CLI), never a
traceback, never a pickle loaded, never the folder's Python run, never randomly initialised weights."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from slimtorch.errors import SlimError
from slimtorch.zoo.local import load_local, local_tokenizer
from tests.hostile import folders as F


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return F.tiny_llama_folder(tmp_path_factory.mktemp("good") / "llama")


@pytest.fixture
def bad(good, tmp_path):
    return F.copy_folder(good, tmp_path / "bad")


@pytest.fixture
def marker(tmp_path, monkeypatch):
    m = tmp_path / "pwned"
    monkeypatch.setenv(F.MARKER_ENV, str(m))
    return m


def refused(folder, text: str) -> str:
    with pytest.raises(SlimError, match=text) as info:
        load_local(folder)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_the_good_folder_loads_to_the_saved_weights(good):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model = load_local(good)
    saved = load_file(str(good / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v)
    ref = LlamaForCausalLM.from_pretrained(good).eval()
    x = torch.arange(20)[None]
    assert torch.equal(model(x).logits, ref(x).logits)


def test_index_pointing_at_a_pickle_is_refused_and_the_pickle_never_runs(bad, marker):
    (bad / "decoy.safetensors").write_bytes((bad / "model.safetensors").read_bytes())
    (bad / "model.safetensors").unlink()
    F.write_pickle_payload(bad / "pytorch_model.bin")
    (bad / "decoy.safetensors").unlink()
    F.write_safetensors_parts(bad / "decoy.safetensors", {}, b"")
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "pytorch_model.bin" for k in keys}}))
    refused(bad, "only safetensors files")
    assert not marker.exists()


def test_a_pickle_named_model_safetensors_is_refused_and_never_runs(bad, marker):
    F.write_pickle_payload(bad / "model.safetensors")
    refused(bad, "not a valid safetensors file")
    assert not marker.exists()


def test_only_a_pickle_checkpoint_is_refused(bad, marker):
    (bad / "model.safetensors").unlink()
    F.write_pickle_payload(bad / "pytorch_model.bin")
    refused(bad, "no .safetensors weights")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_auto_map_is_refused_and_the_module_never_runs(bad, marker, where):
    (bad / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    cfg = json.loads((bad / where).read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil",
                       "AutoTokenizer": ["evil.EvilTok", None]}
    (bad / where).write_text(json.dumps(cfg))
    refused(bad, "auto_map")
    with pytest.raises(SlimError, match="auto_map"):
        local_tokenizer.__wrapped__(bad)
    assert not marker.exists()


@pytest.mark.parametrize("change, text", [
    (lambda d: F.drop_tensors(d, lambda k: "layers.1." not in k), "1. missing|missing"),
    (lambda d: F.drop_tensors(d, lambda k: k == "model.embed_tokens.weight"), "missing"),
    (lambda d: F.edit_config(d, num_hidden_layers=3), "missing"),
    (lambda d: F.edit_config(d, num_hidden_layers=1), "unexpected"),
    (lambda d: F.edit_config(d, intermediate_size=96), "shape"),
    (lambda d: F.edit_config(d, vocab_size=5000), "shape"),
    (lambda d: F.retype_tensor(d, torch.bool), "must be floats"),
    (lambda d: F.retype_tensor(d, torch.int8), "must be floats"),
], ids=["layer-removed", "only-embedding", "more-layers", "fewer-layers", "wider-mlp", "vocab", "bool", "int8"])
def test_weights_that_do_not_match_the_config_are_errors_not_random_init(bad, change, text):
    change(bad)
    refused(bad, text)


def _header_edit(folder, edit):
    f = folder / "model.safetensors"
    header, data = F.safetensors_parts(f)
    edit(header)
    F.write_safetensors_parts(f, header, data)


def _first(header):
    return header[next(k for k in sorted(header) if k != "__metadata__")]


@pytest.mark.parametrize("damage", [
    lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
    lambda f: f.write_bytes(b""),
    lambda f: f.write_bytes(struct.pack("<Q", 2**62) + f.read_bytes()[8:]),
    lambda f: f.write_bytes(struct.pack("<Q", 6) + b"notjson" + f.read_bytes()[15:]),
    lambda f: _header_edit(f.parent, lambda h: _first(h).update(data_offsets=[0, 10**12])),
    lambda f: _header_edit(f.parent, lambda h: _first(h).update(shape=[10**12])),
    lambda f: _header_edit(f.parent, lambda h: _first(h).update(dtype="F64")),
    lambda f: _header_edit(f.parent, lambda h: _first(h).update(dtype="Q7")),
    lambda f: _header_edit(f.parent, lambda h: h.update(__metadata__=[1, 2])),
    lambda f: f.write_bytes(struct.pack("<Q", 4) + b"[1] " + b""),
], ids=["truncated", "empty", "header-2^62", "header-not-json", "offsets-past-end", "shape-1e12", "f64-over-f32",
        "unknown-dtype", "metadata-list", "header-a-list"])
def test_corrupt_safetensors_is_one_error(bad, damage):
    damage(bad / "model.safetensors")
    refused(bad, "not a valid safetensors file|missing|shape")


@pytest.mark.parametrize("write, text", [
    (lambda d: (d / "config.json").write_text("[1, 2]"), "JSON object"),
    (lambda d: (d / "config.json").write_bytes(b'{"model_type": "llama\xff\xfe"}'), "UTF-8"),
    (lambda d: F.edit_config(d, num_attention_heads=5), "config|heads|shape|divisible"),
    (lambda d: F.edit_config(d, hidden_size=-32), "config|build|negative|shape"),
    (lambda d: F.edit_config(d, architectures="LlamaForCausalLM"), "architectures must be a list"),
    (lambda d: F.edit_config(d, model_type="no-such-model"), "not a valid transformers config"),
], ids=["list", "non-utf8", "heads", "negative", "arch-string", "model-type"])
def test_bad_config_json_is_one_error(bad, write, text):
    write(bad)
    refused(bad, text)


def test_tokenizer_ids_beyond_the_vocabulary_are_an_error(bad):
    from slimtorch.zoo import get_entry

    F.edit_config(bad, vocab_size=1000)
    F.drop_tensors(bad, lambda k: True)
    from safetensors.torch import load_file, save_file

    t = load_file(str(bad / "model.safetensors"))
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:1000].contiguous()
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    load_local(bad)  # the model itself is sound
    with pytest.raises(SlimError, match="beyond the model's vocab_size 1000"):
        get_entry(str(bad)).encode(["def f(x): return x\n"])


@pytest.mark.parametrize("key", ["num_hidden_layers", "num_key_value_heads"])
def test_a_huge_count_in_config_is_refused_before_building(bad, key):
    """Found by the fuzz suite: num_hidden_layers = 2^63 built modules on the meta device for ever."""
    import time

    F.edit_config(bad, **{key: 2**63})
    t0 = time.perf_counter()
    refused(bad, "tensors are missing|config|shape|build")
    assert time.perf_counter() - t0 < 10
