"""Custom commonsense tasks: a name outside the paper's eight whose `<data_dir>/<name>/test.json` exists.

Its answers come from the records' `Answer format: a/b/c` lines; extraction is the built-in rule (first
case-sensitive match after the last response marker). Unknown names without such a file keep the
one-line error with the valid names and a did-you-mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_dora, tiny_llama

from dora_cli.errors import UserError
from dora_cli.eval.commonsense import evaluate_commonsense
from dora_cli.eval.tasks import TASKS, custom_task, extract_answer, load_task, spec_of, validate_tasks
from dora_cli.prompts import eval_prompt

ROOT = Path(__file__).resolve().parents[1]
MC = "answer1/answer2/answer3/answer4"


def _record(question: str, answer: str, fmt: str | None = MC) -> dict:
    instruction = f"Please choose the correct answer to the question: {question}\n\nAnswer1: a Answer2: b Answer3: c Answer4: d"
    if fmt is not None:
        instruction += f"\n\nAnswer format: {fmt}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _write(root: Path, task: str, records: list[dict]) -> Path:
    (root / task).mkdir(parents=True, exist_ok=True)
    path = root / task / "test.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def quiz(tmp_path) -> Path:
    _write(tmp_path, "quiz", [_record(f"q{i}?", f"answer{i % 4 + 1}") for i in range(8)])
    return tmp_path


def test_custom_task_is_accepted_and_its_pattern_inferred(quiz):
    assert validate_tasks(["quiz", "boolq", "quiz"], quiz) == ["quiz", "boolq"]
    spec = spec_of("quiz")
    assert spec.pattern == "answer1|answer2|answer3|answer4"
    assert spec.labels == ("answer1", "answer2", "answer3", "answer4")
    examples = load_task("quiz", quiz, limit=5)
    assert [e.id for e in examples] == [f"quiz-{i}" for i in range(5)]
    assert examples[1].answer == "answer2" and examples[1].candidates == spec.labels


def test_custom_task_extraction_is_first_case_sensitive_match(quiz):
    validate_tasks(["quiz"], quiz)
    prompt = eval_prompt("Which? Answer format: answer1/answer2/answer3/answer4")
    assert extract_answer("quiz", prompt + "Answer2 is wrong, the correct answer is answer3 or answer1") == "answer3"
    assert extract_answer("quiz", prompt + "The answer is the second one.") == ""
    assert extract_answer("quiz", prompt + "ANSWER4") == ""


def test_labels_are_the_union_of_the_format_lines_longest_first_in_the_pattern(tmp_path):
    _write(tmp_path, "wide", [
        _record("q0?", "answer2", fmt="answer1/answer2"),
        _record("q1?", "answer10", fmt="answer1/answer2/answer10"),
        _record("q2?", "answer1", fmt=None),  # no format line: scored against every label
    ])
    spec = custom_task("wide", tmp_path)
    assert spec.labels == ("answer1", "answer2", "answer10")
    assert extract_answer("wide", "the correct answer is answer10") == "answer10"  # not "answer1"
    examples = load_task("wide", tmp_path)
    assert examples[0].candidates == ("answer1", "answer2")
    assert examples[2].candidates == spec.labels


def test_builtin_names_keep_their_spec_even_with_a_directory_of_that_name(tmp_path):
    _write(tmp_path, "boolq", [_record("q?", "answer1")])
    validate_tasks(["boolq"], tmp_path)
    assert spec_of("boolq") is TASKS["boolq"]


def test_unknown_task_without_a_file_lists_valid_names_and_suggests(quiz):
    with pytest.raises(UserError) as err:
        validate_tasks(["arc-easy"], quiz)
    msg = str(err.value)
    assert 'unknown task "arc-easy"' in msg and 'did you mean "ARC-Easy"' in msg
    assert all(name in msg for name in TASKS) and "quiz" in msg  # the custom tasks there are named too
    with pytest.raises(UserError, match=r'unknown task "quizz" \(did you mean "quiz"\?\)'):
        validate_tasks(["quizz"], quiz)
    with pytest.raises(UserError, match='unknown task "quiz"'):
        validate_tasks(["quiz"])  # no data directory: only the eight
    with pytest.raises(UserError, match='unknown task "quiz"'):
        validate_tasks(["quiz"], quiz / "missing")
    with pytest.raises(UserError, match='unknown task "../quiz"'):
        validate_tasks(["../quiz"], quiz / "quiz")


def test_custom_task_without_answer_format_or_with_a_foreign_answer_is_a_user_error(tmp_path):
    path = _write(tmp_path, "bare", [_record("q?", "answer1", fmt=None)])
    with pytest.raises(UserError, match="cannot infer its answers") as err:
        validate_tasks(["bare"], tmp_path)
    assert str(path) in str(err.value)
    _write(tmp_path, "odd", [_record("q?", "answer1"), _record("q?", "yes")])
    with pytest.raises(UserError, match=r"record 1: 'answer' must be one of"):
        load_task("odd", tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "test.json").write_text("[{")
    with pytest.raises(UserError, match="not a readable JSON file"):
        validate_tasks(["broken"], tmp_path)


def test_custom_task_evaluates_end_to_end_in_both_modes(quiz, tok, tmp_path):
    model = tiny_llama(vocab_size=512)
    for mode in ("loglik", "generate"):
        m = evaluate_commonsense(
            model, tok, tmp_path / mode, tasks=["quiz"], data_dir=quiz, mode=mode, batch_size=4,
            num_beams=1, max_new_tokens=4, progress=False,
        )
        assert list(m["tasks"]) == ["quiz"] and m["tasks"]["quiz"]["n"] == 8
        assert m["average"] == m["tasks"]["quiz"]["accuracy"]
        assert m["examples_per_s"]["quiz"] > 0
        header, _, row = (tmp_path / mode / "results.md").read_text().splitlines()[:3]
        se = m["tasks"]["quiz"]["se"]
        assert header.endswith("| quiz | Avg |") and row.endswith(f"| {m['average']:.1f} ± {se:.1f} | {m['average']:.1f} ± {se:.1f} |")
        lines = (tmp_path / mode / "predictions" / "quiz.jsonl").read_text().splitlines()
        assert len(lines) == 8
        if mode == "loglik":
            assert m["tasks"]["quiz"]["no_answer_rate"] == 0.0
            assert all(set(json.loads(line)["scores"]) == set(spec_of("quiz").labels) for line in lines)


def test_dora_eval_reads_the_shipped_demo_split_as_a_custom_task(smoke_run, tmp_path):
    out = tmp_path / "eval"
    run_dora("eval", smoke_run / "final", "--tasks", "demo", "--data-dir", "data", "--limit", "4",
             "--mode", "loglik", "--out", out)
    metrics = json.loads((out / "commonsense" / "metrics.json").read_text())
    assert metrics["tasks"]["demo"]["n"] == 4 and metrics["settings"]["tasks"] == ["demo"]
    from dora_cli.evaluate import run_eval

    with pytest.raises(UserError, match=r'unknown task "dmeo" \(did you mean "demo"\?\)'):  # before the model loads
        run_eval(smoke_run / "final", ["eval.tasks=[dmeo]", f"eval.data_dir={ROOT / 'data'}"], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
