"""Seeing a run through the real CLI (in process): validation loss and the remaining time in the log, a
progress bar without placeholders, `train.report_to` trackers (TensorBoard read back, wandb offline,
refused when not installed), and a saved recipe with absolute paths, so that `dora eval` / `dora analyze`
/ `--resume` work from any directory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from pydantic import BaseModel

from dora_cli import cli, trackers
from dora_cli.recipe import LOCAL_PATH, absolute_paths, load_recipe
from dora_cli.rundir import RunDir, identity

SMOKE = ROOT / "recipes" / "smoke.yaml"
# 6 steps of 4 examples: log lines at 2, 4, 6, validation (4 examples) and checkpoints at 3 and 6.
SHORT = [
    "train.max_steps=6", "train.log_every=2", "train.eval_every=3", "train.save_every=3", "train.batch_size=4",
    "train.micro_batch_size=4", "data.cutoff_len=64", "data.max_samples=40", "data.val_set_size=4",
]
WANDB = trackers.installed("wandb")
LOG_LINE = re.compile(r"step (\d+)/6  loss ")


def dora(*args) -> tuple[int, str, str]:
    """`dora ARGS` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["dora", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under run/trackers, as (step, value) by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(run).trackers / trackers.PROJECT))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    """One short run of the smoke recipe from the repository (its relative paths), with trackers; (run, stderr)."""
    pytest.importorskip("tensorboard")
    tmp = tmp_path_factory.mktemp("reporting")
    out = tmp / "run"
    report_to = "[tensorboard,wandb]" if WANDB else "[tensorboard]"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(tmp / name.lower()))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        code, _, err = dora("train", "recipes/smoke.yaml", f"output_dir={out}", f"train.report_to={report_to}", *SHORT)
    assert code == 0, err
    return out, err


# ---- the log ------------------------------------------------------------------------------------------
def test_validation_loss_and_remaining_time_are_logged(run):
    out, err = run
    log = (out / "train.log").read_text()
    validations = [e for e in events(out) if "val_loss" in e]
    assert [e["step"] for e in validations] == [3, 6]
    for e in validations:
        line = f"step {e['step']}/6  val loss {e['val_loss']:.4f}"
        assert line in err and line in log
    assert log.count("val loss") == 2  # the final validation (step 6) is not computed twice
    lines = [line for line in err.splitlines() if LOG_LINE.match(line)]
    assert [int(LOG_LINE.match(line).group(1)) for line in lines] == [2, 4, 6]
    for line in lines[:-1]:  # stderr is not a terminal here: the log line carries the remaining time
        assert re.search(r"  eta \d+(s|m\d\ds|h\d\dm)$", line), line
    assert "eta" not in lines[-1]
    assert not re.search(r"\bnan\b", err + log, re.IGNORECASE)


