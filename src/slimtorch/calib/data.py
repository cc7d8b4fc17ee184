"""Seeded calibration sets drawn from each zoo task's training data (never from its evaluation data).

Each set is a list of batches; a batch is the tuple of positional arguments of the model's forward.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimtorch.errors import SlimError, shown
from slimtorch.eval.user_data import (MAX_NPZ_BYTES, MAX_TEXT_BYTES, text_pieces,  # noqa: F401 - re-exported
                                      text_tokens, user_images)
from slimtorch.io.files import regular_file
from slimtorch.sequential import Batch
from slimtorch.zoo import data, get_entry

DEFAULT_SAMPLES = {"fmnist-classification": 512, "causal-lm": 128, "sentence-embedding": 256,
                   "imagenet-classification": 64}
MAX_CROPS = 4096


def _available(n: int, have: int, what: str) -> int:
    if n > have:
        raise SlimError(f"asked for {n:,} calibration samples, but there are only {have:,} {what}; ask for fewer")
    return n


def _fmnist(n: int, gen: torch.Generator) -> list[Batch]:
    train = data.fashion_mnist("train")
    _available(n, len(train.labels), "Fashion-MNIST training images")
    idx = torch.randperm(len(train.labels), generator=gen)[:n]
    x = train.normalized()[idx]
    return [(x[i:i + 128],) for i in range(0, n, 128)]


def lm_windows(tokens: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows ``(n, seq_len)`` of a token stream."""
    starts = torch.randint(0, len(tokens) - seq_len, (n,), generator=gen)
    return tokens[starts[:, None] + torch.arange(seq_len)[None]]


def _causal_lm(n: int, gen: torch.Generator, tokens: torch.Tensor, seq_len: int) -> list[Batch]:
    _available(n, len(tokens) - seq_len, f"windows of {seq_len} tokens in the calibration text")
    wins = lm_windows(tokens, n, seq_len, gen)
    return [(wins[i:i + 8],) for i in range(0, n, 8)]


