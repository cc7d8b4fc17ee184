"""CBQ: cross-block reconstruction for 2-3-bit weights (Ding et al., "CBQ: Cross-Block Quantization for Large
Language Models"), with LoRA-rounding, learned step sizes, and the per-block reconstruction as its ablation.

Why: at 2-3 bits no rounding of one layer, or one block, is good in isolation: errors of consecutive blocks
interact (a block can undo part of the previous one's error), and GPTQ's and AWQ's layer-wise objectives
cannot see that. CBQ reconstructs a sliding window of consecutive blocks against the float window fed the
same (quantized) input, so the rounding of block i is chosen knowing what block i + 1 makes of it.

Pieces (each a small pure function or module here):

* LoRA-rounding: AdaRound's rounding variable ``h(V) in [0, 1]`` (rectified sigmoid) decides per weight
  whether to round down or up from ``floor(W / s)``; ``V = V0 + A B`` with ``V0`` set so that ``h(V0)`` is the
  fractional part (the start is the float weight itself) and the learned correction of rank r (``A`` zero at
  the start), which needs r (out + in) parameters instead of out x in. AdaRound's regulariser
  ``1 - |2 h - 1|^beta``, with beta annealed from 20 to 2 and its weight raised (``anneal``), drives every
  ``h`` to 0 or 1: at the end the soft weight is a hard rounding.
* Learned step sizes: each channel's (group's) scale multiplies the chosen codes and is trained with them.
* Loss: MSE of the window's output against the float window's, plus the KL divergence of their softmaxes
  over the hidden dimension (CBQ's two terms).
* Windows of ``window`` blocks moving by ``window - overlap``; a block is made final (hard codes, a
  ``QuantLinear``) when the window leaves it, and its quantized outputs become the next inputs.
  ``window=1, overlap=0`` is the plain per-block reconstruction (OmniQuant/BRECQ-like) of the ablation.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.progress import Progress, no_progress
from slimtorch.quant import primitives as P
from slimtorch.quant.modules import quant_type_for, quantize_weight
from slimtorch.sequential import Inputs, advance, block_inputs, find_blocks, first_tensor, set_module
from slimtorch.spec import Plan, QuantSpec

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so that h reaches 0 and 1 exactly


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with ``rectified_sigmoid(V) = h`` for h in (0, 1) (clamped a little inside)."""
    h = h.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def anneal(it: int, iters: int) -> tuple[float, float] | None:
    """(beta, weight factor) of the rounding regulariser at step ``it`` of ``iters``: none in the first fifth
    (the rounding first follows the loss alone, as in AdaRound), then beta from 20 down to 2 while the weight
    grows geometrically by 100x, so that the last steps decide every rounding (with a constant weight, a
    quarter of the variables of a toy layer were still between 0.01 and 0.99 at the end)."""
    warm = iters // 5
    if it < warm:
        return None
    frac = (it - warm) / max(iters - warm - 1, 1)
    return 20 - 18 * frac, 100.0**frac


def rounding_regulariser(h: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's ``mean(1 - |2 h - 1|^beta)``: 0 exactly when every h is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


class LoRARoundLinear(nn.Module):
    """A linear whose weight is ``s (clamp(floor(W / s0) + z + h(V0 + A B)) - z)`` (module docstring), trained in
    float; :meth:`finish` gives the post-training layer with the hard codes."""

    def __init__(self, lin: nn.Linear, spec: QuantSpec, rank: int = 8) -> None:
        super().__init__()
        if spec.is_float:
            raise SlimError(f"cbq learns integer roundings; {spec.dtype} weights have none")
        w = lin.weight.detach().float()
        _, s0, z = quantize_weight(w, spec)  # round to nearest's scale and zero-point: the start
        wg = P.grouped(w, spec)
        self.spec, self.qrange = spec, spec.qrange
        floor = torch.floor(wg / s0)
        self.register_buffer("floor", floor + z)  # the code below the weight (codes carry the zero-point)
        self.register_buffer("zero", z)
        self.register_buffer("v0", inverse_rectified_sigmoid(wg / s0 - floor))
        self.register_buffer("s0", s0)
        self.log_gain = nn.Parameter(torch.zeros_like(s0))  # the learned scale is s0 exp(log_gain): Adam's
        # steps are then relative (a raw scale of ~0.01 moved 10% a step at lr 1e-3, and CBQ lost to RTN)
        out, inp = w.shape
        self.a = nn.Parameter(torch.zeros(out, rank, device=w.device))
        self.b = nn.Parameter(torch.randn(rank, inp, device=w.device) / math.sqrt(inp))
        self.bias = None if lin.bias is None else lin.bias.detach().float()
        self.shape = w.shape

    @property
    def scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.log_gain)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v0 + (self.a @ self.b).reshape(self.v0.shape))

    def codes(self, hard: bool) -> torch.Tensor:
        h = (self.h() >= 0.5).float() if hard else self.h()
        return torch.clamp(self.floor + h, *self.qrange)

    def weight(self, hard: bool = False) -> torch.Tensor:
        return ((self.codes(hard) - self.zero) * self.scale).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def finish(self, lin: nn.Linear, act: QuantSpec | None) -> nn.Module:
        """The post-training module with the hard codes and learned scales (``lin``: the float layer)."""
        with torch.no_grad():
            codes = self.codes(hard=True).reshape(self.shape).to(P.code_dtype(self.spec))
            qp = (codes, self.scale.detach().clone(), self.zero.clone())
        return quant_type_for(lin).from_float(lin, self.spec, act, qp)


def window_loss(y: torch.Tensor, target: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
    """MSE plus the KL divergence of the hidden-dimension softmaxes (target's from the float window)."""
    mse = F.mse_loss(y.float(), target.float())
    kl = F.kl_div(F.log_softmax(y.float(), -1), F.log_softmax(target.float(), -1), log_target=True,
                  reduction="none").sum(-1).mean()  # per token
    return mse + kl_weight * kl


def _run_blocks(blocks: list[nn.Module], args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    for b in blocks:
        x = first_tensor(b(x, *args[1:], **kwargs))
    return x


def cbq(model: nn.Module, plan: Plan, calib, progress: Progress = no_progress, window: int = 2, overlap: int = 1,
        iters: int = 200, lr: float = 1e-3, rank: int = 8, reg: float = 0.01, kl_weight: float = 1.0,
        seed: int = 0) -> list[str]:
    """Quantize the planned weights of ``model``'s blocks by (cross-)block reconstruction (module docstring),
    in place. Layers outside the blocks are rounded to nearest. Returns notes."""
    if not calib:
        raise SlimError("cbq needs calibration data")
    if not 0 <= overlap < window:
        raise SlimError(f"cbq: overlap must be below the window ({window}), got {overlap}")
    names = [n for n, p in plan.items() if p.weight is not None]
    blocks = find_blocks(model, set(names))
    if blocks is None:
        raise SlimError("cbq reconstructs repeated blocks (transformer layers); this model has none")
    list_name, block_list = blocks
    prefix = f"{list_name}."
    notes = []
    for n in names:
        if not n.startswith(prefix):
            layer = model.get_submodule(n)
            set_module(model, n, quant_type_for(layer).from_float(layer, plan[n].weight, plan[n].act))
            notes.append(f"{n}: outside the blocks; rounded to nearest")
    fp_blocks = [copy.deepcopy(b) for b in block_list]
    inputs: Inputs = block_inputs(model, blocks, calib)
    floats: dict[str, nn.Linear] = {}
    learners: dict[str, LoRARoundLinear] = {}

    def prepare(i: int) -> None:
        for n in names:
            if n.startswith(f"{prefix}{i}.") and n not in learners:
                lin = model.get_submodule(n)
                floats[n] = lin
                learners[n] = LoRARoundLinear(lin, plan[n].weight, rank)
                set_module(model, n, learners[n])

    def finish(i: int) -> None:
        for n in [n for n in learners if n.startswith(f"{prefix}{i}.")]:
            set_module(model, n, learners.pop(n).finish(floats.pop(n), plan[n].act))

    gen = torch.Generator().manual_seed(seed)
    step = window - overlap
    starts = list(range(0, max(len(block_list) - window, 0) + 1, step))
    if starts[-1] + window < len(block_list):
        starts.append(len(block_list) - window)
    done = 0  # blocks before this are final, and ``inputs`` are their quantized outputs
    for start in progress(starts, f"cbq windows of {window}"):
        idx = list(range(start, min(start + window, len(block_list))))
        for i in idx:
            prepare(i)
        while done < start:  # advance the inputs through blocks now final
            finish(done)
            inputs = advance(block_list[done], inputs)
            done += 1
        win = [block_list[i] for i in idx]
        fp_win = [fp_blocks[i] for i in idx]
        with torch.no_grad():
            targets = [_run_blocks(fp_win, a, k) for a, k in inputs]
        mods = [m for n, m in learners.items() if int(n[len(prefix):].split(".")[0]) in idx]
        opt = torch.optim.Adam([p for m in mods for p in (m.a, m.b, m.log_gain)], lr=lr)
        for it in range(iters):
            j = int(torch.randint(len(inputs), (1,), generator=gen))
            a, k = inputs[j]
            loss = window_loss(_run_blocks(win, a, k), targets[j], kl_weight)
            sched = anneal(it, iters)
            if sched is not None:
                beta, factor = sched
                loss = loss + reg * factor * sum(rounding_regulariser(m.h(), beta) for m in mods) / len(mods)
            opt.zero_grad()
            loss.backward()
            opt.step()
    while done < len(block_list):
        finish(done)
        done += 1
    return notes

