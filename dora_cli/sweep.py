"""`dora sweep-rank [RECIPE] --ranks 4,8,16 --methods lora,dora --seeds 3`: the paper's rank study (Table 15,
Figure 4), with seeds, a hyperparameter grid chosen on the validation loss, and shards.

Features, top to bottom:
- RECIPE defaults to `recipes/commonsense_7b.yaml` (LLaMA-7B, the paper's Table 15 setting), looked up
  in the current directory, then in the repository; dotted overrides as in `dora train`
- trials are (method, rank, seed) and, with `--grid KEY=v1,v2 ...` (repeatable, any recipe key the sweep
  does not set itself), every combination of the grid's values: the recipe with adapter.method /
  adapter.r / adapter.alpha (2r, or the recipe's with `--alpha-rule fixed`) / train.seed and the grid's
  keys changed, trained in-process by `train.train` into OUTPUT/sweep/<method>-r<r>[-<key>=<value>...]-s<seed>/
  and scored by `evaluate.evaluate` on its final/ into that directory's eval/ (OUTPUT: the recipe's output_dir)
- `--seeds 1,2,3` (or `--seeds 3`: seeds 1, 2, 3; `--seeds 7,`: the one seed 7); default: the recipe's
  train.seed alone. A seed sets the adapter's initialisation, the data order and the dropout masks, so the
  trials of two methods with one seed saw the same batches: their differences are paired by seed
- the grid's setting of each method is chosen on the validation loss, never on the test sets: per (method,
  rank), the lowest mean over its seeds; or, with `--select-at R`, the lowest at rank R and the first seed,
  then used at every rank and seed (the paper's protocol: a learning rate per method, chosen once)
- everything checked before any training, nothing written on a refusal: ranks, methods, seeds, grid
  values (each typed by the recipe schema), shard, every trial's recipe, the batch split, the model path,
  the training data, the eval suite's inputs (commonsense test sets, lm-eval tasks), and every trial directory that already holds a run of another recipe
- resumable: a trial with final/ and eval metrics is skipped, an interrupted one resumes from its newest
  complete checkpoint, an interrupted evaluation resumes where it stopped; a trial evaluated with other
  eval settings (eval.limit, eval.tasks, ...) is evaluated again, not retrained. A directory of a sweep made
  before seeds existed (OUTPUT/sweep/<method>-r<r>/) that holds the same run counts as the trial of the
  recipe's seed, where it is
- `--shard K/N`: this process runs the trials whose index (in the order the arguments fix) is K mod N, so
  N processes or machines share one output directory; a trial is claimed under a lock
  (OUTPUT/sweep/<trial>.lock) while it runs, so two never train the same one. The selection trials of
  `--select-at` are needed by every shard: after its own, a shard runs those nobody has claimed and waits
  for the others. `--report` writes the combined reports from whatever trials are finished, training nothing
- a trial that fails while running (a RunFailure such as a non-finite loss, an out-of-memory error, a
  multi-process training that exits 1) is recorded with its error and the sweep goes on. Any other
  UserError is a problem of the whole sweep: exit status 2. Bugs keep their traceback.
- exit status: 0 when at least one trial succeeded or none failed, 1 (RunFailure) when trials failed and
  none succeeded
- OUTPUT/sweep/sweep.json, sweep.md, sweep.png (sweep_report.py: means over seeds with 95 % intervals,
  the selected settings, paired differences against the first method), written atomically after every
  trial under a lock (OUTPUT/sweep/reports.lock): a killed sweep leaves valid partial results, and every
  shard writes the combined results
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dora_cli.adapters.variants import recipe_methods
from dora_cli.console import say, stderr_is_terminal
from dora_cli.errors import RunFailure, UserError, clip, did_you_mean, first_repeat, one_of
from dora_cli.eval.suites import same_evaluation, suite_of
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
from dora_cli.recipe import Recipe, check_batch, load_recipe, refuse_set_twice, value_at
from dora_cli.rundir import LOG_NAME, RunDir, RunLock
from dora_cli.sweep_report import chosen_at, document, plot, render_table

DEFAULT_RECIPE = Path("recipes") / "commonsense_7b.yaml"
REPO_ROOT = Path(__file__).resolve().parents[1]
ALPHA_RULES = ("2r", "fixed")
SWEEP_DIR = "sweep"
REPORTS_LOCK = "reports.lock"
CLAIM_SUFFIX = ".lock"
MAX_SEED_COUNT = 10  # `--seeds N` above this is refused: `--seeds 42` meant the seed 42 more often than 42 seeds
REPORTS_WAIT_S = 120.0  # the longest a process waits for the reports lock
POLL_S = 10.0  # how often a shard waiting for another's selection trial looks again
SEED_MAX = 2**32 - 1

# Keys the sweep sets itself, and the option that sets them.
SWEPT = {"adapter.method": "--methods", "adapter.r": "--ranks", "train.seed": "--seeds", "output_dir": "the recipe's output_dir"}
ALPHA_IS_2R = "alpha is 2r under --alpha-rule 2r; pass --alpha-rule fixed"
REPORT_NAMES = ("sweep.json", "sweep.md", "sweep.png")
SWEEP_OUTPUT = register_output_kind(OutputKind(
    "sweep", "dora sweep-rank", entries=(*REPORT_NAMES, REPORTS_LOCK, "*" + CLAIM_SUFFIX), nested=(("*-r*", "train"),),
    legacy=lambda directory: json_with(directory / REPORT_NAMES[0], "settings", "trials", "summary") is not None,
))
"""What `dora sweep-rank` writes in OUTPUT/sweep: its reports, the trials' claims and one run directory per trial."""

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
    seeds: str | None = None,
    grid: list[str] | None = None,
    select_at: str | int | None = None,
    shard: str | None = None,
    report: bool = False,
) -> dict:
    """Train and evaluate every trial (this shard's); returns the sweep document (sweep.json)."""
    if recipe is not None and "=" in str(recipe) and not Path(recipe).exists():
        # `dora sweep-rank --ranks 4,8 output_dir=DIR`: no RECIPE, the first word is an override.
        recipe, overrides = None, [str(recipe), *overrides]
    if report and shard is not None:
        raise UserError("--report writes the combined results of every shard: leave out --shard")
    sweep = plan_sweep(recipe, overrides, ranks=ranks, methods=methods, alpha_rule=alpha_rule, seeds=seeds,
                       grid=grid or [], select_at=select_at, shard=shard)
    if report:
        _own_sweep_dir(sweep)
        doc = write_reports(sweep, {})
        print(render_table(doc), end="")
        say(f"sweep: {_counts(doc)}; results in {sweep.dir / 'sweep.md'}")
        return doc
    return execute(sweep)


