"""`dora sweep-rank [RECIPE] --ranks 4,8,16,32,64 --methods lora,dora`: the paper's rank study (Table 15, Figure 4).

Features, top to bottom:
- RECIPE defaults to `recipes/commonsense_7b.yaml` (LLaMA-7B, the paper's Table 15 setting), looked up
  in the current directory, then in the repository; dotted overrides as in `dora train`
- everything checked before any training, nothing written on a refusal: ranks, methods (did you mean),
  the alpha rule, every trial's recipe (overrides typed by the schema), the batch split, the model
  path, the training data, the commonsense test sets, and every trial directory that already holds a
  run of another recipe
- one trial per method and rank: the recipe with adapter.method / adapter.r / adapter.alpha changed
  (alpha = 2r as in the paper, or the recipe's alpha with `--alpha-rule fixed`), trained in-process
  by `train.run_train` into OUTPUT/sweep/<method>-r<r>/ and scored by `evaluate.run_eval` on its
  final/ into OUTPUT/sweep/<method>-r<r>/eval/ (OUTPUT: the recipe's output_dir)
- resumable: a trial with final/ and eval metrics is skipped, an interrupted one resumes from its
  newest complete checkpoint (`--resume`), an interrupted evaluation resumes where it stopped; a
  trial evaluated with other eval settings (eval.limit, eval.tasks, ...) is evaluated again, not retrained
- a trial that fails while running (a RunFailure such as a non-finite loss, an out-of-memory error, a
  multi-process training that exits 1) is recorded with its error and the sweep goes on. Any other
  UserError is a problem of the whole sweep (bad data, a module name that matches nothing): it stops
  the sweep with exit status 2. Bugs keep their traceback.
- exit status: 0 when at least one trial succeeded (failed trials are results of the study, marked in
  every report), 1 (RunFailure) when every trial failed
- OUTPUT/sweep/sweep.json (settings, per trial: method, rank, alpha, trainable parameters and %,
  per-task accuracy, average and its standard error, test examples, validation loss, train and eval
  time, status, error, paths), sweep.md (the layout of the paper's Table 15, Avg ± its standard error,
  validation loss, times) and sweep.png (average accuracy against rank on a log2 axis with ±1 standard
  error bars, one style per method, failed trials marked, a y range of at least 10 points, the model
  by name, the examples in the caption), written atomically and rewritten after every trial: a killed
  sweep leaves valid partial results. With the paper's model (yahma/llama-7b-hf) on the commonsense
  suite the paper's Table 15 averages are shown beside ours (dotted lines in the plot).
- the validation loss (train's metrics.json; set data.val_set_size) is the honest signal of a short
  trial, whose accuracies are often within their standard errors of each other

Every trial uses the recipe's learning rate. (The paper trains LoRA at 3e-4 and DoRA at 2e-4, 1e-4 at
r=32; pass optim.lr=... to change it for the whole sweep.)
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

from dora_cli.adapters import METHODS
from dora_cli.adapters.variants import recipe_methods
from dora_cli.console import say, stderr_is_terminal
from dora_cli.errors import RunFailure, UserError, did_you_mean, one_of
from dora_cli.files import (
    OutputKind,
    check_output,
    json_with,
    output_kind,
    register_output_kind,
    write_json,
    write_output_marker,
    write_text,
)
from dora_cli.plots import fit, model_name, save_png, series_style, y_limits
from dora_cli.recipe import Recipe, check_batch, load_recipe
from dora_cli.rundir import RunDir

DEFAULT_RECIPE = Path("recipes") / "commonsense_7b.yaml"
REPO_ROOT = Path(__file__).resolve().parents[1]
ALPHA_RULES = ("2r", "fixed")
SWEEP_DIR = "sweep"
REPORT_NAMES = ("sweep.json", "sweep.md", "sweep.png")
SWEEP_OUTPUT = register_output_kind(OutputKind(
    "sweep", "dora sweep-rank", entries=REPORT_NAMES, nested=(("*-r*", "train"),),
    legacy=lambda directory: json_with(directory / REPORT_NAMES[0], "settings", "trials", "summary") is not None,
))
"""What `dora sweep-rank` writes in OUTPUT/sweep: its reports, and one run directory per trial."""
MIN_Y_SPAN = 10.0  # percentage points: sweep.png never stretches a smaller difference across its axis

# The paper's Table 15: average commonsense accuracy (%) of LLaMA-7B at each rank (alpha = 2r).
# DoRA r=32 is 78.1, as in recipes/commonsense_7b.yaml (the final arXiv v6 version reports 78.4 at
# lr 1e-4).
PAPER_MODEL = "yahma/llama-7b-hf"
PAPER_TABLE15 = {
    "lora": {4: 39.5, 8: 40.7, 16: 70.9, 32: 74.7, 64: 65.8},
    "dora": {4: 61.9, 8: 77.9, 16: 77.5, 32: 78.1, 64: 72.1},
}


# ==================================================================================================
# Entry point
# ==================================================================================================
def run_sweep(
    recipe: str | Path | None,
    overrides: list[str],
    *,
    ranks: list[str],
    methods: list[str],
    alpha_rule: str = "2r",
) -> dict:
    """Train and evaluate every (method, rank) trial; returns the sweep document (sweep.json)."""
    if recipe is not None and "=" in str(recipe) and not Path(recipe).exists():
        # `dora sweep-rank --ranks 4,8 output_dir=DIR`: no RECIPE, the first word is an override.
        recipe, overrides = None, [str(recipe), *overrides]
    sweep = plan_sweep(recipe, overrides, ranks=ranks, methods=methods, alpha_rule=alpha_rule)
    return execute(sweep)


# ==================================================================================================
# Inputs: checked before anything is trained or written
# ==================================================================================================
def parse_ranks(values: list[str]) -> list[int]:
    """Positive integers, ascending, without repeats; anything else is a UserError naming --ranks."""
    ranks: list[int] = []
    for value in values:
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise UserError(f"--ranks: {text!r} is not a positive integer (e.g. --ranks 4,8,16,32,64)")
        ranks.append(int(text))
    if not ranks:
        raise UserError("--ranks: expected at least one rank (e.g. --ranks 4,8,16,32,64)")
    return sorted(set(ranks))


def parse_methods(values: list[str]) -> list[str]:
    """Adapter methods (those with a rank) in the order given, without repeats."""
    known = recipe_methods()
    methods: list[str] = []
    for value in values:
        method = str(value).strip().lower()
        if method not in known:
            raise UserError(f"--methods: unknown method {value!r}{did_you_mean(method, known)}; expected {one_of(known)}")
        if method not in methods:
            methods.append(method)
    if not methods:
        raise UserError(f"--methods: expected at least one of {one_of(known)}")
    return methods


def check_alpha_rule(rule: str) -> str:
    if rule not in ALPHA_RULES:
        raise UserError(f"--alpha-rule: expected 2r or fixed, got {rule!r}{did_you_mean(rule, ALPHA_RULES)}")
    return rule


def default_recipe() -> Path:
    """recipes/commonsense_7b.yaml (Table 15) in the current directory, else in the repository."""
    for candidate in (Path.cwd() / DEFAULT_RECIPE, REPO_ROOT / DEFAULT_RECIPE):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"no RECIPE given and the paper's rank-study recipe {DEFAULT_RECIPE} is missing "
        f"(looked in {Path.cwd()} and {REPO_ROOT}); pass a recipe: dora sweep-rank RECIPE --ranks ..."
    )


@dataclass
class Trial:
    method: str
    rank: int
    alpha: float
    recipe: Recipe  # the trial's resolved recipe (output_dir = its directory)
    paper_average: float | None

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.rank}"

    @property
    def label(self) -> str:
        return f"{self.method} r={self.rank} alpha={_number(self.alpha)}"

    @property
    def dir(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def final(self) -> Path:
        return RunDir(self.dir).final

    @property
    def eval_dir(self) -> Path:
        return self.dir / "eval"

    @property
    def eval_metrics(self) -> Path:
        return self.eval_dir / "commonsense" / "metrics.json"

    def trained(self) -> bool:
        return self.final.is_dir()

    def done(self) -> bool:
        """Trained and evaluated with the sweep's current eval settings."""
        return self.trained() and self.eval_metrics.is_file() and _same_eval(self.recipe, self.eval_metrics)

    def holds_run(self) -> bool:
        return RunDir(self.dir).is_a_run()


