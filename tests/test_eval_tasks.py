"""Commonsense tasks: answer extraction (LLM-Adapters semantics), task names, test-set loading; math
exact match; the crash-safe JSON-lines files the evaluations resume from."""

from __future__ import annotations

import json

import pytest

from dora_cli.errors import UserError
from dora_cli.eval.math_match import extract_number, math_correct, score_math
from dora_cli.eval.tasks import TASKS, candidates_of, extract_answer, load_task, validate_tasks
from dora_cli.files import append_jsonl, guard_resume, read_jsonl_resumable
from dora_cli.prompts import eval_prompt

# --- extraction --------------------------------------------------------------------------------------

FORMATS = {
    "boolq": ("the correct answer is true", "true"),
    "piqa": ("the correct answer is solution2", "solution2"),
    "social_i_qa": ("the correct answer is answer3", "answer3"),
    "hellaswag": ("the correct answer is ending4", "ending4"),
    "winogrande": ("the correct answer is option1", "option1"),
    "ARC-Easy": ("the correct answer is answer5", "answer5"),
    "ARC-Challenge": ("the correct answer is answer2", "answer2"),
    "openbookqa": ("the correct answer is answer4", "answer4"),
}


def test_every_task_has_a_format_case():
    assert set(FORMATS) == set(TASKS)
    assert list(TASKS) == ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]


@pytest.mark.parametrize("task", list(FORMATS))
def test_extract_each_format_after_the_prompt(task):
    text, expected = FORMATS[task]
    assert extract_answer(task, eval_prompt("Q? Answer format: x/y") + text) == expected
    assert extract_answer(task, text) == expected  # no marker: the whole text is the response


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("boolq", "false, no wait, true", "false"),  # several matches: the first wins
        ("piqa", "solution2 or solution1", "solution2"),
        ("ARC-Easy", "answer3answer1", "answer3"),
        ("hellaswag", "ending3 then ending1", "ending3"),
        ("winogrande", "option2 option1", "option2"),
        ("boolq", "untrue", "true"),  # a plain regex, no word boundary (as upstream)
        ("boolq", "TRUE", ""),  # case-sensitive
        ("boolq", "True", ""),
        ("ARC-Easy", "Answer1", ""),
        ("piqa", "Solution1", ""),
        ("winogrande", "Option1", ""),
        ("ARC-Easy", "answer6", ""),  # not in the pattern
        ("hellaswag", "ending5", ""),
        ("boolq", "", ""),  # nothing
        ("openbookqa", "I do not know", ""),
    ],
)
def test_extract_first_match_case_sensitive(task, text, expected):
    assert extract_answer(task, text) == expected


def test_extract_uses_the_text_after_the_last_response_marker():
    prompt = eval_prompt("Is it true or false? Answer format: true/false")  # "true" / "false" in the prompt
    assert extract_answer("boolq", prompt + "the correct answer is false") == "false"
    assert extract_answer("boolq", prompt + "hmm ### Response: nothing") == ""
    assert extract_answer("boolq", "true ### Response: x ### Response:  false ") == "false"
    assert extract_answer("boolq", prompt) == ""  # the instruction's words never count


# --- task names --------------------------------------------------------------------------------------


def test_unknown_task_lists_valid_names_and_suggests():
    with pytest.raises(UserError) as err:
        validate_tasks(["boolq", "arc-easy"])
    msg = str(err.value)
    assert 'unknown task "arc-easy"' in msg and 'did you mean "ARC-Easy"' in msg
    for name in TASKS:
        assert name in msg


def test_validate_tasks_keeps_order_without_repeats():
    assert validate_tasks(["piqa", "boolq", "piqa"]) == ["piqa", "boolq"]
    with pytest.raises(UserError, match="no task"):
        validate_tasks([])


# --- loading -----------------------------------------------------------------------------------------


def _record(instruction, answer):
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _write(root, task, records):
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / "test.json").write_text(json.dumps(records))


def test_load_task_reads_the_llm_adapters_layout(tmp_path):
    _write(tmp_path, "ARC-Easy", [
        _record("Q1\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3", "answer2"),
        _record("Q2 without a format line", "answer1"),
        _record("Q3\n\nAnswer format: answer1/answer2", "answer4"),  # gold not offered: every label is scored
    ])
    ex = load_task("ARC-Easy", tmp_path)
    assert [e.id for e in ex] == ["ARC-Easy-0", "ARC-Easy-1", "ARC-Easy-2"]
    assert ex[0].candidates == ("answer1", "answer2", "answer3") and ex[0].answer == "answer2"
    assert ex[1].candidates == TASKS["ARC-Easy"].labels
    assert ex[2].candidates == TASKS["ARC-Easy"].labels
    assert [e.id for e in load_task("ARC-Easy", tmp_path, limit=2)] == ["ARC-Easy-0", "ARC-Easy-1"]


def test_candidates_from_the_answer_format_line():
    assert candidates_of("boolq", "x\n\nAnswer format: true/false") == ("true", "false")
    assert candidates_of("winogrande", "x\n\nAnswer format: option1/option2") == ("option1", "option2")
    assert candidates_of("piqa", "no format") == ("solution1", "solution2")
    assert candidates_of("hellaswag", "Answer format: ending1/bogus") == TASKS["hellaswag"].labels


