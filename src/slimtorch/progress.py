"""The progress hook that long loops accept: ``progress(iterable, description) -> iterable``.

The library never draws anything itself; the CLI passes a rich progress bar.
"""

from collections.abc import Callable, Iterable

Progress = Callable[[Iterable, str], Iterable]


def no_progress(it: Iterable, description: str) -> Iterable:
    return it
