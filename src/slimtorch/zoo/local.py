"""A local transformers model folder (the output of ``save_pretrained``) as a model like the zoo's.

Supported: causal language models (a ``config.json`` whose model type transformers'
``AutoModelForCausalLM`` maps) with safetensors weights and a tokenizer in the folder. They are measured
like ``tinyllama-fm``: perplexity on the held-out split of our corpus, tokenized with the folder's own
tokenizer.

A folder is data, never code, and is checked before any weight is read:

* no remote code: a ``config.json`` or ``tokenizer_config.json`` with ``auto_map`` is refused, and
  transformers is always called with ``trust_remote_code=False`` (so it never prompts either);
* no pickle: weights are read by us, from the ``*.safetensors`` files (those a
  ``model.safetensors.index.json`` names, which must all be safetensors files of the folder), each checked
  by ``io.safetensors_header`` first; transformers only builds the architecture from the config;
* strict match: the model the config describes is first built on the meta device (no memory), and the
  files must hold exactly its tensors (tied ones once), with the same shapes, as floats. A missing layer,
  an extra tensor, a changed size or an integer tensor is an error, never a randomly initialised weight.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch
from torch import nn

from slimtorch.errors import SlimError, shown
from slimtorch.io.checkpoint import nonfinite_tensor
from slimtorch.io.files import regular_file
from slimtorch.io.safetensors_header import FLOAT_DTYPES, TensorInfo, read_header

MAX_JSON_BYTES = 16 * 2**20
INDEX_FILE = "model.safetensors.index.json"


def is_local_model(name: str) -> bool:
    return bool(name) and Path(name).is_dir()


def _json_file(path: Path) -> dict:
    """A small UTF-8 JSON object file, or SlimError."""
    regular_file("JSON file", path, MAX_JSON_BYTES)
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise SlimError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SlimError(f"{path} is not UTF-8 JSON: {shown(exc)}") from None
    if not isinstance(raw, dict):
        raise SlimError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return raw


def _config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise SlimError(f"{path} is a folder without config.json; give a zoo name or a save_pretrained folder")
    raw = _json_file(cfg)
    archs = raw.get("architectures", [])
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise SlimError(f"{cfg}: architectures must be a list of class names, got {shown(archs)}")
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        if f.exists() and "auto_map" in (raw if name == "config.json" else _json_file(f)):
            raise SlimError(f"{f} asks for the folder's own Python code (auto_map); slimtorch never runs code "
                            f"from a model folder: use a model whose architecture transformers ships")
    return raw


def _hf_config(path: Path):
    """transformers' config object for the folder (never remote code)."""
    from transformers import AutoConfig

    _config(path)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's config is the folder's problem
        raise SlimError(f"{path}/config.json is not a valid transformers config: {shown(exc, 160)}") from None


def _is_encoder(config) -> bool:
    """An encoder folder: its ``architectures`` name the base model AutoModel builds for its type (say
    ``BertModel``), not a causal LM; or AutoModelForCausalLM does not map its type at all."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING,
                                                        MODEL_MAPPING_NAMES)

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    causal = {causal} if isinstance(causal, str) else set(causal or ())
    base = MODEL_MAPPING_NAMES.get(config.model_type)
    base = {base} if isinstance(base, str) else set(base or ())
    archs = set(config.architectures or ())
    if archs & causal or (not causal and not base):
        return False
    return bool(archs & base) or (not causal and type(config) in MODEL_MAPPING)


def _model_config(path: Path):
    """The folder's config and whether it is an encoder; SlimError unless AutoModelForCausalLM (or, for an
    encoder, AutoModel) maps its type. Decided by transformers' auto-mappings, never by class names."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = _hf_config(path)
    if _is_encoder(config):
        return config, True
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise SlimError(f"{path}: model type {shown(config.model_type)} is neither a causal language model nor an "
                        f"encoder in transformers; local folders must hold a model AutoModelForCausalLM or "
                        f"AutoModel loads")
    return config, False


def local_task(path: Path) -> str:
    """``causal-lm`` (measured like tinyllama-fm) or ``sentence-embedding`` (an encoder, measured like minilm)."""
    _, encoder = _model_config(path)
    weight_files(path)
    return "sentence-embedding" if encoder else "causal-lm"