@dataclass
class Sweep:
    recipe_path: Path
    overrides: list[str]
    base: Recipe  # the recipe with the user's overrides
    ranks: list[int]
    methods: list[str]
    alpha_rule: str
    trials: list[Trial]

    @property
    def dir(self) -> Path:
        return Path(self.base.output_dir) / SWEEP_DIR

    @property
    def paper(self) -> bool:
        """The paper's Table 15 setting: LLaMA-7B on the commonsense suite."""
        return self.base.model.name_or_path == PAPER_MODEL and self.base.eval.suite == "commonsense"


def plan_sweep(
    recipe: str | Path | None, overrides: list[str], *, ranks: list[str], methods: list[str], alpha_rule: str = "2r"
) -> Sweep:
    """Every trial's recipe, validated, and every input checked; writes nothing."""
    rank_list = parse_ranks(ranks)
    method_list = parse_methods(methods)
    rule = check_alpha_rule(alpha_rule)
    recipe_path = Path(recipe) if recipe is not None else default_recipe()
    overrides = list(overrides)
    base = load_recipe(recipe_path, overrides)
    if base.eval.suite != "commonsense":
        raise UserError(f"eval.suite: the rank study scores the commonsense suite, got {base.eval.suite!r}", where=str(recipe_path))
    sweep_dir = Path(base.output_dir) / SWEEP_DIR
    paper = base.model.name_or_path == PAPER_MODEL
    trials = []
    for method in method_list:
        for rank in rank_list:
            alpha = 2 * rank if rule == "2r" else base.adapter.alpha
            trial_dir = sweep_dir / f"{method}-r{rank}"
            trial_recipe = load_recipe(
                recipe_path,
                [*overrides, f"adapter.method={method}", f"adapter.r={rank}", f"adapter.alpha={alpha}",
                 f"output_dir={json.dumps(str(trial_dir))}"],
            )
            paper_average = PAPER_TABLE15.get(method, {}).get(rank) if paper else None
            trial_recipe.expected = _expected(base, trial_recipe, paper_average)
            trials.append(Trial(method, rank, float(alpha), trial_recipe, paper_average))
    sweep = Sweep(recipe_path, overrides, base, rank_list, method_list, rule, trials)
    _check_inputs(sweep)
    return sweep