def _lm_tokens(entry, text_file: Path | None, seq_len: int) -> torch.Tensor:
    """Calibration tokens: ``text_file`` under the model's tokenizer (encoded in pieces of about 256K
    characters cut at line ends, each followed by the end-of-sequence token), or else the tail of our corpus's
    train split that tinyllama-fm's training held back (the last 1/30, used only to pick its
    checkpoint): the model memorised the rest, and calibrating on memorised text misleads data-driven
    methods (measured: GPTQ then does no better than RTN on held-out text)."""
    if text_file is None:
        tokens = entry.tokens("train")
        return tokens[-(len(tokens) // 30):]
    tokens = text_tokens(text_file, entry.encode, "calibration text")
    if len(tokens) <= seq_len:
        raise SlimError(f"calibration text {text_file} has {len(tokens)} tokens; it needs more than {seq_len} "
                        f"(one window)")
    return tokens


def _user_images(task: str, n: int, gen: torch.Generator, path: Path) -> list[Batch]:
    x = user_images(path, task, need_labels=False).x
    n = min(n, len(x))  # a user's set may be smaller than our default draw: all of it
    x = x[torch.randperm(len(x), generator=gen)[:n]]
    return [(x[i:i + 128],) for i in range(0, n, 128)]


def _embedding(n: int, gen: torch.Generator, tokenizer) -> list[Batch]:
    # The evaluation uses noun glosses; calibration uses verb and adjective glosses.
    glosses = data.wordnet_glosses("verb") + data.wordnet_glosses("adj")
    _available(n, len(glosses), "WordNet verb and adjective glosses")
    idx = torch.randperm(len(glosses), generator=gen)[:n].tolist()
    texts = [glosses[i].definition for i in idx]
    out = []
    for i in range(0, n, 32):
        enc = tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def _imagenet(n: int, gen: torch.Generator) -> list[Batch]:
    """Random crops (scale 0.2-1.0 of the short side) of the scikit-image photos that the
    evaluation does not score, resized to 224 px."""
    import torch.nn.functional as F

    from slimtorch.zoo.efficientnet import INPUT_MEAN, INPUT_STD

    _available(n, MAX_CROPS, "crops drawn from the calibration photos (a cap)")
    photos = [data.photo(name).permute(2, 0, 1).float() for name in data.UNLABELLED_PHOTOS]
    crops = []
    for _ in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        h, w = img.shape[-2:]
        side = int(min(h, w) * (0.2 + 0.8 * torch.rand(1, generator=gen).item()))
        top = int(torch.randint(h - side + 1, (1,), generator=gen))
        left = int(torch.randint(w - side + 1, (1,), generator=gen))
        crop = img[None, :, top:top + side, left:left + side]
        crops.append(F.interpolate(crop, size=(224, 224), mode="bilinear", antialias=True, align_corners=False))
    x = (torch.cat(crops) - INPUT_MEAN) / INPUT_STD
    return [(x[i:i + 16],) for i in range(0, n, 16)]


VISION_TASKS = ("fmnist-classification", "imagenet-classification")


def check_data_path(flag: str, name: str, path: Path | None) -> None:
    """SlimError unless ``path`` is None or fits model ``name``: a text file for a language model, an .npz
    file or a folder of class folders for a vision model (checked for existence and size here; the contents
    when read)."""
    if path is None:
        return
    task = get_entry(name).task
    if task == "causal-lm":
        regular_file(f"{flag} text", path, MAX_TEXT_BYTES)
    elif task in VISION_TASKS:
        if not Path(path).is_dir():
            regular_file(f"{flag} data", path, MAX_NPZ_BYTES)
            if Path(path).suffix != ".npz":
                raise SlimError(f"{flag} {path}: {name} is a vision model: give an .npz file (arrays x, y) or a folder of "
                               f"class folders (a text file applies to language models)")
    else:
        raise SlimError(f"{flag} DATA applies to language models and vision models; {name} is {task}")


def calibration_set(name: str, n: int | None = None, seed: int = 0, model=None,
                    data_file: Path | None = None) -> list[Batch]:
    """``n`` calibration samples for model ``name`` (a zoo name or a local folder), drawn with ``seed``.

    ``data_file``: what to draw from instead of the task's training data (``check_data_path``): for a
    language model plain text to cut windows from, for a vision model an .npz or a folder of class folders
    (eval.user_data).
    """
    entry = get_entry(name)
    task = entry.task
    n = (entry.default_calib or DEFAULT_SAMPLES[task]) if n is None else n
    if not isinstance(n, int) or n <= 0:
        raise SlimError(f"the calibration set needs at least one sample, got {shown(n)}")
    check_data_path("--calib", name, data_file)
    gen = torch.Generator().manual_seed(seed)
    if data_file is not None and task != "causal-lm":
        return _user_images(task, n, gen, data_file)
    if task == "fmnist-classification":
        return _fmnist(n, gen)
    if task == "causal-lm":
        from slimtorch.zoo.lm_data import MAX_WINDOW, lm_dims

        seq_len = lm_dims(model)[0] if model is not None else MAX_WINDOW
        return _causal_lm(n, gen, _lm_tokens(entry, data_file, seq_len), seq_len)
    if task == "sentence-embedding":
        return _embedding(n, gen, model.tokenizer)
    return _imagenet(n, gen)


def check_calibration(batches: list[Batch]) -> None:
    """SlimError if any floating tensor in the calibration set holds NaN or Inf, or if an input is the
    same value everywhere in the set (zero variance: it would calibrate every range to a point). Entries
    that are not tensors (a ``None`` for an optional argument) pass through unchecked."""
    for i, batch in enumerate(batches):
        for t in batch:
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                raise SlimError(f"calibration batch {i} holds NaN or Inf values; clean the calibration data")
    if not batches:
        return
    for j, t in enumerate(batches[0]):
        if torch.is_tensor(t) and t.is_floating_point() and t.numel() > 1:
            first = t.reshape(-1)[0]
            if all(bool((b[j] == first).all()) for b in batches):
                raise SlimError(f"calibration input {j} has zero variance (every value is {first.item():g}); "
                                f"calibrate on real data")
