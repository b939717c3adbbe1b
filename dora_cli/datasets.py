"""Training data: read commonsense / Alpaca records, tokenise them with label masking, collate batches.

    records  = load_records(cfg.data)                        # sources -> validated, mixed, subset
    train, val = split_train_val(records, cfg.data.val_set_size, cfg.data.seed)
    example  = tokenize_record(record, tokenizer, cfg.data)  # {input_ids, labels, attention_mask}
    batch    = make_collator(tokenizer)(examples)            # right-padded torch tensors
    train_examples, val_examples = build_datasets(cfg.data, tokenizer)   # all of the above

Sources (`data.sources[i].path`): a local .json file (a list of records), a .jsonl file (one record a
line), a .parquet file (one record a row), a directory written by `datasets.save_to_disk` (it holds
`dataset_info.json` / `state.json`, or `dataset_dict.json` and a folder per split), another directory (its
`<split>.json` / `.jsonl` / `.parquet`, else every such file in it, sorted), or a Hugging Face Hub dataset
name (`datasets.load_dataset(name, split=...)`). Rows from every source go through the same validation.

Record formats (`data.format`):

- commonsense / alpaca: string `instruction` and `output`; `input` is optional (missing or null means "");
  `answer` is kept when present; other fields are dropped.
- orca_math (microsoft/orca-math-word-problems-200k): string `question` and `answer`: the question becomes
  the instruction, the answer (a worked solution ending in the result) the output, and it is also kept as
  `answer` for the final-number exact match of `dora eval`.
- messages (OpenAI style): `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}]}`;
  sharegpt: `{"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}]}` (`user` and
  `assistant` are read as `human` and `gpt`). Both become `{"messages": [{role, content}, ...]}`: a
  system turn only first, then a user turn, at least one assistant turn, string contents.

Tokenisation follows LLM-Adapters `finetune.py` (`tokenize` / `generate_and_tokenize_prompt`):

- the full text (prompt + output) is tokenised with the tokenizer's own special tokens (a LLaMA tokenizer
  adds BOS, a GPT-2-style one adds nothing), truncated to `cutoff_len`;
- EOS is appended when `add_eos_token`, the last token is not EOS already, and the text was shorter than
  `cutoff_len` (a text cut at exactly `cutoff_len` gets no EOS, as upstream);
- labels are a copy of input_ids; with `train_on_inputs: false` the first `len(tokenize(user prompt))`
  labels are -100, the user prompt being the prompt without the output, tokenised the same way (with its
  BOS, without EOS, truncated to `cutoff_len`);
- chat templates write their own special tokens, so with `template: chat` the text is tokenised with
  `add_special_tokens=False` (what `apply_chat_template(tokenize=True)` does).

A conversation (messages / sharegpt) is rendered whole by the tokenizer's chat template
(`prompts.conversation`), so its token ids are those of `apply_chat_template(messages, tokenize=True)`,
truncated to `cutoff_len`. With `train_on_inputs: false` a token is trained when its characters overlap the text
of an assistant turn (its content and end-of-turn token(s), as the template writes them; character offsets of
a fast tokenizer, as transformers' `return_assistant_tokens_mask`), every other token is masked; `add_eos_token` does not apply (the template ends turns).

Two deliberate differences from upstream: the mask never makes labels longer than input_ids (upstream would,
if the user prompt tokenised to more tokens than the full text), and the collator pads on the right
(upstream trains with `padding_side="left"` through DataCollatorForSeq2Seq).

Everything is deterministic: sampling uses `random.Random` seeded from `data.seed`, order is kept.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dora_cli import hub, prompts
from dora_cli.errors import UserError, absent, clip, did_you_mean, one_of, problem_of, reading, unicode_text
from dora_cli.files import looks_local
from dora_cli.recipe import CONVERSATION_FORMATS, INT32_MAX, DataConfig, DataSource

IGNORE_INDEX = -100
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
"""A directory holding one of these was written by `datasets.save_to_disk` and is read by `load_from_disk`."""
REQUIRED_FIELDS = {
    "commonsense": ("instruction", "output"),
    "alpaca": ("instruction", "output"),
    "orca_math": ("question", "answer"),
}
OPTIONAL_FIELDS = ("input",)
RENAMED_FIELDS = {"orca_math": {"question": "instruction", "answer": "output"}}
"""Per format: source field -> normalised field (`answer` is also kept under its own name, as in every format)."""


@dataclass(frozen=True)
class TurnLayout:
    """Where a conversation format keeps its turns: the list field, the role and text fields of a turn, and
    its role names -> the normalised role (system, user, assistant)."""

    turns: str
    role: str
    content: str
    roles: dict[str, str]


CONVERSATION_LAYOUTS = {
    "messages": TurnLayout("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": TurnLayout(
        "conversations", "from", "value",
        {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"},
    ),
}
assert set(CONVERSATION_LAYOUTS) == set(CONVERSATION_FORMATS)
FORMATS = (*REQUIRED_FIELDS, *CONVERSATION_LAYOUTS)


# --------------------------------------------------------------------------- reading


def load_records(cfg: DataConfig) -> list[dict]:
    """All sources, validated for `cfg.format`, each cut to its `weight`, then `max_samples` of the mix.

    Records keep their order: sources in order, each in file order (a weighted subset keeps file order);
    `max_samples` shuffles the mix with `cfg.seed` and takes the first N (the paper's 10K Alpaca subset).
    """
    if not cfg.sources:
        raise UserError(
            "no training data (expected a list of sources, each with a path)", where="data.sources"
        )
    mixed: list[dict] = []
    for i, source in enumerate(cfg.sources):
        records = read_source(source, cfg.format, where=f"data.sources[{i}]")
        mixed.extend(
            take_fraction(
                records, source.weight, seed=cfg.seed * 1_000_003 + i, where=f"data.sources[{i}].weight"
            )
        )
    if cfg.max_samples is not None and cfg.max_samples < len(mixed):
        order = list(range(len(mixed)))
        random.Random(cfg.seed).shuffle(order)
        mixed = [mixed[j] for j in order[: cfg.max_samples]]
    return mixed


def read_source(source: DataSource, fmt: str = "commonsense", where: str = "data.sources") -> list[dict]:
    """The validated records of one source (local file, directory, saved dataset or hub dataset name)."""
    path = Path(source.path).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES):
        records = validate_records(_load_saved(path, source.split, f"{where}.path"), fmt, origin=str(path))
        if not records:
            raise UserError(f"{source.path}: no records (empty dataset)", where=f"{where}.path")
        return records
    if path.is_dir():
        files = _files_of_dir(path, source.split, where)
    elif path.is_file():
        files = [path]
    elif os.path.lexists(path):  # a link to nowhere, a link loop
        raise UserError(f"{source.path}: {absent(path)}", where=f"{where}.path")
    elif looks_local(source.path, DATA_SUFFIXES):
        raise UserError(f"{source.path}: no such file or directory{_near_names(path)}", where=f"{where}.path")
    else:
        rows = _load_hub(source.path, source.split, where=f"{where}.path")
        records = validate_records(rows, fmt, origin=f"{source.path} (hub, split {source.split})")
        if not records:
            raise UserError(
                f"{source.path}: split {source.split!r} has no records (empty dataset)", where=where
            )
        return records
    records = []
    for file in files:
        records.extend(validate_records(read_records_file(file), fmt, origin=str(file)))
    if not records:
        raise UserError(f"{source.path}: no records (empty dataset)", where=f"{where}.path")
    return records


def read_records_file(path: str | Path) -> list[Any]:
    """The raw rows of a .json file (a list), a .jsonl file (one JSON value a line) or a .parquet file (one
    row a record); UserError if malformed."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a records file" if path.is_dir() else absent(path) if os.path.lexists(path) else None
        raise UserError(problem or f"no such file{_near_names(path)}", where=str(path))
    if path.suffix == ".parquet":
        return _read_parquet(path)
    with reading(path):
        text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(
                    f"line {lineno}: invalid JSON: {err.msg} (column {err.colno})", where=str(path)
                ) from err
            except (ValueError, RecursionError) as err:
                raise UserError(f"line {lineno}: cannot read: {problem_of(err)}", where=str(path)) from None
        return rows
    with reading(path):
        data = json.loads(text)
    if not isinstance(data, list):
        raise UserError(f"expected a JSON list of records, got {_type_name(data)}", where=str(path))
    return data


def _read_parquet(path: Path) -> list[Any]:
    """The rows of a .parquet file as dicts (what the file's columns hold, typed by the file)."""
    import pyarrow.parquet as pq

    with reading(path):
        return pq.read_table(path).to_pylist()


def _load_saved(path: Path, split: str, where: str) -> list[dict]:
    """The rows of a `datasets.save_to_disk` directory: a Dataset, or the `split` of a DatasetDict."""
    import datasets

    with reading(path):
        saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserError(
                f"{path}: the saved dataset has no split {split!r} (its splits: {one_of(saved)})"
                f"{did_you_mean(split, saved)}",
                where=where,
            )
        saved = saved[split]
    return saved.to_list()


def validate_records(rows: Iterable[Any], fmt: str, origin: str) -> list[dict]:
    """Normalised records {instruction, input, output[, answer]} (conversations: {messages}); UserError naming
    origin, index and field."""
    if fmt in CONVERSATION_LAYOUTS:
        return [_conversation(row, idx, CONVERSATION_LAYOUTS[fmt], fmt, origin) for idx, row in enumerate(rows)]
    if fmt not in REQUIRED_FIELDS:
        raise UserError(
            f"unknown format {fmt!r} (expected {one_of(FORMATS)}){did_you_mean(fmt, FORMATS)}",
            where="data.format",
        )
    required = REQUIRED_FIELDS[fmt]
    renamed = RENAMED_FIELDS.get(fmt, {})
    expected = f"a {fmt} record needs string fields {' and '.join(required)}"
    expected += "" if renamed else "; input is optional"
    out = []
    for idx, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(
                f"record [{idx}]: expected an object, got {_type_name(row)} ({expected})", where=origin
            )
        rec = {}
        for field in required:
            if field not in row:
                raise UserError(f"record [{idx}]: missing field {field!r} ({expected})", where=origin)
            rec[renamed.get(field, field)] = _text(row[field], f"record [{idx}]", field, origin)
        for field in OPTIONAL_FIELDS:
            value = row.get(field)
            rec[field] = _text("" if value is None else value, f"record [{idx}]", field, origin)
        if "answer" in row:
            rec["answer"] = row["answer"]
        out.append(rec)
    return out


def _text(value: Any, at: str, field: str, origin: str) -> str:
    """A record's text field: a string of valid Unicode, else a UserError naming the record and field."""
    if not isinstance(value, str):
        raise UserError(f"{at}: field {field!r} must be a string, got {_type_name(value)}", where=origin)
    return unicode_text(value, f"{at}: field {field!r}", where=origin)


def _conversation(row: Any, idx: int, layout: TurnLayout, fmt: str, origin: str) -> dict:
    """One conversation record as {"messages": [{"role", "content"}, ...]}, checked turn by turn."""
    expected = (
        f"a {fmt} record is {{\"{layout.turns}\": [{{\"{layout.role}\": ..., \"{layout.content}\": \"text\"}}, ...]}}"
    )
    if not isinstance(row, dict):
        raise UserError(f"record [{idx}]: expected an object, got {_type_name(row)} ({expected})", where=origin)
    turns = row.get(layout.turns)
    if layout.turns not in row:
        raise UserError(f"record [{idx}]: missing field {layout.turns!r} ({expected})", where=origin)
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if turns == [] else _type_name(turns)
        raise UserError(f"record [{idx}]: field {layout.turns!r} must be a list of turns, got {got}", where=origin)
    messages = []
    for j, turn in enumerate(turns):
        at = f"record [{idx}]: {layout.turns}[{j}]"
        if not isinstance(turn, dict):
            raise UserError(f"{at}: expected an object, got {_type_name(turn)} ({expected})", where=origin)
        role = turn.get(layout.role)
        if not (isinstance(role, str) and role in layout.roles):
            shown = clip(repr(role), 40) if layout.role in turn else "missing"
            raise UserError(
                f"{at}: {layout.role} {shown} is not one of {one_of(layout.roles)}{did_you_mean(str(role), layout.roles)}",
                where=origin,
            )
        if layout.content not in turn:
            raise UserError(f"{at}: missing field {layout.content!r} ({expected})", where=origin)
        content = _text(turn[layout.content], at, layout.content, origin)
        messages.append({"role": layout.roles[role], "content": content})
    _check_turn_order(messages, f"record [{idx}]: {layout.turns}", origin)
    return {"messages": messages}


def _check_turn_order(messages: list[dict], at: str, origin: str) -> None:
    """A system turn only first, then a user turn; at least one assistant turn (something to train on)."""
    roles = [m["role"] for m in messages]
    for j, role in enumerate(roles):
        if role == "system" and j > 0:
            raise UserError(f"{at}[{j}]: a system turn may only open the conversation", where=origin)
    first = 1 if roles[0] == "system" else 0
    if first >= len(roles) or roles[first] != "user":
        raise UserError(f"{at}[{first}]: the conversation must start with a user turn (after an optional system "
                        "turn)", where=origin)
    if "assistant" not in roles:
        raise UserError(f"{at}: no assistant turn (nothing to train on)", where=origin)


def take_fraction(records: list[dict], weight: float | None, seed: int, where: str = "weight") -> list[dict]:
    """A seeded `weight` share of `records` in file order: None or 1 all, 0.25 a quarter, 2.5 all twice + half."""
    if weight is None:
        return list(records)
    if not weight > 0:
        raise UserError(f"{weight} is not a fraction to take (expected a number > 0)", where=where)
    whole, frac = divmod(weight, 1.0)
    n_frac = round(frac * len(records))
    if whole == 0:
        n_frac = max(1, n_frac)
    picked = sorted(random.Random(seed).sample(range(len(records)), min(n_frac, len(records))))
    return list(records) * int(whole) + [records[j] for j in picked]


def split_train_val(records: Sequence[dict], val_set_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split: `val_set_size` records for validation, the rest for training; both keep their order."""
    if val_set_size <= 0:
        return list(records), []
    if val_set_size >= len(records):
        raise UserError(
            f"{val_set_size} leaves nothing to train on: the data has {len(records)} records "
            f"(expected fewer than {len(records)})",
            where="data.val_set_size",
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:val_set_size])
    train = [r for j, r in enumerate(records) if j not in val_idx]
    val = [records[j] for j in sorted(val_idx)]
    return train, val


def _files_of_dir(path: Path, split: str, where: str) -> list[Path]:
    for suffix in DATA_SUFFIXES:
        if (path / f"{split}{suffix}").is_file():
            return [path / f"{split}{suffix}"]
    files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise UserError(
            f"{path}: no {split}.json, {split}.jsonl, {split}.parquet or other .json / .jsonl / .parquet file in "
            "this directory (nor a dataset saved by datasets.save_to_disk)",
            where=f"{where}.path",
        )
    return files


def _near_names(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f" (no directory {parent})" if str(parent) not in ("", ".") else ""
    return did_you_mean(path.name, [p.name for p in parent.iterdir()])


def _load_hub(name: str, split: str, where: str) -> list[dict]:
    """Rows of a Hugging Face Hub dataset (or any name `datasets.load_dataset` resolves). A hub that does not
    answer is refused at once (`hub.access`); with HF_HUB_OFFLINE=1 `datasets` reads its local cache."""
    import datasets

    access = hub.access()
    problem = f"; {access.why_not()}" if access.local_only else ""
    if access.problem is not None:
        raise UserError(f"{name!r} is not a local file or directory and could not be loaded from the Hugging Face "
                        f"Hub: {access.why_not()}{_near_names(Path(name))}", where=where)
    try:
        ds = datasets.load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise UserError(
            f"{name!r} is not a local file or directory and could not be loaded from the Hugging Face Hub "
            f"({clip(reason, 200)}){problem}{_near_names(Path(name))}",
            where=where,
        ) from err
    return ds.to_list()


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- tokenising


def is_conversation(cfg: DataConfig) -> bool:
    return cfg.format in CONVERSATION_LAYOUTS


def format_record(record: dict, cfg: DataConfig, tokenizer: Any = None) -> tuple[str, str]:
    """(full training text, user prompt): the user prompt is the full text without the output."""
    user = prompts.render(cfg.template, record["instruction"], record.get("input") or "", None, tokenizer)
    return user + record["output"], user


def tokenize_record(record: dict, tokenizer: Any, cfg: DataConfig) -> dict[str, list[int]]:
    """input_ids, labels, attention_mask of one record (LLM-Adapters semantics, see the module docstring)."""
    if is_conversation(cfg):
        return tokenize_conversations([record], tokenizer, cfg)[0]
    full, user = format_record(record, cfg, tokenizer)
    kwargs = _tokenizer_kwargs(cfg)
    ids = tokenizer(full, **kwargs)["input_ids"]
    user_len = None if cfg.train_on_inputs else len(tokenizer(user, **kwargs)["input_ids"])
    return _finish(ids, user_len, tokenizer.eos_token_id, cfg)


def tokenize_records(
    records: Sequence[dict], tokenizer: Any, cfg: DataConfig, chunk: int = 1024
) -> list[dict[str, list[int]]]:
    """`tokenize_record` over many records, in batched tokenizer calls; same result, same order."""
    if is_conversation(cfg):
        return [ex for i in range(0, len(records), chunk) for ex in tokenize_conversations(records[i : i + chunk], tokenizer, cfg)]
    kwargs = _tokenizer_kwargs(cfg)
    out = []
    for start in range(0, len(records), chunk):
        texts = [format_record(r, cfg, tokenizer) for r in records[start : start + chunk]]
        full_ids = tokenizer([full for full, _ in texts], **kwargs)["input_ids"]
        if cfg.train_on_inputs:
            user_lens: list[int | None] = [None] * len(texts)
        else:
            user_lens = [len(ids) for ids in tokenizer([user for _, user in texts], **kwargs)["input_ids"]]
        out.extend(
            _finish(ids, n, tokenizer.eos_token_id, cfg) for ids, n in zip(full_ids, user_lens, strict=True)
        )
    return out


def tokenize_conversations(records: Sequence[dict], tokenizer: Any, cfg: DataConfig) -> list[dict[str, list[int]]]:
    """Conversation records through the chat template: ids as `apply_chat_template(tokenize=True)` (cut to
    cutoff_len), labels on the tokens that overlap an assistant turn's trained text."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"format {cfg.format} needs a fast tokenizer (character offsets find the assistant turns); "
                        f"{type(tokenizer).__name__} is not one", where="data.format")
    if not cfg.train_on_inputs and prompts.marks_generation(tokenizer):  # transformers' own assistant mask
        out = []
        for r in records:
            ids, mask = prompts.assistant_mask(tokenizer, r["messages"], cfg.cutoff_len, _conversation_label(r))
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
            out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
        return out
    if cfg.train_on_inputs:  # everything is trained: no spans to find
        rendered = [(prompts.render_conversation(tokenizer, r["messages"], _conversation_label(r)), []) for r in records]
    else:
        rendered = [prompts.conversation(tokenizer, r["messages"], _conversation_label(r)) for r in records]
    encoded = tokenizer(
        [text for text, _ in rendered], add_special_tokens=False, truncation=True, max_length=cfg.cutoff_len,
        padding=False, return_offsets_mapping=True,
    )
    out = []
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        ids = list(ids)
        if cfg.train_on_inputs:
            labels = list(ids)
        else:
            labels = [t if _overlaps(offset, spans) else IGNORE_INDEX for t, offset in zip(ids, offsets)]
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return out


def _overlaps(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    """Whether a token's [start, end) characters overlap a trained span (transformers' assistant mask does the same)."""
    start, end = offset
    return any(start < b and end > a for a, b in spans)


def _conversation_label(record: dict) -> str:
    """A conversation named in errors by its first user turn."""
    first = next(m["content"] for m in record["messages"] if m["role"] == "user")
    return f"data: the conversation that starts {clip(repr(first), 60)}"


def build_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[list[dict], list[dict]]:
    """Tokenised (train, val) examples of the recipe's data: load, validate, mix, subset, split, tokenise."""
    records = load_records(cfg)
    train, val = split_train_val(records, cfg.val_set_size, cfg.seed)
    if cfg.template == "chat":
        prompts.chat_prompt(tokenizer, "")  # fail early and clearly when the tokenizer has no chat template
    return tokenize_records(train, tokenizer, cfg), tokenize_records(val, tokenizer, cfg)


def _tokenizer_kwargs(cfg: DataConfig) -> dict[str, Any]:
    return dict(
        truncation=True, max_length=cfg.cutoff_len, padding=False, add_special_tokens=cfg.template != "chat"
    )


def _finish(
    ids: Sequence[int], user_len: int | None, eos_id: int | None, cfg: DataConfig
) -> dict[str, list[int]]:
    ids = list(ids)
    if (
        cfg.add_eos_token
        and eos_id is not None
        and (not ids or ids[-1] != eos_id)
        and len(ids) < cfg.cutoff_len
    ):
        ids.append(eos_id)
    labels = list(ids)
    if user_len is not None:
        n = min(user_len, len(labels))
        labels[:n] = [IGNORE_INDEX] * n
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


# --------------------------------------------------------------------------- describing (dry runs)


@dataclass(frozen=True)
class TokenStats:
    """Token counts of tokenised examples: lengths before cutoff_len, how many it cuts, the trained share."""

    examples: int
    shortest: int
    median: float
    longest: int
    cut: int  # examples longer than cutoff_len (before truncation)
    tokens: int  # tokens after truncation
    trained: int  # of them, tokens with a label (the first token of an example is never predicted)
    untrained_examples: int  # examples left with no trained token (training leaves them out)


def trained_labels(example: dict) -> int:
    """Tokens of an example with a loss: labels other than IGNORE_INDEX after position 0 (the first label
    is never predicted)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def token_stats(records: Sequence[dict], examples: Sequence[dict], tokenizer: Any, cfg: DataConfig) -> TokenStats:
    """Statistics of `examples` (the tokenisation of `records` under `cfg`); the examples that reach cutoff_len
    are tokenised again without it to tell their full length."""
    if not examples:
        return TokenStats(0, 0, 0.0, 0, 0, 0, 0, 0)
    lengths = [len(e["input_ids"]) for e in examples]
    full = cfg.model_copy(update={"cutoff_len": INT32_MAX})
    reaching = [i for i, n in enumerate(lengths) if n >= cfg.cutoff_len]
    for i, e in zip(reaching, tokenize_records([records[i] for i in reaching], tokenizer, full)):
        lengths[i] = len(e["input_ids"])
    trained = [trained_labels(e) for e in examples]
    ordered = sorted(lengths)
    mid = len(ordered) // 2
    median = float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return TokenStats(
        examples=len(examples), shortest=ordered[0], median=median, longest=ordered[-1],
        cut=sum(n > cfg.cutoff_len for n in lengths), tokens=sum(len(e["input_ids"]) for e in examples),
        trained=sum(trained), untrained_examples=sum(n == 0 for n in trained),
    )


def marked_text(example: dict, tokenizer: Any, masked: tuple[str, str] = ("[[", "]]")) -> str:
    """The example's text with every run of masked tokens (label -100) between the `masked` brackets."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example["input_ids"], example["labels"]):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    parts = []
    for trained, tokens in runs:
        text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        parts.append(text if trained else f"{masked[0]}{text}{masked[1]}")
    return "".join(parts)


# --------------------------------------------------------------------------- collating


@dataclass
class Collator:
    """Pads a micro-batch on the right to its longest example (or the next multiple of `pad_to_multiple_of`).

    input_ids get `pad_token_id`, labels -100, attention_mask 0. Returns int64 tensors [batch, seq].
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = -(-longest // m) * m
        batch = len(examples)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(ex.get("labels", ex["input_ids"]), dtype=torch.long)
            attention_mask[i, :n] = torch.as_tensor(ex.get("attention_mask", [1] * n), dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out, the value does not matter)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def make_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> Collator:
    return Collator(pad_token_id=pad_token_id(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
