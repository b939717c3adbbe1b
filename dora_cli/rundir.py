"""The output directory of a run, and everything in it: nobody else spells these paths.

    output_dir/
      .dora_output             {"kind": "train"}: a run directory (files.check_output; earlier runs: .dora_run)
      .lock                    pid and host of the run using the directory (a dead owner's lock is taken over)
      recipe.yaml              the resolved recipe of the run that owns the directory (${env:...} as written)
      inputs.json              what the run trains on (input_fingerprints), compared by --resume
      accelerate.yaml          the Accelerate setup it trained with, as set up (processes, machines, strategy and
                               its settings; `accelerate launch --config_file` reads it), rewritten at each start
      deepspeed.json           the DeepSpeed config it ran with (strategy deepspeed only)
      train.log                every line the run printed, with time stamps
      metrics.jsonl            one record per log step / validation / skipped step
      metrics.json             the summary, written at the end
      trackers/                the experiment trackers of train.report_to (TensorBoard event files under
                               dora_cli/, wandb's offline runs under wandb/)
      checkpoint-<step>/       complete checkpoints only: written under a temporary name, then renamed
        adapter_config.json, adapter_model.safetensors, dora_cli_adapter.json (or a whole model: method full)
        recipe.yaml
        trainer_state/         optimizer.pt (tensors only) and state.json (the step); the schedule, the data
                               order and the dropout masks are functions of the step
        manifest.json          size and sha256 of every other file, exactly the files present: written last,
                               checked on resume and by every command that reads the checkpoint
      final/                   the same, without trainer_state/
      eval-<checkpoint>/, <checkpoint>-merged/   dora eval's and dora merge's default outputs (their own kinds)

`RunDir` is the run's handle on all of it: the identity check (is this the same recipe, on the same inputs?), clearing,
the recipe, the run log, metrics, checkpoints and the trainer state. Writes that fail (disk full,
read-only) end the run with one line naming the file; complete checkpoints already written stay intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from dora_cli.console import say
from dora_cli.errors import RunFailure, UserError, clip, reading
from dora_cli.files import (
    LOCK_NAME,
    OUTPUT_MARKER,
    TMP_PREFIX,
    OutputKind,
    atomic_directory,
    check_output,
    clear_output,
    fsync_path,
    output_kind,
    pid_alive,
    read_json_object,
    register_output_kind,
    remove,
    write_json,
    write_output_marker,
)

LEGACY_MARKER = ".dora_run"  # the marker of runs made before files.OUTPUT_MARKER, with this text:
LEGACY_MARKER_TEXT = "a dora_cli run directory (dora train --overwrite may clear it)\n"
INPUTS_NAME = "inputs.json"
MANIFEST_NAME = "manifest.json"
RECIPE_NAME = "recipe.yaml"
ACCELERATE_NAME = "accelerate.yaml"
DEEPSPEED_NAME = "deepspeed.json"
LOG_NAME = "train.log"
METRICS_LOG_NAME = "metrics.jsonl"
METRICS_NAME = "metrics.json"
TRACKERS_NAME = "trackers"
STATE_DIR = "trainer_state"
FINAL_NAME = "final"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

VOLATILE = {
    "output_dir", "eval", "expected", "launch",
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_last",
    "train.skip_nonfinite", "train.report_to",
    # (not train.max_steps / train.epochs: the learning-rate schedule spans the run's length)
    # how the same computation runs: the same batches, dropout masks and losses, within float rounding
    # (not data.packing or train.compile: with dropout they draw other masks)
    "train.threads", "optim.fused",
}
"""Dotted recipe keys that may change between a run and its resumption without changing what is trained."""


# ---- lock ---------------------------------------------------------------------------------------
LOCK_ATTEMPTS = 100
"""Looks at a contended lock before giving up (each finds it taken and released again, or breaks a stale one)."""
LOCK_WRITE_GRACE_S = 30.0
"""A lock file that is not a complete record yet is being written (no hard links: created, then filled) for
this long; older, it is debris."""


class RunLock:
    """An exclusive claim on a directory, released on exit; a crashed owner's lock is stale.

    The lock file (`name`, LOCK_NAME by default) is created with its content in one step (a hard link of a
    complete temporary file), so a process never reads a half-written lock (without hard links it is created,
    then filled: a young incomplete file counts as held). A stale lock is deleted only after it is judged
    stale again under an flock on that file while its path still names it, so that of several processes
    finding one stale lock none deletes the lock another has just taken. The directories the lock had to
    create (parents included) are removed again on release when nothing was written into them, so a command
    refused after taking the lock leaves the disk as it was."""

    def __init__(self, directory: Path, what: str = "dora run", noun: str = "output_dir", name: str = LOCK_NAME):
        self.path = Path(directory) / name
        self.what, self.noun = what, noun
        self.held = False
        self.created: Path | None = None

    def acquire(self) -> RunLock:
        owner = self.try_acquire()
        if owner is None:
            return self
        directory = self.path.parent
        if owner.get("host") is None:
            raise UserError(f"{directory}: another process is taking this {self.noun} ({self.path} is being written); "
                            f"wait for it or choose another {self.noun}")
        if owner.get("host") == socket.gethostname():
            raise UserError(
                f"{directory}: another {self.what} (pid {owner['pid']}) is using this {self.noun}; "
                f"wait for it or choose another {self.noun}"
            )
        raise UserError(
            f"{directory}: locked by a run on host {owner.get('host')!r} (pid {owner.get('pid')}); "
            f"if that run is gone, delete {self.path}"
        )

    def try_acquire(self) -> dict | None:
        """Take the lock: None when taken, else its owner's record (pid, host) when a live process on this
        host, or any process on another host, holds it (pid and host None: a lock file still being written)."""
        directory = self.path.parent
        missing = directory
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent  # the topmost directory this lock makes (parents included)
        if not directory.exists():
            self.created = missing
        directory.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(LOCK_ATTEMPTS):
            # A held lock is seen before anything is written (a refused command leaves the disk as it was).
            if not os.path.lexists(self.path) and self._link(me):
                self.held = True
                return None
            try:
                owner = self._holder(self.path.read_text(), os.lstat(self.path).st_mtime)
            except FileNotFoundError:
                continue  # released since: look again (never delete what may be another's new lock)
            except OSError:
                owner = None  # not a readable file: not a lock of ours
            if owner is not None:
                return owner
            self._break_stale()
        raise UserError(f"{self.path}: could not take the lock")

    @staticmethod
    def _holder(text: str, mtime: float) -> dict | None:
        """Who holds a lock file with this text: its record when its process may be alive (on this host, or
        any process on another), a placeholder when the file is young and not yet complete, else None
        (stale: its owner is dead, or the file is not a lock)."""
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        if not isinstance(owner, dict):
            young = time.time() - mtime < LOCK_WRITE_GRACE_S
            return {"pid": None, "host": None} if young else None
        if owner.get("host") != socket.gethostname():
            return owner
        try:
            return owner if pid_alive(int(owner.get("pid", -1))) else None
        except (TypeError, ValueError):
            return None

    def _break_stale(self) -> None:
        """Delete the lock file if it is still stale, judged again while holding an flock on that very file,
        and only if the path still names it: of several processes breaking one stale lock, one deletes it;
        the others find it gone or replaced by the winner's lock, which they leave alone."""
        try:
            fd = os.open(self.path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return
        except OSError:
            try:  # read-only for us (another user's lock): an flock on a read-only file works where it is local
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                return
            except OSError:  # a symbolic link, or an entry that cannot be opened: no lock of ours
                self.path.unlink(missing_ok=True)
                return
        try:
            with contextlib.suppress(ImportError, OSError):
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                return
            if not same:
                return
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise UserError(f"{self.path}: a directory where the lock file goes; move it away")
            text = os.read(fd, 1 << 16).decode("utf-8", errors="replace")
            if self._holder(text, os.fstat(fd).st_mtime) is None:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _link(self, me: dict) -> bool:
        """Create the lock file with `me` in it, whole; False if it exists."""
        tmp = self.path.parent / f"{TMP_PREFIX}{self.path.name}-{os.getpid()}"
        try:
            tmp.write_text(json.dumps(me))
            os.link(tmp, self.path)
            return True
        except (FileExistsError, FileNotFoundError):  # taken; or our temporary was cleaned away: look again
            return False
        except OSError:  # a file system without hard links: create it exclusively, then fill it
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return True
        finally:
            tmp.unlink(missing_ok=True)

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
            if self.created is not None:  # what it made, when nothing was written into it (empty directories only)
                for directory in [self.path.parent, *self.path.parent.parents]:
                    with contextlib.suppress(OSError):
                        directory.rmdir()
                    if directory == self.created:
                        break

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- manifests ----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record size and sha256 of every file under `directory` (fsynced), then the manifest itself."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        fsync_path(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = directory / MANIFEST_NAME
    manifest.write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    fsync_path(manifest)


def verify(directory: Path) -> str | None:
    """None if the checkpoint is intact: its manifest lists exactly the files present, each with the size
    and sha256 it has; else what is wrong with it (one phrase). A file the manifest does not list, or a
    listed one that is missing, is damage as much as a changed one."""
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = {str(name): (int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return f"{MANIFEST_NAME} is damaged"
    try:
        present = sorted(
            p.relative_to(directory).as_posix() for p in directory.rglob("*")
            if (p.is_symlink() or not p.is_dir()) and p != manifest
        )
    except OSError as err:
        return f"cannot be listed ({err.strerror or err})"
    unlisted = [name for name in present if name not in entries]
    if unlisted:
        return f"{unlisted[0]} is not listed in {MANIFEST_NAME}"
    for name, (size, digest) in sorted(entries.items()):
        if name not in present:
            return f"{name} is missing"
        path = directory / name
        if path.is_symlink() or not path.is_file():
            return f"{name} is not a regular file"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


# ---- checkpoints --------------------------------------------------------------------------------------
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
        remove(doomed)


def clean_temporaries(output_dir: Path) -> None:
    """Remove what interrupted writes left behind (never a complete checkpoint); the run holds the lock."""
    if output_dir.is_dir():
        for path in output_dir.glob(f"{TMP_PREFIX}*"):
            remove(path)


def is_checkpoint_name(name: str) -> bool:
    return bool(CHECKPOINT_RE.match(name)) or name == FINAL_NAME


def run_checkpoints(directory: Path) -> list[Path]:
    """Every checkpoint-<step>/ (by step) and final/ of a run directory; [] for anything else (a
    checkpoint itself, a model directory, a path that is not a directory)."""
    from dora_cli.adapters.checkpoint import CONFIG_NAME

    if not directory.is_dir() or (directory / CONFIG_NAME).is_file() or (directory / "config.json").is_file():
        return []
    final = directory / FINAL_NAME
    return [p for _, p in checkpoints(directory)] + ([final] if final.is_dir() else [])


def checkpoint_step(path: Path) -> int | None:
    """The training step a checkpoint holds: trainer_state/state.json's step, else its checkpoint-<step>
    name; for final/ the run's last step (metrics.json, else the recipe's max_steps, else the newest
    checkpoint); None when nothing tells."""
    state = path / STATE_DIR / "state.json"
    if state.is_file():
        step = read_json_object(state).get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise UserError(f"{state}: no integer 'step'")
        return step
    m = CHECKPOINT_RE.match(path.name)
    if m:
        return int(m.group(1))
    if path.name != FINAL_NAME:
        return None
    try:
        return int(json.loads((path.parent / METRICS_NAME).read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    recipe = saved_recipe(path)
    if recipe is not None and recipe.train.max_steps is not None:
        return recipe.train.max_steps
    steps = checkpoints(path.parent)
    return steps[-1][0] if steps else None


def inside_a_checkpoint(path: Path) -> Path | None:
    """The checkpoint directory (one with a manifest) that `path` is or lies inside, else None."""
    for candidate in (path, *path.parents):
        if (candidate / MANIFEST_NAME).is_file():
            return candidate
    return None


# ---- the identity of a run ------------------------------------------------------------------------------
def identity(recipe) -> dict:
    """What makes two runs the same run (resumable into each other): the recipe without volatile keys,
    its paths absolute (a saved recipe's are; relative ones are taken from the current directory)."""
    from dora_cli.recipe import absolute_paths, dump_recipe, safe_load

    data = safe_load(dump_recipe(absolute_paths(recipe), resolved=True))
    for dotted in VOLATILE:
        *sections, key = dotted.split(".")
        section = data
        for name in sections:
            section = section.get(name) or {}
        section.pop(key, None)
    return data


def first_difference(a, b, prefix: str = "") -> str:
    """The dotted key of the first difference between two recipe documents ("the recipe" at the top)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "the recipe"


def saved_recipe(directory: Path):
    """The recipe a run directory holds (its recipe.yaml, `${env:...}` resolved), None without one."""
    from dora_cli.recipe import load_recipe

    path = directory / RECIPE_NAME
    if not path.is_file():
        return None
    return load_recipe(path, optional=sorted(VOLATILE))  # a ${env:...} unset in a key that may change stays


def _legacy_run(directory: Path) -> bool:
    """A run directory of an earlier version: its marker, or a recipe it saved beside the log it wrote."""
    marker = directory / LEGACY_MARKER
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if marker.is_file() and marker.read_text(encoding="utf-8") == LEGACY_MARKER_TEXT:
            return True
    if not ((directory / RECIPE_NAME).is_file() and (directory / LOG_NAME).is_file()):
        return False
    try:
        return saved_recipe(directory) is not None
    except UserError:
        return False


CHECKPOINT_FILES = (
    MANIFEST_NAME, RECIPE_NAME, "adapter_config.json", "adapter_model.safetensors", "dora_cli_adapter.json",
    STATE_DIR, f"{STATE_DIR}/optimizer.pt", f"{STATE_DIR}/state.json",
    # method full: a whole model and its tokenizer (save_pretrained)
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer*",
    "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", "*.model",
)
"""The paths a checkpoint holds (what its manifest lists and the manifest): anything else in it is the user's."""

TRAIN_OUTPUT = register_output_kind(OutputKind(
    "train", "dora train",
    entries=(LEGACY_MARKER, RECIPE_NAME, ACCELERATE_NAME, DEEPSPEED_NAME, LOG_NAME, METRICS_LOG_NAME, METRICS_NAME,
             TRACKERS_NAME, INPUTS_NAME, "checkpoint-*", FINAL_NAME),
    nested=(("eval", "eval"), ("eval-*", "eval"), ("*-merged", "merge")),
    legacy=_legacy_run,
    contents=(("checkpoint-*", CHECKPOINT_FILES), (FINAL_NAME, CHECKPOINT_FILES),
              (TRACKERS_NAME, ("dora_cli", "dora_cli/**", "wandb", "wandb/**"))),
    sealed=("checkpoint-*", FINAL_NAME),
))
"""What `dora train` writes in output_dir; the default outputs of `dora eval` (eval-<checkpoint>) and
`dora merge` (<checkpoint>-merged) of its checkpoints sit beside them."""


# ---- the inputs of a run ------------------------------------------------------------------------------
FULL_HASH_LIMIT = 1 << 30
"""Files up to this size are hashed whole; larger ones (weights of big models) by their header and 64
blocks spread over the file: any other weights of the same layout differ in them."""
_BLOCK = 1 << 16


def file_fingerprint(path: Path) -> dict:
    """Size and sha256 of a file (sampled past FULL_HASH_LIMIT: the first MiB, 64 blocks, the last block)."""
    size = path.stat().st_size
    if size <= FULL_HASH_LIMIT:
        return {"size": size, "sha256": _sha256(path)}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        for i in range(65):
            f.seek(min(size - _BLOCK, i * (size - _BLOCK) // 64))
            h.update(f.read(_BLOCK))
    return {"size": size, "sha256_sampled": h.hexdigest()}


def _files_fingerprint(path: Path, recursive: bool) -> dict:
    """{relative name: fingerprint} of a file (its own name) or of the files of a directory."""
    if path.is_file():
        return {path.name: file_fingerprint(path)}
    found = path.rglob("*") if recursive else path.iterdir()
    return {p.relative_to(path).as_posix(): file_fingerprint(p) for p in sorted(found)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)}


def input_fingerprints(recipe) -> dict:
    """What a run trains on, by the recipe key that names it: each local data source (size and sha256 of
    its files), the base model and tokenizer directories or .gguf file (config, tokenizer and weight files).
    A hub name is recorded as such (the hub's revision is not pinned here)."""
    named = [(f"data.sources[{i}].path", source.path, True) for i, source in enumerate(recipe.data.sources)]
    named += [("model.name_or_path", recipe.model.name_or_path, False), ("model.tokenizer", recipe.model.tokenizer, False)]
    found: dict = _environment_fingerprints(recipe)
    for key, value, recursive in named:
        if not value:
            continue
        path = Path(value).expanduser()
        if path.exists():
            with reading(path):
                found[key] = {"path": str(path.resolve()), "files": _files_fingerprint(path, recursive)}
        else:
            found[key] = {"hub": value}
    return found


def _environment_fingerprints(recipe) -> dict:
    """The values a recipe took from the environment that make the run what it is (not the volatile keys),
    by their sha256 only: the saved recipe keeps the `${env:...}` reference, the resumed run compares."""
    from dora_cli.recipe import env_references, value_at

    same_run = identity(recipe)
    found = {}
    for ref in env_references(recipe):
        present, value = value_at(same_run, ref.loc)
        if present:
            digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
            found[ref.key] = {"env": ref.text, "sha256": digest}
    return found


def input_change(before: dict, now: dict) -> str | None:
    """The first input that differs between two `input_fingerprints`, in words; None when they agree."""
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        if "env" in (a or {}) or "env" in (b or {}):
            return f"{key}: its value from the environment ({(a or b)['env']}) is not the one the run started with"
        if a is None or b is None or "files" not in a or "files" not in b:
            return f"{key}: {'added' if a is None else 'removed' if b is None else 'another source'} since the run started"
        files_a, files_b = a["files"], b["files"]
        for name in sorted(set(files_a) | set(files_b)):
            fa, fb = files_a.get(name), files_b.get(name)
            if fa == fb:
                continue
            where = Path(b["path"]) / name if Path(b["path"]).is_dir() else Path(b["path"])
            if fa is None:
                return f"{key}: {where} was added since the run started"
            if fb is None:
                return f"{key}: {where} was removed since the run started"
            if fa.get("size") != fb.get("size"):
                return f"{key}: {where} has changed since the run started ({fa.get('size')} bytes then, {fb.get('size')} now)"
            return f"{key}: {where} has changed since the run started (same size, other content)"
        return f"{key}: {b.get('path')} has changed since the run started"
    return None


def writing(path: Path):
    """A failed write (disk full, read-only, permissions) ends the run with one line naming what failed."""
    return _Writing(path)


class _Writing(contextlib.AbstractContextManager):
    def __init__(self, path: Path):
        self.path = path

    def __exit__(self, kind, err, tb):
        if isinstance(err, OSError):
            raise RunFailure(
                f"could not write {self.path}: {err.strerror or err}; complete checkpoints already written are intact"
            ) from None
        return False


# ---- the run's handle on its directory ---------------------------------------------------------------------
class RunDir:
    """output_dir of one run: checked before anything is written, claimed under the lock, then written."""

    kind = TRAIN_OUTPUT.name

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.recipe_file = self.path / RECIPE_NAME
        self.metrics_log = self.path / METRICS_LOG_NAME
        self.metrics_file = self.path / METRICS_NAME
        self.final = self.path / FINAL_NAME
        self.trackers = self.path / TRACKERS_NAME
        self.log_file: Path | None = None  # set when the run owns the directory

    def checkpoint(self, step: int) -> Path:
        return self.path / f"checkpoint-{step}"

    # ---- before anything is written ----------------------------------------------------------
    def check(self, recipe, *, resume: bool, overwrite: bool) -> None:
        """Refuse, before any work, an output_dir this run may not use (files.check_output: a folder holding
        anything a run does not write, inside a checkpoint or another output, a link for --overwrite),
        another recipe's run (unless --overwrite), a finished run of this recipe without --resume, and for
        --resume inputs that changed since the run started."""
        label = f"output_dir {self.path}"
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        check_output(self.path, TRAIN_OUTPUT.name, label=label, replace=overwrite)
        if overwrite:
            return
        key = self.difference(recipe)
        if key is not None:
            raise UserError(
                f"{self.path}: holds a run of a different recipe ({key} differs); "
                "choose another output_dir or pass --overwrite to replace it"
            )
        if not resume and saved_recipe(self.path) is not None:
            if self.finished():
                raise UserError(f"{self.path}: holds a finished run of this recipe; pass --overwrite to start over")
            if checkpoints(self.path) or self.final.exists():
                raise UserError(f"{self.path}: holds a run of this recipe; pass --resume to continue it or --overwrite to start over")
        if resume:
            self.check_inputs(recipe)

    def check_inputs(self, recipe) -> None:
        """--resume: the inputs must be those the run started with (inputs.json; a run made before the
        record has none to compare)."""
        before = self.recorded_inputs()
        if before is None:
            return
        change = input_change(before, input_fingerprints(recipe))
        if change is not None:
            raise UserError(f"{change}; --resume continues a run on the inputs it started with: restore them, "
                            "or start over with --overwrite", where=f"output_dir {self.path}")

    def recorded_inputs(self) -> dict | None:
        path = self.path / INPUTS_NAME
        return read_json_object(path) if path.is_file() else None

    def difference(self, recipe) -> str | None:
        """The first key in which the run this directory holds differs from `recipe` (None: no run, or the
        same run, resumable into each other)."""
        previous = saved_recipe(self.path)
        if previous is None:
            return None
        mine, theirs = identity(recipe), identity(previous)
        return first_difference(mine, theirs) if mine != theirs else None

    def finished(self) -> bool:
        """Whether the run ended: its final/ is complete and intact."""
        return self.final.is_dir() and verify(self.final) is None

    def is_a_run(self) -> bool:
        """A directory a run of ours made (its marker, or the files of an earlier version's run)."""
        return output_kind(self.path) == TRAIN_OUTPUT.name

    # ---- claiming ------------------------------------------------------------------------------------
    def claim(self, recipe, *, overwrite: bool) -> None:
        """Under the lock: check the directory again (a file may have appeared since), clear a previous
        run (--overwrite: only what runs write, never through links), remove interrupted writes, mark the
        directory as a run, record its inputs (a new run) and start the run log."""
        label = f"output_dir {self.path}"
        check_output(self.path, TRAIN_OUTPUT.name, label=label, replace=overwrite)
        if overwrite:
            clear_output(self.path, TRAIN_OUTPUT.name)
        clean_temporaries(self.path)
        with writing(self.path / OUTPUT_MARKER):
            if not (self.path / OUTPUT_MARKER).is_file():
                write_output_marker(self.path, TRAIN_OUTPUT.name)
        inputs = self.path / INPUTS_NAME
        if not inputs.is_file():
            with writing(inputs):
                write_json(inputs, input_fingerprints(recipe))
        self.log_file = self.path / LOG_NAME

    def log(self, message: str) -> None:
        """A line for the user (stderr) and, once the run owns the directory, for train.log."""
        say(message)
        if self.log_file is not None:
            with writing(self.log_file), open(self.log_file, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def close(self) -> None:
        self.log_file = None

    # ---- recipe and metrics ----------------------------------------------------------------------------
    def write_recipe(self, text: str, directory: Path | None = None) -> None:
        path = (directory or self.path) / RECIPE_NAME
        with writing(path):
            path.write_text(text)

    def write_launch(self, accelerate: dict, deepspeed: dict | None) -> None:
        """accelerate.yaml (and deepspeed.json, or none) of the setup this run trains with."""
        import yaml

        path = self.path / ACCELERATE_NAME
        with writing(path):
            path.write_text(yaml.safe_dump(accelerate, sort_keys=False))
        path = self.path / DEEPSPEED_NAME
        with writing(path):
            if deepspeed is None:
                path.unlink(missing_ok=True)
            else:
                write_json(path, deepspeed)

    def log_event(self, record: dict) -> None:
        with writing(self.metrics_log), open(self.metrics_log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def events(self) -> list[dict]:
        if not self.metrics_log.is_file():
            return []
        return [json.loads(x) for x in self.metrics_log.read_text().splitlines() if x.strip()]

    def truncate_events(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint a run resumes from (the killed run wrote them)."""
        if self.metrics_log.is_file():
            kept = [json.dumps(e) for e in self.events() if e.get("step", 0) <= step]
            with writing(self.metrics_log):
                self.metrics_log.write_text("".join(k + "\n" for k in kept))

    def write_metrics(self, metrics: dict) -> None:
        with writing(self.metrics_file):
            write_json(self.metrics_file, metrics)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def write_checkpoint(self, target: Path, fill: Callable[[Path], None]) -> Path:
        """`target` (a checkpoint-<step> or final/) whole or not at all, with its manifest; SIGINT / SIGTERM
        are held while it is renamed into place."""
        def fill_and_seal(tmp: Path) -> None:
            fill(tmp)
            write_manifest(tmp)

        with _deferred_signals(), writing(target):
            return atomic_directory(target, fill_and_seal)

    def write_state(self, directory: Path, optimizer_state: dict, state: dict) -> None:
        """trainer_state/ of a checkpoint: the optimizer's tensors and the step (no RNG state: the data
        order and the dropout masks are functions of the step)."""
        import torch

        path = directory / STATE_DIR
        path.mkdir()
        torch.save(optimizer_state, path / "optimizer.pt")
        write_json(path / "state.json", state)

    @staticmethod
    def read_state(directory: Path) -> tuple[dict, dict]:
        """(optimizer state, state.json) of a checkpoint; the optimizer file holds tensors only."""
        path = directory / STATE_DIR
        return load_tensors_only(path / "optimizer.pt"), read_json_object(path / "state.json")


class _deferred_signals:
    """Hold SIGINT / SIGTERM while a checkpoint is renamed into place (they are delivered afterwards)."""

    def __enter__(self):
        import signal

        self.blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    def __exit__(self, *exc):
        import signal

        signal.pthread_sigmask(signal.SIG_SETMASK, self.blocked)
        return False


def load_tensors_only(path: Path):
    """torch.load restricted to tensors and plain containers: a file carrying other pickled objects is refused."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise UserError(f"{path}: refused: not a plain tensor file ({clip(str(err).splitlines()[0], 120)})") from None
