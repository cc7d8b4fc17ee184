"""The user's own evaluation and calibration data: the same images or text give the same numbers as our
own loaders (oracle: the harness on the built-in data), and bad files are one SlimError each."""

import zipfile

import numpy as np
import pytest
import torch

from slimtorch.calib.data import calibration_set
from slimtorch.errors import SlimError
from slimtorch.eval import evaluate
from slimtorch.eval import metrics as M
from slimtorch.eval.user_data import user_images
from slimtorch.zoo import data, get_entry, load_model


@pytest.fixture(scope="module")
def cnn():
    return load_model("fmnist-cnn")


@pytest.fixture(scope="module")
def test_npz(tmp_path_factory):
    t = data.fashion_mnist("test")
    path = tmp_path_factory.mktemp("d") / "first300.npz"
    np.savez(path, x=t.images[:300].numpy(), y=t.labels[:300].numpy())
    return path


def test_an_npz_of_test_images_scores_like_the_test_set(cnn, test_npz):
    ours = evaluate("fmnist-cnn", model=cnn, limit=300, latency=False)
    theirs = evaluate("fmnist-cnn", model=cnn, data=test_npz, latency=False)
    assert theirs.metric("top1_accuracy") == ours.metric("top1_accuracy")
    assert str(test_npz) in theirs.dataset and "300 images" in theirs.dataset


def test_an_image_folder_of_pngs_reads_back_the_same_pixels(tmp_path, test_npz):
    from PIL import Image

    t = data.fashion_mnist("test")
    for i in range(12):
        d = tmp_path / "imgs" / data.FMNIST_CLASSES[int(t.labels[i])].replace("/", "-")  # class names work
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(t.images[i].numpy()).save(d / f"{i:03d}.png")
    u = user_images(tmp_path / "imgs", "fmnist-classification", need_labels=True)
    order = torch.argsort(u.y * 1000 + torch.arange(len(u.y)))  # folders are read class by class
    want = t.normalized()[:12]
    got = {(int(y), tuple(x.flatten()[:50].tolist())) for x, y in zip(u.x[order], u.y[order])}
    assert got == {(int(y), tuple(x.flatten()[:50].tolist())) for x, y in zip(want, t.labels[:12])}


def test_a_text_file_is_measured_on_its_own_windows(tmp_path):
    model = load_model("tinyllama-fm")
    text = (data.CORPUS_DIR / "library" / "functions.rst.txt").read_text()
    path = tmp_path / "mine.txt"
    path.write_text(text)
    res = evaluate("tinyllama-fm", model=model, data=path, latency=False)
    tokens = get_entry("tinyllama-fm").encode([text])
    wins = M.windows(tokens, 512)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(wins), 4):
            s, c = M.window_nll(model(wins[i:i + 4]), wins[i:i + 4])
            nll, n = nll + s, n + c
    assert res.metric("heldout_perplexity") == pytest.approx(float(np.exp(nll / n)), rel=1e-6)  # the harness takes exp in float32
    assert str(path) in res.dataset and f"{n} predicted tokens" in res.dataset


def test_calibration_draws_from_the_users_images(test_npz):
    calib = calibration_set("fmnist-cnn", 64, data_file=test_npz)
    x = torch.cat([b[0] for b in calib])
    pool = data.fashion_mnist("test").normalized()[:300].flatten(1)
    assert len(x) == 64 and all(bool((pool == row).all(1).any()) for row in x.flatten(1))
    assert len(torch.cat([b[0] for b in calibration_set("fmnist-cnn", None, data_file=test_npz)])) == 300


def test_bad_user_data_is_one_error_each(tmp_path, cnn):
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([object()], dtype=object))
    with pytest.raises(SlimError, match="not a readable .npz of plain arrays"):
        user_images(obj, "fmnist-classification", need_labels=False)
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", b"\0" * (1 << 20))
        z.getinfo("x.npy").file_size = 1 << 40  # a directory that claims a terabyte
    with pytest.raises(SlimError):
        user_images(bomb, "fmnist-classification", need_labels=False)
    bad_y = tmp_path / "bad_y.npz"
    np.savez(bad_y, x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 1, 2, 10]))
    with pytest.raises(SlimError, match="integer labels in 0..9"):
        user_images(bad_y, "fmnist-classification", need_labels=True)
    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, x=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(SlimError, match="no labels"):
        evaluate("fmnist-cnn", model=cnn, data=no_y, latency=False)
    (tmp_path / "imgs" / "jackets").mkdir(parents=True)
    with pytest.raises(SlimError, match="neither a class index"):
        user_images(tmp_path / "imgs", "fmnist-classification", need_labels=True)
    short = tmp_path / "short.txt"
    short.write_text("print(1)\n")
    with pytest.raises(SlimError, match="needs more than 512"):
        evaluate("tinyllama-fm", data=short, latency=False)
