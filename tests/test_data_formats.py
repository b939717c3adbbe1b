"""Data that practitioners have: messages / ShareGPT conversations through the chat template, with the loss on
assistant turns only; .jsonl, .parquet and `save_to_disk` sources; `dora train --dry-run` reading the data."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from conftest import SMOLLM2_DIR, dora_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dora_cli import datasets as ds
from dora_cli.errors import UserError
from dora_cli.recipe import DataConfig, DataSource, recipe_from_dict

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "A plum."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "An apple, of course."},
]
SHAREGPT = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                               "value": m["content"]} for m in CHAT]}
END = "<|im_end|>"


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct's tokenizer: a real ChatML template that adds a system turn when there is none."""
    from transformers import AutoTokenizer

    if not (SMOLLM2_DIR / "tokenizer.json").is_file():
        pytest.skip("SmolLM2-135M-Instruct not fetched (make fetch-model)")
    return AutoTokenizer.from_pretrained(str(SMOLLM2_DIR))


def chat_cfg(**kwargs) -> DataConfig:
    return DataConfig(**{"format": "messages", "train_on_inputs": False, **kwargs})


def trained_runs(example: dict, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != ds.IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


# --------------------------------------------------------------------------------------------------
# Conversations against the template's own rendering


def test_messages_and_sharegpt_read_to_the_same_conversation():
    (a,) = ds.validate_records([{"messages": CHAT, "id": 7}], "messages", origin="m")
    (b,) = ds.validate_records([SHAREGPT], "sharegpt", origin="s")
    assert a == b == {"messages": CHAT}


def test_conversation_tokens_are_the_template_s_and_only_assistant_turns_train(smol):
    (record,) = ds.validate_records([{"messages": CHAT}], "messages", origin="m")
    example = ds.tokenize_record(record, smol, chat_cfg())
    assert example["input_ids"] == smol.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert trained_runs(example, smol) == ["A plum." + END, "An apple, of course." + END]
    everything = ds.tokenize_record(record, smol, chat_cfg(train_on_inputs=True))
    assert everything["labels"] == everything["input_ids"] == example["input_ids"]


@pytest.fixture(scope="module")
def tagged(smol):
    """An independent reference: SmolLM2's template with `{% generation %}` around what an assistant writes,
    for transformers' return_assistant_tokens_mask."""
    tokenizer = smol.__class__.from_pretrained(str(SMOLLM2_DIR))
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert turn in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(turn, (
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
        "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}" + turn + "{% endif %}"))
    return tokenizer


def assert_matches_the_generation_mask(messages: list[dict], tagged) -> dict:
    reference = tagged.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    (record,) = ds.validate_records([{"messages": messages}], "messages", origin="m")
    example = ds.tokenize_record(record, tagged, chat_cfg(cutoff_len=100_000))
    assert example["input_ids"] == reference["input_ids"]
    assert [label != ds.IGNORE_INDEX for label in example["labels"]] == [bool(m) for m in reference["assistant_masks"]]
    return example


def test_the_mask_equals_transformers_generation_mask(tagged):
    for messages in (CHAT, CHAT[1:], CHAT[1:3]):
        assert_matches_the_generation_mask(messages, tagged)


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda t: END not in t and "<|im_start|>" not in t)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4), system=st.none() | TEXT,
       cutoff=st.integers(min_value=2, max_value=120))
def test_any_conversation_is_masked_as_the_reference_and_truncation_keeps_it_aligned(smol, tagged, turns, system, cutoff):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    whole = assert_matches_the_generation_mask(messages, tagged)
    (record,) = ds.validate_records([{"messages": messages}], "messages", origin="m")
    assert ds.tokenize_record(record, smol, chat_cfg(cutoff_len=100_000)) == whole  # the untagged template: same
    cut = ds.tokenize_record(record, smol, chat_cfg(cutoff_len=cutoff))
    n = min(cutoff, len(whole["input_ids"]))
    assert cut["input_ids"] == whole["input_ids"][:n] and cut["labels"] == whole["labels"][:n]


def test_batched_conversations_equal_one_by_one(smol):
    rows = [{"messages": CHAT[: k]} for k in (3, 5)] * 3
    records = ds.validate_records(rows, "messages", origin="m")
    assert ds.tokenize_records(records, smol, chat_cfg(), chunk=4) == [ds.tokenize_record(r, smol, chat_cfg()) for r in records]


def test_a_template_that_is_not_incremental_is_refused(smol):
    odd = smol.__class__.from_pretrained(str(SMOLLM2_DIR))
    odd.chat_template = "{{ messages | length }}:{% for m in messages %}{{ m['content'] }};{% endfor %}"
    (record,) = ds.validate_records([{"messages": CHAT[1:3]}], "messages", origin="m")
    with pytest.raises(UserError, match=r"starts 'Name a fruit.': .* does not render this conversation turn by turn"):
        ds.tokenize_record(record, odd, chat_cfg())
    assert ds.tokenize_record(record, odd, chat_cfg(train_on_inputs=True))["input_ids"]  # whole text: fine


