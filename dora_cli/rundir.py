"""The output directory of a run, and everything in it: nobody else spells these paths.

    output_dir/
      .dora_run                marks a directory dora_cli made: the only kind --overwrite may clear
      .lock                    pid and host of the run using the directory (a dead owner's lock is taken over)
      recipe.yaml              the resolved recipe of the run that owns the directory
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
        manifest.json          size and sha256 of every other file: written last, checked on resume and by
                               every command that reads the checkpoint
      final/                   the same, without trainer_state/

`RunDir` is the run's handle on all of it: the identity check (is this the same recipe?), clearing,
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
import time
from collections.abc import Callable
from pathlib import Path

from dora_cli.console import say
from dora_cli.errors import RunFailure, UserError, clip
from dora_cli.files import TMP_PREFIX, atomic_directory, fsync_path, pid_alive, remove, write_json

LOCK_NAME = ".lock"
MARKER_NAME = ".dora_run"
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
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.max_steps", "train.epochs",
    "train.skip_nonfinite", "train.report_to",
    # how the same computation runs: the same batches, dropout masks and losses, within float rounding
    # (not data.packing or train.compile: with dropout they draw other masks)
    "train.threads", "optim.fused",
}
"""Dotted recipe keys that may change between a run and its resumption without changing what is trained."""


# ---- lock ---------------------------------------------------------------------------------------
class RunLock:
    """An exclusive claim on a directory, released on exit; a crashed owner's lock is stale.

    The lock file (`name`, LOCK_NAME by default) is created with its content in one step (a hard link of a
    complete temporary file), so a process never reads a half-written lock. A directory the lock had to
    create is removed again on release when nothing was written into it, so a command refused after
    taking the lock leaves the disk as it was."""

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
        host, or any process on another host, holds it."""
        directory = self.path.parent
        if not directory.exists():
            self.created = directory
        directory.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            # A held lock is seen before anything is written (a refused command leaves the disk as it was).
            if not self.path.exists() and self._link(me):
                self.held = True
                return None
            owner = self._owner()
            if owner and owner.get("host") == me["host"] and pid_alive(int(owner.get("pid", -1))):
                return owner
            if owner and owner.get("host") != me["host"]:
                return owner
            self.path.unlink(missing_ok=True)  # stale: its owner is dead (or the file is not a lock)
        raise UserError(f"{self.path}: could not take the lock")

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
            if self.created is not None:
                with contextlib.suppress(OSError):
                    self.created.rmdir()  # only when empty

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
    """None if the checkpoint is complete and intact, else what is wrong with it (one phrase)."""
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(str(name), int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return f"{MANIFEST_NAME} is damaged"
    for name, size, digest in entries:
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
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
    from dora_cli.files import read_json_object

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

    data = safe_load(dump_recipe(absolute_paths(recipe)))
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
    """The recipe a run directory holds (its recipe.yaml), None without one; UserError if it is not ours."""
    import yaml
    from pydantic import ValidationError

    from dora_cli.recipe import Recipe, safe_load

    path = directory / RECIPE_NAME
    if not path.is_file():
        return None
    try:
        return Recipe.model_validate(safe_load(path.read_text()))
    except (OSError, ValueError, ValidationError, yaml.YAMLError, RecursionError):
        raise UserError(f"{directory}: holds {RECIPE_NAME} that is not a dora_cli recipe; choose another directory") from None


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
        """Refuse, before any work, an output_dir this run may not use: inside a checkpoint, not a
        directory, not ours (for --overwrite), another recipe's run (unless --overwrite), or a finished
        run of this recipe without --resume."""
        from dora_cli.files import check_output_dir

        label = f"output_dir {self.path}"
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        owner = inside_a_checkpoint(self.path.resolve()) if self.path.exists() or self.path.parent.exists() else None
        if owner is not None:
            raise UserError(f"{label}: lies inside the checkpoint {owner}; choose a directory outside it")
        if self.path.is_symlink() and overwrite:
            raise UserError(f"{label}: is a symbolic link; --overwrite never follows one (give the real directory)")
        check_output_dir(self.path, label=label, exists_ok=True)
        if overwrite:
            if self.path.is_dir() and any(self.path.iterdir()) and not self.is_a_run():
                raise UserError(
                    f"{label}: holds files that no dora_cli run wrote; --overwrite only replaces a run's own "
                    "directory: choose another output_dir"
                )
            return
        key = self.difference(recipe)
        if key is not None:
            raise UserError(
                f"{self.path}: holds a run of a different recipe ({key} differs); "
                "choose another output_dir or pass --overwrite to replace it"
            )
        if saved_recipe(self.path) is not None and not resume and (checkpoints(self.path) or self.final.exists()):
            raise UserError(f"{self.path}: holds a run of this recipe; pass --resume to continue it or --overwrite to start over")

    def difference(self, recipe) -> str | None:
        """The first key in which the run this directory holds differs from `recipe` (None: no run, or the
        same run, resumable into each other)."""
        previous = saved_recipe(self.path)
        if previous is None:
            return None
        mine, theirs = identity(recipe), identity(previous)
        return first_difference(mine, theirs) if mine != theirs else None

    def is_a_run(self) -> bool:
        """A directory a run of ours made: the marker, or (runs older than the marker) a valid recipe.yaml."""
        if (self.path / MARKER_NAME).is_file():
            return True
        try:
            return saved_recipe(self.path) is not None
        except UserError:
            return False

    # ---- claiming ------------------------------------------------------------------------------------
    def claim(self, *, overwrite: bool) -> None:
        """Under the lock: clear a previous run (--overwrite: only what runs write, never through links),
        remove interrupted writes, mark the directory as a run, and start the run log."""
        if overwrite:
            for child in self.path.iterdir():
                if child.name != LOCK_NAME:
                    remove(child)
        clean_temporaries(self.path)
        with writing(self.path / MARKER_NAME):
            (self.path / MARKER_NAME).write_text("a dora_cli run directory (dora train --overwrite may clear it)\n")
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
        from dora_cli.files import read_json_object

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
