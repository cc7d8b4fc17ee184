"""The user's own evaluation and calibration data, checked before use.

* Language models: a UTF-8 text file, tokenized with the model's tokenizer in pieces cut at line ends
  (as ``--calib``), cut into windows of the model's context.
* Vision models: an ``.npz`` file with ``x`` (images) and, to evaluate, ``y`` (integer labels), or a
  folder of class folders (``DATA/<class>/*.png|jpg``; a class is named by its index or by its name in the
  model's class list). Images are uint8 (or floats in [0, 1]), ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB;
  they get the model's own preprocessing (Fashion-MNIST: 28x28 grey, the zoo's normalisation; ImageNet:
  resize, centre crop, normalisation).

An ``.npz`` is read with ``allow_pickle=False`` after its zip directory was checked (the arrays' total
uncompressed size bounded), so neither code nor a decompression bomb gets in.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimtorch.errors import SlimError, shown
from slimtorch.io.files import regular_file

MAX_NPZ_BYTES = 2 * 2**30  # uncompressed
MAX_TEXT_BYTES = 64 * 2**20  # far more than any calibration set draws (128 windows of 512 tokens)
TEXT_PIECE_CHARS = 1 << 18
MAX_IMAGES = 200_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class UserImages:
    x: torch.Tensor  # preprocessed model input, (N, C, H, W)
    y: torch.Tensor | None  # labels (N,), or None
    source: str  # what the report says it measured on


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    regular_file("data file", path, MAX_NPZ_BYTES)
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(i.file_size for i in z.infolist())
        if total > MAX_NPZ_BYTES:
            raise SlimError(f"{path} unpacks to {total:,} bytes; the most an .npz may hold is {MAX_NPZ_BYTES:,}")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except SlimError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SlimError(f"{path} is not a readable .npz of plain arrays: {shown(exc, 160)}") from None


def _folder_images(path: Path, classes: tuple[str, ...]) -> tuple[list[np.ndarray], list[int]]:
    from PIL import Image, UnidentifiedImageError

    by_name = {c.lower().replace("/", "-"): i for i, c in enumerate(classes)}
    images, labels = [], []
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise SlimError(f"{path} has no class folders; put images in {path}/<class>/ (class index or name)")
    for d in subdirs:
        key = d.name.lower()
        label = int(key) if key.isdigit() and int(key) < len(classes) else by_name.get(key)
        if label is None:
            raise SlimError(f"class folder {shown(d.name)} is neither a class index (0-{len(classes) - 1}) nor a "
                            f"class name of this model (e.g. {shown(classes[0])})")
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                continue
            if len(images) >= MAX_IMAGES:
                raise SlimError(f"{path} holds more than {MAX_IMAGES:,} images; use a sample")
            try:
                with Image.open(f) as im:
                    im.draft("RGB", (1024, 1024))
                    if im.width * im.height > 64 * 2**20:
                        raise SlimError(f"{f} is {im.width}x{im.height} pixels; too large")
                    images.append(np.asarray(im.convert("RGB")))
            except (UnidentifiedImageError, OSError) as exc:
                raise SlimError(f"{f} is not a readable image: {shown(exc, 120)}") from None
            labels.append(label)
    if not images:
        raise SlimError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return images, labels


def _as_uint8(img: np.ndarray, where: str) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
            raise SlimError(f"{where}: float images must be finite and in [0, 1]")
        return np.round(img * 255).astype(np.uint8)
    raise SlimError(f"{where}: images must be uint8 or floats in [0, 1], not {img.dtype}")


def user_images(path: Path, task: str, need_labels: bool) -> UserImages:
    """Images (and labels) for a vision ``task`` from an .npz or a folder of class folders."""
    from slimtorch.zoo import data

    path = Path(path)
    classes = data.FMNIST_CLASSES if task == "fmnist-classification" else tuple(data.imagenet_classes())
    if path.is_dir():
        images, labels = _folder_images(path, classes)
        y = torch.tensor(labels)
        source = f"images in {path} ({len(images)} in {len(set(labels))} class folders)"
    else:
        arrays = _npz_arrays(path)
        if "x" not in arrays:
            raise SlimError(f"{path} has no array 'x' (it has: {', '.join(sorted(arrays)) or 'none'})")
        x = arrays["x"]
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)) or not 1 <= len(x) <= MAX_IMAGES:
            raise SlimError(f"{path}: x has shape {list(x.shape)}; give (N, H, W) or (N, H, W, 3) images, "
                            f"1 to {MAX_IMAGES:,} of them")
        images = list(_as_uint8(x, str(path)))
        y = None
        if "y" in arrays:
            yy = arrays["y"]
            if yy.shape != (len(x),) or not np.issubdtype(yy.dtype, np.integer) or yy.min() < 0 or \
                    yy.max() >= len(classes):
                raise SlimError(f"{path}: y must hold {len(x)} integer labels in 0..{len(classes) - 1}")
            y = torch.from_numpy(yy.astype(np.int64))
        source = f"{path} ({len(images)} images)"
    if need_labels and y is None:
        raise SlimError(f"{path} has no labels (array 'y'); evaluation needs them")
    return UserImages(_preprocess(images, task, path), y, source)


def _preprocess(images: list[np.ndarray], task: str, path: Path) -> torch.Tensor:
    if task == "fmnist-classification":
        import torch.nn.functional as F

        from slimtorch.zoo.data import FMNIST_MEAN, FMNIST_STD

        out = []
        for img in images:
            t = torch.from_numpy(np.array(img, dtype=np.float32))
            t = t.mean(-1) if t.ndim == 3 else t  # grey
            if t.shape != (28, 28):
                t = F.interpolate(t[None, None], size=(28, 28), mode="bilinear", antialias=True)[0, 0]
            out.append(t)
        return ((torch.stack(out) / 255.0 - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)
    from slimtorch.zoo.efficientnet import preprocess

    rgb = [np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img for img in images]
    return torch.cat([preprocess(torch.from_numpy(np.array(img))) for img in rgb])


def text_pieces(text: str, size: int = TEXT_PIECE_CHARS) -> list[str]:
    """``text`` cut at line ends into pieces of about ``size`` characters (one piece if it is shorter).

    Tokenizers hold several times a text's size while they encode it in one call (measured: 5 GB for a
    32 MB file); piece by piece, memory stays near the size of the token ids."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def text_tokens(path: Path, encode, what: str = "evaluation text") -> torch.Tensor:
    """The token stream of a UTF-8 text file under ``encode`` (documents -> ids, each followed by
    end-of-sequence), tokenized in pieces cut at line ends (``text_pieces``)."""
    regular_file(what, path, MAX_TEXT_BYTES)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SlimError(f"cannot read {what} {path}: {shown(exc)}") from None
    return torch.cat([encode([piece]) for piece in text_pieces(text)]) if text else torch.empty(0, dtype=torch.long)
