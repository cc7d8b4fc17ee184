"""Compiled against eager outputs of the quantized tinyllama-fm (torch.compile fullgraph=True, default mode
and mode="reduce-overhead"), with the unquantized bf16 model as the yardstick of what compiling alone
changes. Writes one JSON line per (version, mode): the largest logit difference relative to the logits'
range and the share of positions whose argmax agrees.

    PYTHONPATH=../src python compile_check.py [--versions bf16,W4A16-g128,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
from records import run_header

from slimtorch.kernels import int4_mma
from slimtorch.quantize import quantize_
from slimtorch.zoo import load_model


def compare(model, x, mode: str) -> dict:
    with torch.no_grad():
        eager = model(x).float()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, mode=mode)
        for _ in range(3):
            got = compiled(x).float().clone()
    return {"max_diff_rel": float((got - eager).abs().max() / eager.abs().max()),
            "argmax_agree": float((got.argmax(-1) == eager.argmax(-1)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile_check.jsonl"))
    ap.add_argument("--versions", default="bf16,W4A16-g128,W4A16-g128 no-PDL,W8A8-dynamic,FP8,W4A8")
    args = ap.parse_args()
    head = run_header(torch.cuda.get_device_name())
    base = load_model("tinyllama-fm")
    torch.manual_seed(0)
    x = torch.randint(0, 4096, (2, 64), device="cuda")
    x16 = x[:1, :16].contiguous()
    plain_config = int4_mma.mma_config
    for version in args.versions.split(","):
        q = copy.deepcopy(base)
        if version != "bf16":
            quantize_(q, version.split()[0], [], "rtn")
        int4_mma.mma_config = plain_config
        if version.endswith("no-PDL"):  # the int4 kernel launched without programmatic dependent launch
            int4_mma.mma_config = lambda *a, **k: dataclasses.replace(plain_config(*a, **k), pdl=False, early=False)
        q = q.cuda().to(torch.bfloat16).eval()
        for mode in ("default", "reduce-overhead"):
            for name, inp in (("2x64", x), ("1x16", x16)):
                rec = {**head, "model": "tinyllama-fm", "version": version, "mode": mode, "input": name,
                       **compare(q, inp, mode)}
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps({k: v for k, v in rec.items() if k not in head}), flush=True)
    int4_mma.mma_config = plain_config


if __name__ == "__main__":
    main()
