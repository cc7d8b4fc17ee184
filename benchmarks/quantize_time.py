"""Wall time of `slimtorch quantize FOLDER --preset W8A8` on transformers folders of up to 10M parameters,
as a user runs it (a new process: imports, loading, calibration, quantization, evaluation on the folder's
default sample, latency, files), with the tokenisation cache cold and then warm.

    PYTHONPATH=src python benchmarks/quantize_time.py

Folders: tinyllama-fm written with save_pretrained (10.1M parameters, trained) and random-weight GPT-2 and
Qwen2 models of about 10M parameters (tests/families.py's byte-level tokenizer). Appends one JSON line per
(folder, cache state) to benchmarks/results/quantize_time.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from records import run_header

RESULTS = Path(__file__).parent / "results" / "quantize_time.jsonl"
BIG = {  # about 10M parameters each
    "gpt2": {"n_embd": 320, "n_layer": 6, "n_head": 5, "n_positions": 512, "vocab_size": 8192},
    "qwen2": {"hidden_size": 320, "num_hidden_layers": 6, "num_attention_heads": 5, "num_key_value_heads": 5,
              "intermediate_size": 864, "max_position_embeddings": 512, "vocab_size": 8192},
}


def folders(root: Path) -> dict[str, Path]:
    import torch
    from families import byte_level_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimtorch.zoo import load_model
    from slimtorch.zoo.llama import to_hf
    from slimtorch.zoo.lm_data import hf_tokenizer

    out = {}
    d = root / "tinyllama-fm-saved"
    to_hf(load_model("tinyllama-fm")).save_pretrained(d)
    hf_tokenizer().save_pretrained(d)
    out["tinyllama-fm (save_pretrained)"] = d
    tok = byte_level_tokenizer()
    for family, kw in BIG.items():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(family, **kw, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        d = root / family
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        out[f"{family} random {sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters()) / 1e6:.1f}M"] = d
    return out


def main() -> None:
    head = run_header(f"CPU, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "SLIMTORCH_CACHE_DIR": str(tmp / "cache"), "PYTHONPATH": str(ROOT / "src")}
        for label, folder in folders(tmp).items():
            for cache in ("cold", "warm"):
                out = tmp / f"q-{folder.name}-{cache}"
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "slimtorch", "quantize", str(folder), "--preset", "W8A8",
                                    "--out", str(out), "--json"], capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                if r.returncode:
                    raise SystemExit(r.stderr)
                rep = json.loads(r.stdout)
                rec = {**head, "model": label, "cache": cache, "wall_s": wall, "time_s": rep["time_s"],
                       "dataset": rep["dataset"],
                       "metrics": {m["name"]: [m["fp"], m["quantized"]] for m in rep["metrics"]}}
                with RESULTS.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(label, cache, f"{wall:.1f} s", {k: round(v, 1) for k, v in rep["time_s"].items()}, flush=True)


if __name__ == "__main__":
    main()
