"""The ``slimtorch`` executable's first lines.

The heavy imports (torch, numpy, typer, rich) run with SIGINT and SIGTERM held: a KeyboardInterrupt
raised in the middle of an import is swallowed by some libraries and leaves half-initialised modules
behind (measured: Ctrl-C 0.3 s after start gave "module 'numpy' has no attribute 'multiply'", or a run
that went on as if nothing happened). A signal that came during the imports is delivered once they are
done, inside the CLI's error handling: one line and exit 130 (SIGINT) or 143 (SIGTERM), like a signal at
any later moment until the job is over; after that (interpreter shutdown) the signal's default action ends
the process.
"""

from __future__ import annotations

import signal

from slimtorch.cli.signals import HELD, on_sigterm


def main() -> None:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    signal.signal(signal.SIGTERM, on_sigterm)
    import torch  # noqa: F401 - imported here, with the signals held

    from slimtorch.cli.main import main as run

    try:
        run(release=previous)  # releases the signals inside its error handling
    finally:
        # the job is over (its files written, or its staging removed): a signal that comes while the
        # interpreter shuts down now just ends the process, where it would raise into an atexit callback and
        # print a traceback (seen: SIGTERM during weakref.finalize's exit hook)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
