"""`train.mixed_precision: bf16` on the CPU: it trains under bf16 autocast (training and validation loss alike),
resumes after SIGKILL bit for bit, and its adapter evaluates as any other."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import dora_in_process, train_killed_at_checkpoint
from conftest import run_dora as dora
from safetensors.torch import load_file

SMOKE = "recipes/smoke.yaml"
BF16 = "train.mixed_precision=bf16"


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """One uninterrupted bf16 run of the smoke recipe (checkpoints every 5 steps): the reference for resume."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    dora("train", SMOKE, BF16, "train.save_every=5", f"output_dir={out}")
    return out


def weights(run):
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def test_every_loss_is_computed_under_bf16_autocast(tmp_path, monkeypatch, capfd):
    from dora_cli import train

    seen = []
    real = train.loss_terms

    def spy(model, batch, keep):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), model.training))
        return real(model, batch, keep)

    # an fp32 run first in the same process: Accelerate keeps a process's mixed precision unless reset
    code, _, err = dora_in_process(["train", SMOKE, "train.max_steps=1", f"output_dir={tmp_path / 'fp32'}"],
                                   monkeypatch, capfd)
    assert code == 0, err
    monkeypatch.setattr(train, "loss_terms", spy)
    code, _, err = dora_in_process(["train", SMOKE, BF16, "train.max_steps=4", "train.eval_every=2",
                                    f"output_dir={tmp_path / 'run'}"], monkeypatch, capfd)
    assert code == 0, err
    assert {s[2] for s in seen} == {True, False}  # training micro-batches and validation batches
    assert all(enabled and dtype == torch.bfloat16 for enabled, dtype, _ in seen), seen
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["train_loss"])


def test_bf16_trains_close_to_fp32_but_not_equal(bf16_run, smoke_run):
    """Autocast really changes the arithmetic (the adapters differ from the fp32 run's), and the loss falls as in
    fp32 (the smoke recipe's 30 steps: within a few hundredths)."""
    ours, ref = weights(bf16_run), weights(smoke_run)
    assert ours.keys() == ref.keys()
    assert any(not torch.equal(ours[k], ref[k]) for k in ref)
    assert all(v.dtype == torch.float32 for v in ours.values())  # the adapter stays fp32 (autocast casts copies)
    m16, m32 = (json.loads((run / "metrics.json").read_text()) for run in (bf16_run, smoke_run))
    assert m16["train_loss"] < m16["train_loss_first"] - 0.1
    assert abs(m16["val_loss"] - m32["val_loss"]) < 0.05, (m16["val_loss"], m32["val_loss"])


def test_bf16_sigkill_then_resume_is_bitwise_identical(bf16_run, tmp_path):
    out = tmp_path / "killed"
    train_killed_at_checkpoint([SMOKE, BF16, "train.save_every=5"], out, 10)
    resumed = dora("train", SMOKE, BF16, "train.save_every=5", f"output_dir={out}", "--resume")
    assert "resuming from checkpoint-" in resumed.stderr
    ours, ref = weights(out), weights(bf16_run)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


def test_a_bf16_adapter_evaluates(bf16_run, tmp_path):
    out = tmp_path / "eval"
    dora("eval", str(bf16_run / "final"), "--limit", "4", "--out", str(out))
    metrics = json.loads((out / "commonsense" / "metrics.json").read_text())
    assert metrics["settings"]["mode"] == "loglik" and all(t["n"] == 4 for t in metrics["tasks"].values())