# ==================================================================================================
# Inputs: checked before anything is trained or written
# ==================================================================================================
def parse_ranks(values: list[str]) -> list[int]:
    """Positive integers, listed once each, in ascending order; anything else is a UserError naming --ranks."""
    ranks: list[int] = []
    for value in values:
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise UserError(f"--ranks: {text!r} is not a positive integer (e.g. --ranks 4,8,16,32,64)")
        ranks.append(int(text))
    if not ranks:
        raise UserError("--ranks: expected at least one rank (e.g. --ranks 4,8,16,32,64)")
    _refuse_repeats("--ranks", "rank", ranks)
    return sorted(ranks)


def parse_methods(values: list[str]) -> list[str]:
    """Adapter methods (those with a rank) in the order given, listed once each."""
    known = recipe_methods()
    methods: list[str] = []
    for value in values:
        method = str(value).strip().lower()
        if method not in known:
            raise UserError(f"--methods: unknown method {value!r}{did_you_mean(method, known)}; expected {one_of(known)}")
        methods.append(method)
    if not methods:
        raise UserError(f"--methods: expected at least one of {one_of(known)}")
    _refuse_repeats("--methods", "method", methods)
    return methods


def _refuse_repeats(option: str, what: str, values: list) -> None:
    i = first_repeat(values)
    if i is not None:
        raise UserError(f"{option}: {what} {values[i]} is listed twice")


