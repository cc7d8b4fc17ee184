"""Where 2:4 sparsity pays on this GPU (issue 22): dense bf16 ``F.linear`` against the same weight pruned 2:4
and stored semi-structured (torch's ``to_sparse_semi_structured``: the cuSPARSELt and the CUTLASS backends),
at M = 1 .. 8192 rows on LLM shapes, eager and in a CUDA graph, in one run. Weights rotate through enough
copies to spill L2 (timing.rotation_sets), as in kernel_speed.py.

    PYTHONPATH=../src python sparse_speed.py [--shapes 4096x4096,11008x4096,4096x11008] [--rows 1,16,128,2048,8192]
        [--out results/sparse_speed.jsonl]

fp8 (e4m3): dense through ``torch._scaled_mm`` and 2:4 through cuSPARSELt (``torch._cslt_compress`` /
``_cslt_sparse_mm``), the pair ModelOpt's FP8 2:4 figures compare; the ``tuned`` paths (bf16 and fp8) run
the algorithm cuSPARSELt's own search picks (``_cslt_sparse_mm_search``) instead of its default. The fp8
error is measured against the bf16 product of the same (fp8-rounded inputs are not re-derived), so it
includes fp8 rounding.

One JSON line per (shape, M, path, mode): microseconds per call, the speed-up over dense bf16 of the same
mode, and for the fp8 2:4 paths over dense fp8. A path the stack cannot run (a backend missing, a shape it
refuses) is a record with its error, not a crash. Semi-structured sparse tensors take the sparse operand on the left, so the layer is computed as
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


FP8 = torch.float8_e4m3fn
ONE = None  # the unit scale of the fp8 paths, made on the GPU at first use


def fp8_dense(w8: torch.Tensor, x8: torch.Tensor) -> torch.Tensor:
    """Dense fp8 (e4m3, unit per-tensor scales: the speed path, not an accuracy one) through torch._scaled_mm."""
    return torch._scaled_mm(x8, w8.t(), ONE, ONE, out_dtype=torch.bfloat16)


def cslt_linear(wc: torch.Tensor, x: torch.Tensor, alg_id: int = 0) -> torch.Tensor:
    """2:4 through cuSPARSELt: the compressed weight (N, K/2 + metadata) times x^T, transposed back (fp8 or
    bf16 inputs); ``alg_id`` from ``torch._cslt_sparse_mm_search`` (0: the library's default)."""
    return torch._cslt_sparse_mm(wc, x.t(), out_dtype=torch.bfloat16, transpose_result=True, alg_id=alg_id)


def tuned_alg(wc: torch.Tensor, x: torch.Tensor) -> int:
    """cuSPARSELt's own search for the fastest algorithm of this product (0 where the search fails)."""
    try:
        return int(torch._cslt_sparse_mm_search(wc, x.t(), out_dtype=torch.bfloat16, transpose_result=True))
    except Exception:  # noqa: BLE001 - an older stack without the search: the default algorithm
        return 0


def fp8_paths(w: torch.Tensor) -> dict[str, torch.Tensor | str]:
    """The fp8 weights: dense e4m3, and compressed 2:4 e4m3 for cuSPARSELt (or the error that stops it)."""
    w8 = w.to(FP8)
    out: dict[str, torch.Tensor | str] = {"fp8 dense": w8}
    for name, t in (("fp8 2:4 cusparselt", w8), ("fp8 2:4 cusparselt tuned", w8), ("2:4 cusparselt tuned", w)):
        try:
            out[name] = torch._cslt_compress(t)
        except Exception as exc:  # noqa: BLE001
            out[name] = f"{type(exc).__name__}: {exc}"[:300]
    return out


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
    ap.add_argument("--shapes", default="4096x11008,11008x4096,8192x8192", help="NxK (out x in)")
    ap.add_argument("--rows", default="1,16,128,512,2048,8192")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse_speed.jsonl")
    args = ap.parse_args()
    head = run_header(torch.cuda.get_device_name())
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        sets = rotation_sets(n * k * 2)
        g = torch.Generator(device="cuda").manual_seed(0)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(sets)]
        dense = [w * nm_mask(w.abs().float(), 2, 4) for w in dense]
        forms = [{**paths(w), **fp8_paths(w)} for w in dense]
        global ONE
        ONE = torch.ones((), device="cuda")
        for m in (int(v) for v in args.rows.split(",")):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(sets)]
            x8s = [x.to(FP8) for x in xs]
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
                        elif path == "fp8 dense":
                            def fn(i, p=path):
                                return fp8_dense(forms[i][p], x8s[i])
                        elif path.startswith("fp8 2:4") or path.endswith("tuned"):  # torch._cslt_* directly
                            inputs = x8s if path.startswith("fp8") else xs
                            alg = tuned_alg(forms[0][path], inputs[0]) if path.endswith("tuned") else 0
                            if path.endswith("tuned"):
                                rec["alg_id"] = alg

                            def fn(i, p=path, a=alg, inp=inputs):
                                return cslt_linear(forms[i][p], inp[i], a)
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
                    if path in ("dense", "fp8 dense") and "us" in rec:
                        base[path, mode] = rec["us"]
                    if "us" in rec and ("dense", mode) in base:
                        rec["speedup_vs_dense"] = base["dense", mode] / rec["us"]
                    if "us" in rec and path.startswith("fp8 2:4") and ("fp8 dense", mode) in base:  # tuned too
                        rec["speedup_vs_fp8_dense"] = base["fp8 dense", mode] / rec["us"]
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps({k2: v for k2, v in rec.items() if k2 not in head}), flush=True)


if __name__ == "__main__":
    main()
