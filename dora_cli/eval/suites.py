"""The evaluation suites `dora eval` (and the rank sweep) can run, in one registry.

A suite is a name, its decoding defaults, a check of its inputs (run before any model is loaded, so a
missing file is named in a second, not after minutes of loading) and a run on a loaded model:

    suite = suite_of(recipe)                    # SUITES[recipe.eval.suite]
    suite.check_inputs(recipe)                  # UserError naming the file / task / key
    metrics = suite.run(SuiteRun(recipe, model, tokenizer, out_dir, ...))

    commonsense  the 8 LLM-Adapters tasks (and custom ones from eval.data_dir)   4 beams, 32 new tokens
    math         final-number exact match on question / answer records           greedy, 1024 new tokens
    mt_bench     MT-Bench answers, and judgments when a judge is set             (eval.mt_bench.max_new_tokens)
    lm_eval      lm-evaluation-harness tasks (an optional extra)                  (each task's own)

`compared` (suites that report per-task accuracies and their average) gives the settings a finished
evaluation's metrics.json must hold to be reused: the rank sweep skips such a trial's evaluation.

A new suite is one `Suite(...)` entry here plus its module under eval/ (and its name in EvalConfig.suite).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dora_cli.errors import UserError
from dora_cli.recipe import EvalConfig, Recipe


@dataclass(frozen=True)
class SuiteRun:
    """Everything a suite run needs."""

    recipe: Recipe
    model: object
    tokenizer: object
    out_dir: Path  # the suite's own directory (OUT/<suite>)
    model_name: str  # what the model is called in tables (a checkpoint path, a hub id)
    model_id: str  # a file-name-safe id (MT-Bench answer files)
    overwrite: bool = False
    progress: bool = True

    @property
    def eval(self) -> EvalConfig:
        return settings(self.recipe)


@dataclass(frozen=True)
class Suite:
    name: str
    num_beams: int | None
    max_new_tokens: int | None
    check_inputs: Callable[[Recipe], None]
    run: Callable[[SuiteRun], dict]
    writes: tuple[str, ...]
    """The paths it writes in its directory (files.matches patterns): anything else there is the user's."""
    compared: Callable[[Recipe], dict] | None = None


def same_evaluation(recipe: Recipe, metrics: dict) -> bool:
    """Whether `metrics` (a suite's metrics.json) was made with the recipe's eval settings."""
    done = metrics.get("settings", {})
    return all(done.get(key) == value for key, value in suite_of(recipe).compared(recipe).items())


def settings(recipe: Recipe) -> EvalConfig:
    """The recipe's eval section with the suite's defaults filled in where it leaves them unset (None)."""
    cfg, suite = recipe.eval, SUITES[recipe.eval.suite]
    return cfg.model_copy(update={
        "num_beams": cfg.num_beams if cfg.num_beams is not None else suite.num_beams,
        "max_new_tokens": cfg.max_new_tokens if cfg.max_new_tokens is not None else suite.max_new_tokens,
    })


def suite_of(recipe: Recipe) -> Suite:
    return SUITES[recipe.eval.suite]


# ---- commonsense ----------------------------------------------------------------------------------------
def _check_commonsense(recipe: Recipe) -> None:
    from dora_cli.eval.tasks import load_task, validate_tasks

    cfg = recipe.eval
    for task in validate_tasks(cfg.tasks, cfg.data_dir):
        load_task(task, cfg.data_dir, cfg.limit)


def _compared_commonsense(recipe: Recipe) -> dict:
    from dora_cli.eval.tasks import validate_tasks

    cfg = settings(recipe)
    wanted = {"mode": cfg.mode, "limit": cfg.limit, "tasks": validate_tasks(cfg.tasks, cfg.data_dir), "data_dir": cfg.data_dir}
    if cfg.mode == "generate":
        wanted.update(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens)
    return wanted


def _run_commonsense(run: SuiteRun) -> dict:
    from dora_cli.eval.commonsense import evaluate_commonsense

    cfg = run.eval
    return evaluate_commonsense(
        run.model, run.tokenizer, run.out_dir, tasks=cfg.tasks, data_dir=cfg.data_dir, mode=cfg.mode,
        batch_size=cfg.batch_size, limit=cfg.limit, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
        expected=run.recipe.expected, model_name=run.model_name, overwrite=run.overwrite, progress=run.progress,
    )


