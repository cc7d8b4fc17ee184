"""Reading benchmark records (JSON lines under benchmarks/results/) for the table scripts."""

import json
from pathlib import Path


def latest(path: Path, fields: tuple[str, ...]) -> dict[tuple, dict]:
    """The last record of ``path`` for each value of ``fields`` (later records win)."""
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[tuple(r[f] for f in fields)] = r
    return out
