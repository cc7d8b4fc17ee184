"""HF export: a quantized language model as a transformers folder in the compressed-tensors format, the
format vLLM serves and that ``AutoModelForCausalLM.from_pretrained`` loads with the ``compressed-tensors``
package installed.

Per quantized linear ``name`` (tensor names and meaning as compressed-tensors defines them):

* 4-bit and other sub-8-bit integer weights, format ``pack-quantized``: ``name.weight_packed`` (int32,
  codes offset to unsigned and packed densely along the input dimension, element i at bit ``i * bits``),
  ``name.weight_scale`` ``(out, in / group)``, ``name.weight_shape``, and for asymmetric weights
  ``name.weight_zero_point`` packed the same way along the output dimension. Our uint4 codes ``q`` with
  zero-point ``z`` are compressed-tensors' signed codes ``q - 8`` with zero-point ``z - 8``: the same values.
* 8-bit integer weights, format ``int-quantized``: ``name.weight`` (int8) and ``name.weight_scale``
  ``(out, 1)``; static activations add ``name.input_scale`` (and ``name.input_zero_point`` when asymmetric).
* fp8 weights, format ``float-quantized``: ``name.weight`` (float8_e4m3fn) and ``name.weight_scale``.

Layers that share weight and activation specs form one config group whose targets are their exact
module names; everything else stays in float. A layer with a SmoothQuant/AWQ input factor has no place
in the format (its factor would have to be folded into the layer before it) and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimtorch.errors import SlimError, shown
from slimtorch.io.checkpoint import atomic_write_bytes
from slimtorch.quant.modules import ActQuant, QuantLinear, QuantWeight
from slimtorch.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes ``(rows, cols)`` packed densely into int32 words along dim 1: element i of
    a row at bit ``i * bits`` of the row's bit stream, little-endian, rows padded to 32 elements."""
    rows, cols = codes.shape
    v = codes.to(torch.int64)
    if int(v.min()) < 0 or int(v.max()) >= 1 << bits:
        raise ValueError(f"codes outside 0..{(1 << bits) - 1}")
    stream = ((v[..., None] >> torch.arange(bits)) & 1).reshape(rows, cols * bits)
    words = -(-cols * bits // 32)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits)).reshape(rows, words, 32)
    packed = (stream << torch.arange(32)).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def _args(spec: QuantSpec, role: str) -> dict:
    """compressed-tensors QuantizationArgs of one of our specs."""
    g = spec.granularity
    strategy = ("tensor" if isinstance(g, PerTensor) else "channel" if isinstance(g, PerChannel) else
                "group" if isinstance(g, PerGroup) else "token" if isinstance(g, PerToken) else None)
    if strategy is None or (role == "weight" and strategy == "token") or (role == "act" and strategy in ("channel", "group")):
        raise SlimError(f"{type(g).__name__} {role} quantization has no compressed-tensors form")
    return {"num_bits": spec.bits, "type": "float" if spec.is_float else "int", "symmetric": spec.symmetric,
            "strategy": strategy, "group_size": g.size if isinstance(g, PerGroup) else None,
            "dynamic": spec.dynamic, "observer": None if spec.dynamic else "minmax", "actorder": None,
            "block_structure": None, "observer_kwargs": {}}


def _format(spec: QuantSpec) -> str:
    return "float-quantized" if spec.is_float else "int-quantized" if spec.bits == 8 else "pack-quantized"


def _signed(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes in compressed-tensors' signed range: unsigned formats shift by half their range."""
    return codes.to(torch.int32) - (1 << (spec.bits - 1)) if spec.dtype.startswith("u") else codes.to(torch.int32)


def layer_tensors(name: str, m: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (weight and activation parameters)."""
    spec = m.wspec
    out_f, in_f = m.weight_shape
    scale = m.w_scale.reshape(out_f, -1).to(dtype)
    t: dict[str, torch.Tensor] = {f"{name}.weight_scale": scale}
    if spec.is_float:
        t[f"{name}.weight"] = m.qweight
    else:
        codes = _signed(m.qweight, spec)
        if spec.bits == 8:
            t[f"{name}.weight"] = codes.to(torch.int8)
        else:
            t[f"{name}.weight_packed"] = pack_int32(codes + (1 << (spec.bits - 1)), spec.bits)
            t[f"{name}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
        if not spec.symmetric:
            zero = _signed(m.w_zero.reshape(out_f, -1).round(), spec)
            t[f"{name}.weight_zero_point"] = (pack_int32((zero + (1 << (spec.bits - 1))).t(), spec.bits).t()
                                              if spec.bits < 8 else zero.to(torch.int8))
    if m.bias is not None:
        t[f"{name}.bias"] = m.bias.detach().to(dtype)
    act = m.act.spec if m.act is not None else None
    if act is not None and not act.dynamic:
        t[f"{name}.input_scale"] = m.act.scale.reshape(1).to(dtype)
        if not act.symmetric:
            t[f"{name}.input_zero_point"] = m.act.zero.reshape(1).round().to(torch.int8)
    return t


def check_exportable(model: nn.Module) -> None:
    """SlimError naming the first thing the format cannot hold."""
    for name, m in model.named_modules():
        if isinstance(m, QuantWeight) and not isinstance(m, QuantLinear):
            raise SlimError(f"layer {shown(name)} is a quantized convolution; the hf format holds linear layers")
        if isinstance(m, QuantLinear):
            if m.inv_smooth is not None:
                raise SlimError(f"layer {shown(name)} carries a SmoothQuant/AWQ input factor, which compressed-tensors "
                                f"cannot hold; quantize with --method rtn or gptq to export to hf")
            if not m.wspec.is_float and m.wspec.bits > 8:
                raise SlimError(f"layer {shown(name)}: {m.wspec.dtype} weights have no compressed-tensors form")
            _args(m.wspec, "weight")
            if m.act is not None:
                if m.act.spec.bits != 8:
                    raise SlimError(f"layer {shown(name)}: {m.act.spec.dtype} activations have no compressed-tensors "
                                    f"form that runtimes serve; use 8-bit activations or none")
                _args(m.act.spec, "act")
        elif isinstance(m, ActQuant) and not name.endswith(".act"):
            raise SlimError(f"{shown(name)}: quantized attention inputs have no compressed-tensors form")


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` of config.json: one group per distinct (weight, activation) spec."""
    groups: dict[tuple, list[str]] = {}
    formats = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            key = (m.wspec, m.act.spec if m.act is not None else None)
            groups.setdefault(key, []).append(name)
            formats.add(_format(m.wspec))
    config_groups = {
        f"group_{i}": {"targets": names, "weights": _args(w, "weight"),
                       "input_activations": None if a is None else _args(a, "act"), "output_activations": None,
                       "format": _format(w)}
        for i, ((w, a), names) in enumerate(groups.items())
    }
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": [],
            "kv_cache_scheme": None, "global_compression_ratio": None}


def save_compressed_tensors(q: nn.Module, fp_hf: nn.Module, folder: Path, tokenizer) -> dict:
    """Write ``q`` (quantized; module names as in ``fp_hf``, the float transformers model it came from) into
    ``folder``: config.json with its quantization_config, model.safetensors, the tokenizer. Returns a summary."""
    from safetensors.torch import save

    check_exportable(q)
    dtype = next(fp_hf.parameters()).dtype
    qlayers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    fp_modules = dict(fp_hf.named_modules())
    missing = [n for n in qlayers if not isinstance(fp_modules.get(n), nn.Linear)]
    if missing:
        raise SlimError(f"quantized layer {shown(missing[0])} is not a linear layer of the transformers model")
    conv1d = [n for n in qlayers if getattr(fp_modules[n], "from_conv1d", False)]
    if conv1d:  # compressed-tensors quantizes nn.Linear only; GPT-2's layers are transformers' Conv1D
        raise SlimError(f"layer {shown(conv1d[0])} is a GPT-2 Conv1D layer, which compressed-tensors does not "
                        f"quantize; the hf format cannot hold this model")
    state = {}
    seen: dict[int, str] = {}
    for key, t in fp_hf.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in qlayers:
            continue
        if id(t) in seen:  # tied weights (embeddings and lm_head) are stored once, as transformers does
            continue
        seen[id(t)] = key
        state[key] = t.detach().contiguous()
    for name, m in qlayers.items():
        state.update({k: v.contiguous() for k, v in layer_tensors(name, m, dtype).items()})
    folder.mkdir(parents=True, exist_ok=True)
    config = fp_hf.config.to_dict()
    config["quantization_config"] = quantization_config(q)
    config.pop("_name_or_path", None)
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    data = save(state, metadata={"format": "pt"})
    atomic_write_bytes(folder / "model.safetensors", data)
    tokenizer.save_pretrained(str(folder))
    return {"quantized_layers": len(qlayers), "bytes": len(data), "format": config["quantization_config"]["format"]}


def load_compressed_tensors(folder: Path) -> tuple[nn.Module, str]:
    """The folder's model decompressed by the compressed-tensors library (float weights; activation
    quantization applied by compressed-tensors in forward), float32, eval mode, and the route taken.

    First transformers' own route (``AutoModelForCausalLM.from_pretrained``). Where that fails, the library
    directly: transformers builds the architecture from config.json, compressed-tensors applies the
    quantization config and compresses the (real, not meta) modules, the file's tensors load strictly,
    and compressed-tensors decompresses them. (transformers 5 with compressed-tensors 0.20 cannot load
    asymmetric pack-quantized weights: its meta-device build expects the zero-points unpacked while the
    format packs them, as compressed-tensors' own compressor writes them; cf. llm-compressor #1618.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    except ImportError:
        raise SlimError("checking an hf export needs the compressed-tensors package: pip install "
                        "compressed-tensors") from None
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would print a table; a failure is reported below
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                                     dtype=torch.float32)
        route = "transformers AutoModelForCausalLM.from_pretrained"
    except Exception as exc:  # noqa: BLE001 - any failure of the transformers route is reported, then bypassed
        from safetensors.torch import load_file

        why = " ".join(str(exc).split())[:160]
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        qc = config.quantization_config
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False).float()  # before quantization
        compressor = ModelCompressor(quantization_config=QuantizationConfig.model_validate(qc))
        apply_quantization_config(model, compressor.quantization_config, run_compressed=False)
        compressor.compress_model(model)
        missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        tied = {k for k in missing if k == "lm_head.weight" and config.tie_word_embeddings}
        if set(missing) - tied or unexpected:
            raise SlimError(f"{folder}: compressed-tensors' layout differs from the file: missing {shown(missing[:2])}, "
                            f"unexpected {shown(unexpected[:2])}") from None
        compressor.decompress_model(model)
        model.tie_weights()
        route = f"compressed-tensors ModelCompressor (transformers' from_pretrained failed: {why})"
    finally:
        hf_logging.set_verbosity(level)
    model.config.use_cache = False
    return model.eval(), route
