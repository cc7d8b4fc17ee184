"""A learned residual rotation (SpinQuant): the rotation of the residual stream trained, on the orthogonal
matrices, to minimise the quantized model's language-modelling loss on calibration text.

Why: every random Hadamard rotation spreads outliers, but they differ in how much quantization error they
leave, by several perplexity points at W4A4 in SpinQuant's measurements; the loss of the quantized network
says which one is better, and its gradient says how to move.

How: the model is rotated once with an identity residual rotation (norms folded, heads, online rotations:
``rotate_llama(residual=I)``), so that only ``Q`` is left free. Each step computes the rotated weights from
``Q`` (embedding ``E Q``, readers ``W Q``, writers ``Q^T W``), runs the model with the recipe's weights and
activations fake-quantized (round to nearest with dynamic scales, straight-through gradients), and moves
``Q`` by Cayley SGD: with ``G`` the loss gradient, ``A = G Q^T - Q G^T`` is skew-symmetric and
``Q <- (I + lr/2 A)^-1 (I - lr/2 A) Q`` stays exactly orthogonal. Starts from the random Hadamard rotation
that ``rotate_llama`` would draw with the same seed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from slimtorch.calib.rotate import residual_weights, rotate_llama
from slimtorch.errors import SlimError
from slimtorch.progress import Progress, no_progress
from slimtorch.quant import primitives as P
from slimtorch.quant.hadamard import random_hadamard
from slimtorch.quant.recipe import Recipe, build_plan
from slimtorch.sequential import Batch, set_module
from slimtorch.spec import QuantSpec


def _fake(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale, zero = P.qparams(*P.min_max(x.detach(), spec), spec)
    return P.fake_quant(x, scale, zero, spec)


class _FakeQuantLinear(nn.Linear):
    """A linear whose weight (round to nearest) and input (dynamic) are fake-quantized, for the search only."""

    def __init__(self, lin: nn.Linear, wspec: QuantSpec, act: QuantSpec | None) -> None:
        super().__init__(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device, lin.weight.dtype)
        self.load_state_dict(lin.state_dict())
        self.wspec, self.act_spec = wspec, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.act_spec is None else _fake(x, self.act_spec)
        return F.linear(x, _fake(self.weight, self.wspec), self.bias)


def cayley_step(q: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal matrices (module docstring); the result is orthogonal exactly
    (to rounding) for any ``lr``."""
    a = grad @ q.T - q @ grad.T
    eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye + lr / 2 * a, (eye - lr / 2 * a) @ q)


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def learn_rotation(model: nn.Module, calib: list[Batch], recipe: Recipe, steps: int = 100, lr: float = 1.5,
                   seed: int = 0, batch: int = 8, progress: Progress = no_progress) -> tuple[torch.Tensor, list[float]]:
    """The learned residual rotation of ``model`` (a float Llama-architecture causal LM, left unchanged) for
    ``recipe``, and the training loss at each step. Apply it with ``rotate_llama(model, seed=seed,
    residual=Q)`` (the same seed: the head and online rotations are drawn as here)."""
    if not calib:
        raise SlimError("the learned rotation needs calibration text")
    if recipe.weight is None:
        raise SlimError(f"recipe {recipe.name} quantizes no weights; a rotation is learned against a quantization")
    dim = model.model.embed_tokens.weight.shape[1]
    m = rotate_llama(copy.deepcopy(model).float(), seed=seed, residual=torch.eye(dim, dtype=torch.float64))
    for p in m.parameters():
        p.requires_grad_(False)
    plan, _ = build_plan(m, recipe)
    for name, lp in plan.items():
        if lp.weight is not None:
            set_module(m, name, _FakeQuantLinear(m.get_submodule(name), lp.weight, lp.act))
    emb, readers, writers = residual_weights(m)
    names = {id(t): n for n, t in m.named_parameters(remove_duplicate=False)}
    base = {names[id(emb)]: emb.detach().clone()}
    base.update({names[id(lin.weight)]: lin.weight.detach().clone() for lin in readers + writers})
    reader_names = {names[id(lin.weight)] for lin in readers} | {names[id(emb)]}
    q = random_hadamard(dim, torch.Generator().manual_seed(seed)).float()
    ids_all = torch.cat([b[0] for b in calib])
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in progress(range(steps), "learned rotation"):
        ids = ids_all[torch.randperm(ids_all.shape[0], generator=gen)[:batch]]
        q.requires_grad_(True)
        params = {n: (w @ q if n in reader_names else q.T @ w) for n, w in base.items()}
        loss = _lm_loss(functional_call(m, params, (ids,), strict=False), ids)
        (grad,) = torch.autograd.grad(loss, q)
        losses.append(loss.item())
        with torch.no_grad():
            q = cayley_step(q.detach().double(), grad.double(), lr).float()
    return q.detach().double(), losses
