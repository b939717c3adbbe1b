"""The math run: orca-math style records, generation on a tiny model, final-number exact match, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_llama

from dora_cli.errors import UserError
from dora_cli.eval import mathqa
from dora_cli.eval.mathqa import evaluate_math, load_math_records

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"question": "Tom has 3 apples and buys 5 more. How many?", "answer": "3 + 5 = 8. Tom has 8 apples."},
    {"question": "What is 12 times 10?", "answer": "12 * 10 = 120"},
    {"question": "A shop sold 1,200 pens and 300 pencils. How many items?", "answer": 1500},
    {"question": "Half of 9?", "answer": "9 / 2 = 4.5"},
]

pytestmark = pytest.mark.usefixtures("one_thread")


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_run_scores_the_final_number_and_resumes(tok, tmp_path, monkeypatch):
    data = write(tmp_path / "eval.jsonl", RECORDS)
    canned = {"Tom": "so 3 + 5 = 8", "12 times": "it is 1,200", "pens": "1,500 items", "Half": "I do not know"}
    calls = []

    def fake_generate(model, tokenizer, prompts, **kw):
        calls.append(len(prompts))
        assert kw == {"num_beams": 1, "max_new_tokens": 7}
        return [next(v for k, v in canned.items() if k in p) for p in prompts]

    monkeypatch.setattr(mathqa, "generate_batch", fake_generate)
    model = tiny_llama(vocab_size=512)
    m = evaluate_math(model, tok, tmp_path / "out", data=data, batch_size=3, max_new_tokens=7,
                      expected={"exact_match": 56.0}, progress=False)
    assert (m["correct"], m["n"], m["exact_match"]) == (2, 4, 50.0)
    assert m["no_answer_rate"] == 0.25 and m["difference"] == {"exact_match": -6.0}
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions" / "math.jsonl").read_text().splitlines()]
    assert [(r["prediction"], r["answer"], r["correct"]) for r in rows] == [
        (8.0, 8.0, True), (1200.0, 120.0, False), (1500.0, 1500.0, True), (None, 4.5, False)]
    assert rows[0]["prompt"].startswith("Below is an instruction") and "Tom has 3 apples" in rows[0]["prompt"]
    assert calls == [3, 1]
    calls.clear()
    assert evaluate_math(model, tok, tmp_path / "out", data=data, batch_size=3, max_new_tokens=7, progress=False)["correct"] == 2
    assert calls == []  # all predictions were there


def test_math_run_on_a_tiny_model(tok, tmp_path):
    data = write(tmp_path / "eval.jsonl", RECORDS[:2])
    m = evaluate_math(tiny_llama(vocab_size=512), tok, tmp_path / "out", data=data, max_new_tokens=4, progress=False)
    assert m["n"] == 2 and json.loads((tmp_path / "out" / "metrics.json").read_text()) == m


@pytest.mark.parametrize(
    ("row", "needle"),
    [({"answer": "1"}, "question"), ({"question": "q"}, "answer"), ({"question": "q", "answer": "none"}, "no number"),
     ({"question": "q", "answer": True}, "answer")],
)
def test_bad_math_records(tmp_path, row, needle):
    data = write(tmp_path / "eval.jsonl", [RECORDS[0], row])
    with pytest.raises(UserError) as err:
        load_math_records(data)
    assert "record 1" in str(err.value) and needle in str(err.value) and str(data) in str(err.value)
    with pytest.raises(UserError, match="question / answer"):
        load_math_records(None)
