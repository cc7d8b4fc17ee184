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

from slimtorch.errors import SlimError


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
        if self.size < 1:
            raise SlimError(f"group size must be a positive integer, got {self.size}")


Granularity = PerTensor | PerChannel | PerToken | PerGroup

# Integer formats: (qmin, qmax). Float formats: the largest finite value.
INT_RANGES = {
    "int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15),
    "int3": (-4, 3), "uint3": (0, 7), "int2": (-2, 1), "uint2": (0, 3),
}
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
        if self.dtype not in INT_RANGES and self.dtype not in FP8_MAX:
            raise SlimError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join([*INT_RANGES, *FP8_MAX])}")
        if self.observer not in OBSERVERS:
            raise SlimError(f"unknown observer {self.observer!r}; choose one of: {', '.join(OBSERVERS)}")
        if not isinstance(self.granularity, PerTensor | PerChannel | PerToken | PerGroup):
            raise SlimError(f"granularity must be PerTensor, PerChannel, PerToken or PerGroup, got {self.granularity!r}")
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
