"""Quantizers on attention's weightless matmul inputs (Q, K, V, softmax probabilities)."""

import copy

import torch
from torch import nn

from slimtorch.export.quantized import load_quantized, save_quantized
from slimtorch.quant.modules import ActQuant, MatmulInput
from slimtorch.quant.recipe import build_plan, get_preset, load_recipe
from slimtorch.quantize import quantize_
from slimtorch.zoo.llama import LlamaConfig, TinyLlama
from slimtorch.zoo.vit import FmnistViT


def _recipe(tmp_path, attention="{dtype: int8, granularity: tensor, symmetric: false}", preset="W8A8"):
    p = tmp_path / "attn.yaml"
    p.write_text(f"preset: {preset}\nattention: {attention}\n")
    return load_recipe(p)


def _vit():
    torch.manual_seed(0)
    return FmnistViT(dim=48, depth=2, heads=3).eval()


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 28, 28, generator=g),) for _ in range(n)]


def test_attention_points_join_the_plan_only_when_the_recipe_asks(tmp_path):
    model = _vit()
    plan, _ = build_plan(model, _recipe(tmp_path))
    points = sorted(n for n, p in plan.items() if p.weight is None)
    assert points == sorted(f"blocks.{i}.attn.{k}" for i in range(2) for k in ("q_in", "k_in", "v_in", "probs"))
    plan, _ = build_plan(model, get_preset("W8A8"))
    assert all(p.weight is not None for p in plan.values())


def test_quantized_probabilities_are_calibrated_on_the_softmax_range_and_round_trip(tmp_path):
    fp = _vit()
    q = copy.deepcopy(fp)
    quantize_(q, _recipe(tmp_path), _images(), "rtn")
    probs = q.blocks[0].attn.probs
    assert isinstance(probs, ActQuant)
    hi = (probs.spec.qrange[1] - probs.zero) * probs.scale  # largest representable value
    assert 0.0 < hi.item() <= 1.0 + 1e-6 and probs.zero.item() == probs.spec.qrange[0]  # [0, max p]: min is 0
    x = _images(1, seed=9)[0][0]
    with torch.no_grad():
        err = ((q(x) - fp(x)).norm() / fp(x).norm()).item()
    assert err < 0.05
    save_quantized(q, tmp_path / "q.safetensors", base="vit")
    back, meta = load_quantized(tmp_path / "q.safetensors", base_model=_vit())
    assert len(meta["points"]) == 8
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_fewer_attention_bits_cost_more_accuracy(tmp_path):
    fp = _vit()
    x = _images(1, seed=9)[0][0]
    errs = []
    for dtype in ("int8", "uint4", "uint2"):
        q = copy.deepcopy(fp)
        quantize_(q, _recipe(tmp_path, f"{{dtype: {dtype}, granularity: tensor, symmetric: false}}", "W8A8"),
                  _images(), "rtn")
        with torch.no_grad():
            errs.append(((q(x) - fp(x)).norm() / fp(x).norm()).item())
    assert errs[0] < errs[1] < errs[2]


def test_llama_explicit_attention_matches_the_fused_kernel():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)
    model = TinyLlama(cfg).eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        fused = model(ids)
        for layer in model.model.layers:
            layer.self_attn.probs = nn.Identity()  # not a MatmulInput: takes the explicit softmax path
        explicit = model(ids)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert all(type(m) is MatmulInput for n, m in model.named_modules() if n.endswith(("q_in", "k_in", "v_in")))


def test_attention_recipe_on_a_model_without_points_says_so(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16)).eval()
    g = torch.Generator().manual_seed(0)
    rep = quantize_(model, _recipe(tmp_path), [(torch.randn(8, 16, generator=g),)], "rtn")
    assert any("no MatmulInput points" in n for n in rep.notes)
