"""Offline datasets: all real, all from Debian packages, none downloaded.

* Fashion-MNIST: idx files from the Debian package ``dataset-fashion-mnist``.
* English text corpus: the reStructuredText sources of the Python 3.11 manual from
  ``python3.11-doc`` (497 documents, about 11 MB of real English prose and examples).
  We chose it over WordNet glosses for language modelling because its documents are long
  and coherent, so a model has context worth learning. The split is per document (never
  inside one), decided by a hash of the document's path, so it is deterministic and the
  held-out text shares no paragraph with the training text.
* Sentences: WordNet 3.0 glosses from ``wordnet-base`` (117,659 real definitions), used
  to evaluate sentence embeddings.

Every location can be overridden by an environment variable (used on the GPU machine,
where the packages are not installed and the files are carried instead).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimtorch.errors import SlimError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CORPUS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
WORDNET_DIR = Path("/usr/share/wordnet")

FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Normalisation used by every Fashion-MNIST model in the zoo (train-set mean/std of pixels/255).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
HELDOUT_BUCKETS = 20  # one document in 20 (by path hash) is held out


def _dir(env: str, default: Path) -> Path:
    return Path(os.environ.get(env, str(default)))


# ----------------------------------------------------------------------------- Fashion-MNIST
@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 ``(N, 28, 28)`` and labels as int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def normalized(self) -> torch.Tensor:
        """Float images ``(N, 1, 28, 28)`` normalised with the zoo's mean/std."""
        return ((self.images.float() / 255.0 - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)


def _read_idx(path: Path, magic: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    hint = "install it with: sudo apt-get install dataset-fashion-mnist"
    if not path.is_file():
        raise SlimError(f"Fashion-MNIST file {path} is missing; {hint}")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise SlimError(f"Fashion-MNIST file {path} is corrupt ({exc}); reinstall: {hint}") from None
    ndim = len(shape) + 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SlimError(f"Fashion-MNIST file {path} is truncated; reinstall: {hint}")
    got_magic, *dims = struct.unpack(f">{ndim + 1}I", raw[:header])
    if got_magic != magic or tuple(dims) != (count, *shape):
        raise SlimError(
            f"Fashion-MNIST file {path} has header magic={got_magic:#x} dims={tuple(dims)}, "
            f"expected magic={magic:#x} dims={(count, *shape)}; reinstall: {hint}"
        )
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != count * int(np.prod(shape, dtype=np.int64)):
        raise SlimError(f"Fashion-MNIST file {path} has {body.size} bytes of data, expected "
                        f"{count * int(np.prod(shape))}; reinstall: {hint}")
    return body.reshape(count, *shape)


def fashion_mnist(split: str) -> ImageSet:
    """Load Fashion-MNIST ``split`` ('train': 60,000 images, 'test': 10,000).

    Raises:
        SlimError: unknown split, or a missing/corrupt idx file (names the package).
    """
    sizes = {"train": ("train", 60_000), "test": ("t10k", 10_000)}
    if split not in sizes:
        raise SlimError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    prefix, n = sizes[split]
    root = _dir("SLIMTORCH_FMNIST_DIR", FMNIST_DIR)
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 0x803, n, (28, 28))
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 0x801, n, ())
    if labels.max() > 9:
        raise SlimError(f"Fashion-MNIST labels in {root} exceed 9; reinstall dataset-fashion-mnist")
    return ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


# ----------------------------------------------------------------------------- text corpus
@dataclass(frozen=True)
class Corpus:
    """Documents of one split, as (relative path, text) pairs in a fixed order."""

    split: str
    documents: tuple[tuple[str, str], ...]

    @property
    def n_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for _, t in self.documents)

    def text(self, separator: str = "\n\n") -> str:
        return separator.join(t for _, t in self.documents)


def is_heldout(relpath: str) -> bool:
    """Deterministic document-level split: sha256 of the path, one bucket of 20 held out."""
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


def text_corpus(split: str) -> Corpus:
    """The English corpus's ``split``: 'train', 'heldout' or 'all'.

    Raises:
        SlimError: unknown split, or the Debian package is not installed.
    """
    if split not in ("train", "heldout", "all"):
        raise SlimError(f"unknown corpus split {split!r}; use 'train', 'heldout' or 'all'")
    root = _dir("SLIMTORCH_CORPUS_DIR", CORPUS_DIR)
    files = sorted(root.rglob("*.txt")) if root.is_dir() else []
    if not files:
        raise SlimError(f"no text corpus under {root}; install it with: sudo apt-get install python3.11-doc")
    docs = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if split == "all" or is_heldout(rel) == (split == "heldout"):
            docs.append((rel, f.read_text(encoding="utf-8", errors="replace")))
    return Corpus(split, tuple(docs))


# ----------------------------------------------------------------------------- sentences
@dataclass(frozen=True)
class Gloss:
    """One WordNet synset: its first lemma (spaces, not underscores) and its definition."""

    lemma: str
    definition: str


def wordnet_glosses(pos: str = "noun") -> list[Gloss]:
    """All glosses of one part of speech from WordNet 3.0, in file order.

    The definition is the gloss up to its first ';' (examples follow it).

    Raises:
        SlimError: unknown part of speech, or wordnet-base is not installed.
    """
    if pos not in ("noun", "verb", "adj", "adv"):
        raise SlimError(f"unknown part of speech {pos!r}; use noun, verb, adj or adv")
    path = _dir("SLIMTORCH_WORDNET_DIR", WORDNET_DIR) / f"data.{pos}"
    if not path.is_file():
        raise SlimError(f"WordNet file {path} is missing; install it with: sudo apt-get install wordnet-base")
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # licence header
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        lemma = parts[4].replace("_", " ")
        definition = gloss.split(";")[0].strip()
        if definition:
            out.append(Gloss(lemma, definition))
    return out


# ----------------------------------------------------------------------------- photos
# Real photographs shipped inside scikit-image, with the ImageNet classes that name them.
LABELLED_PHOTOS = {
    "coffee": (967, 968, 504),  # espresso, cup, coffee mug
    "chelsea": (281, 282, 285),  # tabby, tiger cat, Egyptian cat
    "rocket": (657, 744, 812),  # missile, projectile, space shuttle
}
UNLABELLED_PHOTOS = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "camera")


def photo(name: str) -> torch.Tensor:
    """A scikit-image sample photo as uint8 RGB ``(H, W, 3)``."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise SlimError("photos need scikit-image: pip install -e '.[hf]'") from None
    img = np.asarray(getattr(skdata, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(img[..., :3]))


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names, in index order."""
    return (Path(__file__).parent / "imagenet_classes.txt").read_text().splitlines()