# ---- math -------------------------------------------------------------------------------------------------
def _check_math(recipe: Recipe) -> None:
    from dora_cli.eval.mathqa import load_math_records

    load_math_records(recipe.eval.data_dir, recipe.eval.limit)


def _run_math(run: SuiteRun) -> dict:
    from dora_cli.eval.mathqa import evaluate_math

    cfg = run.eval
    return evaluate_math(
        run.model, run.tokenizer, run.out_dir, data=cfg.data_dir, template=run.recipe.data.template,
        batch_size=cfg.batch_size, limit=cfg.limit, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
        expected=run.recipe.expected, model_name=run.model_name, overwrite=run.overwrite, progress=run.progress,
    )


# ---- MT-Bench ---------------------------------------------------------------------------------------------
def _check_mt_bench(recipe: Recipe) -> None:
    from dora_cli.eval.mtbench import mt_bench_inputs

    mt_bench_inputs(recipe.eval.mt_bench, recipe.eval.limit)


def _run_mt_bench(run: SuiteRun) -> dict:
    from dora_cli.eval.mtbench import evaluate_mt_bench

    cfg = run.eval
    return evaluate_mt_bench(
        run.model, run.tokenizer, run.out_dir, cfg.mt_bench, model_id=run.model_id, limit=cfg.limit,
        expected=run.recipe.expected, overwrite=run.overwrite, progress=run.progress,
    )


# ---- lm-evaluation-harness --------------------------------------------------------------------------------
def _check_lm_eval(recipe: Recipe) -> None:
    from dora_cli.eval.harness import check_tasks

    cfg = recipe.eval
    if cfg.tasks == EvalConfig().tasks:
        raise UserError("the lm_eval suite takes lm-eval task names (--tasks arc_easy,hellaswag); the default list "
                        "is the commonsense suite's", where="eval.tasks")
    check_tasks(cfg.tasks, tasks_dir=cfg.lm_eval.tasks_dir, data_dir=cfg.data_dir, limit=cfg.limit)


def _compared_lm_eval(recipe: Recipe) -> dict:
    from dora_cli.eval.harness import checked_task_configs

    cfg = recipe.eval
    configs = checked_task_configs(cfg.tasks, tasks_dir=cfg.lm_eval.tasks_dir, data_dir=cfg.data_dir, limit=cfg.limit)
    return {"tasks": cfg.tasks, "num_fewshot": cfg.lm_eval.num_fewshot, "limit": cfg.limit, "data_dir": cfg.data_dir,
            "tasks_dir": cfg.lm_eval.tasks_dir, "task_configs": configs}


def _run_lm_eval(run: SuiteRun) -> dict:
    from dora_cli.eval.harness import evaluate_harness

    cfg = run.eval
    return evaluate_harness(
        run.model, run.tokenizer, run.out_dir, tasks=cfg.tasks, data_dir=cfg.data_dir, tasks_dir=cfg.lm_eval.tasks_dir,
        num_fewshot=cfg.lm_eval.num_fewshot, limit=cfg.limit, batch_size=cfg.batch_size, samples=cfg.lm_eval.samples,
        model_name=run.model_name, overwrite=run.overwrite, progress=run.progress,
    )


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("commonsense", num_beams=4, max_new_tokens=32, check_inputs=_check_commonsense, run=_run_commonsense,
              writes=("metrics.json", "results.md", "predictions", "predictions/run.json", "predictions/*.jsonl"), compared=_compared_commonsense),
        Suite("math", num_beams=1, max_new_tokens=1024, check_inputs=_check_math, run=_run_math,
              writes=("metrics.json", "results.md", "predictions", "predictions/run.json", "predictions/*.jsonl")),
        Suite("mt_bench", num_beams=None, max_new_tokens=None, check_inputs=_check_mt_bench, run=_run_mt_bench,
              writes=("metrics.json", "model_answer", "model_answer/*.jsonl", "model_answer/*.run.json",
                      "model_judgment", "model_judgment/*_single.jsonl")),
        Suite("lm_eval", num_beams=None, max_new_tokens=None, check_inputs=_check_lm_eval, run=_run_lm_eval,
              writes=("run.json", "requests.jsonl", "metrics.json", "results.md", "samples", "samples/*.jsonl"),
              compared=_compared_lm_eval),
    )
}
