"""End-to-end decode speed of a Llama-7B-shaped decoder at batch 1 (random weights: speed only).

    PYTHONPATH=src python benchmarks/decode.py [--layers 32] [--context 1024] [--out DIR]

Three versions of one model: bf16; our int4 weight-only (uint4, groups of 128, RTN) through
QuantLinear, which dispatches to slimtorch.kernels on CUDA; torchao's int4 weight-only (tinygemm).
q/k/v and gate/up are fused into one linear each, as
serving engines do. The block linears are quantized; embeddings and the LM head stay bf16 in all three. One decode step
(every layer, attention over a KV cache of --context positions, the LM head) is captured in a CUDA
graph and replayed; tokens/s = 1 / median step time. Eager steps are timed too. Appends records to
DIR/decode.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from timing import cuda_graph, median_us
from records import run_header

from slimtorch.quant.modules import QuantLinear
from slimtorch.sequential import set_module
from slimtorch.spec import PerGroup, QuantSpec

LLAMA_7B = {"d": 4096, "ffn": 11008, "heads": 32, "vocab": 32000}


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6)


class Block(nn.Module):
    def __init__(self, d: int, ffn: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.n1, self.n2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.qkv_proj, self.o_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_up_proj, self.down_proj = nn.Linear(d, 2 * ffn, bias=False), nn.Linear(ffn, d, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, heads, context, d // heads))
        self.register_buffer("v_cache", torch.zeros(1, heads, context, d // heads))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = rms(x, self.n1)
        q, k, v = self.qkv_proj(h).view(1, 1, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache)  # the whole cache: fixed cost per step
        x = x + self.o_proj(a.transpose(1, 2).reshape(1, 1, -1))
        h = rms(x, self.n2)
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, layers: int, context: int, d: int, ffn: int, heads: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, ffn, heads, context) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed(token).view(1, 1, -1)
        for b in self.blocks:
            x = b(x, pos)
        return self.lm_head(rms(x, self.norm))


def block_linears(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def ours_int4(model: nn.Module) -> nn.Module:
    spec = QuantSpec("uint4", PerGroup(128), symmetric=False)
    for name, lin in block_linears(model):
        set_module(model, name, QuantLinear.from_float(lin, spec, None))
    return model


def torchao_int4(model: nn.Module) -> nn.Module:
    import torchao.quantization as tq

    cfg = tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    tq.quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("blocks."))
    return model


def time_steps(model: nn.Module, steps: int = 30, trials: int = 5) -> tuple[float, float]:
    """(graph us, eager us) per decode step, medians."""
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            model(token, pos)
        torch.cuda.synchronize()
        g = cuda_graph(lambda i: model(token, pos), 1)

        def measure(step) -> float:
            def run():
                for _ in range(steps):
                    step()
            return median_us(run, steps, trials)

        return measure(g.replay), measure(lambda: model(token, pos))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--no-torchao", action="store_true")
    args = ap.parse_args()
    common = {**run_header(torch.cuda.get_device_name()), "model": "llama-7b-shaped", "layers": args.layers,
              "context": args.context, "batch": 1}
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = Decoder(args.layers, args.context, **LLAMA_7B)
    for p in base.parameters():
        p.data.normal_(0, 0.02)
    base = base.bfloat16().eval()
    versions = {"bf16": lambda: base, "ours_int4wo": lambda: ours_int4(copy.deepcopy(base))}
    if not args.no_torchao:
        versions["torchao_int4wo"] = lambda: torchao_int4(copy.deepcopy(base))
    token = torch.tensor([1], device="cuda")
    pos = torch.tensor([0], device="cuda")
    with torch.no_grad():
        ref = base(token, pos).float()
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = None
    for name, make in versions.items():
        rec = {**common, "method": name}
        try:
            model = make()
            with torch.no_grad():
                y = model(token, pos).float()
            rec["logits_rel_err_vs_bf16"] = ((y - ref).norm() / ref.norm()).item()
            rec["graph_us"], rec["eager_us"] = time_steps(model)
            rec["tokens_per_s"] = 1e6 / rec["graph_us"]
            rec["tokens_per_s_eager"] = 1e6 / rec["eager_us"]
            if name == "bf16":
                baseline = rec
            else:
                rec["speedup"] = baseline["graph_us"] / rec["graph_us"]
                rec["speedup_eager"] = baseline["eager_us"] / rec["eager_us"]
            if model is not base:
                del model
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(json.dumps(rec), flush=True)
        with open(args.out / "decode.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