def parse_seeds(text: str | None, default: int) -> list[int]:
    """`None`: [default]; `N`: seeds 1..N; `a,b,c` (or `a,`): those seeds, in that order."""
    if text is None:
        return [default]
    example = "(e.g. --seeds 3 for seeds 1, 2, 3, or --seeds 1,2,3; --seeds 7, for the one seed 7)"
    words = [w.strip() for w in str(text).split(",")]
    listed = len(words) > 1
    words = [w for w in words if w]
    for word in words:
        if not (word.isascii() and word.isdigit()) or int(word) > SEED_MAX:
            raise UserError(f"--seeds: {word!r} is not a seed (an integer 0 .. 2**32-1) {example}")
    if not words:
        raise UserError(f"--seeds: expected a number of seeds or a list of seeds {example}")
    if not listed:
        count = int(words[0])
        if not 1 <= count <= MAX_SEED_COUNT:
            raise UserError(
                f"--seeds: {count} is a number of seeds: expected 1 .. {MAX_SEED_COUNT} (for the one seed {count} "
                f"write --seeds {count},; list more seeds as --seeds 1,2,...)"
            )
        return list(range(1, count + 1))
    seeds = [int(w) for w in words]
    _refuse_repeats("--seeds", "seed", seeds)
    return seeds


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`K/N` with 0 <= K < N."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not str(text).isascii() or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--shard: expected K/N with 0 <= K < N (e.g. --shard 0/4 ... --shard 3/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


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


# ---- the grid ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridValue:
    key: str  # a dotted recipe key
    text: str  # its value as written (YAML; the schema types it)

    @property
    def override(self) -> str:
        return f"{self.key}={self.text}"


Setting = tuple[GridValue, ...]
"""One value per --grid key, in the order the keys were given; () without a grid."""


def split_values(text: str) -> list[str]:
    """`1e-4,2e-4` -> ['1e-4', '2e-4']; commas inside [...], {...} or quotes belong to their value."""
    values, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return values


def parse_grid(terms: list[str], alpha_rule: str) -> list[list[GridValue]]:
    """Each --grid term as its values (typed later, by the schema); keys the sweep sets, eval keys, a key
    given twice, and repeated or empty values are refused."""
    grid: list[list[GridValue]] = []
    for term in terms:
        key, eq, rest = str(term).partition("=")
        key = key.strip()
        if not eq or not key or not re.fullmatch(r"[\w.\-]+", key):
            raise UserError(f"--grid: expected KEY=v1,v2,... with a dotted recipe key (e.g. --grid optim.lr=1e-4,2e-4), got {clip(repr(term), 80)}")
        if key in SWEPT:
            raise UserError(f"--grid {key}: the sweep sets it ({SWEPT[key]}); grid other keys")
        if key == "adapter.alpha" and alpha_rule != "fixed":
            raise UserError(f"--grid adapter.alpha: {ALPHA_IS_2R} to grid it")
        if key.split(".")[0] in ("eval", "expected"):
            raise UserError(f"--grid {key}: every trial is scored the same way; set {key} as an override instead")
        if key in ("train", "train.mixed_precision"):
            raise UserError(f"--grid {key}: a sweep trains in one process, whose Accelerate state keeps one mixed "
                            "precision; run one sweep per train.mixed_precision")
        if any(key == g[0].key for g in grid):
            raise UserError(f"--grid {key}: given twice; list all its values in one --grid {key}=v1,v2,...")
        values = split_values(rest)
        if not all(values):
            raise UserError(f"--grid {key}: an empty value in {clip(repr(rest), 80)} (e.g. --grid {key}=v1,v2)")
        _refuse_repeats(f"--grid {key}", "the value", values)
        grid.append([GridValue(key, v) for v in values])
    return grid


def setting_dict(setting: Setting) -> dict[str, str]:
    return {g.key: g.text for g in setting}


def _name_part(setting: Setting) -> str:
    """`-lr=2e-4-max_steps=20`: the setting in a directory name; a key by its last part unless two share it,
    a value as written when it is a plain word, else by a short hash."""
    if not setting:
        return ""
    lasts = [g.key.rsplit(".", 1)[-1] for g in setting]
    parts = []
    for g, last in zip(setting, lasts):
        key = last if lasts.count(last) == 1 else g.key
        value = g.text if re.fullmatch(r"[A-Za-z0-9._+\-]{1,32}", g.text) else "h" + hashlib.sha1(g.text.encode()).hexdigest()[:8]
        parts.append(f"{key}={value}")
    return "-" + "-".join(parts)


