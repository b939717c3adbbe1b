"""SIGKILL at arbitrary points: training, evaluation and sweeps pick up where they were, losing nothing.

`make test-kill` (CI runs it once after `make test`). Kill points are random moments of a random step
after the newest checkpoint and the moments a checkpoint is being written (a temporary directory
exists); each trained run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_dora
from safetensors.torch import load_file

from dora_cli import rundir
from dora_cli.recipe import load_recipe

pytestmark = pytest.mark.kill

SMOKE = "recipes/smoke.yaml"
KILL_POINTS = 8
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dora_cli.cli", *args], cwd=ROOT, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """SIGKILL `proc` as soon as ready() holds; False if it finished first."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, "timed out waiting for the kill point"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def writing_checkpoint(out: Path, k: int, pid: int) -> bool:
    """Process `pid` is writing checkpoint-<s>, s >= k (its temporary directory exists)."""
    return any(int(p.name.split("-")[2]) >= k for p in out.glob(f".tmp-checkpoint-*-{pid}"))


def after_checkpoint(out: Path, k: int, delay: float, seen: list) -> bool:
    """`delay` seconds have passed since checkpoint-<s>, s >= k, was first seen complete."""
    if not seen and any(step >= k for step, _ in rundir.checkpoints(out)):
        seen.append(time.time())
    return bool(seen) and time.time() - seen[0] > delay


def test_sigkill_at_random_points_and_during_checkpoint_writes(smoke_run, tmp_path):
    rng = random.Random(1234)
    args = ["train.save_every=1", "train.keep_last=2"]
    steps = load_recipe(ROOT / SMOKE).train.max_steps
    reference = load_file(str(smoke_run / "final" / "adapter_model.safetensors"))
    log = []
    for trial in range(KILL_POINTS):
        out = tmp_path / f"run{trial}"
        cmd = ["train", SMOKE, f"output_dir={out}", *args]
        during_write = trial % 2 == 0
        for attempt in range(2):  # killed twice, then left to finish
            # The kill point is a step past the newest checkpoint, so it falls inside this attempt's
            # training whatever the machine's speed: k random in the next 1-8 steps.
            done = max((step for step, _ in rundir.checkpoints(out)), default=0)
            k = min(done + rng.randint(1, 8), steps - 1)
            proc = start(*cmd, *(["--resume"] if attempt else []))
            if during_write:  # while this process writes checkpoint-k or a later one
                ready = partial(writing_checkpoint, out, k, proc.pid)
            else:  # a random moment of the step after checkpoint-k
                ready = partial(after_checkpoint, out, k, rng.uniform(0.0, 0.3), [])
            killed = kill_when(proc, ready)
            leftovers = [p.name for p in out.glob(".tmp-*")]
            intact = [p.name for _, p in rundir.checkpoints(out) if rundir.verify(p) is None]
            log.append({"trial": trial, "attempt": attempt, "killed": killed, "mid_write": bool(leftovers), "intact": intact})
            # what a kill leaves is only whole checkpoints (plus temporaries, never taken for one)
            assert all(rundir.verify(p) is None for _, p in rundir.checkpoints(out)), log[-1]
        run_dora(*cmd, "--resume")
        final = load_file(str(out / "final" / "adapter_model.safetensors"))
        for key in reference:
            assert torch.equal(final[key], reference[key]), (trial, key)
    summary = {
        "kills": sum(x["killed"] for x in log),
        "kills_mid_checkpoint_write": sum(x["killed"] and x["mid_write"] for x in log),
        "runs": KILL_POINTS,
        "all_bitwise_equal": True,
        "log": log,
    }
    report = Path(os.environ.get("DORA_KILL_REPORT", tmp_path / "kill_loop.json"))  # make test-kill keeps it
    report.write_text(json.dumps(summary, indent=1) + "\n")
    assert summary["kills"] >= KILL_POINTS and summary["kills_mid_checkpoint_write"] >= 1, summary


def test_sigkill_during_eval_redoes_no_finished_example(smoke_run, tmp_path):
    out = tmp_path / "eval"
    cmd = ["eval", str(smoke_run / "final"), "--mode", "generate", "--batch-size", "2", "--out", str(out),
           "eval.num_beams=2", "eval.max_new_tokens=24"]
    preds = out / "commonsense" / "predictions" / "boolq.jsonl"
    proc = start(*cmd)
    assert kill_when(proc, lambda: preds.is_file() and len(preds.read_text().splitlines()) >= 4)
    before = preds.read_text().splitlines()
    run_dora(*cmd)
    after = preds.read_text().splitlines()
    assert after[: len(before)] == before  # finished predictions kept as they were, not redone
    ids = [json.loads(x)["id"] for x in after]
    assert len(ids) == len(set(ids)) == 16
    metrics = json.loads((out / "commonsense" / "metrics.json").read_text())
    assert metrics["tasks"]["boolq"]["n"] == 16


def test_sigkill_during_a_sweep_redoes_no_finished_trial(tmp_path):
    out = tmp_path / "sweep"
    cmd = ["sweep-rank", SMOKE, "--ranks", "2,4", "--methods", "dora", f"output_dir={out}",
           "train.max_steps=6", "eval.limit=4"]
    first = out / "sweep" / "dora-r2-s42" / "eval" / "commonsense" / "metrics.json"
    second_run = out / "sweep" / "dora-r4-s42"
    proc = start(*cmd)
    assert kill_when(proc, lambda: first.is_file() and second_run.is_dir())
    stamp = first.stat().st_mtime_ns
    proc = run_dora(*cmd)
    assert first.stat().st_mtime_ns == stamp  # the finished trial is not redone
    report = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [t["status"] for t in report["trials"]] == ["ok", "ok"]


def test_sigkill_during_an_export_leaves_no_gguf_and_the_next_one_cleans_up(smollm2_dir, tmp_path):
    """Killed while the GGUF is being written (its temporary has grown past 10 MB): no OUT, and the next export
    removes the temporary and writes OUT whole."""
    out = tmp_path / "m.gguf"
    proc = start("export", str(smollm2_dir), "--gguf", str(out), "--type", "f32")
    growing = lambda: any(p.stat().st_size > 10 * 2**20 for p in tmp_path.glob(".tmp-m.gguf-*"))  # noqa: E731
    assert kill_when(proc, growing)
    assert not out.exists() and len(list(tmp_path.glob(".tmp-m.gguf-*"))) == 1
    run_dora("export", str(smollm2_dir), "--gguf", str(out), "--type", "f32")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert out.stat().st_size > 500 * 2**20
