"""Data: reading and validating sources, mixing, subsets, splits, tokenisation with masking, collation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dora_cli import datasets as ds
from dora_cli import prompts
from dora_cli.errors import UserError
from dora_cli.recipe import DataConfig, DataSource, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "data" / "smoke"
DEMO = ROOT / "data" / "demo"


def cfg(*paths, **kwargs) -> DataConfig:
    sources = [p if isinstance(p, DataSource) else DataSource(path=str(p)) for p in paths]
    return DataConfig(sources=sources, **kwargs)


def write(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def rec(i: int, **extra) -> dict:
    return {
        "instruction": f"question {i}",
        "input": "",
        "output": f"the correct answer is answer{i % 4 + 1}",
        **extra,
    }


# --------------------------------------------------------------------------- shipped data


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_data_is_what_its_script_writes():
    module = _load_script("make_demo_data")
    train, test = module.build()
    assert json.loads((DEMO / "train.json").read_text()) == train
    assert json.loads((DEMO / "test.json").read_text()) == test
    assert len(train) == 1000 and len(test) == 200
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    for split in (train, test):
        assert all(r["output"] == f"the correct answer is {r['answer']}" for r in split)
        assert all(r["instruction"].endswith("\n\nAnswer format: true/false") for r in split)
        assert sum(r["answer"] == "true" for r in split) == sum(r["answer"] == "false" for r in split)

    def adjectives(split):
        return {w.strip('.!"') for r in split for w in r["instruction"].split('"')[1].split()} & {
            *module.POSITIVE, *module.NEGATIVE}

    unseen = adjectives(test) - adjectives(train)  # words the adapter never saw in training
    assert len(unseen) == 2 * module.HELD_OUT_PER_POLARITY


def test_smoke_data_is_what_its_script_writes():
    import random

    module = _load_script("make_smoke_data")
    for rel, records in module.build(random.Random(module.SEED)).items():
        assert json.loads((SMOKE / rel).read_text()) == records
    answers = {r["answer"] for r in json.loads((SMOKE / "train.json").read_text())}
    assert answers == {"answer1", "answer2", "answer3", "answer4", "true", "false"}


def test_demo_prompts_are_short(tok):
    records = ds.load_records(cfg(DEMO / "test.json")) + ds.load_records(cfg(DEMO / "train.json"))
    assert (
        max(len(tok(prompts.training_prompt(r["instruction"], "", r["output"])).input_ids) for r in records)
        < 128
    )


# --------------------------------------------------------------------------- reading


def test_load_smoke_file_and_directory():
    from_file = ds.load_records(cfg(SMOKE / "train.json"))
    assert len(from_file) == 150
    assert set(from_file[0]) == {"instruction", "input", "output", "answer"}
    assert ds.load_records(cfg(SMOKE)) == from_file  # a directory reads its train.json


def test_directory_without_split_file_reads_all_data_files(tmp_path):
    write(tmp_path / "b.json", [rec(2)])
    (tmp_path / "a.jsonl").write_text(json.dumps(rec(1)) + "\n\n" + json.dumps(rec(3)) + "\n")
    (tmp_path / "notes.txt").write_text("not data")
    got = ds.load_records(cfg(tmp_path))
    assert [r["instruction"] for r in got] == ["question 1", "question 3", "question 2"]
    (tmp_path / "test.jsonl").write_text(json.dumps(rec(9)) + "\n")
    got = ds.load_records(cfg(DataSource(path=str(tmp_path), split="test")))
    assert [r["instruction"] for r in got] == ["question 9"]


def test_input_is_optional_and_extra_fields_dropped(tmp_path):
    path = write(
        tmp_path / "d.json",
        [
            {"instruction": "a", "output": "b"},
            {"instruction": "a", "input": None, "output": "b", "extra": 1},
            {"instruction": "a", "input": "ctx", "output": "b"},
        ],
    )
    got = ds.load_records(cfg(path, format="alpaca"))
    assert got == [{"instruction": "a", "input": "", "output": "b"}] * 2 + [
        {"instruction": "a", "input": "ctx", "output": "b"}
    ]


def test_missing_file_suggests_a_near_name():
    with pytest.raises(UserError) as err:
        ds.load_records(cfg(SMOKE / "trian.json"))
    msg = str(err.value)
    assert msg.startswith("data.sources[0].path: ") and "trian.json: no such file or directory" in msg
    assert 'did you mean "train.json"' in msg


def test_missing_relative_directory_is_local_not_hub(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match=r'data/smok: no such file or directory \(did you mean "smoke"\?\)'):
        ds.load_records(cfg("data/smok"))


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(UserError, match=r"bad.json: invalid JSON at line 3 column 23: Expecting ','"):
        ds.load_records(cfg(path))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec(0)) + "\n" + '{"instruction": "x",\n')
    with pytest.raises(UserError, match=r"bad.jsonl: line 2: invalid JSON"):
        ds.load_records(cfg(path))


def test_json_must_be_a_list(tmp_path):
    with pytest.raises(UserError, match=r"d.json: expected a JSON list of records, got an object"):
        ds.load_records(cfg(write(tmp_path / "d.json", {"data": [rec(0)]})))


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ({"instruction": "a"}, r"record \[2\]: missing field 'output'"),
        ({"output": "b"}, r"record \[2\]: missing field 'instruction'"),
        ({"instruction": "a", "output": 3}, r"record \[2\]: field 'output' must be a string, got a number"),
        (
            {"instruction": ["a"], "output": "b"},
            r"record \[2\]: field 'instruction' must be a string, got a list",
        ),
        ({"instruction": "a", "input": 1, "output": "b"}, r"record \[2\]: field 'input' must be a string"),
        ("just text", r"record \[2\]: expected an object, got a string"),
    ],
)
def test_bad_record_names_file_index_and_field(tmp_path, bad, pattern):
    path = write(tmp_path / "d.json", [rec(0), rec(1), bad])
    with pytest.raises(UserError, match=r"d.json: " + pattern):
        ds.load_records(cfg(path))


def test_empty_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no records"):
        ds.load_records(cfg(write(tmp_path / "e.json", [])))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no records"):
        ds.load_records(cfg(tmp_path / "e.jsonl"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="no train.json, train.jsonl, train.parquet or other .json / .jsonl / .parquet file"):
        ds.load_records(cfg(tmp_path / "sub"))
    with pytest.raises(UserError, match="data.sources: no training data"):
        ds.load_records(DataConfig())


def test_hub_rows_go_through_the_same_validation(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(
            [
                {"instruction": "a", "input": "", "output": "b"},
                {"instruction": "c", "input": "", "output": None},
            ]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(
        UserError, match=r"zwhe99/commonsense_170k \(hub, split train\): record \[1\]: field 'output'"
    ):
        ds.load_records(cfg("zwhe99/commonsense_170k"))
    assert calls == [("zwhe99/commonsense_170k", "train")]


def test_unreachable_hub_is_a_user_error(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        UserError, match=r"data.sources\[0\].path: 'yahma/alpaca-cleaned' is not a local file .* Hub"
    ):
        ds.load_records(cfg("yahma/alpaca-cleaned"))


# --------------------------------------------------------------------------- mixing, subsets, splits


def test_weights_mix_seeded_fractions(tmp_path):
    a = write(tmp_path / "a.json", [rec(i, src="a") for i in range(40)])
    b = write(tmp_path / "b.json", [rec(i, src="b") for i in range(10)])
    c = cfg(DataSource(path=str(a), weight=0.25), DataSource(path=str(b)))
    got = ds.load_records(c)
    assert [r["answer"] for r in got if "answer" in r] == []  # extra fields dropped
    names = [r["instruction"] for r in got]
    assert len(got) == 10 + 10 and names[10:] == [f"question {i}" for i in range(10)]
    first = [int(n.split()[1]) for n in names[:10]]
    assert first == sorted(first)  # a subset keeps file order
    assert ds.load_records(c) == got
    assert ds.load_records(c.model_copy(update={"seed": 7})) != got


def test_weight_above_one_repeats_and_weight_zero_is_refused(tmp_path):
    a = write(tmp_path / "a.json", [rec(i) for i in range(10)])
    got = ds.load_records(cfg(DataSource(path=str(a), weight=2.5)))
    assert len(got) == 25 and got[:10] == got[10:20]
    with pytest.raises(UserError, match=r"data.sources\[0\].weight: 0.0 is not a fraction"):
        ds.load_records(cfg(DataSource.model_construct(path=str(a), split="train", weight=0.0)))
    for weight, bound in ((0, "> 0"), (1e300, "<= 100")):  # the schema refuses them first
        with pytest.raises(UserError, match=rf"data.sources\[0\].weight: expected a value {bound}"):
            recipe_from_dict({"model": {"name_or_path": "a"}, "data": {"sources": [{"path": str(a), "weight": weight}]}}, "t")


def test_max_samples_is_a_seeded_subset():
    c = cfg(DEMO / "train.json", max_samples=100)
    got = ds.load_records(c)
    assert len(got) == 100 and got == ds.load_records(c)
    other = ds.load_records(c.model_copy(update={"seed": 1}))
    assert other != got
    full = ds.load_records(cfg(DEMO / "train.json"))
    assert all(r in full for r in got)
    assert ds.load_records(cfg(DEMO / "train.json", max_samples=5000)) == full


def test_split_train_val_is_seeded_and_disjoint():
    records = [rec(i) for i in range(50)]
    train, val = ds.split_train_val(records, 10, seed=3)
    assert len(train) == 40 and len(val) == 10
    assert sorted(train + val, key=lambda r: int(r["instruction"].split()[1])) == records
    assert ds.split_train_val(records, 10, seed=3) == (train, val)
    assert ds.split_train_val(records, 10, seed=4)[1] != val
    assert ds.split_train_val(records, 0, seed=3) == (records, [])


def test_val_set_as_large_as_the_data_is_refused():
    with pytest.raises(
        UserError, match=r"data.val_set_size: 5 leaves nothing to train on: the data has 5 records"
    ):
        ds.split_train_val([rec(i) for i in range(5)], 5, seed=0)


# --------------------------------------------------------------------------- tokenising


RECORD = {
    "instruction": "Which of these is a fruit?\n\nAnswer1: hammer Answer2: plum",
    "input": "",
    "output": "the correct answer is answer2",
}


def test_tokenize_adds_bos_and_eos_labels_copy(tok):
    ex = ds.tokenize_record(RECORD, tok, DataConfig())
    full = tok(prompts.training_prompt(RECORD["instruction"], "", RECORD["output"])).input_ids
    assert ex["input_ids"][0] == tok.bos_token_id
    assert ex["input_ids"] == full + [tok.eos_token_id]
    assert ex["labels"] == ex["input_ids"] and ex["attention_mask"] == [1] * len(full + [1])


def test_train_on_inputs_false_masks_the_user_prompt(tok):
    ex = ds.tokenize_record(RECORD, tok, DataConfig(train_on_inputs=False))
    user_len = len(tok(prompts.eval_prompt(RECORD["instruction"])).input_ids)
    assert ex["labels"][:user_len] == [ds.IGNORE_INDEX] * user_len
    assert ex["labels"][user_len:] == ex["input_ids"][user_len:]
    assert ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["labels"][user_len:], skip_special_tokens=True) == RECORD["output"]


def test_no_eos_when_disabled(tok):
    ex = ds.tokenize_record(RECORD, tok, DataConfig(add_eos_token=False))
    assert ex["input_ids"][-1] != tok.eos_token_id


def test_truncation_to_cutoff_without_eos(tok):
    full = tok(prompts.training_prompt(RECORD["instruction"], "", RECORD["output"])).input_ids
    ex = ds.tokenize_record(RECORD, tok, DataConfig(cutoff_len=20))
    assert ex["input_ids"] == full[:20] and ex["labels"] == full[:20]
    exact = ds.tokenize_record(RECORD, tok, DataConfig(cutoff_len=len(full)))
    assert exact["input_ids"] == full  # fits exactly: no room, no EOS (as upstream)
    roomy = ds.tokenize_record(RECORD, tok, DataConfig(cutoff_len=len(full) + 1))
    assert roomy["input_ids"] == full + [tok.eos_token_id]


def test_prompt_longer_than_cutoff_masks_everything(tok):
    ex = ds.tokenize_record(RECORD, tok, DataConfig(cutoff_len=10, train_on_inputs=False))
    assert len(ex["input_ids"]) == 10 and ex["labels"] == [ds.IGNORE_INDEX] * 10


def test_tokenizer_without_bos_gets_none(tok):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="<pad>")
    ex = ds.tokenize_record(RECORD, gpt2_like, DataConfig(train_on_inputs=False))
    user_len = len(gpt2_like(prompts.eval_prompt(RECORD["instruction"])).input_ids)
    assert ex["input_ids"][0] != tok.bos_token_id and tok.bos_token_id not in ex["input_ids"]
    assert ex["labels"][user_len - 1] == ds.IGNORE_INDEX and ex["labels"][user_len] != ds.IGNORE_INDEX


def test_chat_template_text_is_tokenised_without_extra_specials(tok):
    chat_tok = tok.__class__.from_pretrained(str(ROOT / "data" / "tiny_tokenizer"))
    chat_tok.chat_template = "<s>{% for m in messages %}{{ m['content'] }}{% endfor %} => "
    ex = ds.tokenize_record(RECORD, chat_tok, DataConfig(template="chat", train_on_inputs=False))
    assert ex["input_ids"].count(tok.bos_token_id) == 1 and ex["input_ids"][0] == tok.bos_token_id
    assert (
        tok.decode(ex["input_ids"], skip_special_tokens=True)
        == RECORD["instruction"] + " => " + RECORD["output"]
    )
    with pytest.raises(UserError, match="no chat template"):
        ds.build_datasets(cfg(SMOKE, template="chat"), tok)


def test_batched_tokenisation_matches_one_by_one(tok):
    records = ds.load_records(cfg(SMOKE / "train.json"))[:40]
    for c in (DataConfig(), DataConfig(train_on_inputs=False, cutoff_len=60)):
        assert ds.tokenize_records(records, tok, c, chunk=16) == [
            ds.tokenize_record(r, tok, c) for r in records
        ]


def test_build_datasets_splits_and_tokenises(tok):
    c = cfg(SMOKE, val_set_size=16, train_on_inputs=False)
    train, val = ds.build_datasets(c, tok)
    assert len(train) == 134 and len(val) == 16
    assert all(set(e) == {"input_ids", "labels", "attention_mask"} for e in train + val)
    assert ds.build_datasets(c, tok) == (train, val)


# --------------------------------------------------------------------------- collating


def test_collator_pads_right():
    batch = ds.Collator(pad_token_id=3)(
        [
            {"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "attention_mask": [1, 1, 1]},
            {"input_ids": [1, 7], "labels": [1, 7], "attention_mask": [1, 1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [1, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_pads_to_a_multiple_of_8(tok):
    collate = ds.make_collator(tok, pad_to_multiple_of=8)
    batch = collate([{"input_ids": list(range(1, 10))}, {"input_ids": [1, 2]}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][1, 2:].eq(tok.pad_token_id).all()
    assert batch["labels"][0, :9].tolist() == list(range(1, 10)) and batch["labels"][0, 9:].eq(-100).all()
    assert batch["attention_mask"].sum(1).tolist() == [9, 2]


def test_collator_on_real_examples(tok):
    train, _ = ds.build_datasets(cfg(SMOKE / "train.json", max_samples=4), tok)
    batch = ds.make_collator(tok)(train)
    lengths = [len(e["input_ids"]) for e in train]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths


def test_pad_id_falls_back_to_eos():
    class NoPad:
        pad_token_id = None
        eos_token_id = 2

    assert ds.pad_token_id(NoPad()) == 2
