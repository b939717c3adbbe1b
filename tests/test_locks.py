"""rundir.RunLock under contention: a lock is held by one process at a time, whatever the interleaving of
two processes that find the same stale lock, a lock released and taken again between another's looks,
or a lock file still being written (a file system without hard links creates it, then fills it).

Each race is replayed deterministically: the other process's steps are made to happen at the exact point
where this one has looked at the lock and not yet acted on what it saw."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dora_cli import rundir
from dora_cli.errors import UserError
from dora_cli.rundir import RunLock

HOST = socket.gethostname()


@pytest.fixture
def other():
    """A live process that is not this one: the holder of the other process's lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def owner_of(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_stale_lock_another_process_took_over_meanwhile_is_left_to_it(tmp_path, other, dead_pid, monkeypatch):
    """Both find the dead owner's lock; the other breaks it and takes it first; this one must not then
    delete the other's fresh lock (and hold the lock beside it)."""
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": dead_pid, "host": HOST}))
    real = rundir.pid_alive
    raced = []

    def alive(pid):
        if pid == dead_pid and not raced:  # judged dead here; meanwhile the other process takes the lock over
            raced.append(1)
            lock.unlink()
            lock.write_text(json.dumps({"pid": other, "host": HOST}))
        return real(pid)

    monkeypatch.setattr(rundir, "pid_alive", alive)
    owner = RunLock(tmp_path).try_acquire()
    assert raced and owner is not None and owner["pid"] == other
    assert owner_of(lock)["pid"] == other  # the other's lock is still there


def test_a_lock_released_and_taken_again_between_two_looks_is_left_to_its_new_holder(tmp_path, other, monkeypatch):
    """This one sees the lock held, then finds the file gone (its holder released it) and, before it acts, a
    third process takes the lock: the new holder's lock must survive."""
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": HOST}))  # a live holder
    real = Path.read_text
    raced = []

    def read_text(self, *args, **kwargs):
        if self == lock and not raced:
            raced.append(1)
            lock.unlink()  # released: this read finds nothing ...
            lock.write_text(json.dumps({"pid": other, "host": HOST}))  # ... and right after, another takes it
            raise FileNotFoundError(2, "No such file or directory", str(lock))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    owner = RunLock(tmp_path).try_acquire()
    assert raced and owner is not None and owner["pid"] == other
    assert owner_of(lock)["pid"] == other


def test_a_lock_file_still_being_written_is_held(tmp_path):
    """Created exclusively, not filled yet (no hard links): young, it belongs to a live process."""
    lock = tmp_path / ".lock"
    lock.write_text("")
    owner = RunLock(tmp_path).try_acquire()
    assert owner is not None and lock.read_text() == ""
    with pytest.raises(UserError, match="lock"):
        RunLock(tmp_path).acquire()
    assert lock.read_text() == ""


def test_an_unreadable_lock_file_left_long_ago_is_taken_over(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text("{")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    mine = RunLock(tmp_path)
    assert mine.try_acquire() is None and owner_of(lock)["pid"] == os.getpid()
    mine.release()
    assert not lock.exists()


def test_one_holder_at_a_time_when_many_processes_break_one_stale_lock(tmp_path, dead_pid):
    """Eight processes started at once on a dead owner's lock: no two ever hold it together."""
    (tmp_path / "claim.lock").write_text(json.dumps({"pid": dead_pid, "host": HOST}))
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from dora_cli.rundir import RunLock\n"
        "d = Path(sys.argv[1]); start = float(sys.argv[2])\n"
        "while time.time() < start: pass\n"
        "lock = RunLock(d, name='claim.lock')\n"
        "deadline = time.time() + 120  # a bound in time, not in tries: a loaded machine may starve a holder\n"
        "while lock.try_acquire() is not None:\n"
        "    if time.time() > deadline:\n"
        "        sys.exit(3)\n"
        "    time.sleep(0.001)\n"
        "inside = d / 'inside'\n"
        "inside.mkdir()  # fails if another holder is inside\n"
        "time.sleep(0.02)\n"
        "inside.rmdir()\n"
        "lock.release()\n"
    )
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(start)], cwd=Path(__file__).parents[1],
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errors


def test_a_directory_in_the_locks_place_is_named(tmp_path):
    (tmp_path / ".lock").mkdir()
    with pytest.raises(UserError, match="a directory where the lock file goes"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").is_dir()
