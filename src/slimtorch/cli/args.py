"""Checks of command-line values, run before any model is loaded: a mistake costs the user a second, not a
finished job. Each returns the value or raises SlimError naming the option."""

from __future__ import annotations

import tempfile
from pathlib import Path

from slimtorch.errors import SlimError, shown

MAX_SEED = 2**63 - 1


def count(flag: str, value: int | None, most: int = 10**9) -> int | None:
    """None, or an integer from 1 to ``most``."""
    if value is not None and not 1 <= value <= most:
        raise SlimError(f"{flag} must be a whole number from 1 to {most:,}, got {shown(value)}")
    return value


def seed(value: int, flag: str = "--seed") -> int:
    if not 0 <= value <= MAX_SEED:
        raise SlimError(f"{flag} must be a whole number from 0 to 2^63-1, got {shown(value)}")
    return value


def choice(flag: str, value: str | None, allowed: tuple[str, ...] | list[str]) -> str | None:
    if value is not None and value not in allowed:
        raise SlimError(f"{flag} {shown(value)} is not one of: {', '.join(allowed)}")
    return value


def device(value: str | None) -> str | None:
    """None, ``cpu``, ``cuda`` or ``cuda:N`` for a device this machine has."""
    if value is None or value == "cpu":
        return value
    import torch

    kind, _, idx = value.partition(":")
    if kind != "cuda" or (idx and not idx.isdigit()):
        raise SlimError(f"--device {shown(value)}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available() or (idx and int(idx) >= torch.cuda.device_count()):
        raise SlimError(f"--device {value}: no such CUDA device here")
    return value


def png_path(flag: str, path: Path | None) -> Path | None:
    """None, or a ``.png`` path whose folder exists (or can be made: nothing in the way is a file)."""
    if path is None:
        return None
    if path.suffix.lower() != ".png":
        raise SlimError(f"{flag} {path} must end in .png")
    if path.is_dir():
        raise SlimError(f"{flag} {path} is a folder")
    for parent in Path(path).absolute().parents:
        if parent.exists():
            try:  # a real probe: permissions alone do not tell that /proc or a read-only mount refuses files
                tempfile.TemporaryFile(dir=parent).close()
            except OSError as exc:
                raise SlimError(f"{flag} {path}: cannot write in {parent} ({exc.strerror})") from None
            break
    return path
