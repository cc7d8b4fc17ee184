"""The command line's consoles and progress bar, shared by the main command and its subcommand modules."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

out = Console()
err = Console(stderr=True)


def progress_bar(it: Iterable, description: str) -> Iterable:
    """A rich progress bar on stderr that disappears when done."""
    items = list(it)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task(description, total=len(items))
        for x in items:
            yield x
            bar.advance(task)
