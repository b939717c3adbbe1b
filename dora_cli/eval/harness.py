"""The lm_eval suite: EleutherAI's lm-evaluation-harness on a loaded model (an optional extra).

    metrics = evaluate_harness(model, tokenizer, "runs/x/eval-final/lm_eval", tasks=["arc_easy", "hellaswag"],
                               num_fewshot=0, limit=100, batch_size=8)

The model object `dora eval` loaded (a base, a merged model, or a base with our adapters, unmerged) is handed
to lm-eval through its Hugging Face wrapper, `HFLM(pretrained=model, tokenizer=tokenizer)`; lm-eval builds the
requests of its tasks and computes their metrics, we answer the requests. Tasks are lm-eval's own, the
YAMLs of `eval.lm_eval.tasks_dir` (lm-eval's include path: tasks reading local files, for machines without
the Hugging Face Hub), and the LLM-Adapters commonsense tasks shipped in lm_eval_tasks/ (`llm_adapters_<task>`,
tag `llm_adapters`: our evaluation prompt and loglik continuations, read from `eval.data_dir`; see
lm_eval_tasks/_llm_adapters.yaml for why their `acc` is our loglik accuracy).

Output directory
    run.json          the model the requests were answered by (checked on every run)
    requests.jsonl    every answered request: a hash of (method, arguments, occurrence) and the answer;
                      appended after every chunk of requests, so a killed run resumes where it stopped
    metrics.json      per task: lm-eval's metrics and their stderr as it reports them (fractions, keyed
                      "acc,none" ...), the task version, few-shot count, n (and the test set's size); the
                      headline metric (the first higher-is-better one in [0, 1]) as `accuracy` / `se` in
                      percent and their macro average; groups as lm-eval reports them; settings, the
                      lm-eval version, the seeds, requests answered and resumed, wall time
    results.md        the table printed at the end
    samples/<task>.jsonl   with `samples`: lm-eval's per-example records (arguments, answers, metrics)

Resuming: a finished evaluation with the same settings is skipped (its metrics returned); otherwise answers
already in requests.jsonl are reused, whatever tasks or few-shot counts asked them. Requests of another
model are never mixed in: refused unless `overwrite`, which discards them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path

from dora_cli.console import progress_bar, say
from dora_cli.errors import UserError, clip, did_you_mean_any_case
from dora_cli.eval.predict import describe_model
from dora_cli.eval.tasks import TASKS, load_task, task_file
from dora_cli.files import append_jsonl, guard_resume, read_jsonl_resumable, remove, write_json, write_text

EXTRA = "pip install 'dora_cli[lm_eval]'"
SHIPPED_TASKS = Path(__file__).parent / "lm_eval_tasks"
TAG = "llm_adapters"
LLM_ADAPTERS = {f"{TAG}_{name.lower().replace('-', '_')}": name for name in TASKS}
"""The shipped lm-eval task of each LLM-Adapters task: llm_adapters_arc_easy -> ARC-Easy."""
DATA_KEY = "dora_data_dir"
"""The lm-eval metadata key that carries eval.data_dir to the shipped tasks' loader."""


def require():
    """The lm_eval module; not installed is a UserError naming the extra."""
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"the lm_eval suite needs EleutherAI's lm-evaluation-harness: {EXTRA}", where="eval.suite") from None
    return lm_eval


def llm_adapters_dataset(task: str, **metadata):
    """lm-eval's `custom_dataset` of the shipped tasks: the records of `<dora_data_dir>/<task>/test.json`."""
    import datasets

    records = json.loads(task_file(task, metadata.get(DATA_KEY)).read_text(encoding="utf-8"))
    rows = [{"instruction": r["instruction"], "answer": r["answer"]} for r in records]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# ---- tasks --------------------------------------------------------------------------------------------
def task_manager(tasks_dir: str | None, data_dir: str | None, tasks: list[str]):
    """lm-eval's TaskManager over the shipped tasks and `tasks_dir`, and lm-eval's own ones unless every task of
    `tasks` is one of the former (indexing lm-eval's ~14,000 task files takes seconds); one per directory state."""
    files = sorted((str(p), p.stat().st_mtime_ns) for p in Path(tasks_dir).rglob("*") if p.is_file()) if tasks_dir else ()
    local = _manager(tasks_dir, data_dir, tuple(files), False)
    if all(local_only(name, local) for name in tasks):
        return local
    return _manager(tasks_dir, data_dir, tuple(files), True)


