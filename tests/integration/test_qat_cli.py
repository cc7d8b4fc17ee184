import json
import subprocess
import sys

import pytest

from slimtorch.qat.methods import parse_bits
from slimtorch.errors import SlimError
from slimtorch.eval import evaluate
from slimtorch.export.quantized import load_quantized


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtorch", *args], capture_output=True, text=True, timeout=900)


def test_parse_bits():
    assert parse_bits("4") == (4, 4) and parse_bits("w4a8") == (4, 8) and parse_bits("W3") == (3, None)
    assert parse_bits("W2A16") == (2, None)
    with pytest.raises(SlimError, match="--bits"):
        parse_bits("four")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lsq", "sat"])
def test_train_qat_cli_saves_a_model_that_reloads_to_the_reported_accuracy(tmp_path, method):
    out = tmp_path / method
    r = run("train-qat", "fmnist-cnn", "--method", method, "--bits", "W3A4", "--epochs", "2", "--limit-train", "512",
            "--batch-size", "128", "--limit", "500", "--device", "cpu", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [h["epoch"] for h in rep["training"]["history"]] == [1, 2]
    assert (out / "checkpoints" / "last.safetensors").is_file()
    assert rep["quantized_layers"]["layer1.conv2"] == "W:int3 A:uint4"
    assert rep["quantized_layers"]["stem.0"] == "W:int8 A:int8"  # first layer at 8 bits, signed image input
    model, meta = load_quantized(out / "model.safetensors")
    assert meta["method"] == f"qat-{method}" and meta["recipe"] == "QAT-" + method + "-W3A4"
    acc = next(m for m in rep["metrics"] if m["name"] == "top1_accuracy")
    assert evaluate("fmnist-cnn", model=model, limit=500).metric("top1_accuracy") == acc["quantized"]
    # finished run + --resume: nothing left to train, same files again
    r2 = run("train-qat", "fmnist-cnn", "--method", method, "--bits", "W3A4", "--epochs", "2", "--limit-train", "512",
             "--batch-size", "128", "--limit", "500", "--device", "cpu", "--out", str(out), "--json", "--resume")
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["metrics"] == rep["metrics"]


def test_train_qat_cli_errors_are_one_line(tmp_path):
    for args, text in [(("fmnist-cnn", "--method", "magic"), "unknown QAT method"),
                       (("minilm",), "Fashion-MNIST classifiers"),
                       (("fmnist-cnn", "--bits", "W9A9"), "2 to 8"),
                       (("fmnist-cnn", "--optimizer", "lion"), "unknown optimizer"),
                       (("fmnist-cnn", "--width-lr", "0.5"), "--method fracbits"),
                       (("fmnist-cnn", "--method", "fracbits", "--width-lr", "-1"), "must be positive")]:
        r = run("train-qat", *args, "--out", str(tmp_path / "x"), "--epochs", "1")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and text in lines[0], r.stderr


@pytest.mark.slow
def test_train_qat_cli_research_methods_write_their_reports(tmp_path):
    from slimtorch.io.checkpoint import load_tensors
    from slimtorch.qat.fracbits import load_plan

    common = ("--epochs", "1", "--limit-train", "256", "--batch-size", "128", "--limit", "200", "--device", "cpu",
              "--json")
    # FracBits: the hardened plan is saved, meets the budget, and the model is in the quantize format
    out = tmp_path / "fracbits"
    r = run("train-qat", "fmnist-cnn", "--method", "fracbits", "--bits", "W3A8", "--out", str(out), *common)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    plan = load_plan(out / "plan.json")
    inner = [n for n in plan if n not in ("stem.0", "fc")]
    from slimtorch.zoo import load_model
    fp = load_model("fmnist-cnn")
    sizes = {n: fp.get_submodule(n).weight.numel() for n in inner}
    assert sum(plan[n].weight.bits * sizes[n] for n in inner) / sum(sizes.values()) <= 3.0
    assert rep["layer_bits"] == {n: p.weight.bits for n, p in plan.items()}
    model, meta = load_quantized(out / "model.safetensors")
    acc = next(m for m in rep["metrics"] if m["name"] == "top1_accuracy")
    assert evaluate("fmnist-cnn", model=model, limit=200).metric("top1_accuracy") == acc["quantized"]
    # F8Net: state dict of the fixed-point model; it reloads to the reported accuracy
    out = tmp_path / "f8net"
    r = run("train-qat", "fmnist-cnn", "--method", "f8net", "--bits", "8", "--out", str(out), *common)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    from slimtorch.qat.f8net import F8CNN
    tensors, meta = load_tensors(out / "model.safetensors")
    f8 = F8CNN(fp)
    f8.load_state_dict(tensors)
    acc = next(m for m in rep["metrics"] if m["name"] == "top1_accuracy")
    assert meta["method"] == "f8net"
    assert evaluate("fmnist-cnn", model=f8.eval(), limit=200).metric("top1_accuracy") == acc["quantized"]
    r = run("train-qat", "fmnist-vit", "--method", "f8net", "--bits", "8", "--out", str(tmp_path / "v"), *common)
    assert r.returncode == 2 and "fmnist-cnn" in r.stderr.strip()
    r = run("train-qat", "fmnist-cnn", "--method", "adabin", "--bits", "2", "--out", str(tmp_path / "b"), *common)
    assert r.returncode == 2 and "--bits 1" in r.stderr.strip()
