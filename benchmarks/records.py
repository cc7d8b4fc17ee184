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
