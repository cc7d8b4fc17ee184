"""Transformers families the project never trained (small random-weight models saved with save_pretrained,
a byte-level BPE tokenizer with an end-of-text token) quantize through the Python API and the CLI, and an
encoder through AutoModel. Oracles: every linear layer but the head is quantized (counted from the
transformers model itself), W8A8 stays within 1% of FP perplexity (cosine 0.999 for the encoder), and the
saved file reloads to the same numbers."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from clitools import run

sys.path.insert(0, str(Path(__file__).parents[1]))
from families import CAUSAL, ENCODER, VOCAB, byte_level_tokenizer, save_family  # noqa: E402

from slimtorch.calib.data import calibration_set  # noqa: E402
from slimtorch.eval import evaluate  # noqa: E402
from slimtorch.export.quantized import load_quantized  # noqa: E402
from slimtorch.quantize import quantize_  # noqa: E402
from slimtorch.zoo import get_entry, load_model  # noqa: E402

FAMILIES = [*CAUSAL, *ENCODER]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: save_family(f, root / f) for f in FAMILIES}


def linear_layers(folder: Path) -> set[str]:
    """Names of the transformers model's linear layers (nn.Linear or GPT-2's Conv1D), head excluded."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if folder.name in ENCODER else AutoModelForCausalLM
    model = auto.from_pretrained(str(folder))
    prefix = "bert." if folder.name in ENCODER else ""  # our sentence encoder holds the model as .bert
    return {prefix + n for n, m in model.named_modules()
            if type(m).__name__ in ("Linear", "Conv1D") and n != "lm_head" and not n.endswith("pooler.dense")}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_quantizes_through_the_api(folders, family):
    folder = str(folders[family])
    entry = get_entry(folder)
    assert entry.task == ("sentence-embedding" if family in ENCODER else "causal-lm")
    fp = load_model(folder)
    q = copy.deepcopy(fp)
    report = quantize_(q, "W8A8", calibration_set(folder, 16, model=fp), "rtn")
    want = linear_layers(folders[family])
    assert want <= set(report.quantized) and all("pooler" in n for n in set(report.quantized) - want)
    res = evaluate(folder, model=q, reference=fp, limit=4 if family in CAUSAL else 200)
    ref = evaluate(folder, model=fp, limit=4 if family in CAUSAL else 200)
    if family in CAUSAL:
        ppl, fp_ppl = res.metric("heldout_perplexity"), ref.metric("heldout_perplexity")
        assert abs(ppl / fp_ppl - 1) < 0.01 and res.metric("next_token_agreement") > 90
    else:
        assert res.metric("min_cosine_to_reference") > 0.999


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_quantizes_through_the_cli_and_reloads(folders, family, tmp_path):
    folder = folders[family]
    limit = "4" if family in CAUSAL else "200"
    r = run("quantize", str(folder), "--preset", "W8A8", "--limit", limit, "--calib-samples", "16",
            "--out", str(tmp_path / "q"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["model"] == str(folder.resolve()) and len(rep["quantized_layers"]) >= len(linear_layers(folder))
    model, _ = load_quantized(tmp_path / "q" / "model.safetensors")
    again = evaluate(str(folder), model=model, limit=int(limit))
    first = rep["metrics"][0]
    assert again.metric(first["name"]) == pytest.approx(first["quantized"], rel=1e-6)


def test_tokenizers_that_do_not_fit_the_model_are_one_line_errors(tmp_path, folders):
    import shutil

    from transformers import AutoConfig

    big = tmp_path / "big-tokenizer"
    shutil.copytree(folders["qwen2"], big)
    cfg = AutoConfig.from_pretrained(str(big))
    tok = byte_level_tokenizer(VOCAB + 64)  # 448 tokens for an embedding of 384
    tok.save_pretrained(big)
    assert len(tok) > cfg.vocab_size
    r = run("quantize", str(big), "--preset", "W8A8", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "ids beyond the model's vocab_size 384" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()

    no_eos = tmp_path / "no-eos"
    shutil.copytree(folders["mistral"], no_eos)
    cfg_file = no_eos / "tokenizer_config.json"
    raw = json.loads(cfg_file.read_text())
    raw.pop("eos_token", None)
    cfg_file.write_text(json.dumps(raw))
    r = run("eval", str(no_eos), "--limit", "1")
    assert r.returncode == 2 and "no end-of-sequence token" in r.stderr, r.stderr


def test_hf_export_refuses_gpt2_conv1d_layers_in_one_line(folders, tmp_path):
    r = run("quantize", str(folders["gpt2"]), "--preset", "W8A8", "--limit", "2", "--calib-samples", "8",
            "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    r = run("export", str(tmp_path / "q"), "--format", "hf")
    assert r.returncode == 2 and "Conv1D" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_gpt2_conv1d_becomes_an_equal_linear():
    from transformers.pytorch_utils import Conv1D

    from slimtorch.zoo.local import linearize_conv1d

    m = torch.nn.Sequential(Conv1D(12, 8))
    x = torch.randn(3, 8)
    want = m(x)
    assert linearize_conv1d(m) == 1 and isinstance(m[0], torch.nn.Linear)
    assert torch.allclose(m(x), want, atol=1e-6)
