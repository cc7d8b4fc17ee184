import json
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtorch", *args], capture_output=True, text=True, timeout=600)


def test_unknown_model_is_one_line_and_exit_2():
    r = run("eval", "resnet9000")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'resnet9000'" in lines[0] and "fmnist-cnn" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_bad_limit_is_one_line_and_exit_2():
    r = run("eval", "fmnist-cnn", "--limit", "0")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "slimtorch: error: --limit must be a whole number from 1 to 1,000,000,000, got 0"], r.stderr


def test_models_lists_the_zoo_with_metrics():
    r = run("models", "--json")
    assert r.returncode == 0
    rows = json.loads(r.stdout)
    assert set(rows) == {"fmnist-cnn", "fmnist-vit", "tinyllama-fm", "minilm", "efficientnet-lite0"}
    assert rows["fmnist-cnn"]["fp_metrics"]["top1_accuracy"] >= 91.0
    table = run("models")
    assert table.returncode == 0 and "tinyllama-fm" in table.stdout


@pytest.mark.slow
def test_eval_json_on_a_slice():
    r = run("eval", "fmnist-cnn", "--limit", "1000", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    acc = next(m["value"] for m in res["metrics"] if m["name"] == "top1_accuracy")
    assert acc > 88.0 and res["params"] == 308_074 and res["latency_ms"] > 0


def test_eval_table_output():
    r = run("eval", "fmnist-cnn", "--limit", "200")
    assert r.returncode == 0, r.stderr
    assert "top1_accuracy" in r.stdout and "CPU latency" in r.stdout
