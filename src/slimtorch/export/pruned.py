"""Save and load pruned (float) models: every tensor of the state dict, the sparse ones as a bitmask and
their nonzero values (:mod:`slimtorch.sparsity.storage`) where that is smaller than dense. No pickle.

File layout (one safetensors file): ``<key>`` for a dense tensor, ``<key>.bitmask`` + ``<key>.values`` for a
compressed one; metadata ``slimtorch``: format ``slimtorch-pruned``, the base model (zoo name or local
folder), ``sparse`` {key: shape}, ``aliases`` {key: key stored} for tensors sharing storage (tied
embeddings, stored once), and the pruning record (method, pattern, per-layer sparsity; for a structured
pruning ``structured`` {widths: {group: units kept}, heads}). Loading builds the base model, narrows it to the
recorded widths (pruning/structured.narrow_to_) and loads the tensors back: outputs are bit-identical to the
model that was saved.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from slimtorch.errors import SlimError, shown
from slimtorch.io.checkpoint import (
    check_loaded,
    load_tensors,
    restore_shared,
    save_tensors,
    store_shared_once,
)
from slimtorch.sparsity.storage import compress, decompress, worth_compressing

FORMAT = "slimtorch-pruned"
FORMAT_VERSION = 1


def _dense_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def state_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state dict as dense tensors, a tensor shared by several keys (tied embeddings)
    counted once: the size a dense file of it has."""
    state = dict(model.state_dict())
    store_shared_once(state)
    return _dense_bytes(state)


def save_pruned(model: nn.Module, path: Path, base: str, extra: dict | None = None) -> dict:
    """Atomically write ``model`` to ``path``; returns {"bytes", "dense_bytes", "compressed_tensors"}."""
    state = dict(model.state_dict())
    aliases = store_shared_once(state)  # tied embeddings: stored once
    tensors, sparse = {}, {}
    for key, t in state.items():
        if t.dim() >= 2 and t.is_floating_point() and worth_compressing(t):
            bits, vals = compress(t)
            tensors[f"{key}.bitmask"], tensors[f"{key}.values"] = bits, vals
            sparse[key] = list(t.shape)
        else:
            tensors[key] = t
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "base": base, "sparse": sparse, "aliases": aliases,
            **(extra or {})}
    save_tensors(path, tensors, meta)
    return {"bytes": Path(path).stat().st_size, "dense_bytes": _dense_bytes(state), "compressed_tensors": len(sparse)}


def load_pruned(path: Path, base_model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_pruned`: (model, metadata). Checksum first; a file that does not
    match its base model, or whose sparse pairs disagree, is one SlimError naming the file."""
    path = Path(path)
    tensors, meta = load_tensors(path, require_digest=True)
    if meta.get("format") != FORMAT:
        raise SlimError(f"{path} is not a slimtorch pruned model (no {FORMAT} metadata)")
    if meta.get("version") != FORMAT_VERSION:
        raise SlimError(f"{path} has format version {shown(meta.get('version'))}; this slimtorch reads {FORMAT_VERSION}")
    sparse = meta.get("sparse")
    if not isinstance(sparse, dict):
        raise SlimError(f"{path}: its sparse tensor list is missing or not a mapping")
    structured = meta.get("structured")
    if (base_model is None or structured is not None) and not isinstance(meta.get("base"), str):
        raise SlimError(f"{path} names no base model")
    if base_model is None:
        from slimtorch.zoo import load_model

        base_model = load_model(meta["base"])
    if structured is not None:  # width-pruned: give the base model the pruned shapes first
        from slimtorch.calib.data import calibration_set
        from slimtorch.pruning.structured import narrow_to_

        if not isinstance(structured, dict) or not isinstance(structured.get("widths"), dict):
            raise SlimError(f"{path}: its structured-pruning record is not a mapping of group widths")
        example = calibration_set(meta["base"], 1, model=base_model)[0]
        narrow_to_(base_model, structured["widths"], bool(structured.get("heads")), example, f"{path}")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or any(not isinstance(v, str) or v not in tensors and v not in sparse
                                            for v in aliases.values()):
        raise SlimError(f"{path}: its aliases do not name stored tensors")
    want = base_model.state_dict()
    for key, shape in sparse.items():
        if key not in want or not isinstance(shape, list) or [*want[key].shape] != shape:
            raise SlimError(f"{path}: sparse tensor {shown(key)} is not a tensor of that shape in the base model")
        bits, vals = tensors.pop(f"{key}.bitmask", None), tensors.pop(f"{key}.values", None)
        if bits is None or vals is None:
            raise SlimError(f"{path}: sparse tensor {shown(key)} lacks its bitmask or values")
        if vals.dtype != want[key].dtype:
            raise SlimError(f"{path}: {shown(key)} values are {vals.dtype}; the base model holds {want[key].dtype}")
        tensors[key] = decompress(bits, vals, tuple(shape), f"{path}: {key}")
    restore_shared(tensors, aliases)
    try:
        missing, unexpected = base_model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise SlimError(f"{path} does not match its base model: {shown(exc)}") from None
    check_loaded(base_model, missing, unexpected, path, meta.get("base"))
    return base_model.eval(), meta