def local_only(name: str, local, seen: frozenset = frozenset()) -> bool:
    """Whether `name` is built from the shipped tasks and tasks_dir alone: one of their tasks, our tag, or a group
    of theirs whose members (named, not inline configs) all are."""
    if name == TAG or name in local.all_subtasks:
        return True
    entry = local.task_index.get(name) if name in local.all_groups and name not in seen else None
    members = (entry.cfg or {}).get("task") if entry is not None else None
    if not isinstance(members, list) or not members:
        return False
    return all(isinstance(m, str) and local_only(m, local, seen | {name}) for m in members)


@functools.cache
def _manager(tasks_dir: str | None, data_dir: str | None, files: tuple, defaults: bool):
    from lm_eval.tasks import TaskManager

    class Manager(TaskManager):
        """A TaskManager that hands out a task list loaded by `check_tasks` (before the model) once."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.checked: dict[tuple, dict] = {}
            self.configs: dict[tuple, dict[str, str]] = {}  # task list -> task_configs() of what it built

        def load(self, task_list):
            key = tuple(task_list) if isinstance(task_list, list) else None
            return self.checked.pop(key) if key in self.checked else super().load(task_list)

    include = [str(SHIPPED_TASKS), *([tasks_dir] if tasks_dir else [])]
    return Manager(include_path=include, include_defaults=defaults, metadata={DATA_KEY: data_dir} if data_dir else None)


def check_tasks(tasks: list[str], *, tasks_dir: str | None, data_dir: str | None, limit: int | None) -> None:
    """Every task known to lm-eval (else one line with a did-you-mean), the shipped tasks' test files
    readable, and every task's dataset loaded; nothing is written."""
    require()
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise UserError(f"{tasks_dir} is not a directory (expected lm-eval task YAML files)", where="eval.lm_eval.tasks_dir")
    if not tasks:
        raise UserError("no task given (--tasks arc_easy,hellaswag)", where="eval.tasks")
    manager = task_manager(tasks_dir, data_dir, tasks)
    for name in tasks:
        if name not in manager.all_tasks:
            raise UserError(_unknown_task(name, manager, tasks_dir), where="eval.tasks")
    for name in tasks:
        for shipped in LLM_ADAPTERS if name == TAG else [name] if name in LLM_ADAPTERS else []:
            load_task(LLM_ADAPTERS[shipped], data_dir, limit)
    with _datasets(tasks), _building(tasks), _quiet():
        loaded = manager.load(list(tasks))
    unsafe = [name for name, task in loaded["tasks"].items() if getattr(task, "UNSAFE_CODE", False)]
    if unsafe:
        raise UserError(f"{', '.join(unsafe)}: the task runs code the model wrote (unsafe_code); dora eval does not run "
                        "such tasks (lm-eval's own CLI does, with --confirm_run_unsafe_code)", where="eval.tasks")
    manager.checked[tuple(tasks)] = loaded
    manager.configs[tuple(tasks)] = task_configs(loaded)


def checked_task_configs(tasks: list[str], *, tasks_dir: str | None, data_dir: str | None, limit: int | None) -> dict[str, str]:
    """`task_configs` of the tasks, checked (`check_tasks`) unless they already were in this state of the task
    directories."""
    require()
    manager = task_manager(tasks_dir, data_dir, list(tasks))
    if tuple(tasks) not in manager.configs:
        check_tasks(list(tasks), tasks_dir=tasks_dir, data_dir=data_dir, limit=limit)
    return manager.configs[tuple(tasks)]


def task_configs(loaded: dict) -> dict[str, str]:
    """Task or group name -> a digest of its configuration as lm-eval built it (prompt templates, choices, metrics,
    few-shot settings, the source of the functions it names, a group's members and aggregation): an evaluation
    is reused only for the same digests, so a task YAML edited since is evaluated again."""
    configs = {**{name: task.dump_config() for name, task in loaded["tasks"].items()},
               **{name: [group.to_dict(), group.child_names] for name, group in loaded["groups"].items()}}
    return {name: hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for name, config in sorted(configs.items())}


