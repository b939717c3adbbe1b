"""Commonsense evaluation of a loaded (model, tokenizer): the 8 LLM-Adapters tasks, resumable.

    metrics = evaluate_commonsense(model, tokenizer, "runs/x/eval", data_dir="../shared/data/commonsense",
                                   tasks=["boolq", "ARC-Easy"], mode="generate", batch_size=8)

Modes
    generate  the LLM-Adapters protocol: evaluation prompt, deterministic beam search (4 beams, 32 new
              tokens), first match of the task's answer pattern after the last "### Response:".
    loglik    every candidate answer of an example ("the correct answer is answer1", ...) scored by
              the summed log-probability of its tokens after the prompt; the best one is the prediction.

Output directory
    predictions/run.json        the settings the predictions were made with (checked on every run)
    predictions/<task>.jsonl    one line per example: id, prompt, output, prediction, answer, correct
                                (+ scores in loglik mode); appended after every batch
    metrics.json                per task: accuracy (%), se (its standard error), correct, n, no_answer_rate;
                                macro average and its se; settings; the paper's numbers and the
                                differences; examples per second and wall time of this run
    results.md                  Table 1 of the paper: this model's row (+ the paper's row, + n)

Both modes at once (`evaluate_commonsense_modes`, `make demo`): each batch's prompts are run once for
both (predict.generate_and_loglik), each mode's files in its own directory, as two runs would write them.

Resuming: a run that was killed is repeated with the same arguments; examples whose prediction is
already in predictions/<task>.jsonl are not recomputed. Predictions made with other settings (mode,
beams, new tokens, prompt template, model name and description) are never mixed in: the run is refused before anything is written,
unless `overwrite=True`, which discards them. The batch size is not a setting of the predictions
(batched and batch-1 predictions agree), so a run may be resumed with another batch size.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from dora_cli.console import progress_bar
from dora_cli.errors import UserError, one_of
from dora_cli.eval.predict import (
    continuation,
    describe_model,
    encode,
    generate_and_loglik,
    generate_batch,
    loglik_batch,
)
from dora_cli.eval.report import results_table, summarize, task_metrics
from dora_cli.eval.tasks import TASKS, Example, extract_answer, load_task, validate_tasks
from dora_cli.files import append_jsonl, guard_resume, read_jsonl_resumable, write_json, write_text
from dora_cli.prompts import eval_prompt

MODES = ("generate", "loglik")
PROMPT = "llm_adapters"


def predict_examples(
    model, tokenizer, examples: list[Example], *, mode: str, num_beams: int, max_new_tokens: int
) -> list[dict]:
    """Prediction records for one batch of examples of one task."""
    prompts = [eval_prompt(e.instruction) for e in examples]
    records = []
    if mode == "generate":
        outputs = generate_batch(model, tokenizer, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens)
        for e, prompt, output in zip(examples, prompts, outputs):
            pred = extract_answer(e.task, prompt + output)
            records.append(_record(e, prompt, output, pred))
    else:
        all_scores = loglik_batch(model, tokenizer, prompts, [e.candidates for e in examples])
        records = [_loglik_record(e, prompt, scores) for e, prompt, scores in zip(examples, prompts, all_scores)]
    return records


def predict_both(model, tokenizer, examples: list[Example], *, num_beams: int, max_new_tokens: int) -> dict[str, list[dict]]:
    """Prediction records of one batch in both modes, the prompts run once: {mode: records}."""
    prompts = [eval_prompt(e.instruction) for e in examples]
    outputs, all_scores = generate_and_loglik(model, tokenizer, prompts, [e.candidates for e in examples],
                                              num_beams=num_beams, max_new_tokens=max_new_tokens)
    generated = [_record(e, p, o, extract_answer(e.task, p + o)) for e, p, o in zip(examples, prompts, outputs)]
    return {"generate": generated, "loglik": [_loglik_record(e, p, sc) for e, p, sc in zip(examples, prompts, all_scores)]}


def _loglik_record(e: Example, prompt: str, scores: dict[str, float]) -> dict:
    best = max(e.candidates, key=lambda c: scores[c])  # ties: the first candidate
    return _record(e, prompt, continuation(best), best, scores={c: round(s, 6) for c, s in scores.items()})


def _record(e: Example, prompt: str, output: str, prediction: str, **extra) -> dict:
    return {
        "id": e.id, "prompt": prompt, "output": output, "prediction": prediction,
        "answer": e.answer, "correct": prediction == e.answer, **extra,
    }


def _fingerprint(mode: str, num_beams: int, max_new_tokens: int, model: str) -> dict:
    """What the predictions depend on; a run resumes only onto predictions with the same fingerprint."""
    template = hashlib.sha256(eval_prompt("{instruction}").encode()).hexdigest()[:12]
    fp = {"mode": mode, "prompt": f"{PROMPT} {template}", "model": model}
    if mode == "generate":
        fp.update(num_beams=num_beams, max_new_tokens=max_new_tokens)
    return fp


def evaluate_commonsense(model, tokenizer, out_dir: str | Path, *, mode: str = "generate", **options) -> dict:
    """Evaluate on the commonsense tasks in one mode; writes predictions, metrics.json, results.md; returns the
    metrics. `options`: those of evaluate_commonsense_modes (tasks, data_dir, batch_size, limit, num_beams,
    max_new_tokens, expected, model_name, overwrite, progress)."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}, expected {one_of(MODES)}", where="eval.mode")
    return evaluate_commonsense_modes(model, tokenizer, {mode: out_dir}, **options)[mode]


