"""Shared-input groups, exact folding of smoothing scales, AWQ's searches: against float references."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from slimtorch.calib.groups import find_groups
from slimtorch.calib.smoothing import clip_search
from slimtorch.hooks import TemporaryHooks
from slimtorch.quant import primitives as P
from slimtorch.quant.modules import quantize_weight
from slimtorch.quant.recipe import get_preset
from slimtorch.quantize import quantize_
from slimtorch.spec import PerChannel, PerGroup, QuantSpec
from slimtorch.zoo.llama import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)


def _llama():
    torch.manual_seed(0)
    m = TinyLlama(CFG).eval()
    with torch.no_grad():  # norms away from 1, so folding into them is visible
        for layer in m.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return m


def _ids(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, CFG.vocab_size, (4, 16), generator=g),) for _ in range(n)]


def _block_inputs(model, ids):
    seen = []

    def grab(mod, args, kwargs):
        seen.append((args, kwargs))

    with TemporaryHooks() as hooks, torch.no_grad():
        hooks.before(model.model.layers[0], grab, with_kwargs=True)
        model(*ids)
    return seen


def test_llama_block_groups_and_their_producers_are_found_by_running_it():
    model = _llama()
    block = model.model.layers[0]
    names = [f"model.layers.0.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    groups = find_groups(model, block, names, _block_inputs(model, _ids(1)[0]))
    got = {tuple(n.rsplit(".", 1)[-1] for n in g.layers): (g.producer or "").rsplit(".", 1)[-1] for g in groups}
    # q/k/v read the input norm; gate/up the post-attention norm; down reads silu(gate) * up, which is
    # linear in up's output rows; o reads attention output, which no module can absorb exactly
    assert got == {("q_proj", "k_proj", "v_proj"): "input_layernorm", ("o_proj",): "",
                   ("gate_proj", "up_proj"): "post_attention_layernorm", ("down_proj",): "up_proj"}
    assert {g.inspect.rsplit(".", 1)[-1] for g in groups} == {"self_attn", "o_proj", "mlp", "down_proj"}


class PostNorm(nn.Module):
    """BERT-style: the norm's output also feeds the residual, so a scale folded into it changes the output."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        h = self.norm(x)
        return self.out(h + torch.relu(self.fc(h)))


def test_a_norm_that_also_feeds_a_residual_is_not_a_producer():
    torch.manual_seed(0)
    m = PostNorm().eval()
    groups = find_groups(m, m, ["fc", "out"], [((torch.randn(8, 16),), {})])
    assert {tuple(g.layers): g.producer for g in groups} == {("fc",): None, ("out",): None}


@pytest.mark.parametrize("method,preset", [("smoothquant", "W8A8"), ("awq", "W4A16-g128")])
def test_rescaling_folds_into_norms_and_keeps_the_model_close(method, preset):
    fp = _llama()
    q = copy.deepcopy(fp)
    norm_before = fp.model.layers[0].input_layernorm.weight.clone()
    rec = get_preset(preset)
    if method == "awq":  # the tiny model's widths (32, 48) need a group size that divides them
        rec = replace(rec, weight=replace(rec.weight, granularity=PerGroup(16)))
    rep = quantize_(q, rec, _ids(4), method)
    layer = q.model.layers[0]
    assert not torch.equal(layer.input_layernorm.weight, norm_before)  # 1/s folded into the norm
    assert layer.self_attn.q_proj.inv_smooth is None and layer.mlp.down_proj.inv_smooth is None
    assert layer.self_attn.o_proj.inv_smooth is not None  # nothing to fold into: explicit multiply
    assert any("o_proj" in n for n in rep.notes)
    x = _ids(1, seed=5)[0][0]
    with torch.no_grad():
        err = ((q(x) - fp(x)).norm() / fp(x).norm()).item()
    assert err < (0.03 if method == "smoothquant" else 0.15)


def test_clip_search_never_worse_than_no_clipping_and_shrinks_an_outlier_group():
    torch.manual_seed(0)
    W = torch.randn(8, 64)
    W[0, 5] = 12.0  # one outlier widens group 0 of row 0
    x = torch.randn(512, 64)
    spec = QuantSpec("uint4", PerGroup(32), symmetric=False)
    scale, zero = clip_search(W, x, spec)
    plain = quantize_weight(W, spec)

    def err(codes, s, z):
        d = (P.dequantize(codes, s, z, spec) - W).reshape(8, 2, 32)
        return torch.einsum("ngk,ogk->nog", x.reshape(-1, 2, 32), d).pow(2).mean(0)  # (out, group)

    e_clip, e_plain = err(*quantize_weight(W, spec, scale, zero)), err(*plain)
    assert (e_clip <= e_plain + 1e-6).all()  # shrink 0 is in the grid
    assert e_clip.sum() < e_plain.sum()
    assert scale[0, 0, 0] < plain[1][0, 0, 0]  # the outlier group's range was shrunk


def test_clip_search_returns_the_scale_shape_of_its_granularity():
    W, x = torch.randn(8, 64), torch.randn(100, 64)
    for spec, shape in ((QuantSpec("int4", PerChannel(0)), (8, 1)),
                        (QuantSpec("uint4", PerGroup(32), symmetric=False), (8, 2, 1))):
        scale, zero = clip_search(W, x, spec)
        assert scale.shape == zero.shape == shape == quantize_weight(W, spec)[1].shape
        # the search includes the full range, so its output error on x is never above round-to-nearest's
        err_clip = (x @ (P.dequantize(*quantize_weight(W, spec, scale, zero), spec) - W).T).pow(2).mean()
        err_rtn = (x @ (P.dequantize(*quantize_weight(W, spec), spec) - W).T).pow(2).mean()
        assert err_clip <= err_rtn * (1 + 1e-6) and err_clip < err_rtn
