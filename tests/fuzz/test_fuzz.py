"""The quick subset of the fuzz suite (tests/fuzz/run.py --full runs the whole): generated recipes,
damaged folders, tampered quantized files and hostile command lines, each category in a worker process.
Every case must end in a checked sound result or one SlimError: no other exception, nothing past 30 s,
peak memory under 2 GB, no partial output folder, no pickle or folder code run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.fuzz.run import LIMITS, QUICK, run_category


@pytest.mark.parametrize("category", list(QUICK))
def test_fuzz_quick(category):
    with tempfile.TemporaryDirectory() as tmp:
        row = run_category(category, QUICK[category], seed=1, work=Path(tmp) / category)
    assert "worker_failed" not in row, row
    assert row["ok"] + row["refused"] + row["defect"] + row["hang"] == QUICK[category]
    assert row["defect"] == 0 and row["hang"] == 0, row["defects"]
    assert row["peak_rss_mb"] < LIMITS["peak_rss_mb"] and row["slowest_case_s"] < LIMITS["slowest_case_s"]
    assert row["refused"] > 0 and (row["ok"] > 0 or category in ("folders", "files"))  # the generator bites
