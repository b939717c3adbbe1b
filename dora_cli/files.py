"""Crash-safe files: every file and directory dora_cli writes goes through here.

- `atomic_file` / `write_text` / `write_json`: a temporary sibling, fsync, `os.replace`. A reader sees
  the old file or the new one, never half of one.
- `atomic_directory`: a directory filled under a temporary sibling name and renamed into place
  (replacing an older one only when asked); a killed writer leaves a `.tmp-<name>-<pid>` sibling that
  `clean_stale` removes on the next run.
- `append_jsonl` / `read_jsonl_resumable`: append-only JSON lines, flushed and fsynced per call, read
  back with a torn last line dropped; `read_jsonl`: a JSON-lines input file.
- `guard_resume`: outputs made with other settings are never mixed into a resumed run.

Permissions are those of an ordinary file or directory (the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dora_cli.errors import UserError, problem_of, reading

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{temporary_sibling(path).name}.", dir=path.parent)
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
    `replace`, else a UserError."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
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


def check_output_dir(path: str | Path, *, label: str, exists_ok: bool) -> Path:
    """Refuse, before any work, a directory `path` that this command could not create or replace:
    a file or a dangling symlink in its place, a parent that is a file, a parent we cannot write, or
    (unless `exists_ok`) an existing directory. `label` names the setting in the message (`--out x`)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{label}: is a symbolic link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise UserError(f"{label}: is a file; expected a directory")
    if path.is_dir() and not exists_ok:
        raise UserError(f"{label}: already exists")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{label}: cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{label}: cannot be written: {ancestor} is not writable (read-only or no permission)")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{label}: is not writable (read-only or no permission)")
    return path


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


_STALE = re.compile(rf"^{re.escape(TMP_PREFIX)}.*-(\d+)(\.\w+)?$")  # .tmp-<name>-<pid>[.<random>]


def clean_stale(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries that killed writers left in `directory` (only of `name` when given):
    `.tmp-*-<pid>` entries whose process is gone. Returns what was removed."""
    removed = []
    if not directory.is_dir():
        return removed
    prefix = f"{TMP_PREFIX}{name}-" if name else TMP_PREFIX
    for path in directory.iterdir():
        m = _STALE.match(path.name)
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
    with reading(path):
        raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


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
        raise UserError(f"{what}: {path} does not exist")
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
