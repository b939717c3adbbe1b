"""Training survives faults: signals, damaged checkpoints, failed writes, non-finite losses, a busy output_dir.

Each test names the guarantee it checks (README, "Reliability").
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from dora_cli import rundir, train
from dora_cli.errors import RunFailure, UserError

SMOKE = str(ROOT / "recipes" / "smoke.yaml")


def final_weights(run: Path) -> dict:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def assert_bitwise_equal(run: Path, reference: Path) -> None:
    ours, ref = final_weights(run), final_weights(reference)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


def train_inproc(out: Path, *overrides: str, **kw):
    return train.run_train(SMOKE, [f"output_dir={out}", *overrides], **kw)


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "final")
    return out


# ---- 1. interruption ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_exits_cleanly(sig, code, smoke_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dora_cli.cli", "train", SMOKE, f"output_dir={out}", "train.log_every=1", "train.save_every=null"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "saved checkpoint-" in err and "Traceback" not in err
    (step, path), = rundir.checkpoints(out)
    assert 3 <= step < 30 and rundir.verify(path) is None
    train_inproc(out, "train.log_every=1", "train.save_every=null", resume=True)
    assert_bitwise_equal(out, smoke_run)


def test_resuming_a_finished_run_changes_nothing(smoke_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert train_inproc(out, resume=True) == out / "final"
    assert "the run is finished; nothing to resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("change", ["train.max_steps=20", "train.max_steps=40", "train.max_steps=null train.epochs=2"])
@pytest.mark.parametrize("finished", [True, False])
def test_resuming_with_another_length_is_another_run(change, finished, smoke_run, tmp_path):
    """The schedule spans the run's length: another max_steps or epochs is refused (the finished run kept)."""
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    if not finished:
        shutil.rmtree(out / "final")
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    key = "train.epochs" if "epochs" in change else "train.max_steps"
    with pytest.raises(UserError, match=rf"holds a run of a different recipe \({key} differs\)"):
        train_inproc(out, *change.split(), resume=True)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


# ---- 2. corruption -----------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["adapter_model.safetensors", "trainer_state/optimizer.pt", "recipe.yaml"])
def test_damaged_checkpoint_is_named_and_resume_falls_back(victim, smoke_run, tmp_path, capsys):
    out = copy_run(smoke_run, tmp_path)
    path = out / "checkpoint-30" / victim
    data = path.read_bytes()
    if victim.endswith("safetensors"):
        path.write_bytes(data[: len(data) // 2])  # truncated
    else:
        path.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))  # altered, same size
    assert victim in rundir.verify(path.parents[1] if "/" in victim else path.parent)
    train_inproc(out, resume=True)
    err = capsys.readouterr().err
    assert f"checkpoint-30 is damaged ({victim}" in err and "resuming from checkpoint-20" in err
    assert_bitwise_equal(out, smoke_run)


def test_pickle_in_a_checkpoint_is_refused(smoke_run, tmp_path):
    out = copy_run(smoke_run, tmp_path)
    ckpt = out / "checkpoint-30"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    (ckpt / "trainer_state" / "optimizer.pt").write_bytes(pickle.dumps(Payload()))
    rundir.write_manifest(ckpt)  # the manifest agrees: only the loader stands in the way
    with pytest.raises(UserError, match="optimizer.pt: refused: not a plain tensor file"):
        train_inproc(out, resume=True)


# ---- 3. failed writes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_failed_checkpoint_write_keeps_the_previous_one(error, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = rundir.write_manifest
    calls = []

    def failing(directory):
        calls.append(directory)
        if len(calls) == 2:  # the second checkpoint's write fails half-way
            raise OSError(error, os.strerror(error), str(directory))
        real(directory)

    monkeypatch.setattr(rundir, "write_manifest", failing)
    with pytest.raises(RunFailure, match=f"could not write .*checkpoint-20: {os.strerror(error)}"):
        train_inproc(out, "train.max_steps=20")
    assert [p.name for _, p in rundir.checkpoints(out)] == ["checkpoint-10"]
    assert rundir.verify(out / "checkpoint-10") is None
    assert not list(out.glob(".tmp-*")) and not (out / ".lock").exists()


# ---- 4. numerical faults ---------------------------------------------------------------------------------
def poison(monkeypatch, steps, value=float("nan")):
    """Make the loss of the given (0-based) optimizer steps non-finite."""
    real = train.Trainer._accumulate

    def poisoned(self):
        stats = real(self)  # [mean loss, tokens] of the step
        return stats.index_fill(0, torch.tensor([0]), value) if self.step in steps else stats

    monkeypatch.setattr(train.Trainer, "_accumulate", poisoned)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_with_the_step_named(value, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison(monkeypatch, {5}, value)
    with pytest.raises(RunFailure, match=f"step 6: the loss is {value}; training stopped. The last good checkpoint is .*checkpoint-4"):
        train_inproc(out, "train.save_every=2", "train.max_steps=10")
    assert [p.name for _, p in rundir.checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]  # keep_last 2
    assert not (out / "final").exists()


def test_skip_nonfinite_skips_and_logs(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison(monkeypatch, {3, 7})
    train_inproc(out, "train.max_steps=12", "train.skip_nonfinite=2")
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "skipped" in e] == [4, 8]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 12
    with pytest.raises(RunFailure, match="step 8: the loss is nan"):
        train_inproc(tmp_path / "again", "train.max_steps=12", "train.skip_nonfinite=1")


# ---- 7. safety: the run log says when remote code is trusted ---------------------------------------------
@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_logged_when_on(trust, tmp_path):
    out = tmp_path / "run"
    train_inproc(out, "train.max_steps=2", f"model.trust_remote_code={str(trust).lower()}")
    assert ("trust_remote_code is on" in (out / "train.log").read_text()) == trust


# ---- 8. concurrent runs ----------------------------------------------------------------------------------
def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(UserError, match=f"another dora run \\(pid {sleeper.pid}\\) is using this output_dir"):
            train_inproc(out, "train.max_steps=2")
        assert not (out / "final").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    train_inproc(out, "train.max_steps=2")  # the owner is dead: its lock is stale
    assert (out / "final").is_dir() and not (out / ".lock").exists()


# ---- 7. safety: nothing reaches a shell, nothing unsafe is deserialised ------------------------------
def test_the_code_has_no_shell_and_no_unsafe_loader():
    """A recipe value can only reach argv lists; checkpoints are read by safetensors or weights_only."""
    import re

    risky = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|yaml\.unsafe_load|yaml\.load\((?!text, Loader=RecipeLoader)"
                       r"|pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)")
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "dora_cli").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if risky.search(line)
    ]
    assert hits == []
    from dora_cli.recipe import RecipeLoader

    assert issubclass(RecipeLoader, __import__("yaml").SafeLoader)
