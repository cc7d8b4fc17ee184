"""Rotations for 4-bit activations (QuaRot, SpinQuant): orthogonal matrices folded into a Llama-architecture
model's weights, so that the activations every quantized linear sees lose their outlier channels while the
float model computes the same function.

Why: W4A4's error is dominated by a few activation channels hundreds of times larger than the rest; per-token
scales are set by them and the other channels fall to one or two codes. A rotation ``x -> x Q`` spreads every
channel over all of them, and a linear reading ``x Q`` computes the same result with its weight ``W Q``.

What is rotated (``rotate_llama``), for tinyllama-fm and transformers' ``LlamaForCausalLM`` alike (the
parameter names are the same):

1. RMSNorm scales are folded into the linears they feed (q/k/v, gate/up, lm_head; the head is untied from
   the embedding first), leaving weightless norms, which commute with a rotation: ``rms(x Q) = rms(x)``.
2. The residual stream: the embedding's rows become ``E Q``, linears reading the stream ``W Q``, linears
   writing to it (o_proj, down_proj) ``Q^T W``.
3. Per head, V and O: ``W_v <- H^T W_v`` on each head's rows and ``W_o <- W_o H`` on each head's columns
   (attention mixes tokens, not channels, so a rotation of V's channels passes through it).
4. Online, before down_proj (its input is made inside the MLP and no weight can absorb a rotation of it):
   ``down_proj`` becomes ``OnlineRotation(H) -> down_proj`` with ``W_down <- W_down H``.
5. Online, Q and K after RoPE (tinyllama-fm's attention only: its Q and K points are modules): ``q H`` and
   ``k H`` leave ``q k^T`` unchanged, and the rotated K is what a 4-bit KV cache stores.

The rotations are random Hadamard matrices (``quant.hadamard``); ``residual`` may also be a given orthogonal
matrix, e.g. a learned one (``learn_rotation``). All folding is done in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.quant.hadamard import random_hadamard
from slimtorch.quant.modules import MatmulInput


class OnlineRotation(nn.Module):
    """``x -> x R`` over the last dimension (R orthogonal, applied in x's dtype; the buffer follows the model's
    dtype like any other)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x.dtype)


class RotatedInput(nn.Sequential):
    """``OnlineRotation`` then the module it feeds (a linear, or a matmul input point): quantization planners
    find the inner module (``.1``), whose input quantizer then sees the rotated input."""

    def __init__(self, matrix: torch.Tensor, inner: nn.Module) -> None:
        super().__init__(OnlineRotation(matrix), inner)


def _layers(model: nn.Module):
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if body is None or layers is None or not hasattr(model, "lm_head") or not hasattr(body, "embed_tokens"):
        raise SlimError("rotation applies to Llama-architecture models (model.embed_tokens, model.layers, "
                        "model.norm, lm_head)")
    return body, layers


def _linear(module: nn.Module) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise SlimError(f"rotation needs float nn.Linear layers; found {type(module).__name__} (rotate before "
                        f"quantizing, and only once)")
    return module


def _set(lin: nn.Linear, w: torch.Tensor) -> None:
    lin.weight.data = w.to(lin.weight.dtype).contiguous()


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        _set(lin, lin.weight.detach().double() * g[None, :])
    norm.weight.data = torch.ones_like(norm.weight)