# ---- trials -------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    method: str
    rank: int
    seed: int
    setting: Setting
    recipe: Recipe  # the trial's resolved recipe (output_dir = its directory)
    paper_average: float | None
    legacy: bool = False  # a directory of a sweep made before seeds (<method>-r<r>/), used where it is

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.rank}{_name_part(self.setting)}-s{self.seed}"

    @property
    def alpha(self) -> float:
        return self.recipe.adapter.alpha

    @property
    def label(self) -> str:
        grid = "".join(f" {g.override}" for g in self.setting)
        return f"{self.method} r={self.rank} alpha={_number(self.alpha)}{grid} seed={self.seed}"

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
        return self.eval_dir / self.recipe.eval.suite / "metrics.json"

    def trained(self) -> bool:
        return self.final.is_dir()

    def done(self) -> bool:
        """Trained and evaluated with the sweep's current eval settings."""
        return self.trained() and self.eval_metrics.is_file() and same_evaluation(self.recipe, json.loads(self.eval_metrics.read_text()))

    def holds_run(self) -> bool:
        return RunDir(self.dir).is_a_run()


SELECTED = None
"""The setting of a study trial under --select-at: the one the selection chooses (not known when planning)."""


@dataclass(frozen=True)
class Slot:
    """A place in the trial order: a trial, or (setting SELECTED) the trial of whichever setting is chosen."""

    method: str
    rank: int
    seed: int
    setting: Setting | None
    selecting: bool = False  # a trial of the selection at --select-at (rank R, the first seed)


@dataclass
class Sweep:
    recipe_path: Path
    overrides: list[str]
    base: Recipe  # the recipe with the user's overrides
    ranks: list[int]
    methods: list[str]
    seeds: list[int]
    alpha_rule: str
    grid: list[list[GridValue]]
    settings: list[Setting]  # every combination of the grid's values, in the order given
    select_at: int | None
    shard: tuple[int, int] | None
    slots: list[Slot]  # the trial order: what `--shard K/N` divides
    trials: dict[tuple, Trial] = field(default_factory=dict)  # (method, rank, seed, setting) -> every possible trial

    @property
    def dir(self) -> Path:
        return Path(self.base.output_dir) / SWEEP_DIR

    @property
    def paper(self) -> bool:
        """The paper's Table 15 setting: LLaMA-7B on the commonsense suite."""
        return self.base.model.name_or_path == PAPER_MODEL and self.base.eval.suite == "commonsense"

    def trial(self, slot: Slot, setting: Setting | None = None) -> Trial:
        return self.trials[(slot.method, slot.rank, slot.seed, slot.setting if slot.setting is not SELECTED else setting)]

    def mine(self, index: int) -> bool:
        return self.shard is None or index % self.shard[1] == self.shard[0]


def plan_sweep(
    recipe: str | Path | None, overrides: list[str], *, ranks: list[str], methods: list[str], alpha_rule: str = "2r",
    seeds: str | None = None, grid: list[str] | None = None, select_at: str | int | None = None, shard: str | None = None,
) -> Sweep:
    """Every trial's recipe, validated, and every input checked; writes nothing."""
    rank_list = parse_ranks(ranks)
    method_list = parse_methods(methods)
    rule = check_alpha_rule(alpha_rule)
    shard_kn = parse_shard(shard)
    recipe_path = Path(recipe) if recipe is not None else default_recipe()
    overrides = list(overrides)
    # The sweep's keys may not be overridden, except its root (output_dir) and, without --seeds, the seed.
    swept = {key: f"the sweep sets it ({option}); give it there, not as an override" for key, option in SWEPT.items()
             if key != "output_dir" and (key != "train.seed" or seeds is not None)}
    if rule == "2r":
        swept["adapter.alpha"] = f"{ALPHA_IS_2R} to set it"
    refuse_set_twice(overrides, swept)
    base = load_recipe(recipe_path, overrides)
    if suite_of(base).compared is None:
        raise UserError(f"eval.suite: the rank study compares per-task accuracies (commonsense or lm_eval), got {base.eval.suite!r}",
                        where=str(recipe_path))
    seed_list = parse_seeds(seeds, base.train.seed)
    grid_values = parse_grid(list(grid or []), rule)
    refuse_set_twice(overrides, {values[0].key: f"also set by --grid {values[0].key}=...; keep one of them"
                                 for values in grid_values})
    for values in grid_values:  # each value typed by the schema, named as the user gave it
        typed = [_typed(recipe_path, overrides, value) for value in values]
        i = first_repeat(typed)
        if i is not None:
            first = values[typed.index(typed[i])]
            raise UserError(f"--grid {first.key}: {first.text} and {values[i].text} are the same value")
    settings = [tuple(v) for v in itertools.product(*grid_values)]
    if len(settings) > 1 and base.data.val_set_size == 0:
        raise UserError("--grid: each method's setting is chosen on the validation loss, and there is none: set "
                        "data.val_set_size (examples held out of the training data)")
    if select_at is not None:
        text = str(select_at).strip()
        if not (text.isascii() and text.isdigit()):
            raise UserError(f"--select-at: {text!r} is not a rank (e.g. --select-at 8)")
        select_at = int(text)
        if not grid_values:
            raise UserError("--select-at: there is nothing to select without --grid")
        if select_at not in rank_list:
            raise UserError(f"--select-at: rank {select_at} is not one of --ranks {','.join(map(str, rank_list))}")
    slots = _order(method_list, rank_list, seed_list, settings, select_at)
    sweep = Sweep(recipe_path, overrides, base, rank_list, method_list, seed_list, rule, grid_values, settings, select_at,
                  shard_kn, slots)
    paper = base.model.name_or_path == PAPER_MODEL
    for method, rank, seed, setting in itertools.product(method_list, rank_list, seed_list, settings):
        trial = Trial(method, rank, seed, setting, base, PAPER_TABLE15.get(method, {}).get(rank) if paper else None)
        trial.recipe = _trial_recipe(sweep, trial, sweep.dir / trial.name)
        legacy = sweep.dir / f"{method}-r{rank}"
        if not setting and not trial.dir.exists() and RunDir(legacy).is_a_run():
            candidate = _trial_recipe(sweep, trial, legacy)
            if RunDir(legacy).difference(candidate) is None:
                trial.recipe, trial.legacy = candidate, True
        sweep.trials[(method, rank, seed, setting)] = trial
    _check_inputs(sweep)
    return sweep


