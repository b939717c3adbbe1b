"""Experiment trackers of `train.report_to` (TensorBoard, Weights & Biases), through Accelerate's trackers.

    check(recipe.train.report_to)                  before anything is written: a tracker that is not
                                                   installed is a UserError naming its pip package
    Accelerator(..., **accelerator_options(recipe, run_dir))
    start(acc, recipe, run_dir, step)              init_trackers: project "dora_cli", the run named after
                                                   output_dir, the flattened recipe as the run's config
    log(acc, record)                               the numbers of a metrics.jsonl record, at its step
    finish(acc)                                    flushes and closes them (on the main process)

They write under output_dir/trackers/ (RunDir.trackers): TensorBoard event files in dora_cli/, wandb's
runs in wandb/ (offline with WANDB_MODE=offline; online, wandb needs `wandb login` or WANDB_API_KEY).
A resumed run purges the TensorBoard events after the step it resumes from, as metrics.jsonl drops them.
"""

from __future__ import annotations

import importlib.util
import json

from dora_cli.errors import UserError

PROJECT = "dora_cli"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the pip package it needs


def installed(tracker: str) -> bool:
    return importlib.util.find_spec(PACKAGES[tracker]) is not None


def check(report_to: list[str]) -> None:
    """Refuse a tracker whose package is missing (one line naming the package)."""
    for tracker in report_to:
        if not installed(tracker):
            package = PACKAGES[tracker]
            raise UserError(
                f"train.report_to: {tracker} is not installed; pip install {package} "
                f"(or pip install 'dora_cli[trackers]'), or remove it from train.report_to"
            )


def accelerator_options(recipe, run_dir) -> dict:
    """log_with / project_dir of the Accelerator (nothing without trackers)."""
    report_to = list(recipe.train.report_to)
    return {"log_with": report_to, "project_dir": str(run_dir.trackers)} if report_to else {}


def start(acc, recipe, run_dir, step: int) -> None:
    """Start the trackers (no-op without any); `step` > 0: a resumed run."""
    if not recipe.train.report_to:
        return
    from dora_cli.recipe import dump_recipe, safe_load

    if acc.is_main_process:
        run_dir.trackers.mkdir(exist_ok=True)
    options = {
        "wandb": {"name": run_dir.path.name, "dir": str(run_dir.trackers)},
        "tensorboard": {"purge_step": step + 1} if step else {},
    }
    acc.init_trackers(PROJECT, config=flatten(safe_load(dump_recipe(recipe))), init_kwargs=options)


def log(acc, record: dict) -> None:
    """The numeric fields of one metrics.jsonl record (loss, lr, grad_norm, tokens_per_s, val_loss, ...)."""
    values = {
        key: value for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    if values and acc.trackers:
        acc.log(values, step=record["step"])


def finish(acc) -> None:
    """Flush and close the trackers. (Accelerator.end_training would also end the process group, which
    the run's last barrier still needs.)"""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers.clear()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"adapter": {"r": 8}} -> {"adapter.r": 8}; lists become their JSON text (what trackers accept)."""
    flat: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat
