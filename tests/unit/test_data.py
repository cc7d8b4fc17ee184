import gzip
import struct

import pytest
import torch

from slimtorch.errors import SlimError
from slimtorch.zoo import data


def test_fashion_mnist_counts_and_balance():
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    assert train.images.shape == (60_000, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10_000, 28, 28)
    # Fashion-MNIST is exactly balanced: 6,000 train and 1,000 test images per class.
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    # The zoo's normalisation constants are the train set's pixel mean/std.
    px = train.images.float() / 255
    assert px.mean().item() == pytest.approx(data.FMNIST_MEAN, abs=5e-4)
    assert px.std().item() == pytest.approx(data.FMNIST_STD, abs=5e-4)


def _write_idx(path, magic, dims, body):
    path.write_bytes(gzip.compress(struct.pack(f">{len(dims) + 1}I", magic, *dims) + body))


def test_fashion_mnist_missing_file_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTORCH_FMNIST_DIR", str(tmp_path))
    with pytest.raises(SlimError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("test")


def test_fashion_mnist_bad_magic_and_truncation(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTORCH_FMNIST_DIR", str(tmp_path))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x801, (10_000, 28, 28), b"")  # labels magic on images
    with pytest.raises(SlimError, match="magic=0x801"):
        data.fashion_mnist("test")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (10_000, 28, 28), bytes(100))
    with pytest.raises(SlimError, match="100 bytes of data"):
        data.fashion_mnist("test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(SlimError, match="corrupt"):
        data.fashion_mnist("test")


def test_fashion_mnist_unknown_split():
    with pytest.raises(SlimError, match="'train' or 'test'"):
        data.fashion_mnist("val")


def test_corpus_split_is_a_deterministic_partition():
    train, held, every = (data.text_corpus(s) for s in ("train", "heldout", "all"))
    names = lambda c: {p for p, _ in c.documents}  # noqa: E731
    assert names(train) | names(held) == names(every)
    assert not names(train) & names(held)
    assert every.n_bytes >= 5_000_000  # the issue asks for at least 5 MB of text
    assert 0.02 < held.n_bytes / every.n_bytes < 0.10
    assert all(data.is_heldout(p) for p in names(held))
    assert data.text_corpus("heldout").documents == held.documents  # same order, same text


def test_corpus_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTORCH_CORPUS_DIR", str(tmp_path / "nothing"))
    with pytest.raises(SlimError, match="apt-get install python3.11-doc"):
        data.text_corpus("train")


def test_wordnet_gloss_counts_match_wordnet_3_0():
    # WordNet 3.0 has 82,115 noun, 13,767 verb, 18,156 adjective and 3,621 adverb synsets.
    counts = {pos: len(data.wordnet_glosses(pos)) for pos in ("noun", "verb", "adj", "adv")}
    assert counts == {"noun": 82_115, "verb": 13_767, "adj": 18_156, "adv": 3_621}
    first = data.wordnet_glosses("noun")[0]
    assert first.lemma == "entity" and first.definition.startswith("that which is perceived")


def test_imagenet_classes():
    classes = data.imagenet_classes()
    assert len(classes) == 1000 and classes[0] == "tench" and classes[281] == "tabby"
    assert len(set(classes)) == 1000  # torchvision's list, which disambiguates 'crane' and 'maillot'
    assert (classes[504], classes[967], classes[968]) == ("coffee mug", "espresso", "cup")


def test_shift_flip_equals_shifting_a_padded_copy():
    import torch.nn.functional as F

    from slimtorch.zoo.augment import shift_flip

    x = torch.randn(16, 1, 28, 28)
    out = shift_flip(x, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the same draws, applied to an explicitly padded copy
    dx, dy = torch.randint(0, 5, (16,), generator=gen), torch.randint(0, 5, (16,), generator=gen)
    flip = torch.rand(16, generator=gen) < 0.5
    pad = F.pad(x[:, 0], (2, 2, 2, 2), value=float(x.min()))
    for i in range(16):
        ref = pad[i, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28]
        assert torch.equal(out[i, 0], ref.flip(-1) if flip[i] else ref)
    assert not torch.equal(out, x) and out.shape == (16, 1, 28, 28)
