"""Running the CLI in a subprocess, and the one-line error every user mistake must be."""

import subprocess
import sys


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtorch", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in r.stderr, r.stderr