def test_a_template_that_raises_is_one_line(smol):
    strict = smol.__class__.from_pretrained(str(SMOLLM2_DIR))
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    (record,) = ds.validate_records([{"messages": CHAT[1:3]}], "messages", origin="m")
    with pytest.raises(UserError, match="chat template refuses this conversation: Conversation roles must alternate"):
        ds.tokenize_record(record, strict, chat_cfg())


def test_a_tokenizer_without_chat_template_is_refused(tok):
    (record,) = ds.validate_records([{"messages": CHAT}], "messages", origin="m")
    with pytest.raises(UserError, match="has no chat template"):
        ds.tokenize_record(record, tok, chat_cfg())


def test_conversation_formats_imply_the_chat_template():
    assert DataConfig(format="sharegpt").template == "chat"
    with pytest.raises(UserError, match=r"data: format messages is rendered by the tokenizer's chat template, "
                                        r"so template must be chat \(or left out\), got alpaca"):
        recipe_from_dict({"model": {"name_or_path": "a/b"}, "data": {"format": "messages", "template": "alpaca"}}, "r")


@pytest.mark.parametrize(("fmt", "row", "message"), [
    ("messages", {"conversations": []}, r"missing field 'messages'"),
    ("messages", {"messages": []}, r"field 'messages' must be a list of turns, got an empty list"),
    ("messages", {"messages": "hi"}, r"field 'messages' must be a list of turns, got a string"),
    ("messages", {"messages": ["hi"]}, r"messages\[0\]: expected an object, got a string"),
    ("messages", {"messages": [{"role": "asistant", "content": "x"}]},
     r"messages\[0\]: role 'asistant' is not one of assistant, system or user \(did you mean \"assistant\"\?\)"),
    ("messages", {"messages": [{"content": "x"}]}, r"messages\[0\]: role missing is not one of"),
    ("messages", {"messages": [{"role": "user"}]}, r"messages\[0\]: missing field 'content'"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
     r"messages\[0\]: field 'content' must be a string, got a list"),
    ("messages", {"messages": [{"role": "user", "content": "x"}]}, r"messages: no assistant turn"),
    ("messages", {"messages": [{"role": "assistant", "content": "x"}]},
     r"messages\[0\]: the conversation must start with a user turn"),
    ("messages", {"messages": [*CHAT[:3], {"role": "system", "content": "x"}]},
     r"messages\[3\]: a system turn may only open the conversation"),
    ("sharegpt", {"conversations": [{"from": "humman", "value": "x"}]},
     r"conversations\[0\]: from 'humman' is not one of .* \(did you mean \"human\"\?\)"),
    ("sharegpt", {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "y"}]},
     r"conversations\[0\]: field 'value' must be a string, got null"),
    ("sharegpt", "text", r"expected an object, got a string"),
])
def test_bad_conversations_name_record_turn_and_field(tmp_path, fmt, row, message):
    good = {"messages": CHAT} if fmt == "messages" else SHAREGPT
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"chats.jsonl: record \[1\]: " + message):
        ds.load_records(DataConfig(format=fmt, sources=[DataSource(path=str(path))]))


# --------------------------------------------------------------------------------------------------
# File types: every one through the same validation


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_to_disk(path: Path, rows: list[dict], split: str | None = None) -> Path:
    import datasets

    data = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({split: data}) if split else data).save_to_disk(str(path))
    return path


ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
CHATS = [{"messages": CHAT[1:3]}, {"messages": CHAT}]


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "saved", "saved-dict", "parquet-dir"])
@pytest.mark.parametrize(("fmt", "rows"), [("alpaca", ROWS), ("messages", CHATS)])
def test_every_file_type_reads_the_same_records(tmp_path, kind, fmt, rows):
    path = {
        "json": lambda: (tmp_path / "d.json").write_text(json.dumps(rows)) and tmp_path / "d.json",
        "jsonl": lambda: (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        and tmp_path / "d.jsonl",
        "parquet": lambda: write_parquet(tmp_path / "d.parquet", rows),
        "saved": lambda: save_to_disk(tmp_path / "saved", rows),
        "saved-dict": lambda: save_to_disk(tmp_path / "saved", rows, split="train"),
        "parquet-dir": lambda: write_parquet((tmp_path / "pq").mkdir() or tmp_path / "pq" / "train.parquet", rows).parent,
    }[kind]()
    got = ds.load_records(DataConfig(format=fmt, sources=[DataSource(path=str(path))]))
    assert got == ds.validate_records(rows, fmt, origin="x")


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_bad_records_in_binary_sources_are_refused_the_same_way(tmp_path, kind):
    rows = [*ROWS, {"instruction": "q", "input": "", "output": None}]  # a typed column: a null, not a number
    path = write_parquet(tmp_path / "d.parquet", rows) if kind == "parquet" else save_to_disk(tmp_path / "s", rows)
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}: record \[5\]: field 'output' must be a string, got null"):
        ds.load_records(DataConfig(format="alpaca", sources=[DataSource(path=str(path))]))


