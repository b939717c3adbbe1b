"""The eight commonsense tasks of LLM-Adapters (DoRA paper, Table 1): names, answer formats, test sets.

Answer extraction follows `extract_answer` of LLM-Adapters' `commomsense_evaluate.py` (also
NVlabs/DoRA `commonsense_reasoning/commonsense_evaluate.py`): take the text after the last
`### Response:`, strip it, and return the FIRST match of the task's regex, case-sensitive
(`TRUE` or `Answer1` do not match); no match gives "" and counts as wrong.

Test sets are read in the LLM-Adapters layout `<root>/<task>/test.json` (a JSON list of
`{"instruction", "input", "output", "answer"}` records) from a local directory, or from a Hugging
Face dataset repository with the same layout (`hf://owner/name`, or `owner/name` when no such local
directory exists).

Custom tasks: a name that is not one of the eight is accepted when the data directory is local and
holds `<root>/<name>/test.json` (e.g. `--data-dir data --tasks demo` reads data/demo/test.json). Its
answers are the options of the records' `Answer format: a/b/c` lines (all the lines' options, in the
order first seen) and its pattern is their alternation (`answer1|answer2|answer3|answer4`), applied
like the built-in ones: case-sensitive, first match. `validate_tasks(..., data_dir)` and `load_task`
register the spec under the name, so `extract_answer` / `spec_of` find it afterwards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from dora_cli.errors import UserError, did_you_mean_any_case, one_of, problem_of
from dora_cli.prompts import response_of


@dataclass(frozen=True)
class TaskSpec:
    name: str
    """Directory name in the LLM-Adapters layout."""
    column: str
    """Column header in the paper's Table 1."""
    pattern: str
    """The upstream regex, applied case-sensitively; the first match is the prediction."""
    labels: tuple[str, ...]
    """Every answer the pattern can produce (the candidates when a record names none)."""


def _answers(n: int) -> tuple[str, ...]:
    return tuple(f"answer{i}" for i in range(1, n + 1))


# In the column order of the paper's Table 1.
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("boolq", "BoolQ", r"true|false", ("true", "false")),
        TaskSpec("piqa", "PIQA", r"solution1|solution2", ("solution1", "solution2")),
        TaskSpec("social_i_qa", "SIQA", r"answer1|answer2|answer3|answer4|answer5", _answers(5)),
        TaskSpec("hellaswag", "HellaSwag", r"ending1|ending2|ending3|ending4", tuple(f"ending{i}" for i in range(1, 5))),
        TaskSpec("winogrande", "WinoGrande", r"option1|option2", ("option1", "option2")),
        TaskSpec("ARC-Easy", "ARC-e", r"answer1|answer2|answer3|answer4|answer5", _answers(5)),
        TaskSpec("ARC-Challenge", "ARC-c", r"answer1|answer2|answer3|answer4|answer5", _answers(5)),
        TaskSpec("openbookqa", "OBQA", r"answer1|answer2|answer3|answer4|answer5", _answers(5)),
    )
}

_FORMAT_LINE = re.compile(r"Answer format:\s*(\S+)\s*$")

# Custom tasks seen by `validate_tasks` / `load_task` with a data directory: name -> spec (the latest wins).
_CUSTOM: dict[str, TaskSpec] = {}


def spec_of(task: str) -> TaskSpec:
    """The spec of a built-in task, or of a custom task already validated with its data directory."""
    if task in TASKS:
        return TASKS[task]
    if task in _CUSTOM:
        return _CUSTOM[task]
    raise UserError(f'unknown task "{task}"; valid tasks: {one_of(TASKS)}')


def extract_answer(task: str, text: str) -> str:
    """The first match of the task's pattern in the response part of `text`, or "" (= wrong)."""
    match = re.search(spec_of(task).pattern, response_of(text))
    return match.group(0) if match else ""


def _local_root(data_dir: str | Path | None) -> Path | None:
    """The data directory when it is a local directory (custom tasks are local only), else None."""
    if data_dir is None or _is_hub_name(str(data_dir)):
        return None
    root = Path(str(data_dir)).expanduser()
    return root if root.is_dir() else None


def custom_task(task: str, data_dir: str | Path | None) -> TaskSpec | None:
    """The spec of a custom task: `<data_dir>/<task>/test.json` exists locally, None when it does not.

    Labels: the options of every record's `Answer format:` line, in the order first seen; the pattern
    is their alternation (longer labels first, so that `answer1` never shadows `answer10`). A file
    whose records name no answer format is a UserError.
    """
    root = _local_root(data_dir)
    if root is None or not task or task in (".", "..") or "/" in task or "\\" in task:
        return None
    path = root / task / "test.json"
    if not path.is_file():
        return None
    labels: list[str] = []
    for rec in _read_records(path):
        instruction = rec.get("instruction") if isinstance(rec, dict) else None
        match = _FORMAT_LINE.search(instruction) if isinstance(instruction, str) else None
        if match:
            labels += [o for o in match.group(1).split("/") if o and o not in labels]
    if len(labels) < 2:
        raise UserError(
            f"custom task {task}: cannot infer its answers: no record's instruction ends with an "
            "'Answer format: a/b/...' line naming two or more answers",
            where=str(path),
        )
    pattern = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
    spec = TaskSpec(task, task, pattern, tuple(labels))
    _CUSTOM[task] = spec
    return spec


