"""The first check on any file a user names: it is a regular file (not a FIFO that blocks forever, not
``/dev/zero`` that never ends, not a folder), readable, and no larger than what its reader will take."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from slimtorch.errors import SlimError


def regular_file(what: str, path: Path | str, most: int) -> int:
    """The size of ``path``, a readable regular file of at most ``most`` bytes; SlimError naming it as
    ``what`` (e.g. ``--calib``, ``recipe``) otherwise."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SlimError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SlimError(f"{what} {path} is not a regular file")
    if st.st_size > most:
        raise SlimError(f"{what} {path} has {st.st_size:,} bytes; at most {most:,} are read")
    if not os.access(path, os.R_OK):
        raise SlimError(f"{what} {path} is not readable")
    return st.st_size