def _expected(base: Recipe, trial: Recipe, paper_average: float | None) -> dict[str, float]:
    """The paper's numbers of the trial's row: the recipe's own `expected` only for the recipe's own
    adapter (its row of the paper); else the Table 15 average where the paper has one."""
    a, b = base.adapter, trial.adapter
    if (a.method, a.r, a.alpha) == (b.method, b.r, b.alpha):
        return dict(base.expected)
    return {"avg": paper_average} if paper_average is not None else {}


def _check_inputs(sweep: Sweep) -> None:
    """What would stop every trial (or a trial directory that belongs to another run), found before hours of training."""
    from dora_cli.datasets import load_records
    from dora_cli.eval.suites import suite_of
    from dora_cli.models import resolve_source

    base = sweep.base
    check_output(sweep.dir, SWEEP_OUTPUT.name, label=f"output_dir {base.output_dir}: {SWEEP_DIR}")
    check_batch(base, base.launch.num_processes)
    resolve_source(base.model.name_or_path)
    load_records(base.data)
    suite_of(base).check_inputs(base)  # every task `dora eval` accepts, custom ones included
    for trial in sweep.trials:
        check_output(trial.dir, RunDir.kind, label=f"trial directory {trial.dir}")
        key = RunDir(trial.dir).difference(trial.recipe)
        if key is not None:
            raise UserError(
                f"{trial.dir}: holds a trial of a different recipe ({key} differs); delete the directory "
                "to redo the trial with the new settings, or choose another output_dir"
            )


# ==================================================================================================
# The trials
# ==================================================================================================
def _trial_failures() -> tuple[type[BaseException], ...]:
    """Exceptions that end one trial, not the sweep: RunFailure (non-finite loss, failed write), out of memory."""
    import torch

    return (RunFailure, MemoryError, torch.OutOfMemoryError)