def test_the_progress_bar_shows_no_placeholder_before_the_first_log_step(tmp_path, monkeypatch, capsys):
    from rich.progress import Progress

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws the bar as on a terminal
    monkeypatch.setattr("dora_cli.console.stderr_is_terminal", lambda: True)
    for method in ("add_task", "update"):  # draw a frame after every change, not 10 times a second
        original = getattr(Progress, method)

        def drawn(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            self.refresh()
            return result

        monkeypatch.setattr(Progress, method, drawn)
    monkeypatch.setattr(sys, "argv", ["dora", "train", "recipes/smoke.yaml", f"output_dir={tmp_path / 'out'}",
                                      "train.max_steps=2", "train.log_every=2", "train.batch_size=4",
                                      "train.micro_batch_size=4", "train.save_every=null", "data.val_set_size=0",
                                      "data.max_samples=8", "data.cutoff_len=32"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 0, err
    assert "0/2" in err and "loss " in err and "tok/s" in err  # frames before and after the log step
    assert not re.search(r"\bnan\b", err, re.IGNORECASE)


# ---- trackers -----------------------------------------------------------------------------------------
def test_tensorboard_holds_every_record_of_metrics_jsonl_at_its_step(run):
    out, _ = run
    found = scalars(out)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
        expected = [(e["step"], e[key]) for e in events(out) if key in e]
        assert [step for step, _ in found[key]] == [step for step, _ in expected], key
        for (_, value), (_, want) in zip(found[key], expected):
            assert value == pytest.approx(want, rel=1e-6), key
    assert [step for step, _ in found["loss"]] == [2, 4, 6]


@pytest.mark.skipif(not WANDB, reason="wandb is not installed")
def test_wandb_writes_an_offline_run_under_the_run_directory(run):
    out, _ = run
    runs = list((RunDir(out).trackers / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


@pytest.mark.parametrize("tracker", sorted(trackers.PACKAGES))
def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(tracker, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(trackers, "installed", lambda name: name != tracker)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["dora", "train", "recipes/smoke.yaml", f"output_dir={out}",
                                      f"train.report_to=[{tracker}]"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: train.report_to: {tracker} is not installed; pip install {trackers.PACKAGES[tracker]} ")
    assert not out.exists()


def test_an_unknown_tracker_is_a_recipe_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["dora", "train", "recipes/smoke.yaml", f"output_dir={tmp_path}/out",
                                      "train.report_to=[tensorbord]"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2 and 'did you mean "tensorboard"' in capsys.readouterr().err


# ---- paths: the saved recipe works from anywhere --------------------------------------------------------
def marked_fields(section: BaseModel, where: str = ""):
    """(dotted name, the section holding it, field name, kind) of every path field of a recipe."""
    for name, field in type(section).model_fields.items():
        value, extra = getattr(section, name), field.json_schema_extra
        if isinstance(extra, dict) and "path" in extra:
            yield f"{where}{name}", section, name, extra["path"]
        elif isinstance(value, BaseModel):
            yield from marked_fields(value, f"{where}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from marked_fields(item, f"{where}{name}[{i}].")


def recipe_with(value: str):
    recipe = load_recipe(SMOKE)
    for _, section, name, _ in marked_fields(recipe):
        setattr(section, name, value)
    return recipe


def test_every_path_field_is_made_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "thing").write_text("x")
    names = {name for name, *_ in marked_fields(load_recipe(SMOKE))}
    assert names == {
        "model.name_or_path", "model.tokenizer", "data.sources[0].path", "eval.data_dir", "eval.mt_bench.questions",
        "eval.mt_bench.reference_answers", "eval.mt_bench.judge_prompts", "eval.lm_eval.tasks_dir", "output_dir",
    }
    relative = recipe_with("rel/thing")
    absolute = absolute_paths(relative)
    assert all(getattr(s, n) == "rel/thing" for _, s, n, _ in marked_fields(relative))  # the original is unchanged
    assert {getattr(s, n) for _, s, n, _ in marked_fields(absolute)} == {str(tmp_path / "rel" / "thing")}
    assert absolute_paths(absolute) == absolute
    for value in ("owner/model", "hf://owner/data"):  # not on disk: a hub id stays a hub id
        for name, section, field, kind in marked_fields(absolute_paths(recipe_with(value))):
            want = str(tmp_path / value) if kind == LOCAL_PATH["path"] else value
            assert os.path.normpath(getattr(section, field)) == os.path.normpath(want), name


def test_identity_compares_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "thing").write_text("x")
    assert identity(recipe_with("rel/thing")) == identity(recipe_with(str(tmp_path / "rel" / "thing")))
    assert identity(recipe_with("rel/thing")) != identity(recipe_with("owner/model"))


def test_the_saved_recipe_has_absolute_paths(run):
    out, _ = run
    for directory in (out, out / "final", out / "checkpoint-3"):
        saved = load_recipe(directory / "recipe.yaml")
        for name, section, field, _ in marked_fields(saved):
            value = getattr(section, field)
            assert value is None or Path(value).is_absolute(), (directory, name, value)
        assert saved.model.tokenizer == str(ROOT / "data" / "tiny_tokenizer")


def test_eval_and_analyze_of_a_checkpoint_work_from_another_directory(run, tmp_path, monkeypatch):
    out, _ = run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, stdout, err = dora("eval", out / "final", "--limit", "3", "--mode", "loglik", "--out", tmp_path / "ev")
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "commonsense" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"boolq", "ARC-Easy"} and metrics["n"] == 6
    assert "± " in stdout and "| n | 3 |" in stdout  # the table printed: accuracy ± se, the examples
    code, _, err = dora("analyze", out / "final", "--out", tmp_path / "an")
    assert code == 0, err
    assert (tmp_path / "an" / "analysis.json").is_file()
    assert list(elsewhere.iterdir()) == []  # nothing written into the current directory


def test_a_run_resumed_from_another_directory_is_the_same_run(run, tmp_path, monkeypatch):
    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "final")
    shutil.rmtree(copy / "checkpoint-6")  # killed after checkpoint-3; its log went on to step 6
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    # The saved recipe (absolute paths) with another tracker list: report_to does not change the run.
    code, _, err = dora("train", copy / "recipe.yaml", f"output_dir={copy}", "train.report_to=[tensorboard]", "--resume")
    assert code == 0, err
    assert "resuming from checkpoint-3 (step 3)" in err
    records = events(copy)
    assert [e["step"] for e in records if "loss" in e] == [2, 4, 6]
    found = scalars(copy)  # the steps after the checkpoint are logged once, with the resumed run's values
    assert [step for step, _ in found["loss"]] == [2, 4, 6]
    assert [v for _, v in found["loss"]] == pytest.approx([e["loss"] for e in records if "loss" in e], rel=1e-6)
