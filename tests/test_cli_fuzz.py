"""Property test (issue 13): whatever bytes or JSON a user file holds, `dora` ends with exit status 0, or
with exit status 2 and one `error:` line; never a traceback.

The files: a records file (the math suite's, read by the same reader as training data), an MT-Bench
questions file, a model directory's tokenizer.json, and a checkpoint's adapter_config.json and
adapter_model.safetensors. Each example rewrites one file and runs the real CLI in process. Random
JSON is drawn over the keys these files use, and half the examples are a valid file with one key
replaced by random JSON or removed, so that they reach past the first shape checks.

Deterministic (derandomize=True, no example database) and bounded: EXAMPLES examples per file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, TINY_TOKENIZER, dora_in_process, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 20
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
KEYS = [
    "instruction", "input", "output", "answer", "question", "question_id", "category", "turns",
    "version", "model", "type", "vocab", "merges", "added_tokens", "normalizer", "pre_tokenizer", "decoder",
    "peft_type", "r", "lora_alpha", "target_modules", "use_dora", "base_model_name_or_path", "task_type",
    "lora_dropout", "fan_in_fan_out", "bias", "modules_to_save", "use_rslora", "id", "content", "special",
]
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["q_proj", "LORA", "BPE", "dora", "1.0", "", "answer1"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5),
    max_leaves=20,
)
CONTENT = st.one_of(
    st.binary(max_size=600),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.lists(JSON, min_size=1, max_size=3).map(lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()),
)
RECORD = {"instruction": "Is it?", "input": "", "output": "the correct answer is true", "answer": "true",
          "question": "What is 2+3?"}
QUESTION = {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Shorter."]}


@st.composite
def mutated(draw, valid: dict) -> dict:
    """`valid` with one key set to random JSON, or removed."""
    doc = dict(valid)
    key = draw(st.sampled_from(sorted(doc)))
    if draw(st.booleans()):
        doc[key] = draw(JSON)
    else:
        del doc[key]
    return doc


def near_valid(valid: dict, lines: bool) -> st.SearchStrategy[bytes]:
    """A file of one or two near-valid objects: a JSON list, or JSON lines."""
    rows = st.lists(st.just(valid) | mutated(valid), min_size=1, max_size=2)
    if lines:
        return rows.map(lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode())
    return rows.map(lambda rs: json.dumps(rs).encode())


def near_valid_file(text: str) -> st.SearchStrategy[bytes]:
    """A JSON object file with one top-level key changed or removed."""
    return mutated(json.loads(text)).map(lambda doc: json.dumps(doc).encode())


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` cut short, or with a few bytes changed."""
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A trained tiny run and a tiny model directory, copied per file under test."""
    from transformers import AutoTokenizer

    from dora_cli import train

    root = tmp_path_factory.mktemp("cli-fuzz")
    tiny_llama(vocab_size=512).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(str(TINY_TOKENIZER)).save_pretrained(root / "model")
    train.run_train(str(ROOT / "recipes" / "smoke.yaml"), [f"output_dir={root / 'run'}", "train.max_steps=1",
                                                          "train.save_every=null", "data.val_set_size=0"])
    return root


def dora(argv: list[str], monkeypatch, capfd) -> tuple[int, str]:
    """`dora ARGV` in this process: (exit status, stderr)."""
    code, _, err = dora_in_process(argv, monkeypatch, capfd)
    return code, err


def assert_clean(code: int, err: str) -> None:
    """Success, or one `error:` line and status 2. An exception would have failed the test already."""
    assert "Traceback" not in err
    if code != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)


def fresh(workspace: Path, name: str, tmp: Path) -> Path:
    target = tmp / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(workspace / name, target)
    return target


EVAL_TINY = ["--tasks", "boolq", "--limit", "1", "--data-dir", "data/smoke/commonsense", "--batch-size", "1",
             "eval.mode=loglik"]


@pytest.mark.usefixtures("one_thread")
@FUZZ
@given(content=CONTENT | near_valid(RECORD, lines=False), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_records_file(content, suffix, tmp_path, monkeypatch, capfd, workspace):
    path = tmp_path / f"records{suffix}"
    path.write_bytes(content)
    assert_clean(*dora(["eval", str(workspace / "run" / "final"), "--suite", "math", "--data-dir", str(path),
                        "--limit", "1", "eval.max_new_tokens=2", "eval.num_beams=1", "--out", str(tmp_path / "out")],
                       monkeypatch, capfd))


@pytest.mark.usefixtures("one_thread")
@FUZZ
@given(content=CONTENT | near_valid(QUESTION, lines=True))
def test_random_questions_file(content, tmp_path, monkeypatch, capfd, workspace):
    path = tmp_path / "question.jsonl"
    path.write_bytes(content)
    assert_clean(*dora(["eval", str(workspace / "run" / "final"), "--suite", "mt_bench", "--questions", str(path),
                        "--limit", "1", "eval.mt_bench.max_new_tokens=2", "--out", str(tmp_path / "out")],
                       monkeypatch, capfd))


@pytest.mark.usefixtures("one_thread")
@FUZZ
@given(content=CONTENT | near_valid_file((TINY_TOKENIZER / "tokenizer.json").read_text()))
def test_random_tokenizer_file(content, tmp_path, monkeypatch, capfd, workspace):
    model = fresh(workspace, "model", tmp_path)
    (model / "tokenizer.json").write_bytes(content)
    assert_clean(*dora(["eval", str(model), *EVAL_TINY, "--out", str(tmp_path / "out")], monkeypatch, capfd))


@pytest.mark.usefixtures("one_thread")
@FUZZ
@given(data=st.data(), victim=st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]))
def test_random_checkpoint_file(data, victim, tmp_path, monkeypatch, capfd, workspace):
    run = fresh(workspace, "run", tmp_path)
    path = run / "final" / victim
    valid = path.read_bytes()
    near = near_valid_file(valid.decode()) if victim.endswith(".json") else damaged(valid)
    path.write_bytes(data.draw(CONTENT | near))
    assert_clean(*dora(["eval", str(run / "final"), *EVAL_TINY, "--out", str(tmp_path / "out")], monkeypatch, capfd))