def execute(sweep: Sweep) -> dict:
    """Run the planned trials in order, rewriting the reports after each; returns the sweep document."""
    records = {t.name: _pending(t) for t in sweep.trials}
    failures = _trial_failures()
    n = len(sweep.trials)
    check_output(sweep.dir, SWEEP_OUTPUT.name, label=f"output_dir {sweep.base.output_dir}: {SWEEP_DIR}")
    sweep.dir.mkdir(parents=True, exist_ok=True)
    if output_kind(sweep.dir) is None:
        write_output_marker(sweep.dir, SWEEP_OUTPUT.name)
    say(f"sweep: {n} trials ({', '.join(sweep.methods)} x r = {', '.join(map(str, sweep.ranks))}) in {sweep.dir}")
    for i, trial in enumerate(sweep.trials, 1):
        head = f"sweep [{i}/{n}] {trial.label}"
        if trial.done():
            records[trial.name] = _collect(trial)
            say(f"{head}: skipped (done: avg {_cell(records[trial.name]['average'])})")
            write_reports(sweep, records)
            continue
        started = time.perf_counter()
        try:
            _run_trial(trial, head)
            records[trial.name] = _collect(trial)
        except failures as err:
            records[trial.name] = _failed(trial, _one_line(err))
        except SystemExit as err:  # a multi-process training that failed exits with its status
            if err.code in (0, None, 2, 130, 143):  # user error or a signal: stop the sweep
                raise
            records[trial.name] = _failed(trial, f"training exited with status {err.code} (see {trial.dir / 'train.log'})")
        finally:
            gc.collect()
            _empty_cuda_cache()
        record = records[trial.name]
        seconds = time.perf_counter() - started
        if record["status"] == "ok":
            val = f", val loss {record['val_loss']:.4f}" if record["val_loss"] is not None else ""
            say(f"{head}: ok, avg {_avg(record)}{val}, {_percent(record['trainable_percent'])}% trainable ({seconds:.0f} s)")
        else:
            say(f"{head}: FAILED: {record['error']}")
        write_reports(sweep, records)
    doc = sweep_document(sweep, records)
    summary = doc["summary"]
    print(render_table(doc), end="")
    say(f"sweep: {summary['ok']} ok, {summary['failed']} failed; results in {sweep.dir / 'sweep.md'}")
    if summary["ok"] == 0:
        raise RunFailure(f"every trial of the sweep failed; the errors are in {sweep.dir / 'sweep.json'}")
    return doc


def _run_trial(trial: Trial, head: str) -> None:
    """Train (or resume) unless final/ exists, then evaluate (resumable) into the trial's eval/."""
    from dora_cli import evaluate, train

    trained_now = False
    if not trial.trained():
        resume = trial.holds_run()
        say(f"{head}: {'resuming' if resume else 'training'} -> {trial.dir}")
        train.train(trial.recipe, resume=resume)
        trained_now = True
    # Predictions of an earlier final/, or a finished evaluation with other settings, are discarded;
    # an interrupted evaluation of this final/ (predictions, no metrics yet) resumes.
    redo = trained_now or trial.eval_metrics.is_file()
    say(f"{head}: evaluating{' again (eval settings changed)' if redo and not trained_now else ''} -> {trial.eval_dir}")
    # The sweep's current eval settings (not the ones saved with final/ when it was trained).
    evaluate.evaluate(trial.final, trial.recipe, out=trial.eval_dir, overwrite=redo, progress=stderr_is_terminal())


def _same_eval(recipe: Recipe, metrics_file: Path) -> bool:
    """Whether the evaluation in `metrics_file` was made with the recipe's eval settings (else it is redone)."""
    from dora_cli.eval.suites import settings
    from dora_cli.eval.tasks import validate_tasks

    cfg = settings(recipe)
    done = json.loads(metrics_file.read_text()).get("settings", {})
    wanted = {"mode": cfg.mode, "limit": cfg.limit, "tasks": validate_tasks(cfg.tasks, cfg.data_dir), "data_dir": cfg.data_dir}
    if cfg.mode == "generate":
        wanted.update(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens)
    return all(done.get(key) == value for key, value in wanted.items())


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- per-trial records ----------------------------------------------------------------------------
def _base_record(trial: Trial) -> dict:
    return {
        "name": trial.name, "method": trial.method, "rank": trial.rank, "alpha": _number(trial.alpha),
        "status": "pending", "error": None,
        "trainable_params": None, "total_params": None, "trainable_percent": None,
        "tasks": {}, "average": None, "average_se": None, "examples": None, "paper_average": trial.paper_average,
        "val_loss": None, "train_time_s": None, "eval_time_s": None,
        "paths": {"output_dir": str(trial.dir), "final": str(trial.final), "eval_metrics": str(trial.eval_metrics)},
    }


def _pending(trial: Trial) -> dict:
    return _collect(trial) if trial.done() else _base_record(trial)


