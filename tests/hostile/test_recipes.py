"""Careless and hostile recipes: each is one SlimError naming what is wrong, found before any work, with
bounded time and memory; or, where the recipe is sound, a correct result."""

from __future__ import annotations

import copy
import resource
import time

import pytest
import torch

from slimtorch.calib.data import calibration_set
from slimtorch.errors import SlimError
from slimtorch.eval import evaluate
from slimtorch.quant.recipe import load_recipe
from slimtorch.quantize import quantize_
from slimtorch.zoo import load_model

BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
"""


def write(tmp_path, text: str | bytes, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def refused(tmp_path, text, match: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(SlimError, match=match) as info:
        load_recipe(write(tmp_path, text))
    assert "\n" not in str(info.value) and len(str(info.value)) < 600
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: < 200 MB grown


@pytest.mark.parametrize("field", ["weight", "act", "observer", "granularity", "preset", "dtype"])
def test_alias_bombs_are_refused_without_expanding(tmp_path, field):
    bomb = BOMB.replace("h: &h", "x: &h")
    if field in ("weight", "act", "preset"):
        text = bomb + f"{field}: *h\n"
    else:
        text = bomb + f"weight: {{dtype: int8, {field}: *h}}\n"
    refused(tmp_path, text, "alias")


@pytest.mark.parametrize("text, match", [
    ("[" * 2000 + "]" * 2000, "nests deeper"),
    ("weight: {dtype: uint4, granularity: group:" + "9" * 5000 + ", symmetric: false}", "granularity"),
    ("weight: {dtype: uint4, granularity: 'group:99999999999', symmetric: false}", "granularity|group size"),
    ("weight: {dtype: int8}\nweight: {dtype: int4}\n", "appears twice"),
    ("weight: {dtype: int8, dtype: int4}\n", "appears twice"),
    ("preset: W8A8\n1: 2\n", "unknown fields"),
    ("preset: W8A8\n? [a, b]\n: 1\n", "plain value"),
    ("preset: [W8A8]\n", "preset"),
    ("preset: {a: 1}\n", "preset"),
    ("weight: {dtype: [int8]}\n", "dtype"),
    ("weight: {dtype: {a: 1}}\n", "dtype"),
    ("preset: W8A8\ntargets: 7\n", "list of strings"),
    ("preset: W8A8\ntargets: true\n", "list of strings"),
    ("preset: W8A8\ntargets: 1.5\n", "list of strings"),
    ("preset: W8A8\nignore: 3\n", "list of strings"),
    ("preset: W8A8\ntargets: Linear\n", "list of strings"),
    ("preset: W8A8\ntargets: {Linear: 1}\n", "list of strings"),
    ("preset: W8A8\nact: {dtype: int8, granularity: token}\n", "static activations"),
    ("preset: W8A8\nact: {dtype: int8, granularity: channel}\n", "static activations"),
    ("preset: W8A8\nattention: {dtype: int8, granularity: 'channel:1'}\n", "static activations"),
    ("weight: {dtype: int8, symmetric: 'no'}\n", "true or false"),
    ("weight: {dtype: int8, symmetric: 1}\n", "true or false"),
    ("preset: W8A8\nact: {dtype: int8, dynamic: 'x'}\n", "true or false"),
    ("weight: {dtype: int8, granularity: 'channel:3'}\n", "weight granularity"),
    ("weight: {dtype: int8, granularity: 'channel:-9'}\n", "weight granularity"),
    ("weight: {dtype: int8, granularity: token}\n", "weight granularity"),
    ("weight: {dtype: int8, dynamic: true}\n", "dynamic"),
    ("weight: {dtype: int8, granularity: 7}\n", "granularity must be a string"),
    ("weight: null\nact: {dtype: int8, granularity: tensor}\n", "but not their weights"),
    ("preset: W8A8\nweight: null\n", "but not their weights"),
    ("weight: {dtype: int5x}\n", "unknown dtype"),
    ("weight: {dtype: int8, observer: 12}\n", "unknown observer"),
    ("preset: W8A8\nact: {dtype: int8, dynamic: true, granularity: 'group:8'}\n", "dynamic activations"),
    ("- 1\n- 2\n", "mapping"),
    ("", "mapping"),
    ("preset: W8A8\nignore: ['re:(']\n", "not a valid regex"),
    ("preset: W8A8\nignore: ['" + "x" * 600 + "']\n", "at most"),
], ids=lambda v: v[:24] if isinstance(v, str) else None)
def test_bad_recipes_are_one_line(tmp_path, text, match):
    refused(tmp_path, text, match)


@pytest.mark.parametrize("data, match", [
    (b"preset: W8A8\nignore: ['\xff\xfe']\n", "not UTF-8"),
    ("preset: W8A8\n".encode("utf-16"), "not UTF-8"),
    (b"preset: W8A8\n" + b"#" * 70_000, "at most"),
])
def test_bad_bytes_are_one_line(tmp_path, data, match):
    refused(tmp_path, data, match)


def test_a_fifo_or_a_device_as_recipe_is_refused_at_once(tmp_path):
    import os

    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SlimError, match="not a regular file"):
        load_recipe(fifo)
    with pytest.raises(SlimError, match="not a regular file"):
        load_recipe("/dev/zero")


def test_activation_only_recipe_is_refused_not_a_silent_replacement(tmp_path):
    """Before: tinyllama-fm with targets o_proj went from perplexity 17.5 to 723 with exit 0."""
    r = write(tmp_path, "targets: ['re:.*o_proj']\nweight: null\nact: {dtype: int8, granularity: tensor}\n")
    with pytest.raises(SlimError, match="but not their weights"):
        quantize_(load_model("fmnist-cnn"), r)


def test_attention_only_recipe_on_a_model_without_points_is_an_error(tmp_path):
    r = write(tmp_path, "attention: {dtype: int8, granularity: tensor, symmetric: false}\n")
    with pytest.raises(SlimError, match="no MatmulInput points"):
        quantize_(load_model("fmnist-cnn"), r, calibration_set("fmnist-cnn", 128))


def test_attention_only_recipe_quantizes_only_the_points(tmp_path):
    """The oracle: only MatmulInput points change; every Linear stays the float module."""
    from torch import nn

    from slimtorch.quant.modules import ActQuant

    r = write(tmp_path, "attention: {dtype: int8, granularity: tensor, symmetric: false}\n")
    fp = load_model("fmnist-vit")
    q = copy.deepcopy(fp)
    report = quantize_(q, r, calibration_set("fmnist-vit", 128))
    assert report.quantized and all(v == "W:- A:int8" for v in report.quantized.values())
    assert all(isinstance(q.get_submodule(n), ActQuant) for n in report.quantized)
    assert sum(isinstance(m, nn.Linear) for m in q.modules()) == sum(isinstance(m, nn.Linear) for m in fp.modules())
    acc = evaluate("fmnist-vit", model=q, limit=500).metric("top1_accuracy")
    assert abs(acc - evaluate("fmnist-vit", model=fp, limit=500).metric("top1_accuracy")) < 2.0


def test_nan_weights_are_named_as_such_not_as_bad_calibration_data():
    m = load_model("fmnist-cnn")
    with torch.no_grad():
        next(p for p in m.parameters() if p.ndim == 4)[0, 0, 0, 0] = float("nan")
    with pytest.raises(SlimError, match="model's own tensor .* NaN"):
        quantize_(m, "W8A8", calibration_set("fmnist-cnn", 128))
