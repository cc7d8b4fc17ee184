"""A local transformers model folder (the output of ``save_pretrained``) as a model like the zoo's.

Supported: causal language models (``config.json`` architectures ``*ForCausalLM``) with safetensors
weights and a tokenizer in the folder. They are measured like ``tinyllama-fm``: perplexity on the
held-out split of our corpus, tokenized with the folder's own tokenizer. Weights are read with
``use_safetensors=True``: a folder with only pickle weights (``pytorch_model.bin``) is refused.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from torch import nn

from slimtorch.errors import SlimError


def is_local_model(name: str) -> bool:
    return Path(name).is_dir()


def _config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise SlimError(f"{path} is a folder without config.json; give a zoo name or a save_pretrained folder")
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SlimError(f"cannot read {cfg}: {exc}") from None


def local_task(path: Path) -> str:
    archs = _config(path).get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        if not any(path.glob("*.safetensors")):
            raise SlimError(f"{path} has no .safetensors weights (pickle checkpoints are not loaded)")
        return "causal-lm"
    raise SlimError(f"{path}: architecture {archs or 'unknown'} is not supported; local folders must hold a "
                    f"*ForCausalLM model")


def load_local(path: Path) -> nn.Module:
    """The folder's model in float32, eval mode, without a KV cache."""
    from transformers import AutoModelForCausalLM

    local_task(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SlimError(f"cannot load {path} with transformers: {str(exc).splitlines()[0]}") from None
    model.config.use_cache = False
    return model.eval()


@cache
def local_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SlimError(f"{path} has no usable tokenizer ({str(exc).splitlines()[0]}); save one beside the "
                        f"model with tokenizer.save_pretrained") from None
    if tok.eos_token_id is None:
        raise SlimError(f"the tokenizer in {path} has no end-of-sequence token")
    return tok
