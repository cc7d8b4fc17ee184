import copy
import json

import pytest
from clitools import one_line_error, run

from slimtorch.calib.data import calibration_set
from slimtorch.eval import evaluate
from slimtorch.export.quantized import load_quantized
from slimtorch.quantize import quantize_
from slimtorch.zoo import load_model, manifest


@pytest.mark.slow
def test_quantize_cli_writes_a_model_that_reloads_to_the_same_accuracy(tmp_path):
    out = tmp_path / "q"
    r = run("quantize", "fmnist-cnn", "--preset", "W8A8", "--out", str(out), "--limit", "2000", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert json.loads((out / "report.json").read_text())["metrics"] == rep["metrics"]
    acc = next(m for m in rep["metrics"] if m["name"] == "top1_accuracy")
    assert abs(acc["quantized"] - acc["fp"]) < 1.0
    model, meta = load_quantized(out / "model.safetensors")
    assert meta["recipe"] == "W8A8" and meta["method"] == "rtn"
    assert evaluate("fmnist-cnn", model=model, limit=2000).metric("top1_accuracy") == acc["quantized"]
    assert rep["size"]["quantized_file_bytes"] < 0.3 * rep["size"]["fp_bytes"]


@pytest.mark.slow
def test_fmnist_cnn_w8a8_within_half_a_point_on_the_full_test_set():
    fp = load_model("fmnist-cnn")
    q = copy.deepcopy(fp)
    quantize_(q, "W8A8", calibration_set("fmnist-cnn"), "rtn")
    acc = evaluate("fmnist-cnn", model=q).metric("top1_accuracy")
    assert abs(acc - manifest()["fmnist-cnn"]["fp_metrics"]["top1_accuracy"]) <= 0.5


def test_bad_inputs_are_one_line_exit_2_and_leave_no_model(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(run("quantize", "fmnist-cnn", "--preset", "W8A8", "--out", str(afile)), "is a file")
    one_line_error(run("quantize", "fmnist-cnn", "--preset", "W5", "--out", str(tmp_path / "o")), "unknown preset")
    one_line_error(run("quantize", "fmnist-cnn", "--out", str(tmp_path / "o")), "exactly one of --preset")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: W8A8\nignore: ['re:[']\n")
    one_line_error(run("quantize", "fmnist-cnn", "--recipe", str(recipe), "--out", str(tmp_path / "o")),
                   "not a valid regex")
    one_line_error(run("quantize", "nope", "--preset", "W8A8", "--out", str(tmp_path / "o")), "unknown model")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """tinyllama-fm written by transformers' save_pretrained, with its tokenizer: a folder not in the zoo."""
    from slimtorch.zoo.llama import to_hf
    from slimtorch.zoo.lm_data import hf_tokenizer

    d = tmp_path_factory.mktemp("hf") / "tinyllama-saved"
    to_hf(load_model("tinyllama-fm")).save_pretrained(d)
    hf_tokenizer().save_pretrained(d)
    return d


@pytest.mark.slow
def test_a_save_pretrained_folder_quantizes_exactly_like_the_zoo_entry(tmp_path, hf_folder):
    args = ["--preset", "W4A16-g128", "--method", "awq", "--limit", "4", "--calib-samples", "8", "--json"]
    a = run("quantize", str(hf_folder), *args, "--out", str(tmp_path / "a"))
    b = run("quantize", "tinyllama-fm", *args, "--out", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    assert ra["model"] == str(hf_folder.resolve())
    assert ra["quantized_layers"] == rb["quantized_layers"] and ra["skipped_layers"] == rb["skipped_layers"]
    for ma, mb in zip(ra["metrics"], rb["metrics"]):  # same tokens, same windows, same quantization
        assert ma["name"] == mb["name"] and ma["quantized"] == pytest.approx(mb["quantized"], rel=1e-4)
    model, meta = load_quantized(tmp_path / "a" / "model.safetensors")  # rebuilt from the folder
    ppl = evaluate(str(hf_folder), model=model, limit=4).metric("heldout_perplexity")
    assert ppl == pytest.approx(ra["metrics"][0]["quantized"], rel=1e-6)


def test_bad_folders_and_calibration_text_are_one_line_exit_2(tmp_path, hf_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run("quantize", str(empty), "--preset", "W8A8", "--out", str(tmp_path / "o")), "without config.json")
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    one_line_error(run("quantize", str(hf_folder), "--preset", "W8A8", "--calib", str(short), "--out",
                       str(tmp_path / "o")), "needs more than 512")
    one_line_error(run("quantize", "fmnist-cnn", "--preset", "W8A8", "--calib", str(short), "--out",
                       str(tmp_path / "o")), "applies to language models")
    assert not (tmp_path / "o").exists()