def _failed(trial: Trial, error: str) -> dict:
    return {**_train_numbers(trial, _base_record(trial)), "status": "failed", "error": error}


def _train_numbers(trial: Trial, record: dict) -> dict:
    """Trainable parameters (parameter_report, PEFT's convention), the validation loss and the wall time
    from the metrics.json of `dora train`."""
    path = RunDir(trial.dir).metrics_file
    if path.is_file():
        metrics = json.loads(path.read_text())
        record.update(
            trainable_params=metrics.get("trainable_params"), total_params=metrics.get("total_params"),
            trainable_percent=metrics.get("trainable_percent"), val_loss=metrics.get("val_loss"),
            train_time_s=metrics.get("wall_time_s"),
        )
    return record


def _collect(trial: Trial) -> dict:
    """The record of a finished trial, from what its training and evaluation wrote."""
    record = _train_numbers(trial, _base_record(trial))
    metrics = json.loads(trial.eval_metrics.read_text())
    record.update(
        status="ok",
        tasks={task: m["accuracy"] for task, m in metrics["tasks"].items()},
        average=metrics["average"],
        average_se=metrics.get("average_se"),
        examples=sum(m["n"] for m in metrics["tasks"].values()),
        eval_time_s=metrics.get("wall_time_s"),
    )
    return record


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"


