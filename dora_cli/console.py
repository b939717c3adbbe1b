"""What the user sees while a command works: log lines and progress bars, all on stderr.

stdout carries only results (a resolved recipe, a results table, a path), so that it can be piped.
"""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """One line for the user, on stderr, flushed."""
    print(message, file=sys.stderr, flush=True)


def progress_bar(enabled: bool = True, *, fields: str = ""):
    """A rich progress bar on stderr (description, bar, n/N, elapsed, remaining, then `fields`, a format
    string over the task's fields such as "loss {task.fields[loss]:.4f}"); disabled when not `enabled`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if fields:
        columns.append(TextColumn(fields))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    """42s, 12m05s, 3h07m: a time span as a person reads it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
