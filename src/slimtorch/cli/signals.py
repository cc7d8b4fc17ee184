"""SIGTERM and SIGINT as exceptions, so that a terminated job cleans up (its staging folder), and never in
the middle of an import.

A signal that arrives while a module is being imported (a lazy import deep inside a job, seconds after
start-up) is not raised there: raised inside a pybind11 extension's initialisation it became "ImportError:
initialization failed" and a fatal GIL error at shutdown (seen once in about 30 runs of the hostile
interrupt test, SIGTERM 10.6 s into `slimtorch quantize`). It is delivered again 50 ms later, until no import
is under way.
"""

from __future__ import annotations

import os
import threading

from slimtorch.io.outdir import HELD_SIGNALS as HELD  # noqa: F401 - the signals held around critical steps

RETRY_S = 0.05


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is."""


def importing(frame) -> bool:
    """Whether ``frame`` or a caller of it runs the import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _later(signum: int) -> None:
    timer = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _raising(exc: type[BaseException]):
    """A handler that raises ``exc`` where the program is, or delivers the signal again later while an
    import is under way."""

    def handle(signum, frame):
        if importing(frame):
            _later(signum)
            return
        raise exc()

    return handle


on_sigterm = _raising(Terminated)
on_sigint = _raising(KeyboardInterrupt)