def validate_tasks(tasks: list[str] | tuple[str, ...], data_dir: str | Path | None = None) -> list[str]:
    """The task names in order, without repeats; an unknown name is a UserError listing the valid ones.

    With `data_dir`, a name outside the eight is a custom task when `<data_dir>/<name>/test.json`
    exists (see `custom_task`).
    """
    out: list[str] = []
    for t in tasks:
        if t not in TASKS and custom_task(str(t), data_dir) is None:
            raise UserError(_unknown_task_message(str(t), data_dir))
        if t not in out:
            out.append(t)
    if not out:
        raise UserError(f"no task given; valid tasks: {one_of(TASKS)}")
    return out


def _unknown_task_message(task: str, data_dir: str | Path | None) -> str:
    root = _local_root(data_dir)
    present = sorted(p.name for p in root.iterdir() if (p / "test.json").is_file() and p.name not in TASKS) if root else []
    hint = did_you_mean_any_case(task, [*TASKS, *present])
    msg = f'unknown task "{task}"{hint}; valid tasks: {one_of(TASKS)}'
    if present:
        msg += f"; custom tasks in {root}: {one_of(present)}"
    elif root is not None:
        msg += f" (or a custom task: {root / task / 'test.json'} with 'Answer format:' lines)"
    return msg


@dataclass(frozen=True)
class Example:
    id: str
    """`<task>-<index in test.json>`: stable across runs, the key for resuming."""
    task: str
    instruction: str
    answer: str
    candidates: tuple[str, ...]
    """Answers to score in log-likelihood mode: the record's `Answer format:` line, else all labels."""


def candidates_of(task: str, instruction: str) -> tuple[str, ...]:
    """The answers an instruction offers (`Answer format: answer1/answer2/answer3`), else the task's labels."""
    spec = spec_of(task)
    match = _FORMAT_LINE.search(instruction)
    if match:
        offered = tuple(match.group(1).split("/"))
        if len(offered) >= 2 and all(o in spec.labels for o in offered) and len(set(offered)) == len(offered):
            return offered
    return spec.labels


def _is_hub_name(data_dir: str) -> bool:
    if data_dir.startswith("hf://"):
        return True
    if data_dir.startswith((".", "/", "~")) or Path(data_dir).exists():
        return False
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", data_dir))


def _download_from_hub(repo_id: str, task: str) -> Path:
    """Fetch `<task>/test.json` (or `dataset/<task>/test.json`) from a Hugging Face dataset repository."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with transformers
        raise UserError(f"reading the hub dataset {repo_id} needs huggingface_hub ({err})") from None
    last: Exception | None = None
    for filename in (f"{task}/test.json", f"dataset/{task}/test.json"):
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset"))
        except EntryNotFoundError as err:
            last = err
        except Exception as err:  # network, auth, offline mode: all mean "cannot read it from here"
            raise UserError(
                f"cannot read {filename} from the hub dataset {repo_id} ({type(err).__name__}); "
                "give a local directory in the LLM-Adapters layout <root>/<task>/test.json"
            ) from None
    raise UserError(f"the hub dataset {repo_id} has no {task}/test.json ({type(last).__name__})")


def task_file(task: str, data_dir: str | Path | None) -> Path:
    """The test file of `task`: `<data_dir>/<task>/test.json`, or its hub copy. Missing is a UserError."""
    if data_dir is None:
        raise UserError(
            "eval.data_dir is not set: give the root of the LLM-Adapters layout (<root>/<task>/test.json) "
            "or a hub dataset (hf://owner/name)"
        )
    text = str(data_dir)
    if _is_hub_name(text):
        return _download_from_hub(text.removeprefix("hf://"), task)
    root = Path(text).expanduser()
    if not root.is_dir():
        raise UserError(f"eval.data_dir: {root} is not a directory (expected <root>/<task>/test.json)")
    path = root / task / "test.json"
    if not path.is_file():
        present = sorted(p.name for p in root.iterdir() if (p / "test.json").is_file())
        hint = f"; tasks with a test.json there: {one_of(present)}" if present else ""
        raise UserError(f"no test file for task {task}: {path} does not exist{hint}")
    return path


def _read_records(path: Path) -> list:
    """The JSON list of a test file; unreadable, not a list or empty is a UserError."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise UserError(f"not a readable JSON file ({problem_of(err)})", where=str(path)) from None
    if not isinstance(records, list):
        raise UserError("expected a JSON list of {instruction, answer} records", where=str(path))
    if not records:
        raise UserError("the test set is empty", where=str(path))
    return records


def read_examples(task: str, path: Path, limit: int | None = None) -> list[Example]:
    """Parse and check a test.json of `task`; a malformed record is a UserError naming file and index."""
    records = _read_records(path)
    spec = spec_of(task)
    examples = []
    for i, rec in enumerate(records[:limit] if limit else records):
        if not isinstance(rec, dict):
            raise UserError(f"record {i}: expected an object with instruction and answer", where=str(path))
        instruction, answer = rec.get("instruction"), rec.get("answer")
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError(f"record {i}: missing or empty 'instruction'", where=str(path))
        if not isinstance(answer, str) or answer not in spec.labels:
            raise UserError(
                f"record {i}: 'answer' must be one of {one_of(spec.labels)} for {task}, got {answer!r}",
                where=str(path),
            )
        candidates = candidates_of(task, instruction)
        if answer not in candidates:  # an `Answer format:` line that omits the gold answer: score them all
            candidates = spec.labels
        examples.append(Example(f"{task}-{i}", task, instruction, answer, candidates))
    return examples


def load_task(task: str, data_dir: str | Path | None, limit: int | None = None) -> list[Example]:
    """The first `limit` (all when None) examples of a task's test set (built-in or custom), checked."""
    validate_tasks([task], data_dir)
    return read_examples(task, task_file(task, data_dir), limit)
