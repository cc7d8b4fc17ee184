"""A transformers folder is evaluated on a default sample: LOCAL_EVAL_WINDOWS windows spread evenly over the
held-out split (the report says so); --limit N still means the first N windows."""

import pytest
import torch

from slimtorch.eval import evaluate
from slimtorch.eval import metrics as M
from slimtorch.zoo import get_entry, load_model
from slimtorch.zoo.lm_data import logits_of
from slimtorch.zoo.registry import LOCAL_EVAL_WINDOWS
from tests.hostile.folders import tiny_llama_folder


def _perplexity(model, wins):
    nll = n = 0
    with torch.no_grad():
        for i in range(0, len(wins), 8):
            s, c = M.window_nll(logits_of(model(wins[i:i + 8])), wins[i:i + 8])
            nll, n = nll + s, n + c
    return torch.tensor(nll / n).exp().item()


def test_a_folder_is_evaluated_on_an_even_sample_by_default_and_on_the_first_windows_with_a_limit(tmp_path):
    folder = str(tiny_llama_folder(tmp_path / "tl"))
    res = evaluate(folder, latency=False)
    wins = M.windows(get_entry(folder).tokens("heldout"), 512)
    assert len(wins) > LOCAL_EVAL_WINDOWS  # the sample is a sample
    picked = wins[torch.linspace(0, len(wins) - 1, LOCAL_EVAL_WINDOWS).round().long()]
    assert f"{LOCAL_EVAL_WINDOWS} of {len(wins)} windows of 512, evenly spaced" in res.dataset
    assert "default sample" in res.dataset and res.details["windows"] == LOCAL_EVAL_WINDOWS
    model = load_model(folder)
    assert res.metric("heldout_perplexity") == pytest.approx(_perplexity(model, picked), rel=1e-5)
    first = evaluate(folder, limit=3, latency=False)
    assert "the first 3 of" in first.dataset and "default sample" not in first.dataset
    assert first.metric("heldout_perplexity") == pytest.approx(_perplexity(model, wins[:3]), rel=1e-5)
