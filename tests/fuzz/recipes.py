"""Generated recipes: sound ones (every dtype, granularity, observer and flag combination the schema allows)
and broken ones (one or more fields replaced by a hostile value, or the text itself damaged). A sound recipe
must quantize a small model to finite outputs close to float; a broken one must be one SlimError."""

from __future__ import annotations

import copy
import random

import torch
import yaml
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.quant.modules import MatmulInput
from slimtorch.quant.recipe import load_recipe
from slimtorch.quantize import quantize_

DTYPES = ["int8", "int4", "int3", "int2", "uint8", "uint4", "uint3", "uint2", "int6", "fp8_e4m3", "fp8_e5m2"]
GRANS = ["tensor", "channel", "channel:0", "group:8", "group:16", "group:32", "token", "channel:1", "group:5"]
OBSERVERS = ["minmax", "ema", "percentile", "mse", "kl"]
HOSTILE = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), 10**30, "", "x" * 300, "int5", "group:0",
           "group:-4", "channel:99", "tensor ", "TOKEN", [], ["int8"], {}, {"a": 1}, "re:(", "\u202e\u0000",
           "yes", "no", "on", "null", "1e309", "group:99999999", "Linear", ["Linear", 3], {"Linear": "x"}]
TEXT_DAMAGE = [
    lambda t, r: t + "\n" + "a: &x [1]\nb: *x\n",
    lambda t, r: "[" * r.randint(17, 3000) + "]" * 3,
    lambda t, r: t.encode("utf-16").decode("latin-1"),
    lambda t, r: t[: r.randint(0, len(t))],
    lambda t, r: t + "\n" + t,
    lambda t, r: t.replace(":", "", 1),
    lambda t, r: "\t" + t,
    lambda t, r: t + "\nweight: {dtype: int8, dtype: int4}\n",
    lambda t, r: "group_size: " + "9" * r.randint(4000, 6000),
    lambda t, r: t + "\n!!python/object/apply:os.system ['true']\n",
    lambda t, r: "".join(r.choice("{}[]:,&*!|>'\"-? \n#%@`") for _ in range(r.randint(1, 200))),
]


def sound_spec(r: random.Random, role: str) -> dict:
    dtype = r.choice(DTYPES)
    is_float = dtype.startswith("fp8")
    sym = True if is_float else (False if dtype.startswith("u") else r.choice([True, False]))
    if role == "weight":
        gran = r.choice(["tensor", "channel", "channel:0", "group:8", "group:16"])
        return {"dtype": dtype, "granularity": gran, "symmetric": sym, "observer": r.choice(OBSERVERS)}
    dynamic = r.choice([True, False])
    gran = r.choice(["tensor", "token"]) if dynamic else "tensor"
    return {"dtype": dtype, "granularity": gran, "symmetric": sym, "observer": r.choice(OBSERVERS[:3]),
            "dynamic": dynamic}


def sound_recipe(r: random.Random) -> dict:
    rec: dict = {}
    if r.random() < 0.3:
        rec["preset"] = r.choice(["W8A8", "W8A8-dynamic", "W4A16-g128", "W4A8", "FP8", "W3A16-g128"])
    if "preset" not in rec or r.random() < 0.5:
        rec["weight"] = sound_spec(r, "weight")
    if r.random() < 0.4:
        rec["act"] = sound_spec(r, "act")
    if r.random() < 0.3:
        rec["attention"] = sound_spec(r, "act")
    if r.random() < 0.3:
        rec["targets"] = r.choice([["Linear"], ["Conv2d"], ["Linear", "Conv2d"], ["re:.*fc.*"], ["re:.*"]])
    if r.random() < 0.3:
        rec["ignore"] = r.choice([[], ["head"], ["re:.*conv.*"], ["re:blocks\\.0\\..*"]])
    return rec


def _mutate(rec: dict, r: random.Random) -> dict:
    rec = copy.deepcopy(rec)
    where = r.choice(["top", "spec", "spec", "spec", "list"])
    if where == "top":
        rec[r.choice(["preset", "weight", "act", "attention", "targets", "ignore", "bogus", 7])] = r.choice(HOSTILE)
    elif where == "list":
        rec[r.choice(["targets", "ignore"])] = r.choice(HOSTILE)
    else:
        field = r.choice(["weight", "act", "attention"])
        spec = rec.get(field) if isinstance(rec.get(field), dict) else sound_spec(r, "weight" if field == "weight"
                                                                                  else "act")
        spec[r.choice(["dtype", "granularity", "symmetric", "observer", "dynamic", "extra"])] = r.choice(HOSTILE)
        rec[field] = spec
    return rec


def recipe_texts(seed: int, n: int) -> list[str]:
    """``n`` recipe files' texts: about a third sound, the rest with hostile fields or damaged text."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        rec = sound_recipe(r)
        kind = r.random()
        if kind < 0.35:
            out.append(yaml.safe_dump(rec))
        elif kind < 0.85:
            for _ in range(r.randint(1, 3)):
                rec = _mutate(rec, r)
            out.append(yaml.safe_dump(rec, allow_unicode=True))
        else:
            out.append(r.choice(TEXT_DAMAGE)(yaml.safe_dump(rec), r))
    return out


class Tiny(nn.Module):
    """Conv, Linear and attention matmul inputs, small enough to quantize thousands of times."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 32)
        self.q, self.k = MatmulInput(), MatmulInput()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, 10)
        h = self.conv(x).flatten(2).transpose(1, 2)  # (B, 64, 16)
        h = self.fc(torch.relu(h))  # (B, 64, 32)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 32**0.5, -1)
        return self.head((att @ h).mean(1))


def tiny_model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor]], torch.Tensor]:
    torch.manual_seed(0)
    model = Tiny().eval()
    calib = [(torch.randn(8, 3, 8, 8),) for _ in range(2)]
    return model, calib, torch.randn(16, 3, 8, 8)


def run_recipe(text: str, path, model: nn.Module, calib, x: torch.Tensor) -> str:
    """'refused' (SlimError), or 'ok' after checking the quantized model: finite outputs, and within a loose
    bound of float for 8-bit weight-only recipes. Any other exception propagates (a defect)."""
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        rec = load_recipe(path)
        q = copy.deepcopy(model)
        quantize_(q, rec, calib)
    except SlimError:
        return "refused"
    with torch.no_grad():
        y, ref = q(x), model(x)
    if not bool(torch.isfinite(y).all()):
        raise AssertionError(f"non-finite output from a recipe that was accepted: {text[:200]!r}")
    if rec.weight is not None and rec.weight.bits == 8 and not rec.weight.is_float and rec.act is None \
            and rec.attention is None:
        rel = ((y - ref).norm() / ref.norm()).item()
        if rel > 0.1:
            raise AssertionError(f"8-bit weight-only recipe off by {rel:.3f} relative: {text[:200]!r}")
    return "ok"
