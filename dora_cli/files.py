"""Crash-safe files: every file and directory dora_cli writes goes through here.

- `atomic_file` / `write_text` / `write_json`: a temporary sibling, fsync, `os.replace`. A reader sees
  the old file or the new one, never half of one.
- `atomic_directory`: a directory filled under a temporary sibling name and renamed into place
  (replacing an older one only when asked); a killed writer leaves a `.tmp-<name>-<pid>` sibling that
  `clean_stale` removes on the next run.
- `append_jsonl` / `read_jsonl_resumable`: append-only JSON lines, flushed and fsynced per call, read
  back with a torn last line dropped; `read_jsonl`: a JSON-lines input file.
- `guard_resume`: outputs made with other settings are never mixed into a resumed run.
- who owns an output directory, one rule for every command (`OutputKind`, `check_output`, `clear_output`,
  the `.dora_output` marker): a command writes only into a directory that is absent, empty or its own,
  never inside a checkpoint or another output, and clears only what it wrote.
- `safetensors_header`: a safetensors file checked (header, sizes) before any library opens it.

Permissions are those of an ordinary file or directory (the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dora_cli.errors import UserError, absent, problem_of, reading

TMP_PREFIX = ".tmp-"


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- files ------------------------------------------------------------------------------------------
def atomic_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create `path` whole or not at all: `write(tmp)` fills a temporary sibling, which is renamed over it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{temporary_sibling(path).name}.", dir=path.parent)
    except OSError as err:  # a place the checks could not rule out (root on /proc, a full or read-only mount)
        raise UserError(f"{path}: cannot be written ({_path_problem(err)})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---- directories --------------------------------------------------------------------------------------
def temporary_sibling(target: Path, tag: str = "") -> Path:
    """`.tmp-<name>[-tag]-<pid>` beside `target`: unique per process, recognisable by `clean_stale`."""
    return target.parent / f"{TMP_PREFIX}{target.name}{'-' + tag if tag else ''}-{os.getpid()}"


def atomic_directory(target: str | Path, fill: Callable[[Path], None], *, replace: bool = True) -> Path:
    """Create `target` whole or not at all: `fill(tmp)` writes into a temporary sibling directory, which
    is renamed into place. An existing `target` is replaced (renamed away first, deleted last) when
    `replace`, else a UserError. A symbolic link in its place is the user's: never replaced (a UserError,
    before `fill` runs)."""
    target = Path(target)
    if target.is_symlink():
        raise UserError(f"{target}: is a symbolic link; it is never replaced (give the real directory)")
    tmp = temporary_sibling(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as err:  # a place the checks could not rule out (root on /proc, a full or read-only mount)
        raise UserError(f"{target}: cannot be written ({_path_problem(err)})") from None
    os.chmod(tmp, 0o777 & ~umask())
    old = None
    try:
        fill(tmp)
        for path in tmp.rglob("*"):  # safetensors and mkstemp files come out 0600
            if path.is_file():
                os.chmod(path, 0o666 & ~umask())
        if target.exists() or target.is_symlink():
            if not replace:
                raise UserError(f"{target}: already exists (it appeared while this command ran)")
            old = temporary_sibling(target, "old")
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        remove(old)
    return target


def _check_writable_place(path: Path, label: str) -> None:
    """Refuse a place where no directory can be made: a file, a dangling link or a link loop in its place
    or above it, a parent that is a file or that cannot be written."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(f"{label}: is a symbolic link to {os.readlink(path)}, which does not exist") from None
    except OSError as err:
        raise UserError(f"{label}: {_path_problem(err)}") from None
    if path.exists() and not path.is_dir():
        raise UserError(f"{label}: is a file; expected a directory")
    ancestor = path.parent
    while True:
        try:
            os.stat(ancestor)
            break
        except FileNotFoundError:
            if os.path.islink(ancestor):
                raise UserError(f"{label}: cannot be created: {ancestor} {absent(ancestor)}") from None
            if ancestor == ancestor.parent:
                break
            ancestor = ancestor.parent
        except OSError as err:
            raise UserError(f"{label}: cannot be created: {ancestor}: {_path_problem(err)}") from None
    if not ancestor.is_dir():
        raise UserError(f"{label}: cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{label}: cannot be written: {ancestor} is not writable (read-only or no permission)")
    if path.is_dir() and not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise UserError(f"{label}: is not writable (read-only or no permission)")