def _typed(recipe_path: Path, overrides: list[str], value: GridValue) -> Any:
    """The value as the schema types it, in the recipe with it, validated; its error names the --grid value."""
    try:
        recipe = load_recipe(recipe_path, [*overrides, value.override])
        return value_at(recipe.model_dump(), tuple(value.key.split(".")))[1]
    except UserError as err:
        where = f"override {clip(value.override, 120)}"
        if err.where != where:
            raise
        raise UserError(str(err)[len(where) + 2 :], where=f"--grid {clip(value.override, 120)}") from None


def _trial_recipe(sweep: Sweep, trial: Trial, directory: Path) -> Recipe:
    """The recipe with the trial's grid values, method, rank, alpha (2r; `fixed`: the recipe's or the grid's),
    seed and directory."""
    alpha = [f"adapter.alpha={2 * trial.rank}"] if sweep.alpha_rule == "2r" else []
    recipe = load_recipe(
        sweep.recipe_path,
        [*sweep.overrides, *(g.override for g in trial.setting), f"adapter.method={trial.method}", f"adapter.r={trial.rank}",
         *alpha, f"train.seed={trial.seed}", f"output_dir={json.dumps(str(directory))}"],
    )
    recipe.expected = _expected(sweep.base, recipe, trial.paper_average)
    return recipe


def _order(methods: list[str], ranks: list[int], seeds: list[int], settings: list[Setting], select_at: int | None) -> list[Slot]:
    """The trial order, fixed by the arguments: seed by seed (a finished seed is a complete table), then setting,
    method, rank. With --select-at R: first each method's grid at rank R with the first seed, then the study
    with each method's chosen setting."""
    if select_at is None:
        return [Slot(m, r, s, setting) for s in seeds for setting in settings for m in methods for r in ranks]
    selection = [Slot(m, select_at, seeds[0], setting, selecting=True) for m in methods for setting in settings]
    return selection + [Slot(m, r, s, SELECTED) for s in seeds for m in methods for r in ranks]


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
    from dora_cli.models import resolve_source

    base = sweep.base
    check_output(sweep.dir, SWEEP_OUTPUT.name, label=f"output_dir {base.output_dir}: {SWEEP_DIR}")
    for trial in sweep.trials.values():
        check_batch(trial.recipe, trial.recipe.launch.num_processes)
    resolve_source(base.model.name_or_path)
    load_records(base.data)
    suite_of(base).check_inputs(base)  # every task `dora eval` accepts, custom ones included
    for trial in sweep.trials.values():
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


