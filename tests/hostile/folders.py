"""Small transformers folders, good and damaged, shared by the hostile-input tests and the fuzz suite."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import torch

MARKER_ENV = "SLIMTORCH_TEST_MARKER"


class Payload:
    """Unpickling this writes the file named by $SLIMTORCH_TEST_MARKER: proof that a pickle ran."""

    def __reduce__(self):
        return (exec, (f"open({os.environ.get(MARKER_ENV, '/tmp/slimtorch-pwned')!r}, 'w').write('pwned')",))


def tiny_llama_folder(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A random-weight Llama causal LM (vocab 4096, our corpus tokenizer) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtorch.zoo.lm_data import hf_tokenizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    hf_tokenizer().save_pretrained(path)
    return path


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_pickle_payload(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Payload()}, f)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors_parts(path: Path, header: dict, data: bytes, pad: bool = True) -> None:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def drop_tensors(folder: Path, keep) -> None:
    """Rewrite model.safetensors with only the tensors whose name ``keep(name)`` accepts."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    save_file({k: v for k, v in tensors.items() if keep(k)}, str(f), metadata={"format": "pt"})


def retype_tensor(folder: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    name = next(iter(sorted(tensors)))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(f), metadata={"format": "pt"})
