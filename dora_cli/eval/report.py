"""Commonsense metrics: per-task accuracy, the macro average, the paper's numbers, and Table 1 in Markdown.

Accuracies are percentages with the paper's convention (Table 1 prints 69.7 for 69.7 %), so that
`expected` values copied from the paper compare directly; `difference` is ours minus the paper's.
The average is the macro average over the tasks evaluated (each task weighs the same, as in the paper).
"""

from __future__ import annotations

from dora_cli.eval.tasks import TASKS


def task_metrics(records: list[dict]) -> dict:
    """accuracy (%), correct, n and no-answer rate (fraction of outputs where no answer was found)."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    no_answer = sum(r["prediction"] == "" for r in records)
    return {
        "accuracy": round(100.0 * correct / n, 4) if n else 0.0,
        "correct": correct,
        "n": n,
        "no_answer_rate": round(no_answer / n, 4) if n else 0.0,
    }


def summarize(per_task: dict[str, dict], settings: dict, expected: dict[str, float] | None = None) -> dict:
    """The metrics document: tasks, macro average, settings, paper numbers and differences."""
    avg = round(sum(m["accuracy"] for m in per_task.values()) / len(per_task), 4) if per_task else 0.0
    doc: dict = {"suite": "commonsense", "tasks": per_task, "average": avg, "settings": settings}
    expected = {k: float(v) for k, v in (expected or {}).items()}
    doc["expected"] = expected
    diff = {t: round(per_task[t]["accuracy"] - expected[t], 4) for t in per_task if t in expected}
    if "avg" in expected:
        diff["avg"] = round(avg - expected["avg"], 4)
    doc["difference"] = diff
    return doc


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def results_table(metrics: dict, model_label: str, paper_label: str = "paper") -> str:
    """Markdown in the layout of the paper's Table 1: a row for this model, and one for the paper's numbers."""
    names = [*TASKS, *(t for t in metrics["tasks"] if t not in TASKS)]  # the eight, then custom tasks
    columns = [TASKS[t].column if t in TASKS else t for t in names] + ["Avg"]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    ours = [metrics["tasks"].get(t, {}).get("accuracy") for t in names] + [metrics["average"]]
    lines.append(f"| {model_label} | " + " | ".join(_cell(v) for v in ours) + " |")
    expected = metrics.get("expected") or {}
    if expected:
        paper = [expected.get(t) for t in names] + [expected.get("avg")]
        lines.append(f"| {paper_label} | " + " | ".join(_cell(v) for v in paper) + " |")
    evaluated = ", ".join(metrics["tasks"]) or "none"
    settings = metrics.get("settings", {})
    note = f"Accuracy (%), tasks evaluated: {evaluated}; mode {settings.get('mode')}"
    if settings.get("mode") == "generate":
        note += f", beams {settings.get('num_beams')}, max new tokens {settings.get('max_new_tokens')}"
    if settings.get("limit"):
        note += f", first {settings['limit']} examples per task"
    return "\n".join(lines) + f"\n\n{note}. Avg is the macro average over the tasks evaluated.\n"