def _path_problem(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "is a symbolic link loop (a link that leads back to itself)"
    return problem_of(err)


# ---- who owns an output directory ------------------------------------------------------------------------
OUTPUT_MARKER = ".dora_output"
"""The file that marks a directory a command of ours made: {"kind": "<command kind>"}."""
LOCK_NAME = ".lock"

OUTPUT_KIND_MODULES = ("dora_cli.rundir", "dora_cli.evaluate", "dora_cli.merge", "dora_cli.analyze", "dora_cli.sweep")
"""The modules that register an output kind (`register_output_kind`), imported when kinds are compared."""


@dataclass(frozen=True)
class OutputKind:
    """What one command writes at the top of its output directory.

    entries: patterns (fnmatch) of the names it writes besides the marker, the lock and temporaries;
    nested: (pattern, kind) of entries that are outputs of another command, placed there by design
    (`eval-final` of dora eval in a run directory); legacy: whether a directory without the marker was
    made by an earlier version (identified by the files that version wrote)."""

    name: str
    command: str
    entries: tuple[str, ...]
    nested: tuple[tuple[str, str], ...] = ()
    legacy: Callable[[Path], bool] | None = None
    contents: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(entry pattern, patterns of the paths inside it): what this kind writes inside the directories among its
    entries (`matches`: segment by segment, `**` any depth). A directory entry owns nothing else: a user's file
    inside it would go with it when it is cleared, replaced or pruned."""

    sealed: tuple[str, ...] = ()
    """Patterns of the directory entries written whole and never written into again (checkpoints): a link inside
    one is never written through (rundir.verify calls it damage), so there it is judged by its name alone."""

    def foreign(self, entry: Path) -> str | None:
        """The first path of `entry` (one of this kind's entries) that this kind did not write, in words, or None:
        a path inside a directory that its `contents` do not name; the entry itself a symbolic link or a file
        with other hard links, or such a link inside a directory written in place (a link inside one leading
        into it is a tracker's), which this kind never makes: writing into it writes into a user's file."""
        if _TEMPORARY.match(entry.name):  # a write a killed command left: removed whole, never written into
            return None
        inside = next((p for pattern, p in self.contents if fnmatch.fnmatchcase(entry.name, pattern)), ())
        sealed = any(fnmatch.fnmatchcase(entry.name, p) for p in self.sealed)
        paths = [entry]
        if entry.is_dir() and not entry.is_symlink():
            paths += sorted(entry.rglob("*"))
        for path in paths:
            rel = path.relative_to(entry.parent).as_posix()
            if path is not entry and not (_TEMPORARY.match(path.name)
                                          or any(matches(path.relative_to(entry).as_posix(), p) for p in inside)):
                return rel
            if sealed and path is not entry:
                continue
            if path.is_symlink():
                if path is entry or not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(entry)):
                    return f"{rel} (a symbolic link to {os.readlink(path)})"
            elif path.is_file() and path.stat().st_nlink > 1:
                return f"{rel} (a file with other hard links)"
        return None

    def owns(self, name: str) -> bool:
        return name in (OUTPUT_MARKER, LOCK_NAME) or bool(_TEMPORARY.match(name)) or any(
            fnmatch.fnmatchcase(name, p) for p in self.entries)

    def nested_kind(self, name: str) -> str | None:
        return next((kind for pattern, kind in self.nested if fnmatch.fnmatchcase(name, pattern)), None)


def matches(rel: str, pattern: str) -> bool:
    """Whether the relative path `rel` matches `pattern` segment by segment: fnmatch within a segment (its `*`
    never crosses a `/`), `**` any number of segments. `tokenizer*` names a file beside the others, never one
    inside a directory `tokenizer_old/`."""
    return _matches(rel.split("/"), pattern.split("/"))


def _matches(parts: list[str], patterns: list[str]) -> bool:
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_matches(parts[i:], patterns[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0]) and _matches(parts[1:], patterns[1:])


OUTPUT_KINDS: dict[str, OutputKind] = {}


def register_output_kind(kind: OutputKind) -> OutputKind:
    OUTPUT_KINDS[kind.name] = kind
    return kind


def _kinds() -> dict[str, OutputKind]:
    import importlib

    for module in OUTPUT_KIND_MODULES:
        importlib.import_module(module)
    return OUTPUT_KINDS


def output_kind(directory: str | Path) -> str | None:
    """The kind of output a command of ours wrote in `directory` (its marker, else the files an earlier
    version wrote), or None (not a directory, or not ours)."""
    directory = Path(directory)
    try:
        if not directory.is_dir():
            return None
        marker = directory / OUTPUT_MARKER
        if marker.is_file() and not marker.is_symlink():
            try:
                kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
            except (OSError, ValueError, AttributeError):
                kind = None
            return kind if isinstance(kind, str) else None
        for kind in _kinds().values():
            if kind.legacy is not None and kind.legacy(directory):
                return kind.name
    except OSError:
        return None
    return None


def json_with(path: Path, *keys: str) -> dict | None:
    """The JSON object in `path` when it has all `keys` (how an earlier version's files are told from a
    user's file of the same name), else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and all(k in data for k in keys) else None


def write_output_marker(directory: str | Path, kind: str) -> Path:
    """Mark `directory` as an output of `kind` (a directory filled atomically marks its temporary)."""
    return write_json(Path(directory) / OUTPUT_MARKER, {"kind": kind, "written_by": "dora_cli"})


def check_output(path: str | Path, kind: str, *, label: str, replace: bool = False) -> Path:
    """The one rule for an output directory, checked before anything is written (nothing is written here).

    A command writes into `path` only when it is absent, empty, or an output of this command's own kind
    (its marker) holding nothing but what this kind writes; never into a folder holding anything else,
    never inside a checkpoint or inside another output of ours (except where that output's kind keeps
    outputs of this kind: `eval-final` in a run directory). `replace` (--overwrite / --force): the
    directory is about to be cleared: it must not be a symbolic link. `label` names the setting in
    messages (`--out x`, `output_dir x`)."""
    path = Path(path)
    kinds = _kinds()
    me = kinds[kind]
    _check_writable_place(path, label)
    if replace and path.is_symlink():
        raise UserError(f"{label}: is a symbolic link; {me.command} never clears through one (give the real directory)")
    from dora_cli.rundir import inside_a_checkpoint

    where = Path(os.path.abspath(path.expanduser()))
    checkpoint = inside_a_checkpoint(where)
    if checkpoint is not None:
        raise UserError(f"{label}: is or lies inside the checkpoint {checkpoint}; choose a directory outside it")
    for ancestor in where.parents:
        owner = output_kind(ancestor)
        if owner is None:
            continue
        if ancestor == where.parent and owner in kinds and kinds[owner].nested_kind(where.name) == kind:
            break
        raise UserError(f"{label}: lies inside {ancestor}, an output of {_command(owner)}; choose a directory outside it")
    if path.is_dir():
        _check_owned(path, me, label)
    return path


def check_output_file_place(path: str | Path, *, label: str) -> Path:
    """The rule of `check_output` for a command whose output is one file (`dora export`): its directory must
    be one that can be made or written, and neither a checkpoint nor inside one or inside any output of ours
    (whose --overwrite / --force would then refuse, or a resume would prune it). The file itself is the
    command's to check (its own marker)."""
    path = Path(path)
    directory = path.parent
    _check_writable_place(directory, f"{label}: its directory {directory}")
    from dora_cli.rundir import inside_a_checkpoint

    where = Path(os.path.abspath(directory.expanduser()))
    checkpoint = inside_a_checkpoint(where)
    if checkpoint is not None:
        raise UserError(f"{label}: lies inside the checkpoint {checkpoint}; choose a place outside it")
    for ancestor in (where, *where.parents):
        owner = output_kind(ancestor)
        if owner is not None:
            raise UserError(f"{label}: lies inside {ancestor}, an output of {_command(owner)}; choose a place outside it")
    return path


def _command(kind: str) -> str:
    known = OUTPUT_KINDS.get(kind)
    return known.command if known else f"dora ({kind})"


def _check_owned(path: Path, kind: OutputKind, label: str) -> None:
    """`path` (a directory) is empty, or an output of `kind` whose every entry that kind writes."""
    entries = sorted(p.name for p in path.iterdir())
    if _unclaimed(entries, path):
        return
    found = output_kind(path)
    if found is None:
        raise UserError(
            f"{label}: holds files that dora_cli did not write ({_some(entries)}); {kind.command} writes only into a "
            "new or empty directory, or one it made: choose another directory"
        )
    if found != kind.name:
        raise UserError(f"{label}: holds an output of {_command(found)}, not of {kind.command}; choose another directory")
    for name in entries:
        if name == LOCK_NAME:  # a lock of ours, or a file RunLock refuses or takes over
            continue
        if kind.owns(name):
            inner = kind.foreign(path / name)
            if inner is not None:
                raise UserError(f"{label}: holds {inner}, which {kind.command} did not write; move it out of the "
                                "directory or choose another")
            continue
        nested = kind.nested_kind(name)
        if nested is not None and (path / name).is_dir() and not (path / name).is_symlink():
            inner = _kinds().get(nested)
            if inner is not None and (output_kind(path / name) == nested or _unclaimed(None, path / name)):
                _check_owned(path / name, inner, f"{label}: {name}")
                continue
        raise UserError(
            f"{label}: holds {name}, which {kind.command} did not write; move it out of the directory or choose another"
        )


def _unclaimed(entries: list[str] | None, path: Path) -> bool:
    """A directory that is empty, or holds only the lock of a command of ours and temporaries of our writes:
    a command stopped before it wrote anything (killed writes left them), or one claiming the directory right
    now (its lock and marker are written under temporary names first; two shards of a sweep start at once)."""
    entries = sorted(p.name for p in path.iterdir()) if entries is None else entries
    left = [n for n in entries if not (n == LOCK_NAME and _our_lock(path / n)) and not _TEMPORARY.match(n)]
    return not left


def _our_lock(path: Path) -> bool:
    """A lock file a command of ours took (rundir.RunLock: pid and host), live or left by a dead process."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(owner, dict) and {"pid", "host"} <= set(owner)


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def clear_output(path: str | Path, kind: str) -> None:
    """--overwrite / --force: remove what `kind` wrote in `path` (its entries and the outputs nested in it),
    never the lock; everything is checked first (the rule of `check_output`), so a directory holding
    anything else loses nothing."""
    path = Path(path)
    _check_owned(path, _kinds()[kind], str(path))
    for child in path.iterdir():
        if child.name != LOCK_NAME:
            remove(child)


def unclaim_if_unused(path: str | Path) -> None:
    """Remove the marker of an output directory that holds nothing else but the lock (a command refused
    after claiming it); the lock's release then removes the directory it made: a refusal leaves no trace."""
    path = Path(path)
    if not path.is_dir() or {p.name for p in path.iterdir()} - {OUTPUT_MARKER, LOCK_NAME}:
        return
    (path / OUTPUT_MARKER).unlink(missing_ok=True)


def remove(path: Path) -> None:
    """Delete a file, a symlink (never what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine."""
    if pid <= 0:  # os.kill(0 or -1, 0) would ask about process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


_TEMPORARY = re.compile(rf"^{re.escape(TMP_PREFIX)}.*-(\d+)(\.\w+)?$")  # .tmp-<name>-<pid>[.<random>]


def clean_stale(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries that killed writers left in `directory` (only of `name` when given):
    `.tmp-*-<pid>` entries whose process is gone. Returns what was removed."""
    removed = []
    if not directory.is_dir():
        return removed
    prefix = f"{TMP_PREFIX}{name}-" if name else TMP_PREFIX
    for path in directory.iterdir():
        m = _TEMPORARY.match(path.name)
        if m and path.name.startswith(prefix) and not pid_alive(int(m.group(1))):
            remove(path)
            removed.append(path)
    return removed


# ---- names ------------------------------------------------------------------------------------------------
def looks_local(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether the user meant `name` as a local path rather than a hub id: an explicit path (`/`, `./`,
    `../`, `~`), a file suffix of `suffixes`, or `dir/...` where `dir` exists here."""
    if name.startswith(("./", "../", "/", "~", ".\\")) or name.lower().endswith(suffixes):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).expanduser().is_dir()


# ---- JSON -------------------------------------------------------------------------------------------------
def read_json_object(path: str | Path) -> dict:
    """A JSON file holding an object; anything else (unreadable, not JSON, not an object) is a UserError."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):  # a device or a named pipe: never read
        raise UserError(f"{path}: is not a regular file (a device, a pipe or a socket)")
    with reading(path):
        raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


def safetensors_header(path: str | Path) -> dict:
    """The header of a safetensors file, checked against the file before any library opens it: a file that
    is cut short, is not safetensors or cannot be read is one line naming it (UserError)."""
    path = Path(path)
    with reading(path), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            raise UserError(f"{path}: not a complete safetensors file ({size} bytes; its header "
                            f"{'is cut short' if length >= 2 else 'is missing'})")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise UserError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise UserError(f"{path}: not a safetensors file (tensor {name!r} has no valid data_offsets)")
        if offsets[1] > data:
            raise UserError(f"{path}: cut short: tensor {name!r} ends at byte {offsets[1]} of its data, the file holds {data}")
    return header


# ---- JSON lines ---------------------------------------------------------------------------------------
def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append records as JSON lines in one write, then flush and fsync."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not lines:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_resumable(path: str | Path, *, repair: bool = True) -> list[dict]:
    """Records of an append-only JSON-lines file; [] when it does not exist.

    Every write ends with a newline, so text after the last newline is a torn write (a kill in
    the middle of `append_jsonl`): it is dropped, and with `repair` the file is truncated to its
    last complete line. A complete line that is not a JSON object means the file was edited or is
    not ours: a UserError naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    *complete, tail = data.split(b"\n")  # `tail` is what follows the last newline: b"" or torn
    records: list[dict] = []
    for i, raw in enumerate(complete):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):
            rec = None
        if not isinstance(rec, dict):
            raise UserError(f"line {i + 1} is not a JSON object; remove the file to redo this part", where=str(path))
        records.append(rec)
    if tail and repair:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
    return records


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """A JSON-lines input file; a missing file, an unreadable one or a bad line is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {path} {'is a directory, not a file' if path.is_dir() else absent(path)}")
    with reading(path):
        lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise UserError(f"line {i + 1}: not JSON ({problem_of(err)})", where=str(path)) from None
        if not isinstance(rec, dict):
            raise UserError(f"line {i + 1}: expected a JSON object", where=str(path))
        records.append(rec)
    return records


def guard_resume(run_file: Path, outputs: list[Path], fingerprint: dict, *, overwrite: bool = False) -> None:
    """Make `outputs` safe to resume onto, then record `fingerprint` in `run_file`.

    Earlier outputs made with the same fingerprint are kept (the caller skips what they hold). Made
    with another one (or without a readable run file), they are a UserError, raised before anything is
    written, unless `overwrite`: then they are deleted.
    """
    existing = [p for p in outputs if p.exists()]
    if existing:
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != fingerprint:
            if not overwrite:
                if isinstance(previous, dict):
                    differs = "; ".join(
                        f"{k}: {previous.get(k)!r} then, {v!r} now" for k, v in fingerprint.items() if previous.get(k) != v
                    )
                else:
                    differs = f"no readable {run_file.name} beside them"
                raise UserError(
                    f"holds results made with other settings ({differs}); use another output directory, "
                    "or overwrite to discard them",
                    where=str(run_file.parent),
                )
            for p in existing:
                p.unlink()
    write_json(run_file, fingerprint)
