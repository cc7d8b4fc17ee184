"""Check a safetensors file's structure before any library reads it, so that a damaged or hostile file is
one clear error instead of a library exception, a huge allocation or a read past the end.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional ``__metadata__`` of string
pairs), then the data buffer. :func:`read_header` checks every field against the file's real size: the
header fits in the file and is a JSON object, each dtype is one torch can hold, each shape's bytes equal
its offsets' span, and the spans tile the buffer exactly (no gaps, no overlaps, nothing past the end).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from slimtorch.errors import SlimError
from slimtorch.io.files import regular_file

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # a key of DTYPE_BYTES
    shape: tuple[int, ...]


def _bad(path: Path, what: str) -> SlimError:
    return SlimError(f"{path} is not a valid safetensors file: {what}")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors (name -> dtype and shape) and the string metadata of a safetensors file, after checking
    the whole layout against the file size. SlimError on anything malformed; nothing large is read."""
    path = Path(path)
    size = regular_file("weights file", path, 1 << 50)
    if size < 8:
        raise _bad(path, f"{size} bytes, shorter than the 8-byte header length (truncated or empty)")
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit in the file's {size} bytes")
            raw = f.read(n)
    except OSError as exc:
        raise SlimError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _bad(path, "its header is not UTF-8 JSON (a pickle or another format under this name?)") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    buffer = size - 8 - n
    tensors, spans = {}, []
    for name, info in header.items():
        tensors[name], span = _tensor(path, name, info, buffer)
        spans.append(span)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise _bad(path, "tensor data overlaps or leaves gaps")
        end = stop
    if end != buffer:
        raise _bad(path, f"tensor data covers {end} of the {buffer} data bytes")
    return tensors, meta


def _tensor(path: Path, name: str, info, buffer: int) -> tuple[TensorInfo, tuple[int, int]]:
    where = f"tensor {name[:80]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"{where} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _bad(path, f"{where} has unsupported dtype {str(dtype)[:20]!r}")
    ints = (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
            and all(type(v) is int and v >= 0 for v in (*shape, *offsets)))
    if not ints or len(shape) > 8:
        raise _bad(path, f"{where} needs a shape of at most 8 sizes and two offsets, non-negative integers")
    begin, stop = offsets
    if not begin <= stop <= buffer:
        raise _bad(path, f"{where} has offsets {begin}..{stop} outside the {buffer} data bytes")
    if math.prod(shape) * DTYPE_BYTES[dtype] != stop - begin:
        raise _bad(path, f"{where}: shape {shape} of {dtype} does not fill its {stop - begin} bytes")
    return TensorInfo(dtype, tuple(shape)), (begin, stop)