def _unknown_task(name: str, manager, tasks_dir: str | None) -> str:
    hint = did_you_mean_any_case(name.replace("-", "_"), manager.all_tasks)  # ARC-Easy suggests arc_easy
    msg = f'unknown lm-eval task "{name}"{hint}; lm-eval knows {len(manager.all_tasks)} tasks, groups and tags (`lm-eval ls tasks`)'
    if tasks_dir:
        from lm_eval.tasks import TaskManager

        own = TaskManager(include_path=tasks_dir, include_defaults=False).all_tasks
        msg += f"; in {tasks_dir}: {', '.join(own) if own else 'none (a task YAML names its `task:`)'}"
    return msg


@contextlib.contextmanager
def _datasets(tasks: list[str]):
    """A dataset lm-eval cannot download (offline, no hub) as one line."""
    try:
        yield
    except (ConnectionError, FileNotFoundError) as err:
        from dora_cli import hub

        access = hub.access()
        why = f"; {access.why_not()}" if access.local_only else ""
        raise UserError(
            f"the dataset of a task could not be loaded ({clip(f'{type(err).__name__}: {err}', 200)}){why}; a task "
            "can read local files instead: --tasks-dir DIR of task YAMLs (README: the lm_eval suite)",
            where=f"eval.tasks {','.join(tasks)}",
        ) from None


BUILD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError)
"""What lm-eval raises for a task it cannot build (while the tasks are loaded: nothing else runs then)."""


@contextlib.contextmanager
def _building(tasks: list[str], errors: tuple = BUILD_ERRORS):
    """A task lm-eval cannot build from its YAML (an unknown output type, a template naming a field the documents
    lack, a group asked with one of its own tasks, ...) as one line. While requests are answered only a template
    error is (`errors` empty): a ValueError there may as well be the model's."""
    from jinja2 import TemplateError

    try:
        yield
    except (*errors, TemplateError) as err:
        raise UserError(f"lm-eval cannot build the tasks ({clip(f'{type(err).__name__}: {err}', 300)}); see their task "
                        "YAMLs", where=f"eval.tasks {','.join(tasks)}") from None


@contextlib.contextmanager
def _quiet():
    """lm-eval's info and warning lines (a pre-built model, seeds, metadata hints), its per-task "building
    contexts" bars and the datasets library's bars off the console (our own bar counts the requests)."""
    import datasets
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator_module

    logger = logging.getLogger("lm_eval")
    level, bar, bars = logger.level, getattr(task_module, "tqdm", None), datasets.is_progress_bar_enabled()
    git_hash = getattr(evaluator_module, "get_git_commit_hash", None)
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    if bar is not None:
        task_module.tqdm = functools.partial(bar, disable=True)
    if git_hash is not None:  # `git describe` in the current directory: "fatal: not a git repository" on stderr
        evaluator_module.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        if bar is not None:
            task_module.tqdm = bar
        if git_hash is not None:
            evaluator_module.get_git_commit_hash = git_hash


