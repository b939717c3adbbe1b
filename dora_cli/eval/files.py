"""Crash-safe files for evaluation outputs: atomic writes and append-only JSON lines.

- `write_atomic` / `write_json`: temporary file in the same directory, fsync, `os.replace`.
  A reader sees the old file or the new one, never half of one.
- `append_jsonl`: one JSON object per line, flushed and fsynced per call (one call per finished
  batch), so a killed run loses at most the batch that was running.
- `read_jsonl_resumable`: reads such a file back, dropping a torn last line (a kill in the middle of
  a write) and truncating it away, so that the next append starts on a clean line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dora_cli.errors import UserError


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            raise UserError(f"line {i + 1} is not a JSON object; remove the file to redo this part", where=str(path))
        records.append(rec)
    if tail and repair:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
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


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """A JSON-lines input file; a missing file or a bad line is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {path} does not exist")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise UserError(f"line {i + 1}: not JSON ({err})", where=str(path)) from None
        if not isinstance(rec, dict):
            raise UserError(f"line {i + 1}: expected a JSON object", where=str(path))
        records.append(rec)
    return records
