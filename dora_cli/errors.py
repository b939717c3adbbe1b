"""User errors: one clear line, exit status 2, no traceback.

Anything the user can fix (a recipe, a path, a flag, a checkpoint that does not fit)
raises `UserError`. The CLI prints `error: <message>` and exits with status 2.
Every other exception is a bug in dora_cli and keeps its traceback, with one exception made at the
command boundary (`run_main`): an `OSError` that the environment caused (permission, read-only or full
disk, name too long) or that names a path the user gave (`note_user_paths`) is the user's to fix, so it is
one line too. Loaders turn their own failures into UserErrors where the user's file is opened
(`reading` for text and JSON files; models.py for model files).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path


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


def did_you_mean_any_case(word: str, choices: Iterable[str]) -> str:
    """`did_you_mean` ignoring case ("arc-easy" suggests "ARC-Easy"), naming the choice as it is spelled."""
    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f' (did you mean "{by_lower[close[0]]}"?)' if close else ""


def one_of(choices: Iterable[str]) -> str:
    """'a, b or c' for error messages."""
    items = sorted(str(c) for c in choices)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def first_repeat(values: Sequence) -> int | None:
    """The index of the first value equal to an earlier one (values need not be hashable), or None."""
    return next((i for i, value in enumerate(values) if value in values[:i]), None)


def unicode_text(text: str, what: str, where: str | None = None) -> str:
    """`text` when it is valid Unicode, else a UserError naming `what`: undecodable bytes passed through the
    command line or a stream arrive as unpaired surrogates, as does a JSON "\\ud800" escape, and no
    tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(f"{what}: not valid Unicode text (undecodable bytes or an unpaired surrogate at "
                        f"character {err.start})", where=where) from None
    return text


def absent(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be opened as it stands: "is a symbolic link loop", "is a symbolic link to X, which
    does not exist", "does not exist"; None when it exists."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return "does not exist"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop (a link that leads back to itself)"
        return problem_of(err)
    return None


def clip(text: str, limit: int = 200) -> str:
    """`text` on one line, at most `limit` characters, cut after a whole word ("..." marks the cut; a
    first word longer than the limit is cut inside)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 2]  # one character more than fits: a word that ends exactly there is whole
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else cut[:-1]).rstrip(" ,;:") + "..."


class RunFailure(UserError):
    """A run that cannot go on (a non-finite loss, a failed write): one line, exit status 1."""

    exit_code = 1


# --------------------------------------------------------------------------------------------------
# Reading the user's files


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Turn what reading and parsing the user's text / JSON file can raise into a UserError naming it.

    Covers a file that cannot be opened (missing, a directory, no permission), bytes that are not
    UTF-8, malformed JSON, JSON nested deeper than the parser's recursion limit and integers past
    Python's digit limit. A UserError raised inside passes through unchanged.
    """
    where = str(path)
    try:
        yield
    except UserError:
        raise
    except UnicodeDecodeError as err:
        raise UserError(f"not UTF-8 text (byte {err.start})", where=where) from None
    except json.JSONDecodeError as err:
        raise UserError(f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}", where=where) from None
    except (ValueError, RecursionError, OSError) as err:
        raise UserError(f"cannot read: {problem_of(err)}", where=where) from None


def problem_of(err: BaseException) -> str:
    """What a reader's or parser's exception means, in a few words for an error line."""
    if isinstance(err, RecursionError):
        return "nested too deeply (more than a few hundred levels)"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[:1].lower() + err.strerror[1:]
    text = str(err)
    if isinstance(err, ValueError) and "integer string conversion" in text:
        limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        return f"a number has more digits than Python reads ({limit} at most)"
    return clip(text) or type(err).__name__


# --------------------------------------------------------------------------------------------------
# OSError at the command boundary

ENVIRONMENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
    errno.ELOOP, errno.EIO, errno.EMFILE, errno.ENFILE, errno.EFBIG,
})
"""OSErrors the machine causes, never the code: permissions, read-only or full disks, limits."""

_USER_PATHS: set[str] = set()


def note_user_paths(*paths: str | os.PathLike | None) -> None:
    """Remember paths the user named (arguments, recipe values): an OSError on them, inside them or on
    a directory above them is the user's to fix."""
    for path in paths:
        if path is not None and str(path).strip():
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                _USER_PATHS.add(os.path.abspath(os.path.expanduser(str(path))))
                _USER_PATHS.add(str(Path(path).expanduser().resolve()))


def _is_user_path(filename: str | os.PathLike) -> bool:
    try:
        path = os.path.abspath(os.fsdecode(filename))
    except (TypeError, ValueError):
        return False
    for user in _USER_PATHS:
        if path == user or path.startswith(user.rstrip(os.sep) + os.sep) or user.startswith(path.rstrip(os.sep) + os.sep):
            return True
    return False


def user_os_error(err: OSError) -> str | None:
    """The one-line message of an OSError that is the user's to fix, or None for one that may be a bug."""
    names = [n for n in (err.filename, err.filename2) if n is not None]
    environmental = err.errno in ENVIRONMENT_ERRNOS
    if not (environmental or any(_is_user_path(n) for n in names)):
        return None
    reason = err.strerror or clip(str(err)) or type(err).__name__
    if not names:
        return reason[:1].lower() + reason[1:]
    target = " -> ".join(os.fsdecode(n) for n in names)
    return f"{target}: {reason[:1].lower()}{reason[1:]}"


class Terminated(BaseException):
    """SIGTERM as an exception, so that every `finally` and temporary clean-up runs (a BaseException:
    no `except Exception` swallows it, and Typer does not turn it into an exit status as it does Ctrl-C)."""


def _terminate(signum, _frame) -> None:
    raise Terminated()


def run_main(body: Callable[[], object], interrupted: str = "interrupted") -> None:
    """Run a command-line entry point under the tuned C allocator (allocator.py): a UserError (or an OSError
    that is the user's, see `user_os_error`) is one line on stderr and its exit status, Ctrl-C 130 and
    SIGTERM 143 after cleaning up what was half-written; anything else keeps its traceback."""
    import signal

    from dora_cli.allocator import tune_allocator

    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # our own one-line errors say what failed
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        tune_allocator()  # before any tensor: every entry point (and every launched worker) runs with it
        body()
    except UserError as err:
        _fail(str(err), err.exit_code)
    except OSError as err:
        message = user_os_error(err)
        if message is None:
            raise
        _fail(message, 2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"{interrupted} (SIGTERM)", file=sys.stderr)
        sys.exit(143)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, code: int) -> None:
    sys.stdout.flush()
    print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
    sys.exit(code)