def weight_files(path: Path) -> list[Path]:
    """The folder's safetensors weight files: those its index names, or every ``*.safetensors``."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = _json_file(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SlimError(f"{index} has no weight_map")
        if not all(isinstance(n, str) for n in weight_map.values()):
            raise SlimError(f"{index}: weight_map must map tensor names to file names")
        names = set(weight_map.values())
        bad = [n for n in names if not n.endswith(".safetensors") or "/" in n or "\\" in n or n.startswith(".")]
        if bad:
            raise SlimError(f"{index} maps weights to {shown(bad[0])}: only safetensors files in the folder are "
                            f"read (pickle checkpoints never are)")
        files = [path / n for n in sorted(names)]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SlimError(f"{path} has no .safetensors weights (pickle checkpoints are not loaded)")
    for f in files:
        if not f.is_file():
            raise SlimError(f"{f} is missing (named by {INDEX_FILE}) or not a regular file")
    return files


def _file_tensors(path: Path) -> dict[str, tuple[Path, TensorInfo]]:
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for f in weight_files(path):
        tensors, _ = read_header(f)
        for name, info in tensors.items():
            if name in out:
                raise SlimError(f"tensor {shown(name)} is in both {out[name][0].name} and {f.name}")
            if info.dtype not in FLOAT_DTYPES:
                raise SlimError(f"{f}: tensor {shown(name)} is {info.dtype}; model weights must be floats "
                                f"({', '.join(FLOAT_DTYPES)})")
            out[name] = (f, info)
    return out


def _build(config, device: str | None, encoder: bool = False) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if encoder else AutoModelForCausalLM
    try:
        with torch.device(device) if device else nullcontext():
            # float32 after the build: from_config's dtype keyword is torch_dtype before transformers 4.56
            return auto.from_config(config, trust_remote_code=False).float()
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build is the folder's problem
        raise SlimError(f"cannot build the model of {config.name_or_path or 'the folder'} from its config.json: "
                        f"{shown(exc, 160)}") from None


COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_experts", "num_local_experts",
              "n_routed_experts")


def _check_counts(path: Path, config, tensors: int) -> None:
    """Layer and expert counts no larger than the files' tensor count (each needs at least one): the meta
    build makes one module per layer, so num_hidden_layers = 2^63 would never finish (a fuzz case). Only the
    keys that count modules (COUNT_KEYS): others merely mention layers (Qwen2's max_window_layers)."""
    for key, value in config.to_dict().items():
        if key in COUNT_KEYS and type(value) is int and value > tensors:
            raise SlimError(f"{path}: tensors are missing: config.json says {key} = {shown(value)}, but the weight "
                            f"files hold only {tensors} tensors")


def renamed_keys(model: nn.Module, keys) -> dict[str, str]:
    """File key -> model key for the file keys the model does not have but one of transformers' own
    checkpoint renamings for this model maps onto a key it has (transformers 5 saves GPT-NeoX's head as
    ``embed_out`` and loads it as ``lm_head``). Only plain renamings: no tensor is split, fused or changed."""
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers before 5: keys are loaded as saved
        return {}
    expected = set(model.state_dict())
    rules = [(src, tgt) for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)
             for src, tgt in zip(t.source_patterns, t.target_patterns)]
    out = {}
    for key in keys:
        if key in expected:
            continue
        for src, tgt in rules:
            try:
                new = re.sub(src, tgt, key)
            except (re.error, IndexError):
                continue
            if new != key and new in expected:
                out[key] = new
                break
    return out


def _check_match(path: Path, model: nn.Module, files: dict[str, tuple[Path, TensorInfo]]) -> None:
    """The files hold exactly the model's state (tied tensors at least once), shape for shape."""
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for key, t in expected.items():
        groups.setdefault(id(t), []).append(key)
    unexpected = [k for k in files if k not in expected]
    missing = [keys[0] for keys in groups.values() if not any(k in files for k in keys)]
    if missing or unexpected:
        first = ([f"missing {shown(missing[0])}"] if missing else []) + \
            ([f"unexpected {shown(unexpected[0])}"] if unexpected else [])
        raise SlimError(f"{path}: the weights do not match config.json: {len(missing)} missing, {len(unexpected)} "
                        f"unexpected tensors ({', '.join(first)})")
    for key, (f, info) in files.items():
        want = tuple(expected[key].shape)
        if info.shape != want:
            raise SlimError(f"{f.name}: tensor {shown(key)} has shape {list(info.shape)}, config.json says "
                            f"{list(want)}")


