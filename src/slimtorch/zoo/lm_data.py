"""Tokenizer and token streams for tinyllama-fm.

The tokenizer is a byte-level BPE (4,096 entries, trained on the corpus's train split by
``scripts/train_tokenizer.py``) stored as ``weights/tinyllama-fm.tokenizer.json`` in the
``tokenizers`` format, which ``transformers.PreTrainedTokenizerFast`` also reads.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from slimtorch.errors import SlimError
from slimtorch.io.cache import cached_tensor, content_key
from slimtorch.zoo.data import text_corpus

TOKENIZER_FILE = Path(__file__).parent / "weights" / "tinyllama-fm.tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
EOS_ID = 2


def load_tokenizer(path: Path = TOKENIZER_FILE):
    """The ``tokenizers.Tokenizer`` shipped with tinyllama-fm."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise SlimError(f"tokenizer file {path} is missing; reinstall slimtorch from a full checkout")
    return Tokenizer.from_file(str(path))


def corpus_tokens(split: str, tokenizer=None) -> torch.Tensor:
    """The split's documents tokenized and concatenated, each followed by the end-of-sequence token:
    int64 ``(N,)``. ``tokenizer``: the shipped one (None), a ``tokenizers.Tokenizer``, or a transformers
    tokenizer.

    With the shipped tokenizer the result is cached per split (tokenizing the train split takes
    seconds, and evaluation and calibration both need it): treat it as read-only.
    """
    if tokenizer is None:
        return _shipped_tokens(split)
    docs = [t for _, t in text_corpus(split).documents]
    identity = _tokenizer_identity(tokenizer)
    if identity is None:  # a tokenizer we cannot describe exactly is not cached
        return encode_documents(docs, tokenizer)
    return cached_tensor("tokens", content_key("corpus-tokens", identity, docs), lambda: encode_documents(docs, tokenizer))


def _tokenizer_identity(tok) -> str | None:
    """A complete description of what ``encode_documents`` does with ``tok``: the fast tokenizer's own
    serialisation and the end-of-sequence id it appends; None for tokenizers without one."""
    backend = getattr(tok, "backend_tokenizer", tok)
    if not hasattr(backend, "to_str"):
        return None
    eos = tok.eos_token_id if hasattr(tok, "eos_token_id") else EOS_ID
    return f"{type(tok).__name__}|eos={eos}|{backend.to_str()}"


@cache
def _shipped_tokens(split: str) -> torch.Tensor:
    return corpus_tokens(split, load_tokenizer())


def encode_documents(docs: list[str], tok) -> torch.Tensor:
    """Token ids of ``docs``, concatenated, each followed by the end-of-sequence token."""
    if hasattr(tok, "encode_batch"):  # tokenizers.Tokenizer
        seqs, eos = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)], EOS_ID
    else:  # transformers tokenizer
        seqs, eos = tok(docs, add_special_tokens=False)["input_ids"], tok.eos_token_id
    ids: list[int] = []
    for seq in seqs:
        ids.extend(seq)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


# windows for evaluation and calibration: the model's context, at most this many tokens
MAX_WINDOW = 512


def lm_dims(model) -> tuple[int, int]:
    """(window length, vocabulary size) of our TinyLlama or a transformers causal LM: the window is
    the model's context length, capped at MAX_WINDOW."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "max_seq_len"):
        return min(cfg.max_seq_len, MAX_WINDOW), cfg.vocab_size
    return min(model.config.max_position_embeddings, MAX_WINDOW), model.config.vocab_size


def logits_of(out) -> torch.Tensor:
    """Logits from our models (a tensor) or a transformers output object."""
    return out if isinstance(out, torch.Tensor) else out.logits


def hf_tokenizer(path: Path = TOKENIZER_FILE):
    """The tokenizer as ``transformers.PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
