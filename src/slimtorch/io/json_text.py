"""Reports as strict JSON: what ``json.dumps`` writes for NaN and infinities (``NaN``, ``Infinity``) is not
JSON, and strict parsers reject the whole document. Non-finite floats become ``null``."""

from __future__ import annotations

import json
import math


def finite_or_none(obj):
    """``obj`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as null)."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)
