"""The output directory of a run: one owner at a time, one recipe, checkpoints that are whole or absent.

    output_dir/
      .lock                    pid and host of the run using the directory (a dead owner's lock is taken over)
      recipe.yaml              the resolved recipe of the run that owns the directory
      checkpoint-<step>/       complete checkpoints only: written under a temporary name, then renamed
        manifest.json          size and sha256 of every other file: written last, checked on resume
      final/
      metrics.jsonl, metrics.json

A checkpoint directory is "complete" when its manifest exists and every file matches it. `--resume`
takes the newest complete one and names every damaged one it passes over.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from dora_cli.errors import UserError

LOCK_NAME = ".lock"
MANIFEST_NAME = "manifest.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"


# ---- lock ---------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive claim on an output directory, released on exit; a crashed owner's lock is stale."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and _alive(int(owner.get("pid", -1))):
                    raise UserError(
                        f"{self.path.parent}: another dora run (pid {owner['pid']}) is using this output_dir; "
                        "wait for it or choose another output_dir"
                    ) from None
                if owner and owner.get("host") != me["host"]:
                    raise UserError(
                        f"{self.path.parent}: locked by a run on host {owner.get('host')!r} (pid {owner.get('pid')}); "
                        f"if that run is gone, delete {self.path}"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is dead
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"{self.path}: could not take the lock")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- manifests and atomic directories ---------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    """Record size and sha256 of every file under `directory` (fsynced), then the manifest itself."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        _fsync(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = directory / MANIFEST_NAME
    manifest.write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    _fsync(manifest)


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it (one phrase)."""
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_NAME} is damaged"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, {meta['size']} were written"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def atomic_directory(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create `target` whole or not at all: `fill` writes into a temporary sibling, a manifest is
    added, and the directory is renamed into place (replacing an older `target`)."""
    target = Path(target)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        write_manifest(tmp)
        old = None
        if target.exists():
            old = target.parent / f"{TMP_PREFIX}old-{target.name}-{os.getpid()}"
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def clean_temporaries(output_dir: Path) -> None:
    """Remove what interrupted writes left behind (never a complete checkpoint)."""
    if output_dir.is_dir():
        for path in output_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# ---- checkpoints ----------------------------------------------------------------------------------------
def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-<step> directory, oldest first (complete or not)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def newest_intact(output_dir: Path, say: Callable[[str], None]) -> tuple[int, Path] | None:
    """The newest complete, intact checkpoint; every damaged one passed over is reported through `say`."""
    for step, path in reversed(checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return step, path
        say(f"{path.name} is damaged ({problem}); falling back to an older checkpoint")
    return None


def prune(output_dir: Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` checkpoints."""
    if keep_last is None:
        return
    for _, path in checkpoints(output_dir)[:-keep_last]:
        # Renamed first: a kill during the deletion leaves a temporary, never a half checkpoint.
        doomed = path.parent / f"{TMP_PREFIX}pruned-{path.name}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
