"""Tampering with slimtorch's quantized files, shared by the tests and the fuzz suite: edits that keep the
checksum stale (caught by it) and edits that recompute it (caught by the validation behind it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimtorch.io.checkpoint import DIGEST_KEY, META_KEY, tensors_digest


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    return load_file(str(path)), meta


def rewrite(path: Path, tensors: dict[str, torch.Tensor], meta, fix_digest: bool = True) -> None:
    """Write ``tensors`` and ``meta`` (any JSON value) back; with ``fix_digest`` the checksum matches them."""
    meta_json = json.dumps(meta, sort_keys=True)
    extra = {DIGEST_KEY: tensors_digest(tensors, meta_json)} if fix_digest else {DIGEST_KEY: "0" * 64}
    save_file(tensors, str(path), metadata={META_KEY: meta_json, **extra})


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x40
    path.write_bytes(bytes(data))
