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
    """The split's documents tokenized and concatenated, each followed by ``</s>``: int64 ``(N,)``.

    With the shipped tokenizer (``tokenizer=None``) the result is cached per split (tokenizing the
    train split takes seconds, and evaluation and calibration both need it): treat it as read-only.
    """
    if tokenizer is None:
        return _shipped_tokens(split)
    return _tokenize(split, tokenizer)


@cache
def _shipped_tokens(split: str) -> torch.Tensor:
    return _tokenize(split, load_tokenizer())


def _tokenize(split: str, tok) -> torch.Tensor:
    docs = [t for _, t in text_corpus(split).documents]
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.int64)


def hf_tokenizer(path: Path = TOKENIZER_FILE):
    """The tokenizer as ``transformers.PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
