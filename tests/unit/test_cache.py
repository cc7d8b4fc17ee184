"""The disk cache: computed once per content key, read back after, a damaged entry recomputed, an
unwritable folder harmless; corpus tokenisation goes through it."""

import os

import pytest
import torch

from slimtorch.io import cache as C


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTORCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _never():
    raise AssertionError("computed again: the cached value should have been read")


def test_content_keys_separate_their_parts():
    assert C.content_key("ab", "c") != C.content_key("a", "bc")
    assert C.content_key(["a", "b"]) != C.content_key(["ab"]) == C.content_key("ab")  # a string is one item
    assert C.content_key("x", ["y"]) == C.content_key("x", ["y"])


def test_a_value_is_computed_once_then_read_back(folder):
    want = torch.arange(10)
    assert torch.equal(C.cached_tensor("t", "k1", lambda: want), want)
    assert (folder / "t" / "k1.safetensors").is_file()
    assert torch.equal(C.cached_tensor("t", "k1", _never), want)
    assert torch.equal(C.cached_tensor("t", "k2", lambda: want + 1), want + 1)  # another key, another value


def test_a_damaged_entry_is_recomputed_and_replaced(folder):
    C.cached_tensor("t", "k", lambda: torch.arange(5))
    path = folder / "t" / "k.safetensors"
    path.write_bytes(path.read_bytes()[:-3])  # truncated
    assert torch.equal(C.cached_tensor("t", "k", lambda: torch.arange(5)), torch.arange(5))
    assert torch.equal(C.cached_tensor("t", "k", _never), torch.arange(5))  # the replacement reads back


def test_cache_off_and_unwritable_folders_only_mean_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTORCH_CACHE_DIR", "off")
    calls = []
    for _ in range(2):
        C.cached_tensor("t", "k", lambda: calls.append(1) or torch.zeros(1))
    assert len(calls) == 2
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SLIMTORCH_CACHE_DIR", str(blocker / "below"))
    assert torch.equal(C.cached_tensor("t", "k", lambda: torch.ones(2)), torch.ones(2))


def test_corpus_tokens_of_a_tokenizer_are_cached_by_its_content(folder, monkeypatch):
    from slimtorch.zoo import lm_data

    tok = lm_data.load_tokenizer()
    first = lm_data.corpus_tokens("heldout", tok)
    assert torch.equal(first, lm_data.encode_documents(
        [t for _, t in lm_data.text_corpus("heldout").documents], tok))
    assert len(os.listdir(folder / "tokens")) == 1
    monkeypatch.setattr(lm_data, "encode_documents", lambda *a: _never())
    assert torch.equal(lm_data.corpus_tokens("heldout", lm_data.load_tokenizer()), first)
