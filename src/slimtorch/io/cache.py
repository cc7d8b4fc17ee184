"""A disk cache of computed tensors, keyed by the content they were computed from.

What is slow to compute and the same on every run goes here: a transformers folder's tokenisation of
our corpus (seconds to minutes, depending on the tokenizer) is done once per (tokenizer, text) and read
back on later runs. Entries are our checksummed safetensors files (``io.checkpoint``), written
atomically; a damaged or foreign entry is recomputed and replaced, and a folder that cannot be
written only means nothing is kept. The folder is ``$SLIMTORCH_CACHE_DIR``, else
``$XDG_CACHE_HOME/slimtorch``, else ``~/.cache/slimtorch``; ``SLIMTORCH_CACHE_DIR=off`` turns it off.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from slimtorch.errors import SlimError
from slimtorch.io.checkpoint import load_tensors, save_tensors

VERSION = "1"  # part of every key: a change of what is stored makes old entries unreachable


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is off."""
    env = os.environ.get("SLIMTORCH_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimtorch"


def content_key(*parts: str | bytes | Iterable[str]) -> str:
    """sha256 over ``parts`` (strings, bytes, or iterables of strings), each length-prefixed so that
    different splits of the same bytes give different keys."""
    h = hashlib.sha256(VERSION.encode())
    for part in parts:
        items = [part] if isinstance(part, str | bytes) else list(part)
        h.update(len(items).to_bytes(8, "little"))
        for item in items:
            data = item if isinstance(item, bytes) else item.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def cached_tensor(kind: str, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, or what it returned on an earlier run for the same ``kind`` and ``key``."""
    folder = cache_dir()
    if folder is None:
        return compute()
    path = folder / kind / f"{key}.safetensors"
    if path.is_file():
        try:
            tensors, meta = load_tensors(path, require_digest=True)
            if meta.get("key") == key and set(tensors) == {"value"}:
                return tensors["value"]
        except (SlimError, OSError, ValueError):
            pass  # damaged or foreign: computed again and replaced below
    value = compute()
    try:
        save_tensors(path, {"value": value}, {"key": key, "kind": kind})
    except (OSError, SlimError):
        pass  # a read-only or full disk: nothing is kept, nothing is lost
    return value
