"""Save and load quantized models: packed integer weights, scales, zero-points, JSON plan. No pickle.

File layout (one safetensors file):

* ``<layer>.qweight``: codes packed along the input dimension (packing.py); fp8 codes as raw bytes.
* ``<layer>.w_scale`` / ``<layer>.w_zero``, ``<layer>.act.scale`` / ``.act.zero``
  for static activations, and every other tensor of the model as it is.
* metadata ``slimtorch``: the base model (a zoo name or a local folder), the recipe and method, per
  quantized layer its kind, weight shape, specs and conv arguments, and the spec of each quantized
  matmul input point (``points``: attention Q/K/V/probabilities). Tensors shared by several names (tied
  embeddings) are stored once and listed under ``aliases``.

Loading builds the base model, swaps in the quantized modules with the unpacked codes and loads
the rest; outputs are bit-identical to the model that was saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimtorch.errors import SlimError, shown
from slimtorch.io.checkpoint import (FLOAT_VALUES, check_loaded, load_tensors, restore_shared, save_tensors,
                                     store_shared_once)
from slimtorch import packing
from slimtorch.quant.modules import ActQuant, MatmulInput, QuantConv2d, QuantLinear, QuantWeight
from slimtorch.sequential import set_module
from slimtorch.quant.primitives import FP8_DTYPES, scale_shape
from slimtorch.spec import spec_from_dict, spec_to_dict

FORMAT_VERSION = 1


def _pack_codes(m: QuantWeight) -> torch.Tensor:
    if m.wspec.is_float:
        return m.qweight.view(torch.uint8)
    qmin, _ = m.wspec.qrange
    return packing.pack(m.qweight, m.wspec.bits, qmin)


def _unpack_codes(packed: torch.Tensor, spec, n: int) -> torch.Tensor:
    if spec.is_float:
        return packed.view(FP8_DTYPES[spec.dtype])
    qmin, _ = spec.qrange
    codes = packing.unpack(packed, spec.bits, qmin, n)
    return codes.to(torch.uint8) if spec.dtype == "uint8" else codes.to(torch.int8)


def save_quantized(model: nn.Module, path: Path, base: str, extra: dict | None = None) -> None:
    """Atomically write ``model`` (quantized by ``quantize_``) to ``path``."""
    layers, tensors = {}, {}
    qnames = {n for n, m in model.named_modules() if isinstance(m, QuantWeight)}
    for name, m in model.named_modules():
        if not isinstance(m, QuantWeight):
            continue
        info = {"kind": "conv2d" if isinstance(m, QuantConv2d) else "linear", "weight_shape": list(m.weight_shape),
                "weight": spec_to_dict(m.wspec), "act": spec_to_dict(m.act.spec if m.act else None)}
        if isinstance(m, QuantConv2d):
            info["conv"] = {"stride": list(m.stride), "padding": list(m.padding) if not isinstance(m.padding, str)
                            else m.padding, "dilation": list(m.dilation), "groups": m.groups,
                            "same_padding": m.same_padding}
        layers[name] = info
        tensors[f"{name}.qweight"] = _pack_codes(m)
    points = {n: spec_to_dict(m.spec) for n, m in model.named_modules()
              if isinstance(m, ActQuant) and not any(n == f"{q}.act" for q in qnames)}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in qnames and leaf in ("qweight",):
            continue
        tensors[key] = t
    aliases = store_shared_once(tensors)
    meta = {"format": "slimtorch-quantized", "version": FORMAT_VERSION, "base": base, "layers": layers,
            "points": points, "aliases": aliases, **(extra or {})}
    save_tensors(path, tensors, meta)


def load_quantized(path: Path, base_model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_quantized`. Returns (model, metadata).

    The file's checksum (tensors and metadata) is verified first; then every layer's specs are checked for
    their role, its scales for being finite and positive, and the rest must match the base model exactly.
    Anything else wrong in the file is one SlimError naming the file."""
    path = Path(path)
    tensors, meta = load_tensors(path, require_digest=True)
    if meta.get("format") != "slimtorch-quantized":
        raise SlimError(f"{path} is not a slimtorch quantized model (no slimtorch-quantized metadata)")
    version = meta.get("version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise SlimError(f"{path} has format version {shown(version)}; this slimtorch reads 1 to {FORMAT_VERSION}")
    try:
        if base_model is None:
            from slimtorch.zoo import load_model

            if not isinstance(meta.get("base"), str):
                raise SlimError(f"{path} names no base model")
            base_model = load_model(meta["base"])
        return _rebuild(base_model.eval(), tensors, meta, path), meta
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise SlimError(f"{path} is damaged: its layers do not match its metadata ({type(exc).__name__}: "
                        f"{shown(exc)})") from None


def _checked_scale(t: torch.Tensor, what: str) -> torch.Tensor:
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise SlimError(f"{what} must hold finite positive floats (a damaged or edited file)")
    return t


def _check_layout(path: Path, layer: str, pairs: dict[str, tuple[torch.Tensor | None, tuple[int, ...]]]) -> None:
    """Each present tensor is a float tensor of the shape its layer needs (absent ones are checked by
    their users)."""
    for leaf, (t, want) in pairs.items():
        if t is not None and (tuple(t.shape) != tuple(want) or t.dtype not in FLOAT_VALUES):
            raise SlimError(f"{path}: {shown(layer)}.{leaf} is {t.dtype} of shape {list(t.shape)}; the layer needs "
                            f"floats of shape {list(want)}")


def _check_against_base(old: nn.Module, name: str, info: dict, shape: tuple[int, ...], path: Path) -> None:
    """The layer a file describes is the base model's layer: same kind, weight shape and conv arguments
    (compared by type and value: 1.0 is not a stride)."""
    kind = "linear" if isinstance(old, nn.Linear) else "conv2d" if isinstance(old, nn.Conv2d) else None
    same = info["kind"] == kind and tuple(old.weight.shape) == shape
    if same and kind == "conv2d":
        c = info["conv"]
        as_json = [list(old.stride), old.padding if isinstance(old.padding, str) else list(old.padding),
                   list(old.dilation), old.groups, bool(getattr(old, "tf_same_padding", False))]
        same = repr([c["stride"], c["padding"], c["dilation"], c["groups"], c.get("same_padding", False)]) == \
            repr(as_json)
    if not same:
        raise SlimError(f"{path}: layer {shown(name)} is not the base model's layer of that name (kind, shape or "
                        f"convolution arguments differ): the file is damaged or made for another model")


def _rebuild(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> nn.Module:
    restore_shared(tensors, meta.get("aliases", {}))
    for name, info in meta["layers"].items():
        wspec, aspec = spec_from_dict(info["weight"], "weight"), spec_from_dict(info["act"], "act")
        if wspec is None or info["kind"] not in ("linear", "conv2d"):
            raise SlimError(f"{path}: layer {shown(name)} has no weight spec or an unknown kind")
        shape = tuple(int(d) for d in info["weight_shape"])
        _check_against_base(model.get_submodule(name), name, info, shape, path)
        rows, width = shape[0], int(torch.Size(shape[1:]).numel())
        packed = tensors.pop(f"{name}.qweight")
        if packed.dtype != torch.uint8:
            raise SlimError(f"{path}: {shown(name)}.qweight is {packed.dtype}; packed codes are uint8")
        codes = _unpack_codes(packed, wspec, width).reshape(rows, width)
        scale = _checked_scale(tensors[f"{name}.w_scale"], f"{name}.w_scale")
        zero = tensors[f"{name}.w_zero"]
        bias = tensors.get(f"{name}.bias")
        in_shape = (width,) if info["kind"] == "linear" else (shape[1] * info["conv"]["groups"], 1, 1)
        _check_layout(path, name, {"w_scale": (scale, scale_shape((rows, width), wspec)),
                                   "w_zero": (zero, scale_shape((rows, width), wspec)),
                                   "bias": (bias, (rows,)), "inv_smooth": (tensors.get(f"{name}.inv_smooth"), in_shape),
                                   **({"act.scale": (tensors[f"{name}.act.scale"], ()),
                                       "act.zero": (tensors[f"{name}.act.zero"], ())}
                                      if aspec is not None and not aspec.dynamic else {})})
        if info["kind"] == "linear":
            new = QuantLinear(wspec, codes, scale, zero, bias, aspec, shape)
        else:
            c = info["conv"]
            pad = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
            new = QuantConv2d(wspec, codes, scale, zero, bias, aspec, shape, stride=tuple(c["stride"]),
                              padding=pad, dilation=tuple(c["dilation"]), groups=c["groups"],
                              same_padding=c.get("same_padding", False))
        if f"{name}.inv_smooth" in tensors:
            new.inv_smooth = _checked_scale(tensors[f"{name}.inv_smooth"], f"{name}.inv_smooth")
        if aspec is not None and not aspec.dynamic:
            new.act.scale = _checked_scale(tensors[f"{name}.act.scale"], f"{name}.act.scale")
            new.act.zero = tensors[f"{name}.act.zero"]
        set_module(model, name, new)
    for name, raw in meta.get("points", {}).items():
        point = ActQuant(spec_from_dict(raw, "act"))
        if not isinstance(model.get_submodule(name), MatmulInput):
            raise SlimError(f"{path}: {shown(name)} is not a matmul input point of the base model")
        if not point.spec.dynamic:
            _check_layout(path, name, {"scale": (tensors[f"{name}.scale"], ()), "zero": (tensors[f"{name}.zero"], ())})
            point.scale = _checked_scale(tensors[f"{name}.scale"], f"{name}.scale")
            point.zero = tensors[f"{name}.zero"]
        set_module(model, name, point)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith(".qweight")]
    check_loaded(model, missing, unexpected, path, meta["base"])
    return model
