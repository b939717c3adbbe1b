"""`dora train` end to end on the smoke recipe: through the real CLI, resume after SIGKILL, 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_dora as dora
from conftest import train_killed_at_checkpoint
from safetensors.torch import load_file

SMOKE = "recipes/smoke.yaml"


def weights(run: Path) -> dict:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def test_smoke_run_writes_checkpoints_and_metrics(smoke_run):
    final = smoke_run / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "manifest.json"):
        assert (final / name).is_file(), name
    assert sorted(p.name for p in smoke_run.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]  # keep_last 2
    ckpt = smoke_run / "checkpoint-20"
    assert (ckpt / "trainer_state" / "optimizer.pt").is_file() and (ckpt / "recipe.yaml").is_file()
    lines = [json.loads(x) for x in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb"} <= set(lines[0])
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["tokens"] > 0 and metrics["val_loss"] is not None
    assert metrics["trainable_params"] > 0 and 0 < metrics["trainable_percent"] < 100
    # the loss goes down
    assert metrics["train_loss"] < metrics["train_loss_first"] - 0.1


def test_dry_run_prints_the_share_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    proc = dora("train", SMOKE, f"output_dir={out}", "adapter.r=4", "--dry-run")
    assert "trainable%:" in proc.stdout and "r: 4" in proc.stdout
    assert not out.exists()


def test_sigkill_then_resume_is_bitwise_identical(smoke_run, tmp_path):
    out = tmp_path / "killed"
    train_killed_at_checkpoint([SMOKE, "train.save_every=5"], out, 10)
    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    seconds = json.loads((newest / "trainer_state" / "state.json").read_text())["train_seconds"]
    resumed = dora("train", SMOKE, f"output_dir={out}", "train.save_every=5", "--resume")
    assert f"resuming from {newest.name}" in resumed.stderr
    # the training time of the run counts the killed invocation's, up to the checkpoint resumed from
    assert 0 < seconds < json.loads((out / "metrics.json").read_text())["wall_time_s"]
    ours, ref = weights(out), weights(smoke_run)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert (ours[key] == ref[key]).all(), key


def test_two_processes_equal_one(smoke_run, tmp_path):
    out = tmp_path / "ddp"
    proc = dora("train", SMOKE, f"output_dir={out}", "--nproc", "2", timeout=600)
    assert "launching 2 processes" in proc.stderr
    ours, ref = weights(out), weights(smoke_run)
    for key in ref:
        assert (ours[key] - ref[key]).abs().max().item() <= 1e-5, key
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2


def test_output_dir_of_another_recipe_is_refused(smoke_run):
    proc = dora("train", SMOKE, f"output_dir={smoke_run}", "adapter.r=4", check=False)
    assert proc.returncode == 2
    assert "different recipe (adapter.r differs)" in proc.stderr and "Traceback" not in proc.stderr
    proc = dora("train", SMOKE, f"output_dir={smoke_run}", check=False)
    assert proc.returncode == 2 and "holds a finished run of this recipe; pass --overwrite" in proc.stderr