# ==================================================================================================
# Reports: sweep.json, sweep.md, sweep.png (atomic, rewritten after every trial)
# ==================================================================================================
def sweep_document(sweep: Sweep, records: dict[str, dict]) -> dict:
    trials = [records[t.name] for t in sweep.trials]
    base = sweep.base
    settings = {
        "recipe": str(sweep.recipe_path),
        "overrides": sweep.overrides,
        "model": base.model.name_or_path or "random (model.config)",
        "methods": sweep.methods,
        "ranks": sweep.ranks,
        "alpha_rule": sweep.alpha_rule,
        "alpha": "2r" if sweep.alpha_rule == "2r" else _number(base.adapter.alpha),
        "output_dir": str(sweep.dir),
        "eval": {"tasks": base.eval.tasks, "mode": base.eval.mode, "limit": base.eval.limit, "data_dir": base.eval.data_dir},
        "paper_reference": "Table 15 (LLaMA-7B)" if sweep.paper else None,
    }
    summary = {status: sum(t["status"] == status for t in trials) for status in ("ok", "failed", "pending")}
    return {"settings": settings, "trials": trials, "summary": summary, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_reports(sweep: Sweep, records: dict[str, dict]) -> dict:
    """sweep.json, sweep.md and sweep.png in OUTPUT/sweep/, each written under a temporary name and renamed."""
    doc = sweep_document(sweep, records)
    json_name, md_name, png_name = REPORT_NAMES
    write_json(sweep.dir / json_name, doc)
    write_text(sweep.dir / md_name, render_table(doc))
    plot(doc, sweep.dir / png_name)
    return doc


def render_table(doc: dict) -> str:
    """Markdown in the layout of the paper's Table 15: one row per trial, Avg ± its standard error, then the
    validation loss and the times."""
    from dora_cli.eval.tasks import TASKS

    settings, trials = doc["settings"], doc["trials"]
    evaluated = settings["eval"]["tasks"]
    tasks = [*(t for t in TASKS if t in evaluated), *(t for t in evaluated if t not in TASKS)]
    paper = settings["paper_reference"] is not None
    columns = [
        "Model", "r", "# Params (%)", *(TASKS[t].column if t in TASKS else t for t in tasks), "Avg",
        "Val loss", "Train (s)", "Eval (s)", *(["Paper Avg"] if paper else []),
    ]
    lines = [
        f"# Rank study: {model_name(settings['model'])}",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * (len(columns) - 2),
    ]
    for t in trials:
        if t["status"] == "ok":
            cells = [_cell(t["tasks"].get(task)) for task in tasks] + [_avg(t)]
        else:
            cells = ["-"] * len(tasks) + [t["status"]]
        cells += [_loss(t["val_loss"]), _seconds(t["train_time_s"]), _seconds(t["eval_time_s"])]
        if paper:
            cells.append(_cell(t["paper_average"]))
        lines.append(f"| {METHODS[t['method']].display} | {t['rank']} | {_percent(t['trainable_percent'])} | " + " | ".join(cells) + " |")
    lines += ["", _note(doc)]
    failed = [t for t in trials if t["status"] == "failed"]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- {t['name']}: {t['error']}" for t in failed]
    return "\n".join(lines) + "\n"


def _note(doc: dict) -> str:
    settings = doc["settings"]
    ev = settings["eval"]
    alpha = "alpha = 2r" if settings["alpha_rule"] == "2r" else f"alpha = {settings['alpha']} (fixed)"
    note = f"Model {settings['model']}. Accuracy (%), {alpha}; eval mode {ev['mode']}"
    if ev["limit"]:
        note += f", first {ev['limit']} examples per task"
    note += (
        f"; {_examples(doc)}. Avg is the macro average over the tasks evaluated, ± one binomial standard error"
        " (percentage points). Val loss: the trial's validation loss (data.val_set_size examples); times in"
        " seconds (training, and the evaluation's predictions)."
    )
    if settings["paper_reference"] is not None:
        note += " Paper Avg: the paper's Table 15 (LLaMA-7B, eight tasks)."
    return note


def _examples(doc: dict) -> str:
    """'n = 400 test examples per trial (2 tasks)', from the trials evaluated so far."""
    counts = sorted({t["examples"] for t in doc["trials"] if t["status"] == "ok" and t["examples"] is not None})
    if not counts:
        return "no trial evaluated yet"
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    tasks = len(doc["settings"]["eval"]["tasks"])
    return f"n = {n} test examples per trial ({tasks} task{'s' if tasks != 1 else ''})"


def plot(doc: dict, path: Path):
    """Average accuracy ± one standard error against rank (log2 axis, the ranks as ticks), one style per
    method (markers, line styles and a small sideways offset keep tied methods apart); failed trials
    marked with x at the bottom; the paper's averages dotted; at least MIN_Y_SPAN points of y range.
    Written atomically; returns the figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    settings, trials = doc["settings"], doc["trials"]
    ranks, methods = settings["ranks"], settings["methods"]
    width = 6.4
    fig = Figure(figsize=(width, 4.6), layout="constrained")
    ax = fig.subplots()
    shown: list[float] = []
    for i, method in enumerate(methods):
        style, name = series_style(i), METHODS[method].display
        shift = 2 ** (0.035 * (i - (len(methods) - 1) / 2))  # a sideways offset on the log axis
        mine = {t["rank"]: t for t in trials if t["method"] == method}
        ok = [mine[r] for r in ranks if r in mine and mine[r]["status"] == "ok"]
        xs = [t["rank"] * shift for t in ok]
        ys = [t["average"] for t in ok]
        errs = [t["average_se"] or 0.0 for t in ok]
        if ok:
            ax.errorbar(xs, ys, yerr=errs, capsize=3, elinewidth=1.0, label=name, **style)
            shown += [y - e for y, e in zip(ys, errs)] + [y + e for y, e in zip(ys, errs)]
        failed = [r for r in ranks if r in mine and mine[r]["status"] == "failed"]
        if failed:  # x in axis coordinates: at the bottom, whatever the accuracies
            ax.plot(failed, [0.04] * len(failed), "x", color=style["color"], markersize=10, markeredgewidth=2,
                    transform=ax.get_xaxis_transform(), label=f"{name} failed")
        reference = [(t["rank"], t["paper_average"]) for t in trials if t["method"] == method and t["paper_average"] is not None]
        if settings["paper_reference"] and reference:
            ax.plot(*zip(*reference), linestyle=":", marker=style["marker"], fillstyle="none", color=style["color"],
                    alpha=0.7, label=f"{name} (paper)")
            shown += [y for _, y in reference]
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(ranks) / 1.4, max(ranks) * 1.4)
    ax.set_ylim(*y_limits(shown, MIN_Y_SPAN, floor=0.0, ceiling=100.0))
    ax.set_xlabel("rank r")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(fit(f"Rank study: {model_name(settings['model'])}", width, 11), fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.supxlabel(fit(f"{_examples(doc)}; error bars: ±1 binomial standard error of the average", width, 8), fontsize=8)
    save_png(fig, path)
    return fig


# ---- formatting -----------------------------------------------------------------------------------
def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _avg(record: dict) -> str:
    """The average with its standard error: '72.3 ± 1.1'."""
    se = record.get("average_se")
    return _cell(record["average"]) + (f" ± {se:.1f}" if se is not None else "")


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _percent(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"
