"""Tensors on disk: safetensors with JSON metadata, atomic writes, sha256 checks, no pickle.

Every file :func:`save_tensors` writes carries, beside its JSON metadata, the sha256 of that metadata and of
every tensor's name, dtype, shape and bytes (``DIGEST_KEY``); :func:`load_tensors` recomputes it, so a
flipped byte or an edited field is an error, not a wrong model. The structure is checked first
(``safetensors_header.read_header``), so a damaged file never reaches the safetensors library.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimtorch.errors import SlimError, shown
from slimtorch.io.outdir import umask_mode
from slimtorch.io.safetensors_header import read_header

META_KEY = "slimtorch"
DIGEST_KEY = "slimtorch_sha256"


def tensors_digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """Hex sha256 of ``meta_json`` and of each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


FLOAT_VALUES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # fp8 tensors hold codes


def nonfinite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first float tensor (fp8 aside: codes, not values) holding NaN or Inf, or None."""
    for name, t in tensors.items():
        if t.dtype in FLOAT_VALUES and not bool(torch.isfinite(t).all()):
            return name
    return None


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
        umask_mode(tmp, 0o666)
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
        meta_json = json.dumps(metadata or {}, sort_keys=True, allow_nan=False)
        save_file(flat, tmp, metadata={META_KEY: meta_json, DIGEST_KEY: tensors_digest(flat, meta_json)})
        _sort_header(Path(tmp))
        umask_mode(tmp, 0o666)  # after: save_file writes a file of its own in place of tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sort_header(path: Path) -> None:
    """Rewrite the file's JSON header with sorted keys, in place and at the same length (padded with spaces,
    as the format allows). The safetensors library writes the metadata map in a random order per process,
    so the same tensors and metadata gave one of two files; now they give one, byte for byte (a resumed
    quantization's file equals an uninterrupted run's)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        canon = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canon) <= n:
            f.seek(8)
            f.write(canon + b" " * (n - len(canon)))


def read_metadata(path: Path) -> dict:
    """The metadata :func:`save_tensors` wrote, read from the file's header alone (no tensors loaded, the
    digest not checked: for choosing how to load a file, not for trusting it); {} where there is none or it
    is not a JSON object."""
    try:
        meta = json.loads(read_header(Path(path))[1].get(META_KEY, "{}"))
    except (json.JSONDecodeError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_tensors(path: Path, sha256: str | None = None,
                 require_digest: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors and metadata saved by :func:`save_tensors`, checking ``sha256`` (of the whole file) first
    if given, then the file's structure, then its stored digest (required when ``require_digest``)."""
    path = Path(path)
    if sha256 is not None:
        verify_sha256(path, sha256)
    elif not path.is_file():
        raise SlimError(f"weights file {path} does not exist")
    _, raw_meta = read_header(path)
    meta_json = raw_meta.get(META_KEY, "{}")
    try:
        meta = json.loads(meta_json)
        tensors = load_file(str(path))
    except (SafetensorError, json.JSONDecodeError, RecursionError, OSError, RuntimeError) as exc:
        raise SlimError(f"cannot read {path} as a slimtorch safetensors file: {shown(exc)}") from None
    if not isinstance(meta, dict):
        raise SlimError(f"{path}: its slimtorch metadata is not a JSON object")
    digest = raw_meta.get(DIGEST_KEY)
    if digest is None and require_digest:
        raise SlimError(f"{path} has no checksum (written by an older slimtorch, or edited); write it again")
    if digest is not None and digest != tensors_digest(tensors, meta_json):
        raise SlimError(f"{path} fails its checksum: its tensors or metadata were changed after it was written")
    return tensors, meta


def check_loaded(model, missing: list[str], unexpected: list[str], path: Path, base) -> None:
    """After ``load_state_dict(strict=False)`` of a saved compressed model: SlimError if the file's tensors
    did not match the base model's, or if the result holds NaN or Inf."""
    if missing or unexpected:
        raise SlimError(f"{path} does not match its base model {shown(base)}: missing {shown(missing[:2])}, "
                        f"unexpected {shown(unexpected[:2])}")
    bad = nonfinite_tensor(model.state_dict())
    if bad is not None:
        raise SlimError(f"{path}: tensor {shown(bad)} holds NaN or Inf")


def store_shared_once(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Drop from ``tensors`` (in place) every tensor that is a view of the same storage, offset, shape and dtype
    as one kept before it (tied embeddings); returns {dropped key: kept key}, for :func:`restore_shared`.
    safetensors refuses to write shared tensors."""
    aliases, seen = {}, {}
    for key in list(tensors):
        t = tensors[key]
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            del tensors[key]
        else:
            seen[ident] = key
    return aliases


def restore_shared(tensors: dict[str, torch.Tensor], aliases: dict) -> None:
    """Put back (in place) the keys :func:`store_shared_once` dropped, each naming its kept tensor."""
    for key, target in aliases.items():
        tensors[key] = tensors[target]
