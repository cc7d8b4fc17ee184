"""transformers ``generate()`` speed of a Llama-7B-shaped model (random weights: speed only), bf16 against our
quantized versions, the way users run it: eagerly (transformers' default), and with a static KV cache, which
makes ``generate()`` compile the decoding step (``torch.compile``, mode reduce-overhead: CUDA graphs;
fullgraph=True, so a graph break is an error).

    PYTHONPATH=src python benchmarks/generate.py [--layers 32] [--batches 1,8,32] [--prompt 128] [--new 64]
        [--presets W4A16-g128] [--modes eager,static-compile] [--out FILE]

For each (mode, batch, version): ``generate`` with 1 new token (the prefill, plus one sampled token) and with
``--new`` tokens, greedy, never stopping early, each timed 3 times (medians, CUDA-synchronised wall time).
Prefill tokens/s = batch x prompt / t(1); decode tokens/s = batch x (new - 1) / (t(new) - t(1)). The bf16 model
is timed in the same run; each record holds its bf16 baseline and the ratio. The model is built in memory
with transformers' ``LlamaForCausalLM`` (the class a local Llama folder loads into); the block linears are
quantized by ``quantize_`` (RTN; the LM head stays bf16, as the presets say). Appends JSON lines to
benchmarks/results/generate.jsonl (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from records import run_header

# would shadow the PyPI package `kernels` that transformers probes for
from slimtorch.quantize import quantize_

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000}


def build(layers: int, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max_positions, **LLAMA_7B)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(model, batch: int, prompt: int, new: int, static: bool, trials: int = 3) -> dict:
    from transformers import CompileConfig

    torch.manual_seed(batch)
    ids = torch.randint(1, 32000, (batch, prompt), device="cuda")
    kw = {"attention_mask": torch.ones_like(ids), "do_sample": False}
    if static:
        kw.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
    else:
        kw.update(disable_compile=True)

    def gen(n: int):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    t0 = time.perf_counter()
    with torch.no_grad():
        out = gen(new)  # warm-up: compiles and captures in static mode
        gen(new)
        warm_s = time.perf_counter() - t0
        t1 = statistics.median(timed(lambda: gen(1)) for _ in range(trials))
        tn = statistics.median(timed(lambda: gen(new)) for _ in range(trials))
    assert out.shape == (batch, prompt + new)
    return {"prefill_s": t1, "generate_s": tn, "warmup_s": warm_s,
            "prefill_tokens_per_s": batch * prompt / t1, "decode_tokens_per_s": batch * (new - 1) / (tn - t1),
            "tokens": out[:, prompt:prompt + 8].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--presets", default="W4A16-g128")
    ap.add_argument("--modes", default="eager,static-compile")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.jsonl"))
    args = ap.parse_args()
    import transformers

    head = {**run_header(torch.cuda.get_device_name()), "transformers": transformers.__version__,
            "model": "llama-7b-shaped", "layers": args.layers, "prompt": args.prompt, "new_tokens": args.new}
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    versions = ["bf16", *args.presets.split(",")]
    models = {}
    for version in versions:  # both held at once (a 7B-shaped bf16 model is about 13 GB)
        model = build(args.layers, args.prompt + args.new)
        rec0 = {**head, "version": version}
        if version != "bf16":
            t0 = time.perf_counter()
            quantize_(model, version, [], "rtn")
            rec0["quantize_s"] = time.perf_counter() - t0
        rec0["gpu_weights_gib"] = sum(t.numel() * t.element_size() for t in
                                      [*model.parameters(), *model.buffers()]) / 2**30
        models[version] = (model, rec0)
        gc.collect()
        torch.cuda.empty_cache()
    for mode in modes:  # versions side by side for each (mode, batch): a run cut short still has pairs
        for b in batches:
            for version, (model, rec0) in models.items():
                rec = {**rec0, "mode": mode, "batch": b}
                try:
                    rec.update(measure(model, b, args.prompt, args.new, mode == "static-compile"))
                except Exception as exc:  # noqa: BLE001
                    rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}"
                torch._dynamo.reset()
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps({k: v for k, v in rec.items() if k not in head}), flush=True)
    # ratios against bf16 of the same run, printed (each record went to the file as soon as it was measured)
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    mine = [r for r in rows if r.get("date") == head["date"] and r.get("command") == head["command"]]
    base = {(r["mode"], r["batch"]): r for r in mine if r["version"] == "bf16" and "error" not in r}
    for r in mine:
        b = base.get((r["mode"], r["batch"]))
        if r["version"] != "bf16" and b is not None and "error" not in r:
            print(f"{r['version']:12s} {r['mode']:15s} batch {r['batch']:3d}: decode "
                  f"{r['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x bf16 "
                  f"({r['decode_tokens_per_s']:.0f} vs {b['decode_tokens_per_s']:.0f} tok/s), prefill "
                  f"{r['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
