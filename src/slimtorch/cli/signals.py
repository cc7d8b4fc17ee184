"""SIGTERM as an exception, so that a terminated job cleans up (its staging folder) as Ctrl-C does."""

from __future__ import annotations

from slimtorch.io.outdir import HELD_SIGNALS as HELD  # noqa: F401 - the signals held around critical steps


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is."""


def on_sigterm(signum, frame):
    raise Terminated()
