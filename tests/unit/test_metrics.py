import math
import time

import pytest
import torch
from torch import nn

from slimtorch.eval import metrics as M


def test_top1_and_topk_closed_form():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5], [0.0, 0.4, 0.6]])
    labels = torch.tensor([1, 0, 0, 2])
    assert M.top1_accuracy(logits, labels) == pytest.approx(75.0)
    assert M.topk_hits(logits, [{1}, {2}, {0}, {0}], k=2) == 2  # rows 0 and 1 hit; rows 2 and 3 rank class 0 last
    assert M.top1_agreement(logits, logits.flip(0)) == pytest.approx(0.0)


def test_window_nll_uniform_logits_is_log_vocab():
    v = 50
    ids = torch.randint(0, v, (3, 17))
    s, n = M.window_nll(torch.zeros(3, 17, v), ids)
    assert n == 3 * 16 and s / n == pytest.approx(math.log(v), rel=1e-6)


def test_windows_drop_the_tail():
    w = M.windows(torch.arange(23), 5)
    assert w.shape == (4, 5) and w[-1].tolist() == [15, 16, 17, 18, 19]
    assert M.windows(torch.arange(23), 5, limit=2).shape == (2, 5)


def test_unigram_perplexity_closed_form():
    # Train counts (+1 smoothing): token 0 -> 4, token 1 -> 2, token 2 -> 1, token 3 -> 1 (total 8).
    train = torch.tensor([0, 0, 0, 1])
    evalw = torch.tensor([[3, 0, 1]])  # predicted tokens: 0 and 1
    expected = math.exp(-(math.log(4 / 8) + math.log(2 / 8)) / 2)
    assert M.unigram_perplexity(train, evalw, vocab_size=4) == pytest.approx(expected)


def test_cosine_and_retrieval():
    a = torch.randn(20, 8)
    assert torch.allclose(M.cosine_to_reference(a, 3 * a), torch.ones(20, dtype=torch.float64))
    assert M.cosine_to_reference(a, -a).max().item() == pytest.approx(-1.0)
    q = torch.eye(4)
    keys = torch.eye(4)[[2, 0, 3, 1]]
    assert M.nearest(q, keys).tolist() == [1, 3, 0, 2]
    assert M.retrieval_agreement(q, keys, q, keys) == 100.0
    assert M.retrieval_agreement(q, keys, q, torch.eye(4)) == 0.0


def test_model_size_counts_tied_weights_once():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "bn": nn.BatchNorm1d(4)})
    # 40 tied floats + BN weight/bias/mean/var (4 each) + num_batches_tracked (int64)
    assert M.model_size_bytes(model) == 40 * 4 + 4 * 4 * 4 + 8
    assert M.param_count(model) == 40 + 8


def test_cpu_latency_median():
    calls = []
    ms = M.cpu_latency_ms(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and 0 <= ms < 50


def test_interleaved_latency_times_each_function_in_turn_after_its_warm_up():
    order = []

    def slow_first(name, ms):
        def fn():
            order.append(name)
            time.sleep(0.2 if order.count(name) == 1 else ms / 1e3)  # the first call: 200 ms (cold)
        return fn

    lat = M.interleaved_latency({"a": slow_first("a", 2.0), "b": slow_first("b", 8.0)}, trials=9, warmup=2)
    assert order[:4] == ["a", "a", "b", "b"] and order[4:] == ["a", "b"] * 9  # warm-ups, then in turn
    assert lat["a"].trials == lat["b"].trials == 9
    # sleeps are lower bounds; the cold first calls were warm-ups, so no timing comes near 200 ms
    assert 2.0 <= lat["a"].p10_ms <= lat["a"].median_ms <= lat["a"].p90_ms < 100
    assert 8.0 <= lat["b"].median_ms < 100 and lat["b"].median_ms - lat["a"].median_ms > 4.0
