"""``apply_(model, config, calib)``: one entry point for every compression family.

A family is a config type (a frozen dataclass) and a handler registered for it with
:func:`handler`; ``apply_`` looks the handler up by the config's type and runs it on the model, in
place. Quantization (``PTQConfig``), QAT preparation (``QATConfig``) and every later family
(pruning, caching, distillation) come in this way, and the CLI's choices come from the same
registry (:func:`families`).

The registry is filled when a config's module is imported, which is always the case once a config
object exists: ``apply_`` needs no list of families of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimtorch.errors import SlimError
from slimtorch.progress import Progress, no_progress
from slimtorch.sequential import Batch


@dataclass(kw_only=True)
class Report:
    """What a handler did. Families extend it with their own fields (``QuantReport``, ``QATReport``)."""

    family: str = ""
    calib_samples: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# (model, config, calibration batches, progress) -> Report
Handler = Callable[[nn.Module, Any, list[Batch], Progress], Report]
_HANDLERS: dict[type, tuple[str, Handler]] = {}


def handler(config_type: type, family: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``config_type`` configs, for ``family``."""

    def register(fn: Handler) -> Handler:
        if config_type in _HANDLERS:
            raise ValueError(f"{config_type.__name__} already has a handler")
        _HANDLERS[config_type] = (family, fn)
        return fn

    return register


def families() -> dict[str, type]:
    """Family name -> config type, for every family imported so far."""
    return {family: t for t, (family, _) in _HANDLERS.items()}


def apply_(model: nn.Module, config: object, calib: list[Batch] | None = None,
           progress: Progress = no_progress) -> Report:
    """Compress ``model`` in place as ``config`` says, with calibration batches ``calib`` (tuples of
    forward arguments) where the family needs data. Returns the family's report."""
    from slimtorch.calib.data import check_calibration
    from slimtorch.io.checkpoint import nonfinite_tensor

    if type(config) not in _HANDLERS:
        known = ", ".join(t.__name__ for t in _HANDLERS) or "none imported"
        raise SlimError(f"{type(config).__name__} is not a compression config (known: {known})")
    family, fn = _HANDLERS[type(config)]
    bad = nonfinite_tensor(model.state_dict())
    if bad is not None:
        raise SlimError(f"the model's own tensor {bad} holds NaN or Inf; it cannot be compressed (is it damaged?)")
    calib = list(calib or [])
    check_calibration(calib)
    t0 = time.perf_counter()
    report = fn(model, config, calib, progress)
    report.family = family
    report.calib_samples = sum(len(b[0]) for b in calib)
    report.seconds = time.perf_counter() - t0
    return report