@dataclass
class Runner:
    """One process's work on a sweep: the trials it ran and how they ended."""

    sweep: Sweep
    failed: dict[str, dict] = field(default_factory=dict)  # trial name -> record, failed in this process

    def head(self, index: int) -> str:
        shard = f" (shard {self.sweep.shard[0]}/{self.sweep.shard[1]})" if self.sweep.shard else ""
        return f"sweep [{index + 1}/{len(self.sweep.slots)}]{shard}"

    def attempt(self, trial: Trial, head: str) -> str:
        """Run one trial under its claim: 'done' (finished, now or before), 'failed', or 'claimed' (another
        process holds it)."""
        head = f"{head} {trial.label}"
        if trial.done():
            say(f"{head}: skipped (done{' in ' + str(trial.dir) if trial.legacy else ''})")
            return "done"
        claim = RunLock(self.sweep.dir, what="dora sweep-rank", noun="trial", name=trial.name + CLAIM_SUFFIX)
        owner = claim.try_acquire()
        if owner is not None:
            say(f"{head}: claimed by pid {owner.get('pid')} on {owner.get('host')}; left to it")
            return "claimed"
        try:
            if trial.done():  # finished by another process since we looked
                return "done"
            return self._run(trial, head)
        finally:
            claim.release()

    def _run(self, trial: Trial, head: str) -> str:
        started = time.perf_counter()
        self.failed.pop(trial.name, None)
        try:
            _run_trial(trial, head)
        except _trial_failures() as err:
            self.failed[trial.name] = _failed(trial, _one_line(err))
        except SystemExit as err:  # a multi-process training that failed exits with its status
            if err.code in (0, None, 2, 130, 143):  # user error or a signal: stop the sweep
                raise
            self.failed[trial.name] = _failed(trial, f"training exited with status {err.code} (see {trial.dir / LOG_NAME})")
        finally:
            gc.collect()
            _empty_cuda_cache()
        seconds = time.perf_counter() - started
        if trial.name in self.failed:
            say(f"{head}: FAILED: {self.failed[trial.name]['error']}")
            return "failed"
        record = _collect(trial)
        val = f", val loss {record['val_loss']:.4f}" if record["val_loss"] is not None else ""
        say(f"{head}: ok, avg {_cell(record['average'])}{val} ({seconds:.0f} s)")
        for warning in record["warnings"]:
            say(f"{head}: warning: {warning}")
        return "done"


def _own_sweep_dir(sweep: Sweep) -> None:
    """OUTPUT/sweep made, with the marker of the sweep's outputs, before anything is written into it."""
    check_output(sweep.dir, SWEEP_OUTPUT.name, label=f"output_dir {sweep.base.output_dir}: {SWEEP_DIR}")
    sweep.dir.mkdir(parents=True, exist_ok=True)
    if output_kind(sweep.dir) is None:
        write_output_marker(sweep.dir, SWEEP_OUTPUT.name)


def execute(sweep: Sweep) -> dict:
    """Run this process's trials in order, rewriting the combined reports after each; returns the document."""
    runner = Runner(sweep)
    grid = f" x {len(sweep.settings)} grid settings" if sweep.grid else ""
    shard = f"; shard {sweep.shard[0]}/{sweep.shard[1]}" if sweep.shard else ""
    say(f"sweep: {len(sweep.slots)} trials ({', '.join(sweep.methods)} x r = {', '.join(map(str, sweep.ranks))} x "
        f"seeds {', '.join(map(str, sweep.seeds))}{grid}{shard}) in {sweep.dir}")
    _own_sweep_dir(sweep)
    for trial in sweep.trials.values():
        if trial.legacy:
            say(f"sweep: {trial.dir} (a sweep made before seeds) holds the trial {trial.name}: used where it is")
    chosen: dict[str, tuple[str, Setting | None]] | None = None
    for i, slot in enumerate(sweep.slots):
        if not sweep.mine(i):
            continue
        if slot.setting is SELECTED:
            if chosen is None:
                chosen = _settle_selection(sweep, runner)
            state, setting = chosen[slot.method]
            if state != "chosen":
                say(f"{runner.head(i)} {slot.method} r={slot.rank} seed={slot.seed}: not run: every selection trial "
                    f"of {slot.method} at r={sweep.select_at} failed")
                continue
            trial = sweep.trial(slot, setting)
        else:
            trial = sweep.trial(slot)
        runner.attempt(trial, runner.head(i))
        write_reports(sweep, runner.failed)
    doc = write_reports(sweep, runner.failed)
    print(render_table(doc), end="")
    say(f"sweep: {_counts(doc)}; results in {sweep.dir / 'sweep.md'}")
    summary = doc["summary"]
    if summary["ok"] == 0 and summary["failed"] > 0:
        raise RunFailure(f"every finished trial of the sweep failed; the errors are in {sweep.dir / 'sweep.json'}")
    return doc


