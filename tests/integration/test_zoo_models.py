"""The shipped and packaged models, measured on real data against oracles."""

import math

import pytest
import torch

from slimtorch.eval import evaluate
from slimtorch.zoo import data, load_model, manifest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name,floor", [("fmnist-cnn", 91.0), ("fmnist-vit", 88.0)])
def test_fmnist_models_full_test_set(name, floor):
    res = evaluate(name)
    acc = res.metric("top1_accuracy")
    assert acc >= floor
    assert acc == pytest.approx(manifest()[name]["fp_metrics"]["top1_accuracy"], abs=0.02)
    assert "10000 images" in res.dataset


def test_tinyllama_far_below_unigram_on_heldout():
    res = evaluate("tinyllama-fm", limit=40)
    ppl, uni = res.metric("heldout_perplexity"), res.metric("unigram_perplexity")
    assert ppl * 10 < uni, (ppl, uni)
    assert 10 <= res.params / 1e6 <= 40


def test_tinyllama_loads_as_transformers_llama_from_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slimtorch.zoo.llama import to_hf
    from slimtorch.zoo.lm_data import hf_tokenizer

    model = load_model("tinyllama-fm")
    to_hf(model).save_pretrained(tmp_path)
    tok = hf_tokenizer()
    tok.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "The built-in function len() returns the number of items in a container."
    ids = tok2(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert tok2.decode(ids[0]) == text
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max().item() < 1e-3
    # the model has learned the corpus: greedy next tokens beat chance by far on this sentence
    nll = torch.nn.functional.cross_entropy(ours[0, :-1], ids[0, 1:]).item()
    assert math.exp(nll) < 100


def test_minilm_reproduces_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from slimtorch.zoo.minilm import package_dir

    sentences = [g.definition for g in data.wordnet_glosses("noun")[:: 997][:64]]
    ours = load_model("minilm").encode(sentences)
    ref = torch.from_numpy(st.SentenceTransformer(str(package_dir()), device="cpu").encode(sentences))
    cos = torch.nn.functional.cosine_similarity(ours.double(), ref.double(), dim=-1)
    assert cos.min().item() >= 1 - 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(sentences)), atol=1e-5)


def test_minilm_retrieval_metric_and_self_agreement():
    model = load_model("minilm")
    res = evaluate("minilm", model=model, reference=model, limit=200)
    assert res.metric("mean_cosine_to_reference") == pytest.approx(1.0, abs=1e-6)
    assert res.metric("retrieval_agreement") == 100.0
    assert res.metric("definition_recall@1") > 30.0  # chance is 0.5% among 200 definitions


def test_efficientnet_lite0_recognises_real_photos():
    model = load_model("efficientnet-lite0")
    from slimtorch.eval.harness import _photo_batch

    names = list(data.LABELLED_PHOTOS)
    with torch.no_grad():
        top5 = model(_photo_batch(names)).topk(5, dim=-1).indices.tolist()
    hits = [n for n, row in zip(names, top5) if set(row) & set(data.LABELLED_PHOTOS[n])]
    assert len(hits) >= 2, hits
