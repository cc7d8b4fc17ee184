"""Rotations (quant/hadamard.py, calib/rotate.py) and the KV-cache quantizer, against exact identities."""

import copy

import pytest
import torch

from slimtorch.calib.rotate import OnlineRotation, RotatedInput, rotate_llama
from slimtorch.errors import SlimError
from slimtorch.quant.hadamard import has_hadamard, hadamard, random_hadamard, random_orthogonal
from slimtorch.zoo.llama import LlamaConfig, TinyLlama


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 64, 384, 896, 1024])
def test_hadamard_matrices_are_plus_minus_one_and_orthogonal(n):
    h = hadamard(n)
    assert h.shape == (n, n) and bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_orders_without_a_construction_are_refused_and_get_a_random_rotation():
    assert not has_hadamard(6)  # 6 = 2 x 3: no Hadamard matrix of order 6 exists
    with pytest.raises(SlimError, match="order 6"):
        hadamard(6)
    r = random_hadamard(6, torch.Generator().manual_seed(0))
    assert torch.allclose(r @ r.T, torch.eye(6, dtype=torch.float64), atol=1e-12)


def test_random_rotations_are_orthogonal_and_seeded():
    a = random_hadamard(384, torch.Generator().manual_seed(1))
    b = random_hadamard(384, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.allclose(a @ a.T, torch.eye(384, dtype=torch.float64), atol=1e-12)
    o = random_orthogonal(50, torch.Generator().manual_seed(0))
    assert torch.allclose(o.T @ o, torch.eye(50, dtype=torch.float64), atol=1e-12)


def test_a_hadamard_rotation_spreads_an_outlier_channel_evenly():
    x = torch.zeros(1, 64, dtype=torch.float64)
    x[0, 5] = 8.0
    y = x @ random_hadamard(64, torch.Generator().manual_seed(0))
    assert torch.allclose(y.abs(), torch.full_like(y, 1.0))  # 8 / sqrt(64) on every channel


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=112, max_seq_len=32)
    m = TinyLlama(cfg).double()
    with torch.no_grad():  # norms away from 1, so that folding them matters
        for mod in m.modules():
            if type(mod).__name__ == "RMSNorm":
                mod.weight.uniform_(0.5, 1.5)
    return m


def test_the_rotated_float_model_computes_the_same_logits():
    # the exactness test of issue 24: every fold (norms, residual, V/O heads, online down_proj and Q/K)
    m = _tiny()
    ids = torch.randint(0, 97, (3, 20))
    want = m(ids)
    r = rotate_llama(copy.deepcopy(m), seed=3)
    assert isinstance(r.model.layers[0].mlp.down_proj, RotatedInput)
    assert isinstance(r.model.layers[0].self_attn.k_in, RotatedInput)
    assert r.lm_head.weight is not r.model.embed_tokens.weight  # untied: the head took the final norm's scale
    # RMSNorm normalises in float32 (as in transformers), so agreement is to float32 rounding, not float64's
    assert torch.allclose(r(ids), want, atol=1e-5, rtol=1e-5)
    # and the weights did change: the rotation is not the identity
    assert not torch.allclose(r.model.layers[0].self_attn.q_proj.weight, m.model.layers[0].self_attn.q_proj.weight)


def test_a_given_residual_rotation_must_be_orthogonal():
    m = _tiny()
    with pytest.raises(SlimError, match="orthogonal 48 x 48"):
        rotate_llama(m, residual=torch.ones(48, 48))


def test_rotating_twice_or_a_quantized_model_is_refused():
    m = rotate_llama(_tiny())
    with pytest.raises(SlimError, match="nn.Linear"):
        rotate_llama(m)


def test_online_rotation_is_x_times_the_matrix():
    r = OnlineRotation(hadamard(4) / 2)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(r(x), x @ (hadamard(4) / 2))


def test_the_kv_cache_quantizer_matches_a_hand_computed_case():
    # dynamic asymmetric uint4, one scale per token and head: a row of K holding 0..15 * 0.1 is exact (16
    # levels over its range, which holds 0), and a row [-1, 0, 0.45, 2, 0...] has scale 3/15 = 0.2 and zero
    # 5: codes 0, 5, 7 (2.25 + 5 rounded), 15 -> values -1, 0, 0.4, 2
    from slimtorch.quant.modules import ActQuant
    from slimtorch.spec import PerToken, QuantSpec

    q = ActQuant(QuantSpec("uint4", PerToken(), symmetric=False, dynamic=True))
    k = torch.zeros(1, 1, 2, 16)
    k[0, 0, 0] = torch.arange(16) * 0.1
    k[0, 0, 1, :4] = torch.tensor([-1.0, 0.0, 0.45, 2.0])
    k[0, 0, 1, 4:] = 0.0
    out = q(k)
    assert torch.allclose(out[0, 0, 0], k[0, 0, 0], atol=1e-6)
    assert torch.allclose(out[0, 0, 1, :4], torch.tensor([-1.0, 0.0, 0.4, 2.0]), atol=1e-6)


def test_a_kv_cache_recipe_quantizes_k_and_v_only():
    import dataclasses

    from slimtorch.quant.recipe import build_plan, get_preset
    from slimtorch.spec import PerToken, QuantSpec

    kv = QuantSpec("uint4", PerToken(), symmetric=False, dynamic=True)
    rec = dataclasses.replace(get_preset("W4A4"), kv_cache=kv)
    plan, _ = build_plan(_tiny().float(), rec)
    points = {n.rsplit(".", 1)[1]: p.act for n, p in plan.items() if n.endswith(("_in", "probs"))}
    assert points == {"k_in": kv, "v_in": kv}
    rot = rotate_llama(_tiny().float())
    plan, _ = build_plan(rot, rec)
    assert "model.layers.0.self_attn.k_in.1" in plan and "model.layers.0.mlp.down_proj.1" in plan


def test_a_cayley_step_keeps_the_matrix_orthogonal_and_descends_a_quadratic():
    # f(Q) = ||Q - T||^2 for an orthogonal target T: one small step from I moves towards T and stays orthogonal
    from slimtorch.calib.learned_rotation import cayley_step

    t = random_hadamard(12, torch.Generator().manual_seed(0))
    if torch.linalg.det(t) < 0:  # steps from I stay among rotations (det +1); a reflection is out of reach
        t[0] = -t[0]
    q = torch.eye(12, dtype=torch.float64)
    for _ in range(200):
        q = cayley_step(q, 2 * (q - t), 0.05)
        assert torch.allclose(q @ q.T, torch.eye(12, dtype=torch.float64), atol=1e-10)
    assert (q - t).norm() < 0.05 * (torch.eye(12, dtype=torch.float64) - t).norm()


def test_the_learned_rotation_lowers_the_quantized_loss_and_keeps_the_float_model():
    from slimtorch.calib.learned_rotation import learn_rotation
    from slimtorch.quant.recipe import get_preset

    m = _tiny().float()
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    q, losses = learn_rotation(m, [(ids,)], get_preset("W4A4"), steps=15, lr=0.5, batch=4)
    assert torch.allclose(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-6)
    assert losses[-1] < losses[0]  # one fixed batch: the steps descend its loss
    want = m(ids)
    r = rotate_llama(copy.deepcopy(m), seed=0, residual=q)
    assert torch.allclose(r(ids), want, atol=1e-4, rtol=1e-4)  # still an exact rotation of the float model
