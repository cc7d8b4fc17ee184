"""What to do to a model, as frozen data: QuantSpec (one tensor), LayerPlan (one layer), Plan (a model).

Granularity says which elements share a scale:

* ``PerTensor()``: one scale for the whole tensor.
* ``PerChannel(axis)``: one scale per index along ``axis`` (weights: ``axis=0``, the output channel).
* ``PerToken()``: one scale per row of the tensor viewed as ``(-1, C)`` (dynamic activations).
* ``PerGroup(size)``: one scale per ``size`` consecutive elements of the last dimension, per row
  (weights ``(out, in)``: per output channel and group of inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimtorch.errors import SlimError, shown

MAX_GROUP = 1 << 20


@dataclass(frozen=True)
class PerTensor:
    pass


@dataclass(frozen=True)
class PerChannel:
    axis: int = 0


@dataclass(frozen=True)
class PerToken:
    pass


@dataclass(frozen=True)
class PerGroup:
    size: int = 128

    def __post_init__(self) -> None:
        if type(self.size) is not int or not 1 <= self.size <= MAX_GROUP:
            raise SlimError(f"group size must be an integer from 1 to {MAX_GROUP}, got {shown(self.size)}")


Granularity = PerTensor | PerChannel | PerToken | PerGroup

# Integer formats: (qmin, qmax). Float formats: the largest finite value.
INT_RANGES = {f"{u}int{b}": ((0, 2**b - 1) if u else (-(2 ** (b - 1)), 2 ** (b - 1) - 1))
              for b in (8, 7, 6, 5, 4, 3, 2) for u in ("", "u")}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
OBSERVERS = ("minmax", "ema", "percentile", "mse", "kl")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        dtype: one of ``INT_RANGES`` or ``FP8_MAX``.
        granularity: which elements share a scale.
        symmetric: zero-point fixed at 0 (signed ints) or chosen from the range (asymmetric).
        observer: how a static range is estimated: minmax | ema | percentile | mse | kl.
        dynamic: activations only: compute the scale from each call's input.
    """

    dtype: str = "int8"
    granularity: Granularity = field(default_factory=lambda: PerChannel(0))
    symmetric: bool = True
    observer: str = "minmax"
    dynamic: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or (self.dtype not in INT_RANGES and self.dtype not in FP8_MAX):
            raise SlimError(f"unknown dtype {shown(self.dtype)}; choose one of: {', '.join([*INT_RANGES, *FP8_MAX])}")
        if not isinstance(self.observer, str) or self.observer not in OBSERVERS:
            raise SlimError(f"unknown observer {shown(self.observer)}; choose one of: {', '.join(OBSERVERS)}")
        for flag in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, flag), bool):
                raise SlimError(f"{flag} must be true or false, got {shown(getattr(self, flag))}")
        if not isinstance(self.granularity, PerTensor | PerChannel | PerToken | PerGroup):
            raise SlimError(f"granularity must be PerTensor, PerChannel, PerToken or PerGroup, got "
                            f"{shown(self.granularity)}")
        if self.is_float and not self.symmetric:
            raise SlimError(f"{self.dtype} is symmetric only; set symmetric: true")
        if self.dtype.startswith("uint") and self.symmetric:
            raise SlimError(f"{self.dtype} has no negative codes, so it needs symmetric: false (or use "
                            f"{self.dtype[1:]})")

    @property
    def is_float(self) -> bool:
        return self.dtype in FP8_MAX

    @property
    def bits(self) -> int:
        return 8 if self.is_float else int(self.dtype.removeprefix("u").removeprefix("int"))

    @property
    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of an integer format."""
        if self.is_float:
            raise SlimError(f"{self.dtype} is a float format; it has no integer range")
        return INT_RANGES[self.dtype]


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: its weight and input-activation quantization (None: left as is)."""

    weight: QuantSpec | None = None
    act: QuantSpec | None = None