def _settle_selection(sweep: Sweep, runner: Runner) -> dict[str, tuple[str, Setting | None]]:
    """Every selection trial finished (run here when nobody holds it, waited for while another process
    does); then each method's choice, as `_records` gives it."""
    told: set[str] = set()
    while True:
        waiting = []
        for slot in (s for s in sweep.slots if s.selecting):
            trial = sweep.trial(slot)
            if trial.done() or trial.name in runner.failed:
                continue
            if runner.attempt(trial, f"sweep [selection at r={sweep.select_at}]") == "claimed":
                waiting.append(trial)
        if not waiting:
            return _records(sweep, runner.failed)[1]
        for trial in waiting:
            if trial.name not in told:
                told.add(trial.name)
                say(f"sweep: waiting for {trial.name} (another process runs it): the selection at r={sweep.select_at} "
                    f"needs it; if that process is gone, delete {sweep.dir / (trial.name + CLAIM_SUFFIX)}")
        time.sleep(POLL_S)


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


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- per-trial records ----------------------------------------------------------------------------
def _base_record(trial: Trial) -> dict:
    return {
        "name": trial.name, "method": trial.method, "rank": trial.rank, "alpha": _number(trial.alpha), "seed": trial.seed,
        "setting": setting_dict(trial.setting), "status": "pending", "error": None,
        "trainable_params": None, "total_params": None, "trainable_percent": None,
        "tasks": {}, "tasks_se": {}, "average": None, "average_se": None, "examples": None,
        "paper_average": trial.paper_average, "val_loss": None, "train_time_s": None, "eval_time_s": None,
        "magnitude_change": {}, "warnings": [],
        "paths": {"output_dir": str(trial.dir), "final": str(trial.final), "eval_metrics": str(trial.eval_metrics)},
    }


def _failed(trial: Trial, error: str) -> dict:
    return {**_train_numbers(trial, _base_record(trial)), "status": "failed", "error": error}


def _train_numbers(trial: Trial, record: dict) -> dict:
    """Trainable parameters (parameter_report, PEFT's convention), the validation loss, the wall time, the
    relative change of each module kind's magnitude and the run's warnings, from `dora train`'s metrics.json."""
    from dora_cli.adapters.change import MAGNITUDE

    path = RunDir(trial.dir).metrics_file
    if path.is_file():
        metrics = json.loads(path.read_text())
        changes = metrics.get("adapter_change") or {}
        record.update(
            trainable_params=metrics.get("trainable_params"), total_params=metrics.get("total_params"),
            trainable_percent=metrics.get("trainable_percent"), val_loss=metrics.get("val_loss"),
            train_time_s=metrics.get("wall_time_s"), warnings=list(metrics.get("warnings") or []),
            magnitude_change={kind: t[MAGNITUDE]["relative"] for kind, t in changes.items() if MAGNITUDE in t},
        )
    return record


def _collect(trial: Trial) -> dict:
    """The record of a finished trial, from what its training and evaluation wrote."""
    record = _train_numbers(trial, _base_record(trial))
    metrics = json.loads(trial.eval_metrics.read_text())
    record.update(
        status="ok",
        tasks={task: m["accuracy"] for task, m in metrics["tasks"].items()},
        tasks_se={task: m.get("se") for task, m in metrics["tasks"].items()},
        average=metrics["average"],
        average_se=metrics.get("average_se"),
        examples=sum(m["n"] for m in metrics["tasks"].values()),
        eval_time_s=metrics.get("wall_time_s"),
    )
    return record


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"


