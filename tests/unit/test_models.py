import math

import pytest
import torch
import torch.nn.functional as F

from slimtorch.zoo.efficientnet import EfficientNetLite0, SameConv2d
from slimtorch.zoo.llama import LlamaConfig, TinyLlama, apply_rope, rope_cos_sin

SMALL = LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)


def _randomised(cfg: LlamaConfig) -> TinyLlama:
    model = TinyLlama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # norms too, so that every weight matters
    return model


def test_llama_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    from slimtorch.zoo.llama import to_hf

    model = _randomised(SMALL)
    hf = to_hf(model)
    assert isinstance(hf, transformers.LlamaForCausalLM)
    ids = torch.randint(0, SMALL.vocab_size, (3, 29))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_llama_is_causal():
    model = _randomised(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_llama_rejects_too_long_input():
    with pytest.raises(ValueError, match="max_seq_len"):
        TinyLlama(SMALL)(torch.zeros(1, 33, dtype=torch.long))


def test_rope_is_a_rotation_by_relative_position():
    d = 16
    cos, sin = rope_cos_sin(40, d, 10000.0)
    q, k = torch.randn(d), torch.randn(d)
    rot = lambda x, pos: apply_rope(x.view(1, 1, 1, d), cos[pos:pos + 1], sin[pos:pos + 1]).flatten()  # noqa: E731
    assert rot(q, 7).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)
    # <R_m q, R_n k> depends only on m - n
    assert torch.dot(rot(q, 9), rot(k, 4)).item() == pytest.approx(torch.dot(rot(q, 30), rot(k, 25)).item(), abs=1e-4)
    # position 1, first pair: angle 1 radian rotates (x_0, x_{d/2})
    x = torch.zeros(d)
    x[0] = 1.0
    y = rot(x, 1)
    assert y[0].item() == pytest.approx(math.cos(1.0), abs=1e-6) and y[d // 2].item() == pytest.approx(math.sin(1.0), abs=1e-6)


@pytest.mark.parametrize("size,k,s", [(224, 3, 2), (112, 5, 2), (14, 5, 1), (7, 3, 1), (15, 3, 2)])
def test_same_padding_matches_tensorflow(size, k, s):
    conv = SameConv2d(1, 1, k, stride=s, bias=False)
    x = torch.randn(1, 1, size, size)
    y = conv(x)
    assert y.shape[-1] == math.ceil(size / s)
    # TensorFlow puts the odd pixel of padding on the bottom/right
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    ref = F.conv2d(F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2)), conv.weight, stride=s)
    assert torch.allclose(y, ref)


def test_efficientnet_lite0_shapes_and_parameter_count():
    model = EfficientNetLite0().eval()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # published: 4.65M
    assert len(model._blocks) == 16
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
