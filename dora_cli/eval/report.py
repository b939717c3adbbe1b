"""Commonsense metrics: per-task accuracy, the macro average, the paper's numbers, and Table 1 in Markdown.

Accuracies are percentages with the paper's convention (Table 1 prints 69.7 for 69.7 %), so that
`expected` values copied from the paper compare directly; `difference` is ours minus the paper's.
The average is the macro average over the tasks evaluated (each task weighs the same, as in the paper).

Every accuracy carries its binomial standard error in percentage points, se = 100·sqrt(p(1 − p)/n) with
p the accuracy as a fraction, and n; the macro average over K tasks (independent samples) has
se = sqrt(Σ se_k²) / K.
"""

from __future__ import annotations

import math

from dora_cli.eval.tasks import TASKS


def binomial_se(correct: int, n: int) -> float:
    """The standard error of an accuracy of correct / n, in percentage points (0 for n = 0)."""
    if n == 0:
        return 0.0
    p = correct / n
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def average_se(per_task: dict[str, dict]) -> float:
    """The standard error of the macro average of independent task accuracies: sqrt(Σ se²) / K."""
    if not per_task:
        return 0.0
    return math.sqrt(sum(binomial_se(m["correct"], m["n"]) ** 2 for m in per_task.values())) / len(per_task)


def task_metrics(records: list[dict]) -> dict:
    """accuracy (%), its standard error (percentage points), correct, n and no-answer rate (fraction of
    outputs where no answer was found)."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    no_answer = sum(r["prediction"] == "" for r in records)
    return {
        "accuracy": round(100.0 * correct / n, 4) if n else 0.0,
        "se": round(binomial_se(correct, n), 4),
        "correct": correct,
        "n": n,
        "no_answer_rate": round(no_answer / n, 4) if n else 0.0,
    }


def summarize(per_task: dict[str, dict], settings: dict, expected: dict[str, float] | None = None) -> dict:
    """The metrics document: tasks, macro average (its standard error, the examples), settings, paper
    numbers and differences."""
    avg = round(sum(m["accuracy"] for m in per_task.values()) / len(per_task), 4) if per_task else 0.0
    doc: dict = {
        "suite": "commonsense", "tasks": per_task, "average": avg, "average_se": round(average_se(per_task), 4),
        "n": sum(m["n"] for m in per_task.values()), "settings": settings,
    }
    expected = {k: float(v) for k, v in (expected or {}).items()}
    doc["expected"] = expected
    diff = {t: round(per_task[t]["accuracy"] - expected[t], 4) for t in per_task if t in expected}
    if "avg" in expected:
        diff["avg"] = round(avg - expected["avg"], 4)
    doc["difference"] = diff
    return doc


def _cell(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if se is None else f"{value:.1f} ± {se:.1f}"


def results_table(metrics: dict, model_label: str, paper_label: str = "paper") -> str:
    """Markdown in the layout of the paper's Table 1: a row for this model (accuracy ± standard error), one
    for the paper's numbers, and the examples per task (n)."""
    names = [*TASKS, *(t for t in metrics["tasks"] if t not in TASKS)]  # the eight, then custom tasks
    columns = [TASKS[t].column if t in TASKS else t for t in names] + ["Avg"]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    tasks = metrics["tasks"]
    ours = [_cell(tasks[t]["accuracy"], tasks[t]["se"]) if t in tasks else "-" for t in names]
    ours.append(_cell(metrics["average"], metrics["average_se"]))
    lines.append(f"| {model_label} | " + " | ".join(ours) + " |")
    expected = metrics.get("expected") or {}
    if expected:
        paper = [expected.get(t) for t in names] + [expected.get("avg")]
        lines.append(f"| {paper_label} | " + " | ".join(_cell(v) for v in paper) + " |")
    counts = [str(tasks[t]["n"]) if t in tasks else "-" for t in names] + [str(metrics["n"])]
    lines.append("| n | " + " | ".join(counts) + " |")
    evaluated = ", ".join(metrics["tasks"]) or "none"
    settings = metrics.get("settings", {})
    note = f"Accuracy (%) ± one binomial standard error, tasks evaluated: {evaluated}; mode {settings.get('mode')}"
    if settings.get("mode") == "generate":
        note += f", beams {settings.get('num_beams')}, max new tokens {settings.get('max_new_tokens')}"
    if settings.get("limit"):
        note += f", first {settings['limit']} examples per task"
    note += (". Avg is the macro average over the tasks evaluated; n the examples scored. Standard errors in"
             " percentage points: sqrt(p(1 - p)/n) per task, sqrt(sum of their squares) / tasks for Avg")
    return "\n".join(lines) + f"\n\n{note}.\n"