def _records(sweep: Sweep, failed: dict[str, dict]) -> tuple[list[dict], dict[str, tuple[str, Setting | None]]]:
    """One record per trial of the sweep, in the trial order, from the disk (any process's finished trials)
    and `failed` (this process's failures; other processes' stay in sweep.json until the trial runs again);
    and under --select-at each method's choice: ("chosen", setting), ("pending", None) while a selection
    trial is not finished, ("none", None) when all failed. A study trial whose setting is not chosen is a
    record without a setting (pending, or failed)."""
    earlier = _earlier_failures(sweep)

    def record_of(trial: Trial, selecting: bool) -> dict:
        if trial.done():
            record = _collect(trial)
        else:
            record = failed.get(trial.name) or earlier.get(trial.name) or _base_record(trial)
        return {**record, "selecting": selecting}

    records = [record_of(sweep.trial(slot), True) for slot in sweep.slots if slot.selecting]
    state: dict[str, tuple[str, Setting | None]] = {}
    if sweep.select_at is not None:
        for method, choice in chosen_at(records, sweep.methods).items():
            state[method] = ("pending", None) if choice == "pending" else ("none", None) if choice is None \
                else ("chosen", _setting_of(sweep, choice))
    seen = {r["name"] for r in records}
    for slot in (s for s in sweep.slots if not s.selecting):
        if slot.setting is SELECTED and state[slot.method][0] != "chosen":
            placeholder = _base_record(sweep.trial(slot, sweep.settings[0]))
            record = {**placeholder, "name": f"{slot.method}-r{slot.rank}-s{slot.seed}", "setting": None, "paths": {},
                      "selecting": False}
            if state[slot.method][0] == "none":
                record.update(status="failed", error=f"not run: every selection trial of {slot.method} failed")
            records.append(record)
            continue
        trial = sweep.trial(slot, state[slot.method][1] if slot.setting is SELECTED else None)
        if trial.name not in seen:
            seen.add(trial.name)
            records.append(record_of(trial, False))
    return records, state


def _setting_of(sweep: Sweep, text: dict[str, str]) -> Setting:
    return next(s for s in sweep.settings if setting_dict(s) == text)


def _earlier_failures(sweep: Sweep) -> dict[str, dict]:
    """The failed trials sweep.json holds (written by any process of this sweep)."""
    path = sweep.dir / "sweep.json"
    try:
        trials = json.loads(path.read_text())["trials"]
        return {t["name"]: t for t in trials if t.get("status") == "failed"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# ==================================================================================================
# Reports: sweep.json, sweep.md, sweep.png (atomic, under the reports lock)
# ==================================================================================================
def sweep_settings(sweep: Sweep) -> dict:
    base = sweep.base
    return {
        "recipe": str(sweep.recipe_path),
        "overrides": sweep.overrides,
        "model": base.model.name_or_path or "random (model.config)",
        "methods": sweep.methods,
        "ranks": sweep.ranks,
        "seeds": sweep.seeds,
        "grid": {values[0].key: [v.text for v in values] for values in sweep.grid},
        "select_at": None if sweep.select_at is None else {"rank": sweep.select_at, "seed": sweep.seeds[0]},
        "alpha_rule": sweep.alpha_rule,
        "alpha": "2r" if sweep.alpha_rule == "2r" else _number(base.adapter.alpha),
        "output_dir": str(sweep.dir),
        "eval": {"suite": base.eval.suite, "tasks": base.eval.tasks, "mode": base.eval.mode, "limit": base.eval.limit,
                 "data_dir": base.eval.data_dir},
        "paper_reference": "Table 15 (LLaMA-7B)" if sweep.paper else None,
    }


def write_reports(sweep: Sweep, failed: dict[str, dict]) -> dict:
    """sweep.json, sweep.md and sweep.png in OUTPUT/sweep/ from every finished trial, each written under a
    temporary name and renamed; under a lock, so the newest of several processes' reports is written last."""
    with _reports_lock(sweep.dir):
        doc = document(sweep_settings(sweep), _records(sweep, failed)[0])
        json_name, md_name, png_name = REPORT_NAMES
        write_json(sweep.dir / json_name, doc)
        write_text(sweep.dir / md_name, render_table(doc))
        plot(doc, sweep.dir / png_name)
    return doc


class _reports_lock:
    """The reports lock, waited for (another process holds it for the second it takes to write); after
    REPORTS_WAIT_S (its holder died on another host) the reports are written without it, atomically still."""

    def __init__(self, directory: Path):
        self.lock = RunLock(directory, what="dora sweep-rank", noun="sweep reports", name=REPORTS_LOCK)

    def __enter__(self):
        waited = 0.0
        while self.lock.try_acquire() is not None and waited < REPORTS_WAIT_S:
            time.sleep(0.2)
            waited += 0.2
        if not self.lock.held:
            say(f"sweep: {self.lock.path} has been held for {REPORTS_WAIT_S:.0f} s; writing the reports without it")
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _counts(doc: dict) -> str:
    s = doc["summary"]
    return f"{s['ok']} ok, {s['failed']} failed, {s['pending']} pending"


# ---- formatting -----------------------------------------------------------------------------------
def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"

