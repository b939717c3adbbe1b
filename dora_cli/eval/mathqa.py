"""Math word problems (orca-math style `question` / `answer` records): generate, exact match of the final number.

    metrics = evaluate_math(model, tokenizer, "runs/x/eval-final/math", data="orca_eval.jsonl", limit=500)

The prompt is the training template (`data.template` of the recipe: alpaca, llm_adapters or chat,
through `prompts.render`) with the question as the instruction; decoding is `generate_batch` (greedy
for num_beams 1, beam search otherwise) with left padding; the score is `math_match.math_correct`.

Output directory, resumable as the commonsense run (same rules, `predictions/run.json`):
    predictions/math.jsonl   id, prompt, output, prediction (number or null), answer (gold number), correct
    metrics.json             exact_match (%), se (its binomial standard error, percentage points), correct, n,
                             no_answer_rate, settings, expected, difference
"""

from __future__ import annotations

from pathlib import Path

from dora_cli.console import progress_bar
from dora_cli.errors import UserError
from dora_cli.eval.math_match import extract_number, gold_number, math_correct
from dora_cli.eval.predict import describe_model, generate_batch
from dora_cli.eval.report import binomial_se
from dora_cli.files import append_jsonl, guard_resume, read_jsonl_resumable, write_json
from dora_cli.prompts import render


def load_math_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """`question` / `answer` records of a .json / .jsonl file; a bad record is a UserError naming its index."""
    from dora_cli.datasets import read_records_file

    if path is None:
        raise UserError("eval.data_dir: set the file of question / answer records (.json or .jsonl)")
    rows = read_records_file(path)
    if not rows:
        raise UserError("no records", where=str(path))
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise UserError(f"record {i}: needs a non-empty string 'question'", where=str(path))
        answer = row.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise UserError(f"record {i}: needs an 'answer' (text ending with the result, or a number)", where=str(path))
        gold = gold_number(answer)
        if gold is None:
            raise UserError(f"record {i}: no number in 'answer' (or one too large for a float)", where=str(path))
        out.append({"id": f"math-{i}", "question": row["question"], "answer": answer, "gold": gold})
    return out


def evaluate_math(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    data: str | Path,
    template: str = "alpaca",
    batch_size: int = 8,
    limit: int | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 1024,
    expected: dict[str, float] | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate an answer to every question and score the final number; writes predictions and metrics.json."""
    records = load_math_records(data, limit)
    prompts = {r["id"]: render(template, r["question"], tokenizer=tokenizer) for r in records}
    description = describe_model(model)
    fingerprint = {"suite": "math", "template": template, "num_beams": num_beams,
                   "max_new_tokens": max_new_tokens, "model": description}
    out = Path(out_dir)
    pred_file = out / "predictions" / "math.jsonl"
    guard_resume(out / "predictions" / "run.json", [pred_file], fingerprint, overwrite=overwrite)

    model.eval()
    done = {r["id"]: r for r in read_jsonl_resumable(pred_file) if "id" in r}
    todo = [r for r in records if r["id"] not in done]
    with progress_bar(progress) as bar:
        job = bar.add_task("math", total=len(records), completed=len(records) - len(todo))
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            outputs = generate_batch(
                model, tokenizer, [prompts[r["id"]] for r in batch], num_beams=num_beams, max_new_tokens=max_new_tokens
            )
            rows = [
                {"id": r["id"], "prompt": prompts[r["id"]], "output": o, "prediction": extract_number(o),
                 "answer": r["gold"], "correct": math_correct(o, r["gold"])}
                for r, o in zip(batch, outputs)
            ]
            append_jsonl(pred_file, rows)
            done.update((row["id"], row) for row in rows)
            bar.update(job, advance=len(batch))

    rows = [done[r["id"]] for r in records]
    n, correct = len(rows), sum(bool(r["correct"]) for r in rows)
    metrics = {
        "suite": "math",
        "exact_match": round(100.0 * correct / n, 4), "se": round(binomial_se(correct, n), 4), "correct": correct, "n": n,
        "no_answer_rate": round(sum(r["prediction"] is None for r in rows) / n, 4),
        "settings": {"template": template, "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                     "batch_size": batch_size, "limit": limit, "data": str(data),
                     "model": model_name or description, "model_description": description},
        "expected": dict(expected or {}),
    }
    if expected and "exact_match" in expected:
        metrics["difference"] = {"exact_match": round(metrics["exact_match"] - float(expected["exact_match"]), 4)}
    write_json(out / "metrics.json", metrics)
    return metrics
