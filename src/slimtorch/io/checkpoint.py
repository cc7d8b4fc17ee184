"""Tensors on disk: safetensors with JSON metadata, atomic writes, sha256 checks, no pickle."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimtorch.errors import SlimError

META_KEY = "slimtorch"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise SlimError unless ``path`` exists and hashes to ``expected``."""
    if not Path(path).is_file():
        raise SlimError(f"weights file {path} is missing; reinstall slimtorch (or the package that ships it)")
    got = sha256_file(path)
    if got != expected:
        raise SlimError(f"weights file {path} fails its sha256 check (got {got[:16]}..., expected "
                        f"{expected[:16]}...): it is corrupt or was modified; restore it from a clean checkout")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomically save ``tensors`` as safetensors with ``metadata`` as JSON under one key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(flat, tmp, metadata={META_KEY: json.dumps(metadata or {}, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors and metadata saved by :func:`save_tensors`, checking ``sha256`` first if given."""
    path = Path(path)
    if sha256 is not None:
        verify_sha256(path, sha256)
    elif not path.is_file():
        raise SlimError(f"weights file {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except (SafetensorError, json.JSONDecodeError, OSError) as exc:
        raise SlimError(f"cannot read {path} as a slimtorch safetensors file: {exc}") from None
    return tensors, meta