def linearize_conv1d(model: nn.Module) -> int:
    """Replace each transformers ``Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``) by the
    ``nn.Linear`` that computes the same (weight transposed), so every quantization method sees a linear
    layer. The new layer is marked ``from_conv1d``. Returns the number replaced."""
    from slimtorch.sequential import set_module

    n = 0
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.ndim == 2:
            lin = nn.Linear(m.weight.shape[0], m.weight.shape[1], bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.weight.t())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            lin.from_conv1d = True
            set_module(model, name, lin)
            n += 1
    return n


def load_local(path: Path) -> nn.Module:
    """The folder's model in float32, eval mode, without a KV cache: a causal LM, or an encoder wrapped as
    a sentence encoder (mean pooling over the folder's tokenizer, as minilm)."""
    from safetensors.torch import load_file

    config, encoder = _model_config(path)
    files = _file_tensors(path)  # the weight files, each header checked
    _check_counts(path, config, len(files))
    meta_model = _build(config, "meta", encoder)
    renames = renamed_keys(meta_model, list(files))
    files = {renames.get(k, k): v for k, v in files.items()}
    _check_match(path, meta_model, files)
    model = _build(config, None, encoder)
    state: dict[str, torch.Tensor] = {}
    for f in sorted({f for f, _ in files.values()}):
        try:
            state.update({renames.get(k, k): v.float() for k, v in load_file(str(f)).items()})
        except Exception as exc:  # noqa: BLE001 - the header was checked; anything left is a damaged file
            raise SlimError(f"cannot read {f}: {shown(exc)}") from None
    bad = nonfinite_tensor(state)
    if bad is not None:
        raise SlimError(f"{path}: weight {shown(bad)} holds NaN or Inf")
    model.load_state_dict(state, strict=False)  # tied copies are absent from the files by design
    model.tie_weights()
    model.config.use_cache = False
    model.eval()
    with torch.no_grad():  # a config that builds but computes nonsense (say rope_theta <= 0) fails here
        try:
            out = model(torch.arange(8)[None] % config.vocab_size)
            logits = out.last_hidden_state if encoder else out.logits
        except Exception as exc:  # noqa: BLE001 - a model its own config cannot run is the folder's problem
            raise SlimError(f"the model in {path} fails on 8 tokens: {shown(exc, 160)}") from None
    if not bool(torch.isfinite(logits).all()):
        raise SlimError(f"the model in {path} computes NaN or Inf on 8 tokens; check config.json")
    linearize_conv1d(model)
    if encoder:
        from slimtorch.zoo.minilm import SentenceEncoder

        return SentenceEncoder(model, local_tokenizer(path, need_eos=False)).eval()
    return model


@cache
def local_tokenizer(path: Path, need_eos: bool = True):
    """The folder's tokenizer; a causal LM's must have an end-of-sequence token (documents are joined with
    it), an encoder's need not."""
    from transformers import AutoTokenizer

    _config(path)  # refuses auto_map in either config before transformers reads them
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure to read a user's tokenizer is the folder's problem
        raise SlimError(f"{path} has no usable tokenizer ({shown(exc, 120)}); save one beside the "
                        f"model with tokenizer.save_pretrained") from None
    if need_eos and tok.eos_token_id is None:
        raise SlimError(f"the tokenizer in {path} has no end-of-sequence token, which joins our corpus's documents "
                        f"for a causal LM; set one (tokenizer.eos_token = ...) and save the tokenizer again")
    vocab = _hf_config(path).vocab_size
    if len(tok) > vocab:  # ids beyond the embedding: an IndexError deep in the model otherwise
        raise SlimError(f"the tokenizer in {path} has {len(tok)} tokens, ids beyond the model's vocab_size {vocab}: "
                        f"the tokenizer does not belong to this model")
    return tok


def check_token_ids(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` if they all index the model's embedding (``vocab_size`` of the config), else SlimError."""
    vocab = _hf_config(path).vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise SlimError(f"the tokenizer in {path} produces token id {int(ids.max())}, beyond the model's "
                        f"vocab_size {vocab}: the tokenizer does not belong to this model")
    return ids