Plan = dict[str, LayerPlan]  # module name -> LayerPlan


def check_role(spec: QuantSpec | None, role: str) -> QuantSpec | None:
    """``spec`` if it can quantize a tensor of ``role`` (``weight``: a layer's weight; ``act``: a layer's
    input or an attention matmul input), else SlimError saying what would work.

    Weights are 2-D ``(out, in)``: one scale for the tensor, per output channel (axis 0) or per group of
    inputs; their range is fixed once, so ``dynamic`` does not apply. Static activations keep one range
    for every call: per tensor (their shape changes from call to call); dynamic ones may also take one
    scale per token."""
    if spec is None:
        return None
    g = spec.granularity
    if role == "weight":
        if spec.dynamic:
            raise SlimError("dynamic: true applies to activations; a weight's range is fixed when it is quantized")
        if isinstance(g, PerToken) or (isinstance(g, PerChannel) and g.axis != 0):
            raise SlimError(f"weight granularity {granularity_to_str(g)} is not supported; use tensor, channel "
                            f"(one scale per output channel) or group:N")
    elif spec.dynamic:
        if not isinstance(g, PerTensor | PerToken):
            raise SlimError(f"dynamic activations take granularity tensor or token, not {granularity_to_str(g)}")
    elif not isinstance(g, PerTensor):
        raise SlimError(f"static activations take granularity tensor (one range for every call), not "
                        f"{granularity_to_str(g)}; for per-token scales set dynamic: true")
    return spec


def granularity_to_str(g: Granularity) -> str:
    if isinstance(g, PerTensor):
        return "tensor"
    if isinstance(g, PerToken):
        return "token"
    if isinstance(g, PerGroup):
        return f"group:{g.size}"
    return f"channel:{g.axis}"


def granularity_from_str(text: str) -> Granularity:
    if not isinstance(text, str):
        raise SlimError(f"granularity must be a string (tensor, channel, channel:AXIS, token or group:N), got "
                        f"{shown(text)}")
    t = text.strip().lower()
    if t == "tensor":
        return PerTensor()
    if t == "token":
        return PerToken()
    if t == "channel":
        return PerChannel(0)
    kind, _, num = t.partition(":")
    if kind in ("group", "channel") and num.lstrip("-").isdigit() and len(num) <= 8:
        return PerGroup(int(num)) if kind == "group" else PerChannel(int(num))
    raise SlimError(f"unknown granularity {shown(text)}; use tensor, channel, channel:AXIS, token or group:N")


def spec_to_dict(spec: QuantSpec | None) -> dict | None:
    if spec is None:
        return None
    return {"dtype": spec.dtype, "granularity": granularity_to_str(spec.granularity),
            "symmetric": spec.symmetric, "observer": spec.observer, "dynamic": spec.dynamic}


def mapping_of(raw, allowed: tuple[str, ...], what: str, noun: str = "fields") -> dict:
    """``raw`` if it is a mapping whose keys are all in ``allowed``, else SlimError naming ``what``."""
    if not isinstance(raw, dict):
        raise SlimError(f"{what} must be a mapping of {', '.join(allowed)}; got {shown(raw)}")
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise SlimError(f"{what} has unknown {noun} {', '.join(shown(k, 40) for k in unknown[:3])}; allowed: "
                        f"{', '.join(allowed)}")
    return raw


SPEC_FIELDS = ("dtype", "granularity", "symmetric", "observer", "dynamic")


def spec_from_dict(raw: dict | None, role: str | None = None) -> QuantSpec | None:
    """The spec written by :func:`spec_to_dict` (or a recipe's mapping), checked for ``role`` when given."""
    if raw is None:
        return None
    kw = dict(mapping_of(raw, SPEC_FIELDS, "a quantization spec", "keys"))
    if "granularity" in kw:
        kw["granularity"] = granularity_from_str(kw["granularity"])
    spec = QuantSpec(**kw)
    return check_role(spec, role) if role else spec