def rotate_llama(model: nn.Module, seed: int = 0, residual: torch.Tensor | None = None, heads: bool = True,
                 online_down: bool = True, online_qk: bool = True) -> nn.Module:
    """Rotate ``model`` in place (module docstring) and return it. ``residual``: the stream's rotation
    (dim x dim, orthogonal); a random Hadamard matrix from ``seed`` when None."""
    body, layers = _layers(model)
    g = torch.Generator().manual_seed(seed)
    lm_head = _linear(model.lm_head)
    if lm_head.weight is body.embed_tokens.weight:  # tied: the head takes the final norm's scale, the table not
        lm_head.weight = nn.Parameter(body.embed_tokens.weight.detach().clone(), requires_grad=False)
        if hasattr(model, "config") and hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
    dim = body.embed_tokens.weight.shape[1]
    q = random_hadamard(dim, g) if residual is None else residual.detach().double()
    if q.shape != (dim, dim) or not torch.allclose(q @ q.T, torch.eye(dim, dtype=torch.float64), atol=1e-6):
        raise SlimError(f"the residual rotation must be an orthogonal {dim} x {dim} matrix")
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qp, kp, vp, op = (_linear(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        gate, up, down = (_linear(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        _fold_norm(layer.input_layernorm, [qp, kp, vp])
        _fold_norm(layer.post_attention_layernorm, [gate, up])
        hd = qp.weight.shape[0] // _n_heads(attn, qp) if heads or online_qk else 0
        if heads:
            h = random_hadamard(hd, g)
            nv = vp.weight.shape[0] // hd
            wv = vp.weight.detach().double().reshape(nv, hd, -1)
            _set(vp, torch.einsum("dc,hdk->hck", h, wv).reshape(nv * hd, -1))  # H^T W_v per head
            wo = op.weight.detach().double().reshape(op.weight.shape[0], -1, hd)
            _set(op, (wo @ h).reshape(op.weight.shape[0], -1))
        if online_down:
            hf = random_hadamard(down.weight.shape[1], g)
            _set(down, down.weight.detach().double() @ hf)
            mlp.down_proj = RotatedInput(hf.to(down.weight.dtype), down)
        if online_qk and isinstance(getattr(attn, "q_in", None), MatmulInput) \
                and isinstance(getattr(attn, "k_in", None), MatmulInput):
            hq = random_hadamard(hd, g).to(qp.weight.dtype)  # applied online only
            attn.q_in, attn.k_in = RotatedInput(hq, attn.q_in), RotatedInput(hq, attn.k_in)
    _fold_norm(body.norm, [lm_head])
    rotate_residual(model, q)
    return model


def residual_weights(model: nn.Module) -> tuple[nn.Parameter, list[nn.Linear], list[nn.Linear]]:
    """The embedding table, the linears reading the residual stream (q/k/v, gate/up, lm_head) and those writing
    to it (o_proj, down_proj; inside an online rotation where there is one) of a Llama-architecture model."""
    body, layers = _layers(model)
    readers, writers = [], []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        readers += [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
        down = mlp.down_proj[1] if isinstance(mlp.down_proj, RotatedInput) else mlp.down_proj
        writers += [attn.o_proj, down]
    readers.append(model.lm_head)
    return body.embed_tokens.weight, [_linear(m) for m in readers], [_linear(m) for m in writers]


def rotate_residual(model: nn.Module, q: torch.Tensor) -> nn.Module:
    """The residual stream's rotation alone (step 2 of the module docstring), for a model whose norms are
    folded already (by :func:`rotate_llama`): the embedding ``E Q``, readers ``W Q``, writers ``Q^T W``."""
    emb, readers, writers = residual_weights(model)
    q = q.detach().double()
    emb.data = (emb.detach().double() @ q).to(emb.dtype)
    for lin in readers:
        _set(lin, lin.weight.detach().double() @ q)
    for lin in writers:
        _set(lin, q.T @ lin.weight.detach().double())
    return model


def _n_heads(attn: nn.Module, qp: nn.Linear) -> int:
    for name in ("n_heads", "num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            return getattr(attn, name)
    cfg = getattr(attn, "config", None)
    if cfg is not None and isinstance(getattr(cfg, "num_attention_heads", None), int):
        return cfg.num_attention_heads
    hd = getattr(attn, "head_dim", None)
    if isinstance(hd, int):
        return qp.weight.shape[0] // hd
    raise SlimError("cannot tell the attention's number of heads (n_heads / num_heads / config)")