def test_a_damaged_parquet_file_and_a_missing_split_are_one_line(tmp_path):
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=r"d.parquet: cannot read: "):
        ds.load_records(DataConfig(sources=[DataSource(path=str(bad))]))
    saved = save_to_disk(tmp_path / "s", ROWS, split="train")
    with pytest.raises(UserError, match=r"has no split 'tain' \(its splits: train\) \(did you mean \"train\"\?\)"):
        ds.load_records(DataConfig(sources=[DataSource(path=str(saved), split="tain")]))


# --------------------------------------------------------------------------------------------------
# dora train --dry-run reads the data


NEVER = Path(tempfile.gettempdir()) / "dora-dry-run-never-written"


def dry_run(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    default = [] if any(a.startswith("output_dir=") for a in argv) else [f"output_dir={NEVER}"]
    return dora_in_process(["train", "recipes/smoke.yaml", "--dry-run", *default, *argv], monkeypatch, capsys)


ONE_VALIDATION = {  # data or settings the run refuses: the dry run refuses them with the same line
    "every response cut off": ["data.cutoff_len=8", "data.train_on_inputs=false"],
    "batch larger than the examples": ["train.batch_size=256", "train.micro_batch_size=4"],
    "a record of the wrong type": ["data.sources=[{path: data/smoke/commonsense/boolq/test.json}]", "data.format=orca_math"],
    "output_dir of the user's": ["output_dir=data/smoke"],
    "batch not divisible": ["train.batch_size=6"],
}


@pytest.mark.parametrize("case", list(ONE_VALIDATION))
def test_the_dry_run_refuses_what_the_run_refuses_with_the_same_line(case, tmp_path, monkeypatch, capsys):
    argv = ["train", "recipes/smoke.yaml", f"output_dir={tmp_path / 'out'}", *ONE_VALIDATION[case]]
    code, out, dry_err = dora_in_process([*argv, "--dry-run"], monkeypatch, capsys)
    assert code == 2 and out == "" and len(dry_err.strip().splitlines()) == 1, (out, dry_err)
    code, _, run_err = dora_in_process(argv, monkeypatch, capsys)
    assert code == 2 and run_err.strip().splitlines()[-1] == dry_err.strip(), (dry_err, run_err)
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_counts_token_statistics_and_a_marked_example(smol, tmp_path, monkeypatch, capsys):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(9)))
    code, out, err = dry_run([f"model.tokenizer={SMOLLM2_DIR}", "data.format=messages", "data.val_set_size=2",
                              f"data.sources=[{{path: '{path}'}}]", "data.train_on_inputs=false",
                              f"output_dir={tmp_path / 'never'}", "train.batch_size=4"], monkeypatch, capsys)
    assert code == 0, err
    n = len(smol.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    assert "# data: 9 messages records: 7 for training, 2 for validation" in out
    assert f"min {n}, median {n}, max {n}; 0 of 7 are longer than cutoff_len 128" in out
    trained = len(smol("A plum.<|im_end|>An apple, of course.<|im_end|>")["input_ids"])
    assert f"# trained tokens (with a loss): {7 * trained} of {7 * n} " in out
    example = out.split("the rest is trained\n", 1)[1]
    assert example.startswith("[[<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a fruit.")
    assert "assistant\n]]A plum.<|im_end|>[[\n<|im_start|>user\nAnother one?" in example
    assert example.rstrip("\n").endswith("]]An apple, of course.<|im_end|>[[\n]]")
    assert not (tmp_path / "never").exists()


def test_dry_run_counts_what_cutoff_len_cuts(monkeypatch, capsys):
    code, out, err = dry_run(["data.cutoff_len=80", "data.train_on_inputs=false"], monkeypatch, capsys)
    assert code == 0, err
    cut = re.search(r"(\d+) of 134 are longer than cutoff_len 80 and cut", out)
    assert cut and 0 < int(cut.group(1)) < 134
    assert re.search(r"max (\d+);", out) and int(re.search(r"max (\d+);", out).group(1)) > 80


def test_dry_run_refuses_bad_data_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "q", "output": 5}]))
    code, _, err = dry_run([f"data.sources=[{{path: '{path}'}}]", "data.val_set_size=0"], monkeypatch, capsys)
    assert code == 2 and err == f"error: {path}: record [0]: field 'output' must be a string, got a number\n"