def test_missing_test_file_is_a_user_error(tmp_path):
    _write(tmp_path, "boolq", [_record("q? Answer format: true/false", "true")])
    with pytest.raises(UserError) as err:
        load_task("piqa", tmp_path)
    assert "piqa" in str(err.value) and "test.json" in str(err.value) and "boolq" in str(err.value)
    with pytest.raises(UserError, match="not a directory"):
        load_task("piqa", tmp_path / "nowhere")
    with pytest.raises(UserError, match="data_dir is not set"):
        load_task("piqa", None)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"answer": "true"}, "instruction"),
        ({"instruction": "", "answer": "true"}, "instruction"),
        ({"instruction": "q", "answer": "yes"}, "'yes'"),
        ({"instruction": "q"}, "answer"),
        (["not", "an", "object"], "expected an object"),
    ],
)
def test_malformed_record_names_file_and_index(tmp_path, bad, needle):
    good = _record("q? Answer format: true/false", "true")
    _write(tmp_path, "boolq", [good, good, bad])
    with pytest.raises(UserError) as err:
        load_task("boolq", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "boolq" / "test.json") in msg and "record 2" in msg and needle in msg


def test_not_a_json_list(tmp_path):
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text('{"instruction": "q"}')
    with pytest.raises(UserError, match="JSON list"):
        load_task("boolq", tmp_path)
    (tmp_path / "boolq" / "test.json").write_text("[{")
    with pytest.raises(UserError, match="not a readable JSON"):
        load_task("boolq", tmp_path)
    (tmp_path / "boolq" / "test.json").write_text("[]")
    with pytest.raises(UserError, match="empty"):
        load_task("boolq", tmp_path)


def test_shared_test_sets_load(shared_data):
    for task in ("boolq", "piqa", "ARC-Easy", "openbookqa"):
        examples = load_task(task, shared_data / "commonsense", limit=50)
        assert len(examples) == 50 and all(e.answer in e.candidates for e in examples)


# --- math exact match --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is 42.", 42.0),
        ("3 apples and 4 pears make 7", 7.0),
        ("a total of 1,234 dollars", 1234.0),
        ("it drops to -5 degrees", -5.0),
        ("about 2.50 each", 2.5),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_number_takes_the_last_number(text, number):
    assert extract_number(text) == number


def test_math_correct_compares_final_numbers():
    gold = "She has 5 + 3 = 8 apples. So the answer is 8."
    assert math_correct("5 and 3 give 8", gold)
    assert math_correct("8.0005", gold)  # within 0.001
    assert not math_correct("8.01", gold)
    assert not math_correct("I am not sure", gold)
    assert math_correct("1,000", 1000) and not math_correct("100", "1000")
    assert not math_correct("7", "no number in the gold")


def test_score_math():
    records = [{"question": "q1", "answer": "... = 10"}, {"question": "q2", "answer": "The total is 2,500."},
               {"question": "q3", "answer": "3"}]
    result = score_math(["it is 10", "2500 dollars", "nothing"], records)
    assert (result["correct"], result["n"]) == (2, 3)
    assert result["accuracy"] == pytest.approx(66.6667) and result["no_answer_rate"] == pytest.approx(0.3333)
    with pytest.raises(ValueError):
        score_math(["x"], records)


# --- files -------------------------------------------------------------------------------------------


def test_jsonl_torn_tail_is_dropped_and_truncated(tmp_path):
    f = tmp_path / "p.jsonl"
    append_jsonl(f, [{"id": 1}, {"id": 2}])
    with open(f, "a") as fh:
        fh.write('{"id": 3, "prompt": "cut in the mid')
    assert [r["id"] for r in read_jsonl_resumable(f)] == [1, 2]
    assert f.read_text() == '{"id": 1}\n{"id": 2}\n'
    append_jsonl(f, [{"id": 3}])
    assert [r["id"] for r in read_jsonl_resumable(f)] == [1, 2, 3]
    assert read_jsonl_resumable(tmp_path / "absent.jsonl") == []


def test_jsonl_corrupt_middle_line_is_a_user_error(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(UserError, match="line 2"):
        read_jsonl_resumable(f)


def test_guard_resume(tmp_path):
    run, out = tmp_path / "run.json", tmp_path / "a.jsonl"
    guard_resume(run, [out], {"mode": "generate"})  # nothing yet: records the settings
    out.write_text('{"id": 1}\n')
    guard_resume(run, [out], {"mode": "generate"})  # same settings: kept
    assert out.exists()
    with pytest.raises(UserError, match="mode: 'generate' then, 'loglik' now"):
        guard_resume(run, [out], {"mode": "loglik"})
    assert out.exists() and json.loads(run.read_text()) == {"mode": "generate"}  # refused: untouched
    guard_resume(run, [out], {"mode": "loglik"}, overwrite=True)
    assert not out.exists() and json.loads(run.read_text()) == {"mode": "loglik"}
