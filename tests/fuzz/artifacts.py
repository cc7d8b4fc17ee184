"""Damaged model folders and tampered quantized files, generated from one good example of each by seeded
random mutations (several per case). Each must load to a sound model or be one SlimError; a pickle
payload or a folder's Python must never run (the marker file never appears)."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import torch

from slimtorch.errors import SlimError
from tests.hostile import folders as F
from tests.hostile import tampered as T

HOSTILE_JSON = [None, True, -1, 0, 10**12, 2**63, -(10**9), 1.5, float("nan"), "", "x" * 100, [], [1, 2], {},
                {"a": {"b": {}}}, "LlamaForCausalLM", ["LlamaForCausalLM"], "\udcff"]


def _flip(path: Path, r: random.Random, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(n):
        if data:
            data[r.randrange(len(data))] ^= 1 << r.randrange(8)
    path.write_bytes(bytes(data))


def _header(path: Path, r: random.Random) -> None:
    header, data = F.safetensors_parts(path)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return
    info = header[r.choice(names)]
    key = r.choice(["dtype", "shape", "data_offsets", "extra"])
    info[key] = r.choice([*HOSTILE_JSON, "F64", "BOOL", "I8", "Q9", [10**12], [0, 10**15], [-1, 4], [3, 3, 3]])
    F.write_safetensors_parts(path, header, data)


FOLDER_DAMAGE = {
    "flip-weights": lambda d, r: _flip(d / "model.safetensors", r, r.randint(1, 8)),
    "flip-header": lambda d, r: _flip_header(d / "model.safetensors", r),
    "truncate": lambda d, r: _truncate(d / "model.safetensors", r),
    "header-field": lambda d, r: _header(d / "model.safetensors", r),
    "config-field": lambda d, r: _config_field(d, r),
    "config-bytes": lambda d, r: _flip(d / "config.json", r, r.randint(1, 4)),
    "config-not-object": lambda d, r: (d / "config.json").write_text(r.choice(["[]", "1", "null", '"x"', ""])),
    "drop-tensors": lambda d, r: F.drop_tensors(d, lambda k: r.random() < 0.8),
    "retype": lambda d, r: F.retype_tensor(d, r.choice([torch.bool, torch.int8, torch.int32, torch.float16,
                                                         torch.float64, torch.uint8])),
    "pickle-index": lambda d, r: _pickle_index(d),
    "pickle-only": lambda d, r: ((d / "model.safetensors").unlink(), F.write_pickle_payload(d / "pytorch_model.bin")),
    "pickle-as-safetensors": lambda d, r: F.write_pickle_payload(d / "model.safetensors"),
    "auto-map": lambda d, r: _auto_map(d, r),
    "index-junk": lambda d, r: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": r.choice(HOSTILE_JSON)})),
    "index-escape": lambda d, r: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": r.choice(["../x.safetensors", "/etc/passwd",
                                                                  ".hidden.safetensors", "m.bin"])}})),
    "tokenizer-damage": lambda d, r: _flip(d / "tokenizer.json", r, r.randint(1, 20)),
    "tokenizer-gone": lambda d, r: (d / "tokenizer.json").unlink(),
    "weights-fifo": lambda d, r: ((d / "model.safetensors").unlink(), os.mkfifo(d / "model.safetensors")),
    "weights-dir": lambda d, r: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir()),
}


def _flip_header(path: Path, r: random.Random) -> None:
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    i = r.randrange(min(len(data), 8 + n))
    data[i] ^= 1 << r.randrange(8)
    path.write_bytes(bytes(data))


def _truncate(path: Path, r: random.Random) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: r.randrange(len(data))])


def _config_field(d: Path, r: random.Random) -> None:
    key = r.choice(["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size",
                    "intermediate_size", "max_position_embeddings", "rms_norm_eps", "model_type", "architectures",
                    "tie_word_embeddings", "hidden_act", "head_dim", "rope_theta", "torch_dtype"])
    F.edit_config(d, **{key: r.choice(HOSTILE_JSON + [3, 5, 64, 4097, "gelu", "bogus_act", "float64"])})


def _pickle_index(d: Path) -> None:
    F.write_pickle_payload(d / "pytorch_model.bin")
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "pytorch_model.bin" for k in keys}}))


def _auto_map(d: Path, r: random.Random) -> None:
    marker = os.environ[F.MARKER_ENV]
    (d / "evil.py").write_text(f"open({marker!r}, 'w').write('pwned')\n")
    where = r.choice(["config.json", "tokenizer_config.json"])
    cfg = json.loads((d / where).read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M", "AutoTokenizer": ["evil.T", None]}
    (d / where).write_text(json.dumps(cfg))


def damaged_folder(good: Path, dst: Path, r: random.Random) -> list[str]:
    """Copy ``good`` to ``dst`` and apply 1-3 random damages; returns their names."""
    F.copy_folder(good, dst)
    names = []
    chosen = [r.choice(list(FOLDER_DAMAGE)) for _ in range(r.randint(1, 3))]
    chosen.sort(key=lambda n: n.startswith("weights-"))  # a FIFO last: reading it would block the generator
    for name in chosen:
        try:
            FOLDER_DAMAGE[name](dst, r)
        except (FileNotFoundError, FileExistsError, json.JSONDecodeError, UnicodeDecodeError, ValueError,
                struct.error, NotADirectoryError, IsADirectoryError, Exception):
            continue  # an earlier damage removed what this one edits: the folder is damaged enough
        names.append(name)
    return names


def run_folder(folder: Path) -> str:
    """'ok' (the model loads, its tokenizer encodes within the vocabulary) or 'refused' (SlimError)."""
    from slimtorch.zoo import registry
    from slimtorch.zoo.local import load_local

    registry._local_entry.cache_clear()
    from slimtorch.zoo.local import local_tokenizer

    local_tokenizer.cache_clear()
    try:
        model = load_local(folder)
        registry.get_entry(str(folder)).encode(["def f(x):\n    return x + 1\n"])
    except SlimError:
        return "refused"
    with torch.no_grad():
        assert bool(torch.isfinite(model(torch.arange(16)[None]).logits).all())
    return "ok"


# ---- quantized files ----

def _meta_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _meta_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _meta_paths(v, prefix + (i,))


def _set_path(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def tamper(src: Path, dst: Path, r: random.Random) -> tuple[str, bool]:
    """Copy ``src`` to ``dst`` and tamper with it; returns (what, whether the checksum was recomputed)."""
    shutil.copy(src, dst)
    kind = r.choice(["flip", "flip", "truncate", "append", "header", "meta", "meta", "tensor", "tensor", "drop",
                     "stale"])
    if kind == "flip":
        _flip(dst, r, r.randint(1, 4))
        return kind, False
    if kind == "truncate":
        _truncate(dst, r)
        return kind, False
    if kind == "append":
        dst.write_bytes(dst.read_bytes() + os.urandom(r.randint(1, 64)))
        return kind, False
    if kind == "header":
        _header(dst, r)
        return kind, False
    tensors, meta = T.read(dst)
    if kind == "meta":
        path = r.choice(list(_meta_paths(meta)))
        _set_path(meta, path, r.choice(HOSTILE_JSON + ["int5", "token", "group:7", "conv2d", "linear", [3, 3]]))
    elif kind in ("tensor", "stale"):
        name = r.choice(sorted(tensors))
        t = tensors[name]
        how = r.choice(["nan", "zero", "neg", "huge", "shape", "dtype"])
        if how == "shape":
            t = t.reshape(-1)[: max(t.numel() - 1, 0)].clone()
        elif how == "dtype":
            t = t.to(r.choice([torch.float64, torch.int32, torch.bool, torch.float16]))
        elif t.is_floating_point() and t.numel():
            t = t.clone()
            t.view(-1)[r.randrange(t.numel())] = {"nan": float("nan"), "zero": 0.0, "neg": -1.0, "huge": 1e30}[how]
        tensors[name] = t.contiguous()
    else:  # drop
        tensors.pop(r.choice(sorted(tensors)))
    T.rewrite(dst, tensors, meta, fix_digest=kind != "stale")
    return kind, kind != "stale"


def run_quantized(path: Path, reference: torch.nn.Module, x: torch.Tensor, digest_fixed: bool) -> str:
    """'refused' (SlimError) or 'ok': the loaded model runs to finite outputs, identical to the untouched
    model's unless the tamperer recomputed the checksum (then any sound model is acceptable)."""
    from slimtorch.export.quantized import load_quantized

    try:
        model, _ = load_quantized(path)
    except SlimError:
        return "refused"
    with torch.no_grad():
        try:
            y = model(x)
        except RuntimeError as exc:
            raise AssertionError(f"a loaded model fails to run: {exc}") from None
        if not digest_fixed:
            assert torch.equal(y, reference(x)), "a tampered file loaded as a different model"
    assert bool(torch.isfinite(y).all()) or digest_fixed
    return "ok"
