"""Where 2:4 sparsity pays on this GPU (issue 22): dense bf16 ``F.linear`` against the same weight pruned 2:4
and stored semi-structured (torch's ``to_sparse_semi_structured``: the cuSPARSELt and the CUTLASS backends),
at M = 1 .. 8192 rows on LLM shapes, eager and in a CUDA graph, in one run. Weights rotate through enough
copies to spill L2 (timing.rotation_sets), as in kernel_speed.py.

    PYTHONPATH=../src python sparse_speed.py [--shapes 4096x4096,11008x4096,4096x11008] [--rows 1,16,128,2048,8192]
        [--out results/sparse_speed.jsonl]

One JSON line per (shape, M, path, mode): microseconds per call and the speed-up over dense bf16 of the same
mode. A path the stack cannot run (a backend missing, a shape it refuses) is a record with its error, not a
crash. Semi-structured sparse tensors take the sparse operand on the left, so the layer is computed as
``(W_sparse @ x^T)^T``, what torch's own SparseSemiStructured linear does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from records import run_header
from timing import rotation_sets, time_calls

from slimtorch.sparsity.masks import nm_mask


def paths(w: torch.Tensor) -> dict[str, torch.Tensor | str]:
    """{path: weight in that path's form, or the error that stops it}."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    out: dict[str, torch.Tensor | str] = {"dense": w}
    for name, cutlass in (("2:4 cusparselt", False), ("2:4 cutlass", True)):
        SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
        try:
            out[name] = to_sparse_semi_structured(w)
        except Exception as exc:  # noqa: BLE001 - a backend the stack lacks is a record, not a crash
            out[name] = f"{type(exc).__name__}: {exc}"[:300]
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="NxK (out x in)")
    ap.add_argument("--rows", default="1,8,16,64,128,512,2048,8192")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse_speed.jsonl")
    args = ap.parse_args()
    head = run_header(torch.cuda.get_device_name())
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        sets = rotation_sets(n * k * 2)
        g = torch.Generator(device="cuda").manual_seed(0)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(sets)]
        dense = [w * nm_mask(w.abs().float(), 2, 4) for w in dense]
        forms = [paths(w) for w in dense]
        for m in (int(v) for v in args.rows.split(",")):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(sets)]
            base = {}
            for path in forms[0]:
                for mode in ("eager", "graph"):
                    rec = {**head, "shape": [n, k], "rows": m, "path": path, "mode": mode, "sets": sets}
                    if isinstance(forms[0][path], str):
                        rec["error"] = forms[0][path]
                    else:
                        if path == "dense":
                            def fn(i, p=path):
                                return F.linear(xs[i], forms[i][p])
                        else:
                            def fn(i, p=path):
                                return (forms[i][p] @ xs[i].t()).t()
                        try:
                            got = fn(0).float()
                            want = F.linear(xs[0], dense[0]).float()
                            rec["max_rel_err"] = float((got - want).abs().max() / want.abs().max())
                            rec["us"] = time_calls(fn, sets, graph=mode == "graph")
                        except Exception as exc:  # noqa: BLE001
                            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    if path == "dense" and "us" in rec:
                        base[mode] = rec["us"]
                    if "us" in rec and mode in base:
                        rec["speedup_vs_dense"] = base[mode] / rec["us"]
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps({k2: v for k2, v in rec.items() if k2 not in head}), flush=True)


if __name__ == "__main__":
    main()
