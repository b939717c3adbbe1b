"""Exact match of the final number, for orca-math style data (`question` / `answer` records).

As LLM-Adapters `evaluate.py` (`extract_answer_number`, AddSub / MultiArith / SingleEq): commas are
removed, the numbers are the matches of `-?\\d+\\.?\\d*`, the LAST one is the answer, and two answers
agree when they differ by at most 0.001. Here the gold answer is extracted the same way from the
record's `answer` text (orca-math answers are worked solutions that end with the result); a text with
no number gives None, and a prediction of None is wrong. A number too large for a float (over about
309 digits) is no number here: as a prediction it gives None, as a gold answer `gold_number` refuses it.
"""

from __future__ import annotations

import math
import re

NUMBER = re.compile(r"-?\d+\.?\d*")
TOLERANCE = 1e-3


def extract_number(text: str) -> float | None:
    """The last number in `text` (thousands separators removed), or None (also for one past float's range)."""
    found = NUMBER.findall(text.replace(",", ""))
    return _finite(float(found[-1])) if found else None


def gold_number(gold: str | float | int) -> float | None:
    """The gold answer as a float: a number as given, else the last number of its text; None when there is
    none or it is too large for a float."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        try:
            return _finite(float(gold))
        except OverflowError:  # an int of more than ~309 digits
            return None
    return extract_number(str(gold))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def math_correct(generated: str, gold: str | float | int) -> bool:
    """True when the final number of `generated` equals the gold answer's (within 0.001)."""
    pred = extract_number(generated)
    target = gold_number(gold)
    return pred is not None and target is not None and abs(pred - target) <= TOLERANCE


def score_math(generations: list[str], records: list[dict]) -> dict:
    """Accuracy (%) and counts of `generations` against `records` ({question, answer}), in order."""
    if len(generations) != len(records):
        raise ValueError(f"{len(generations)} generations for {len(records)} records")
    rows = []
    for text, rec in zip(generations, records):
        rows.append({
            "prediction": extract_number(text), "gold": gold_number(rec["answer"]),
            "correct": math_correct(text, rec["answer"]),
        })
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    return {
        "accuracy": round(100.0 * correct / n, 4) if n else 0.0, "correct": correct, "n": n,
        "no_answer_rate": round(sum(r["prediction"] is None for r in rows) / n, 4) if n else 0.0,
        "rows": rows,
    }
