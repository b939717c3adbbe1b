"""SIGKILL of one rank of a 2-process run mid-way, then `--resume` on 2 processes: bitwise the weights of
the uninterrupted 2-process run (DDP and FSDP). `make test-kill` (marker kill)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT, run_dora
from safetensors.torch import load_file

pytestmark = pytest.mark.kill

SMOKE = "recipes/smoke.yaml"
RUN = ["train.max_steps=40", "train.save_every=4", "train.log_every=4", "train.micro_batch_size=2", "data.val_set_size=8"]
STRATEGIES = {"ddp": [], "fsdp": ["launch.strategy=fsdp"]}


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The training process of `rank` among the launcher's descendants (None until it runs)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "dora_cli.cli" in " ".join(child.cmdline()) and child.environ().get("LOCAL_RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sigkill_of_one_rank_then_resume_is_bitwise(strategy, tmp_path):
    overrides = [*RUN, *STRATEGIES[strategy], "--nproc", "2"]
    reference = tmp_path / "uninterrupted"
    run_dora("train", SMOKE, f"output_dir={reference}", *overrides, timeout=1200)

    out = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    launcher = subprocess.Popen([sys.executable, "-m", "dora_cli.cli", "train", SMOKE, f"output_dir={out}", *overrides],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 600
    while not (out / "checkpoint-8").exists():
        assert launcher.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    victim = rank_process(launcher, 1)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=600) != 0
    assert not (out / "final").exists()

    resumed = run_dora("train", SMOKE, f"output_dir={out}", *overrides, "--resume", timeout=1200)
    assert "resuming from checkpoint-" in resumed.stderr
    ours = load_file(str(out / "final" / "adapter_model.safetensors"))
    ref = load_file(str(reference / "final" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys()
    for key in ref:
        assert (ours[key] == ref[key]).all(), key


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("target", ["command", "rank 1"])
def test_a_signal_stops_every_rank_after_the_same_step_then_resume_is_bitwise(target, sig, code, tmp_path):
    """A signal to the command (a scheduler's SIGTERM, Ctrl-C) or to one rank alone: every rank finishes
    the step, the checkpoint is written once, the command exits 128 + signal without a traceback."""
    changed = {"train.save_every": "null", "train.max_steps": "30"}  # a key is given once on a command line
    overrides = [*(o for o in RUN if o.partition("=")[0] not in changed), *(f"{k}={v}" for k, v in changed.items()),
                 "--nproc", "2"]
    reference = tmp_path / "uninterrupted"
    run_dora("train", SMOKE, f"output_dir={reference}", *overrides, timeout=1200)

    out = tmp_path / "stopped"
    launcher = subprocess.Popen([sys.executable, "-m", "dora_cli.cli", "train", SMOKE, f"output_dir={out}", *overrides],
                                cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.02)
    victim = psutil.Process(launcher.pid) if target == "command" else rank_process(launcher, 1)
    victim.send_signal(sig)
    _, err = launcher.communicate(timeout=600)
    assert launcher.returncode == code, err
    assert "Traceback" not in err and err.count("saved checkpoint-") == 1, err
    (saved,) = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert not (out / "final").exists() and 8 <= int(saved.name.split("-")[1]) < 30

    resumed = run_dora("train", SMOKE, f"output_dir={out}", *overrides, "--resume", timeout=1200)
    assert f"resuming from {saved.name}" in resumed.stderr
    ours = load_file(str(out / "final" / "adapter_model.safetensors"))
    ref = load_file(str(reference / "final" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys()
    for key in ref:
        assert (ours[key] == ref[key]).all(), key


def test_a_signal_while_the_ranks_set_up_stops_them_all_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    launcher = subprocess.Popen([sys.executable, "-m", "dora_cli.cli", "train", SMOKE, f"output_dir={out}", *RUN, "--nproc", "2"],
                                cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while rank_process(launcher, 1) is None or rank_process(launcher, 0) is None:  # the ranks are starting
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.02)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 143, err
    assert not (out / "checkpoint-0").exists() and not (out / "final").exists()
    assert not out.exists() or not any(p.name.startswith("checkpoint-") for p in out.iterdir())
