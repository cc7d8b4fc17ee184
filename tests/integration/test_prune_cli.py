"""``slimtorch prune``: FP and pruned measured side by side, a compressed file that loads back to the same
outputs, every bad input one line, exit 2."""

import json

import pytest
import torch

from slimtorch.calib.data import calibration_set
from slimtorch.export.pruned import load_pruned
from tests.integration.clitools import one_line_error, run


def test_prune_writes_a_smaller_file_that_loads_back(tmp_path):
    r = run("prune", "fmnist-cnn", "--method", "magnitude", "--pattern", "2:4", "--limit", "200",
            "--out", str(tmp_path / "p"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["sparsity"] == 0.5 and rep["metrics"][0]["name"] == "top1_accuracy"
    assert rep["size"]["file_bytes"] < 0.6 * rep["size"]["dense_bytes"]
    assert any("kept dense" in n for n in rep["notes"])  # the 9-input stem
    model, meta = load_pruned(tmp_path / "p" / "model.safetensors")
    assert meta["prune"]["pattern"] == "2:4"
    w = dict(model.named_modules())[next(iter(rep["layers"]))].weight
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    with torch.no_grad():
        assert torch.isfinite(model(calibration_set("fmnist-cnn", 4)[0][0])).all()


def test_prune_and_quantize_writes_a_quantized_file(tmp_path):
    from slimtorch.export.quantized import load_quantized

    r = run("prune", "fmnist-cnn", "--method", "sparsegpt", "--pattern", "2:4", "--quantize", "W8A8-dynamic",
            "--limit", "200", "--calib-samples", "128", "--out", str(tmp_path / "q"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["quantized"] == "W8A8-dynamic" and rep["bits_per_weight"] < 12 and rep["sparsity"] == 0.5
    model, meta = load_quantized(tmp_path / "q" / "model.safetensors")
    assert meta["prune"]["pattern"] == "2:4"
    w = dict(model.named_modules())[next(iter(rep["layers"]))].weight()
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_bad_options_are_one_line(tmp_path):
    one_line_error(run("prune", "fmnist-cnn", "--method", "obs", "--out", str(tmp_path / "a")), "obs")
    one_line_error(run("prune", "fmnist-cnn", "--sparsity", "1.5", "--out", str(tmp_path / "b")), "sparsity")
    one_line_error(run("prune", "fmnist-cnn", "--pattern", "4:2", "--out", str(tmp_path / "c")), "4:2")
    one_line_error(run("prune", "no-such-model", "--out", str(tmp_path / "d")), "no-such-model")
    one_line_error(run("prune", "fmnist-cnn", "--quantize", "W5", "--out", str(tmp_path / "e")), "W5")
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_structured_prune_makes_a_smaller_model_that_loads_back(tmp_path):
    from slimtorch.eval import evaluate

    r = run("prune", "fmnist-vit", "--method", "structured", "--budget", "0.6", "--measure", "params", "--heads",
            "--importance", "taylor", "--recover", "3", "--limit", "200", "--calib-samples", "64",
            "--out", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert 0.55 < rep["params"]["after"] / rep["params"]["before"] <= 0.6 and rep["recovery"]["steps"] == 3
    assert rep["size"]["file_bytes"] < 0.65 * rep["size"]["dense_bytes"]
    model, meta = load_pruned(tmp_path / "s" / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == rep["params"]["after"]
    assert meta["structured"]["heads"] is True and model.blocks[0].attn.heads == rep["groups"]["blocks.0.attn"][1]
    res = evaluate("fmnist-vit", model=model, limit=200, latency=False)
    assert res.metrics[0].value == rep["metrics"][0]["pruned"]  # the reloaded model is the one measured


def test_structured_bad_options_are_one_line(tmp_path):
    one_line_error(run("prune", "fmnist-cnn", "--method", "structured", "--quantize", "W8A8",
                       "--out", str(tmp_path / "a")), "--quantize")
    one_line_error(run("prune", "fmnist-cnn", "--method", "structured", "--budget", "0.001",
                       "--out", str(tmp_path / "b")), "budget")
    one_line_error(run("prune", "fmnist-cnn", "--method", "wanda", "--heads", "--out", str(tmp_path / "c")),
                   "--heads")
    one_line_error(run("prune", "fmnist-cnn", "--method", "structured", "--importance", "fisher",
                       "--out", str(tmp_path / "d")), "fisher")
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_train_sparse_mest_writes_a_sparse_model_within_its_memory_bound(tmp_path):
    r = run("train-sparse", "fmnist-cnn", "--method", "mest", "--sparsity", "0.9", "--epochs", "2",
            "--limit-train", "1024", "--limit", "500", "--device", "cpu", "--out", str(tmp_path / "m"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    t = rep["training"]
    assert rep["sparsity"] == pytest.approx(0.9, abs=1e-3) and t["peak_density"] <= t["memory_bound_density"]
    assert rep["size"]["file_bytes"] < 0.45 * rep["size"]["dense_bytes"]  # 90% zeros, stored compressed
    model, _ = load_pruned(tmp_path / "m" / "model.safetensors")
    w = model.layer3.conv2.weight
    assert abs(float((w == 0).float().mean()) - 0.9) < 0.01


def test_train_sparse_bad_options_are_one_line(tmp_path):
    one_line_error(run("train-sparse", "tinyllama-fm", "--out", str(tmp_path / "a")), "fmnist")
    one_line_error(run("train-sparse", "fmnist-cnn", "--method", "rigl", "--out", str(tmp_path / "b")), "rigl")
    one_line_error(run("train-sparse", "fmnist-cnn", "--sparsity", "1.0", "--out", str(tmp_path / "c")), "sparsity")
    one_line_error(run("train-sparse", "fmnist-cnn", "--method", "lth", "--drop", "0.5",
                       "--out", str(tmp_path / "d")), "--drop")
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_train_sparse_lottery_ticket_rounds(tmp_path):
    r = run("train-sparse", "fmnist-cnn", "--method", "lth", "--sparsity", "0.36", "--epochs", "1",
            "--limit-train", "512", "--limit", "200", "--device", "cpu", "--out", str(tmp_path / "t"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [round(x["sparsity"], 2) for x in rep["rounds"]] == [0.0, 0.2, 0.36]
    assert rep["sparsity"] == pytest.approx(0.36, abs=1e-3) and "correlation" in rep["rounds"][1]


def test_npas_prune_meets_its_modelled_latency_and_loads_back(tmp_path):
    r = run("prune", "fmnist-cnn", "--method", "npas", "--latency", "0.6", "--batch", "1024", "--evaluate", "loss",
            "--calib-samples", "128", "--limit", "200", "--out", str(tmp_path / "n"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    lat = rep["modelled_latency_s"]
    assert rep["method"] == "npas" and lat["after"] <= 0.6 * lat["before"] and lat["batch"] == 1024
    model, meta = load_pruned(tmp_path / "n" / "model.safetensors")
    assert meta["prune"]["evaluate"] == "loss" and any("BatchNorm" in n for n in rep["notes"])
    assert sum(p.numel() for p in model.parameters()) == rep["params"]["after"] < rep["params"]["before"]


def test_npas_bad_options_are_one_line(tmp_path):
    one_line_error(run("prune", "fmnist-cnn", "--method", "npas", "--evaluate", "accuracy",
                       "--out", str(tmp_path / "a")), "accuracy")
    one_line_error(run("prune", "fmnist-cnn", "--method", "npas", "--latency", "0",
                       "--out", str(tmp_path / "b")), "latency")
    one_line_error(run("prune", "fmnist-cnn", "--method", "npas", "--budget", "0.5",
                       "--out", str(tmp_path / "c")), "--latency")
    assert not any((tmp_path / x).exists() for x in "abc")