# ---- answering requests, resumably ----------------------------------------------------------------------
def request_key(method: str, args: tuple, occurrence: int) -> str:
    """The identity of a request: its method, its arguments, and how many identical ones came before it in the
    same call (sampled generations repeated k times are k requests)."""
    text = json.dumps([method, list(args), occurrence], sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _restore(method: str, answer):
    return tuple(answer) if method == "loglikelihood" else answer


@functools.cache
def _resumable_class():
    from lm_eval.api.model import LM

    class Resumable(LM):
        """An lm-eval model that answers from requests.jsonl where it can and asks `lm` (HFLM) for the rest, a
        chunk at a time, appending every chunk's answers."""

        def __init__(self, lm, path: Path, chunk: int, bar):
            super().__init__()
            self.lm, self.path, self.chunk, self.bar = lm, path, chunk, bar
            self.done = {r["key"]: r["answer"] for r in read_jsonl_resumable(path) if "key" in r}
            self.asked = self.computed = 0

        def __getattr__(self, name):  # batch_sizes, device, ... of the wrapped model
            if name == "lm":
                raise AttributeError(name)
            return getattr(self.lm, name)

        def get_model_info(self) -> dict:
            params = list(self.lm.model.parameters())
            return {"model_num_parameters": sum(p.numel() for p in params), "model_dtype": str(params[0].dtype)}

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._answer("loglikelihood", requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._answer("loglikelihood_rolling", requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._answer("generate_until", requests)

        def _answer(self, method: str, requests: list) -> list:
            seen: Counter = Counter()
            keys = []
            for r in requests:
                args = json.dumps(list(r.args), sort_keys=True, default=repr)
                keys.append(request_key(method, r.args, seen[args]))
                seen[args] += 1
            todo = [i for i, k in enumerate(keys) if k not in self.done]
            self.asked += len(requests)
            job = self.bar.add_task(method, total=len(requests), completed=len(requests) - len(todo))
            for start in range(0, len(todo), self.chunk):
                part = todo[start : start + self.chunk]
                answers = getattr(self.lm, method)([requests[i] for i in part], disable_tqdm=True)
                append_jsonl(self.path, [{"key": keys[i], "answer": a} for i, a in zip(part, answers)])
                self.done.update((keys[i], a) for i, a in zip(part, answers))
                self.computed += len(part)
                self.bar.update(job, advance=len(part))
            return [_restore(method, self.done[k]) for k in keys]

    return Resumable


# ---- the run --------------------------------------------------------------------------------------------
def evaluate_harness(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    tasks: list[str],
    data_dir: str | None = None,
    tasks_dir: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    samples: bool = False,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate on lm-eval tasks; writes requests.jsonl, metrics.json, results.md (and samples/); returns the
    metrics."""
    lm_eval = require()
    manager = task_manager(tasks_dir, data_dir, list(tasks))
    # (`dora eval` checked them before loading the model)
    configs = checked_task_configs(list(tasks), tasks_dir=tasks_dir, data_dir=data_dir, limit=limit)
    description = describe_model(model)
    settings = {
        "tasks": list(tasks), "num_fewshot": num_fewshot, "limit": limit, "data_dir": data_dir, "tasks_dir": tasks_dir,
        "model": model_name or description, "model_description": description, "lm_eval_version": lm_eval.__version__,
        "task_configs": configs,
    }
    out = Path(out_dir)
    requests_file, metrics_file, samples_dir = out / "requests.jsonl", out / "metrics.json", out / "samples"
    old_samples = sorted(samples_dir.glob("*.jsonl")) if samples_dir.is_dir() else []
    model_id = f"{model_name} {description}" if model_name else description
    guard_resume(out / "run.json", [requests_file, metrics_file, out / "results.md", *old_samples],
                 {"suite": "lm_eval", "model": model_id}, overwrite=overwrite)

    previous = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    if previous and same_settings(previous.get("settings", {}), settings) and (
        not samples or all((samples_dir / f"{t}.jsonl").is_file() for t in previous["tasks"])
    ):
        say(f"lm_eval: already evaluated with these settings; skipped ({metrics_file})")
        return previous

    from lm_eval.models.huggingface import HFLM

    for stale in old_samples:  # of an earlier evaluation: this one rewrites them or has none
        remove(stale)
    began = time.perf_counter()
    model.eval()
    with _quiet(), progress_bar(progress) as bar:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        answering = _resumable_class()(lm, requests_file, chunk=4 * batch_size, bar=bar)
        with _datasets(list(tasks)), _building(list(tasks), errors=()):
            results = lm_eval.simple_evaluate(
                model=answering, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                log_samples=samples,
            )
    metrics = summarize(results, {**settings, "batch_size": batch_size, "samples": samples})
    if num_fewshot is not None:  # lm-eval leaves a task whose config says 0 at 0, and logs it only at info level
        for name in [n for n, t in metrics["tasks"].items() if t["num_fewshot"] != num_fewshot]:
            say(f"note: {name}: its config fixes num_fewshot {metrics['tasks'][name]['num_fewshot']}; "
                f"--num-fewshot {num_fewshot} does not apply to it")
    metrics["requests"] = {"answered": answering.asked, "computed": answering.computed, "resumed": answering.asked - answering.computed}
    metrics["wall_time_s"] = round(time.perf_counter() - began, 3)
    if samples:
        from lm_eval.utils import handle_non_serializable

        for task, rows in results["samples"].items():
            text = "".join(json.dumps(r, ensure_ascii=False, default=handle_non_serializable) + "\n" for r in rows)
            write_text(samples_dir / f"{task}.jsonl", text)
    write_json(metrics_file, metrics)
    write_text(out / "results.md", results_table(metrics))
    return metrics


COMPARED = ("tasks", "num_fewshot", "limit", "data_dir", "tasks_dir", "model", "model_description", "lm_eval_version",
            "task_configs")


def same_settings(done: dict, wanted: dict) -> bool:
    """Whether an evaluation made with `done` settings answers one asked with `wanted` (the batch size and the
    samples switch aside)."""
    return all(done.get(k) == wanted.get(k) for k in COMPARED if k in wanted)


# ---- metrics ----------------------------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def headline(values: dict, higher_is_better: dict) -> str | None:
    """The metric a task is summed up by: the first one lm-eval reports that is higher-is-better and a
    fraction ("acc,none"); None when there is none (perplexities)."""
    for key, value in values.items():
        metric = key.split(",")[0]
        if "_stderr" in metric or not _is_number(value):
            continue
        if higher_is_better.get(metric) and 0.0 <= value <= 1.0:
            return key
    return None


def summarize(results: dict, settings: dict) -> dict:
    """The metrics document from lm-eval's results."""
    groups = {name: {k: v for k, v in r.items() if "," in k} for name, r in (results.get("groups") or {}).items()}
    # a group without aggregate_metric_list: in lm-eval's results, no metrics and no n of its own
    groups.update({name: {} for name in results["results"] if name not in results["n-samples"] and name not in groups})
    per_task = {}
    for name, r in results["results"].items():
        if name in groups:
            continue
        values = {k: v for k, v in r.items() if "," in k}
        best = headline(values, results["higher_is_better"].get(name, {}))
        stderr = values.get(best.replace(",", "_stderr,", 1)) if best else None
        n = results["n-samples"][name]
        per_task[name] = {
            "metrics": values, "version": results["versions"].get(name), "num_fewshot": results["n-shot"].get(name),
            "n": n["effective"], "n_total": n["original"], "metric": best,
            "accuracy": round(100 * values[best], 4) if best else None,
            "se": round(100 * stderr, 4) if best and _is_number(stderr) else None,
        }
    scored = [t for t in per_task.values() if t["accuracy"] is not None]
    config = results.get("config", {})
    return {
        "suite": "lm_eval",
        "tasks": per_task,
        "groups": groups,
        "average": round(sum(t["accuracy"] for t in scored) / len(scored), 4) if scored else None,
        "average_se": round(math.sqrt(sum((t["se"] or 0.0) ** 2 for t in scored)) / len(scored), 4) if scored else None,
        "n": sum(t["n"] for t in per_task.values()),
        "settings": settings,
        "seeds": {k: config.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
    }


def _value(v) -> str:
    return f"{v:.4f}" if _is_number(v) else str(v)


def results_table(metrics: dict) -> str:
    """Every task's metrics (lm-eval's table: fractions ± stderr), the groups, and the average of the headlines."""
    lines = ["| Task | Version | Shots | Metric | Value | Stderr | n |", "|---|---:|---:|---|---:|---:|---:|"]
    for name, t in [*metrics["tasks"].items(), *((g, {"metrics": m}) for g, m in metrics["groups"].items())]:
        for key, value in t["metrics"].items():
            metric, _, flt = key.partition(",")
            if "_stderr" in metric:
                continue
            stderr = t["metrics"].get(f"{metric}_stderr,{flt}")
            shown = metric if flt == "none" else f"{metric} ({flt})"
            lines.append(
                f"| {name} | {t.get('version', '')} | {t.get('num_fewshot', '')} | {shown}{' *' if key == t.get('metric') else ''} "
                f"| {_value(value)} | {_value(stderr) if stderr is not None else ''} | {t.get('n', '')} |"
            )
    settings = metrics["settings"]
    note = f"lm-evaluation-harness {settings['lm_eval_version']}; model {settings['model']}"
    if settings.get("limit"):
        note += f"; first {settings['limit']} examples per task"
    if metrics["average"] is not None:
        note += (f". Average of the headline metrics (*) over {sum(t['accuracy'] is not None for t in metrics['tasks'].values())}"
                 f" tasks: {metrics['average']:.2f} % ± {metrics['average_se']:.2f}")
    return "\n".join(lines) + f"\n\n{note}.\n"
