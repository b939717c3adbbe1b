"""User errors: one clear line, exit status 2, no traceback.

Anything the user can fix (a recipe, a path, a flag, a checkpoint that does not fit)
raises `UserError`. The CLI prints `error: <message>` and exits with status 2.
Every other exception is a bug in dora_cli and keeps its traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterable


class UserError(Exception):
    """A problem with the user's input, reported as a single line."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def one_of(choices: Iterable[str]) -> str:
    """'a, b or c' for error messages."""
    items = sorted(str(c) for c in choices)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


class RunFailure(UserError):
    """A run that cannot go on (a non-finite loss, a failed write): one line, exit status 1."""

    exit_code = 1


def run_main(body: Callable[[], object], interrupted: str = "interrupted") -> None:
    """Run a command-line entry point: a UserError is one line on stderr and its exit status, Ctrl-C 130."""
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # our own one-line errors say what failed
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