def evaluate_commonsense_modes(
    model,
    tokenizer,
    out_dirs: dict[str, str | Path],
    *,
    tasks: list[str] | tuple[str, ...] = tuple(TASKS),
    data_dir: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    expected: dict[str, float] | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """evaluate_commonsense in each mode of `out_dirs` ({mode: its output directory}); with both modes, the
    examples both still need are predicted together (predict_both). Returns {mode: metrics}."""
    # Everything is checked before anything is written.
    unknown = [m for m in out_dirs if m not in MODES]
    if unknown or not out_dirs:
        raise UserError(f"unknown mode {(unknown or [''])[0]!r}, expected {one_of(MODES)}", where="eval.mode")
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1 or (limit is not None and limit < 1):
        raise UserError("batch_size, num_beams, max_new_tokens and limit must be positive", where="eval")
    tasks = validate_tasks(list(tasks), data_dir)
    if expected:
        unknown = [k for k in expected if k not in TASKS and k != "avg"]
        if unknown:
            raise UserError(f"unknown task {unknown[0]!r} in expected; valid keys: {one_of([*TASKS, 'avg'])}", where="expected")
    examples = {t: load_task(t, data_dir, limit) for t in tasks}
    description = describe_model(model)
    named = f"{model_name} {description}" if model_name else description
    pred_dirs = {mode: Path(out) / "predictions" for mode, out in out_dirs.items()}
    for mode, pred_dir in pred_dirs.items():
        previous = sorted(pred_dir.glob("*.jsonl")) if pred_dir.is_dir() else []
        guard_resume(pred_dir / "run.json", previous, _fingerprint(mode, num_beams, max_new_tokens, named), overwrite=overwrite)

    model.eval()
    per_task: dict[str, dict[str, dict]] = {mode: {} for mode in out_dirs}
    speed: dict[str, dict[str, float | None]] = {mode: {} for mode in out_dirs}
    total = sum(len(v) for v in examples.values())
    began = time.perf_counter()
    with progress_bar(progress) as bar:
        job = bar.add_task("commonsense", total=total)
        for task in tasks:
            files = {mode: pred_dirs[mode] / f"{task}.jsonl" for mode in out_dirs}
            done = {mode: {r["id"]: r for r in read_jsonl_resumable(f) if "id" in r} for mode, f in files.items()}
            todo = [e for e in examples[task] if any(e.id not in d for d in done.values())]
            bar.update(job, description=task, advance=len(examples[task]) - len(todo))
            # Longest prompts first: batches of similar length pad little. Order does not change results.
            todo.sort(key=lambda e: -len(encode(tokenizer, eval_prompt(e.instruction))))
            started = time.perf_counter()
            for i in range(0, len(todo), batch_size):
                batch = todo[i : i + batch_size]
                needs = {mode: [e for e in batch if e.id not in done[mode]] for mode in out_dirs}
                if len(out_dirs) == len(MODES) and all(len(n) == len(batch) for n in needs.values()):
                    predicted = predict_both(model, tokenizer, batch, num_beams=num_beams, max_new_tokens=max_new_tokens)
                else:
                    predicted = {mode: predict_examples(model, tokenizer, need, mode=mode, num_beams=num_beams,
                                                        max_new_tokens=max_new_tokens) for mode, need in needs.items() if need}
                for mode, records in predicted.items():
                    append_jsonl(files[mode], records)
                    done[mode].update((r["id"], r) for r in records)
                bar.update(job, advance=len(batch))
            elapsed = time.perf_counter() - started
            for mode in out_dirs:
                per_task[mode][task] = task_metrics([done[mode][e.id] for e in examples[task]])
                # Throughput of this run's predictions (None when every one was resumed from disk); both modes
                # predicted together share the time.
                speed[mode][task] = round(len(todo) / elapsed, 3) if todo and elapsed > 0 else None

    results = {}
    for mode, out in out_dirs.items():
        settings = {
            "mode": mode, "prompt": PROMPT, "num_beams": num_beams if mode == "generate" else None,
            "max_new_tokens": max_new_tokens if mode == "generate" else None, "batch_size": batch_size,
            "limit": limit, "tasks": tasks, "data_dir": None if data_dir is None else str(data_dir),
            "model": model_name or description, "model_description": description,
        }
        if len(out_dirs) > 1:
            settings["predicted_with"] = sorted(out_dirs)
        metrics = {
            **summarize(per_task[mode], settings, expected), "examples_per_s": speed[mode],
            "wall_time_s": round(time.perf_counter() - began, 3),
        }
        write_json(Path(out) / "metrics.json", metrics)
        write_text(Path(out) / "results.md", results_table(metrics, model_name or description))
        results[mode] = metrics
    return results
