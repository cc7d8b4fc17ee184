"""Reading benchmark records (JSON lines under benchmarks/results/) for the table scripts."""

import json
from pathlib import Path


def latest(path: Path, fields: tuple[str, ...], extra=None) -> dict[tuple, dict]:
    """The last record of ``path`` for each value of ``fields`` (later records win); ``extra(record)``, when
    given, is one more key field computed from the record."""
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[tuple(r[f] for f in fields) + ((extra(r),) if extra else ())] = r
    return out


def run_header(device: str, commit: str | None = None) -> dict:
    """The fields every record of one run starts with: its start (UTC), the commit (by default
    $SLIMTORCH_COMMIT: the device tool's copy of the tree may report another HEAD), the device, torch's
    version and the command line."""
    import datetime
    import os
    import sys

    import torch

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit if commit is not None else os.environ.get("SLIMTORCH_COMMIT"), "device": device,
            "torch": torch.__version__, "command": "python " + " ".join(sys.argv)}
