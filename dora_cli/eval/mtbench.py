"""MT-Bench answers of a loaded (model, tokenizer), in FastChat's `model_answer` format; resumable.

Follows FastChat `fastchat/llm_judge/gen_model_answer.py` (lm-sys/FastChat):

- every question has 2 turns; turn 2 is asked with the conversation so far (turn 1 and the model's
  answer to it);
- the prompt is the tokenizer's chat template when it has one (FastChat uses its own conversation
  templates; a fine-tuned model here knows its tokenizer's), else the LLM-Adapters / Alpaca text
  (`prompts.eval_prompt`) with the earlier turns as "### Instruction:" / "### Response:" blocks;
- temperature per category as FastChat's `temperature_config` (writing, roleplay 0.7; stem,
  humanities 0.1; extraction, math, coding, reasoning 0.0; any other category 0.7); below 1e-4 the
  decoding is greedy, else sampling with `torch.manual_seed(0)` before each question (FastChat seeds
  with the choice index, 0), so an answer does not depend on which questions ran before it;
- the answer is the decoded new tokens up to the end-of-sequence token, special tokens removed,
  stripped (and, with the Alpaca text, cut before a "### Instruction:" the model writes itself);
- one JSON line per question: question_id, answer_id, model_id, choices [{index: 0, turns}], tstamp.

Resuming: a question whose answer line exists is not asked again; a `.run.json` beside the answer
file keeps the settings, and answers made with other settings are refused (or discarded with
`overwrite`). When all questions are answered the file is rewritten sorted by question_id, as
FastChat's `reorg_answer_file` does.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
import uuid
from pathlib import Path

import torch

from dora_cli.console import progress_bar, say
from dora_cli.errors import UserError, first_repeat, reading
from dora_cli.eval.judge import (
    NEED_REF_CATS,
    JudgeClient,
    check_judge_inputs,
    judge_answers,
    load_judge_prompts,
    load_reference_answers,
    on_this_machine,
    summarize_scores,
)
from dora_cli.eval.predict import answer_turn, describe_model
from dora_cli.eval.redact import public_url
from dora_cli.files import (
    append_jsonl,
    guard_resume,
    read_jsonl,
    read_jsonl_resumable,
    write_json,
    write_text,
)
from dora_cli.prompts import dialogue_prompt

# FastChat fastchat/llm_judge/common.py `temperature_config`; other categories: 0.7.
TEMPERATURE = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
    "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1,
}
DEFAULT_TEMPERATURE = 0.7


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """MT-Bench questions (FastChat question.jsonl): question_id, category, turns; checked."""
    with reading(path):
        questions = read_jsonl(path, "eval.mt_bench.questions")
    seen = set()
    for i, q in enumerate(questions):
        turns = q.get("turns")
        if not isinstance(q.get("question_id"), int) or not isinstance(q.get("category"), str):
            raise UserError(f"line {i + 1}: needs an integer question_id and a category", where=str(path))
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise UserError(f"line {i + 1}: 'turns' must be a non-empty list of strings", where=str(path))
        if q["question_id"] in seen:
            raise UserError(f"line {i + 1}: question_id {q['question_id']} repeats", where=str(path))
        seen.add(q["question_id"])
    if not questions:
        raise UserError("no questions", where=str(path))
    return questions[:limit] if limit else questions


def mt_bench_inputs(cfg, limit: int | None = None) -> tuple[list[dict], tuple[dict, dict, str | None] | None]:
    """(questions, (judge prompts, reference answers, API key) when a judge is set), every file read and checked:
    what `dora eval` checks before it loads the model, and what the run then uses."""
    if not cfg.questions:
        raise UserError("eval.mt_bench.questions is not set (FastChat question.jsonl)")
    qpath = Path(cfg.questions)
    questions = load_questions(qpath, limit)
    if cfg.judge_url is None:
        return questions, None
    if not cfg.judge_model:
        raise UserError("eval.mt_bench.judge_model: not set; the judge at judge_url needs the name of its model")
    check_judge_url(cfg.judge_url)
    api_key = judge_api_key(cfg)
    beside = " (unset: beside eval.mt_bench.questions)"
    prompts_file = cfg.judge_prompts or qpath.parent / "judge_prompts.jsonl"
    prompts = load_judge_prompts(prompts_file, "eval.mt_bench.judge_prompts" + ("" if cfg.judge_prompts else beside))
    refs = {}
    if any(q["category"] in NEED_REF_CATS for q in questions):
        refs = load_reference_answers(cfg.reference_answers or qpath.parent / "reference_answer" / "gpt-4.jsonl",
                                      "eval.mt_bench.reference_answers" + ("" if cfg.reference_answers else beside))
    check_judge_inputs(questions, None, prompts, refs, prompts_file)
    return questions, (prompts, refs, api_key)


def judge_api_key(cfg) -> str | None:
    """The judge's API key, from the environment variable `eval.mt_bench.judge_api_key_env` names; None when
    that is null (a judge that takes no key) or the variable is unset or empty and the judge is on this machine
    (a local server). Unset or empty for a judge elsewhere: a UserError, before any answer is generated."""
    name = cfg.judge_api_key_env
    if name is not None and not name.strip():
        raise UserError("empty: name the environment variable that holds the key, or null for a judge that takes none",
                        where="eval.mt_bench.judge_api_key_env")
    key = (os.environ.get(name) or None) if name is not None else None
    if key is None and name is not None and not on_this_machine(cfg.judge_url):
        raise UserError(f"{name} is not set or is empty, and the judge at {public_url(cfg.judge_url)} is not on this "
                        "machine: export the key, or set judge_api_key_env to null for a judge that takes none",
                        where="eval.mt_bench.judge_api_key_env")
    return key



def check_judge_url(url: str) -> None:
    """Refuse a judge URL the HTTP client could not use (before any answer is generated); the message shows it
    without credentials, query or fragment, where keys travel."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - a port that is not a number in 0-65535 raises here
    except ValueError:
        raise UserError(f"{public_url(url)!r}: its port is not a number from 0 to 65535",
                        where="eval.mt_bench.judge_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{public_url(url)!r}: expected an http:// or https:// URL with a host (an OpenAI-compatible "
                        "endpoint, e.g. http://127.0.0.1:8000/v1)", where="eval.mt_bench.judge_url")
    names = [name for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
    twice = first_repeat(names)
    if twice is not None:  # the client sends a query as a mapping: one value per name
        raise UserError(f"{public_url(url)!r}: its query names {names[twice]!r} twice", where="eval.mt_bench.judge_url")


def conversation_prompt(tokenizer, questions: list[str], answers: list[str]) -> tuple[str, bool]:
    """The prompt for the last of `questions`, after earlier questions and their `answers`: the tokenizer's
    chat template when it has one, else the LLM-Adapters text (`prompts.dialogue_prompt`).

    Returns (text, add_special_tokens): chat-template text already holds its special tokens.
    """
    template = "chat" if getattr(tokenizer, "chat_template", None) else "llm_adapters"
    return dialogue_prompt(template, tokenizer, questions, answers)


def generate_answers(
    model,
    tokenizer,
    questions: list[dict],
    answer_file: str | Path,
    *,
    model_id: str,
    max_new_tokens: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[int, dict]:
    """Answer every question (2 turns), appending one FastChat answer line per question; question_id -> record."""
    answer_file = Path(answer_file)
    fingerprint = {
        "model_id": model_id, "model": describe_model(model), "max_new_tokens": max_new_tokens,
        "template": "chat" if getattr(tokenizer, "chat_template", None) else "llm_adapters",
    }
    guard_resume(answer_file.with_suffix(".run.json"), [answer_file], fingerprint, overwrite=overwrite)
    done = {r["question_id"]: r for r in read_jsonl_resumable(answer_file) if "question_id" in r}
    todo = [q for q in questions if q["question_id"] not in done]
    model.eval()
    with progress_bar(progress) as bar:
        job = bar.add_task("MT-Bench answers", total=len(questions), completed=len(questions) - len(todo))
        for q in todo:
            temperature = TEMPERATURE.get(q["category"], DEFAULT_TEMPERATURE)
            torch.manual_seed(0)
            turns: list[str] = []
            for j in range(len(q["turns"])):
                prompt, special = conversation_prompt(tokenizer, q["turns"][: j + 1], turns)
                turns.append(
                    answer_turn(model, tokenizer, prompt, special, temperature=temperature, max_new_tokens=max_new_tokens)
                )
            record = {
                "question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
                "choices": [{"index": 0, "turns": turns}], "tstamp": time.time(),
            }
            append_jsonl(answer_file, [record])
            done[q["question_id"]] = record
            bar.update(job, advance=1)
    # All answered: sorted by question id, one line each (FastChat reorg_answer_file).
    lines = "".join(json.dumps(done[k], ensure_ascii=False) + "\n" for k in sorted(done))
    write_text(answer_file, lines)
    return {q["question_id"]: done[q["question_id"]] for q in questions}


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def evaluate_mt_bench(
    model,
    tokenizer,
    out_dir: str | Path,
    cfg,
    *,
    model_id: str,
    limit: int | None = None,
    expected: dict[str, float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Answers (always) and judgments (when cfg.judge_url is set) for MT-Bench; writes metrics.json.

    `cfg` is a recipe's `eval.mt_bench` (MTBenchConfig). Judge prompts and reference answers default
    to the files beside the questions: judge_prompts.jsonl and reference_answer/gpt-4.jsonl.
    `expected`: the paper's number as {"mt_bench": 5.5}; the difference is overall score minus it.

    out_dir/model_answer/<model_id>.jsonl             FastChat answers
    out_dir/model_judgment/<judge_model>_single.jsonl FastChat judgments, one line per turn
    out_dir/metrics.json                              scores overall / per turn / per category
    """
    questions, judge_inputs = mt_bench_inputs(cfg, limit)
    judging = judge_inputs is not None
    if not judging and cfg.judge_model:
        say(f"note: eval.mt_bench.judge_model is {cfg.judge_model!r} but no judge_url is set: answers only, nothing judged")
    if judging:
        prompts, refs, api_key = judge_inputs
        if api_key is None and cfg.judge_api_key_env is not None:
            say(f"note: {cfg.judge_api_key_env} is not set: the judge at {public_url(cfg.judge_url)} is called without an API key")

    out = Path(out_dir)
    answer_file = out / "model_answer" / f"{_file_name(model_id)}.jsonl"
    answers = generate_answers(
        model, tokenizer, questions, answer_file, model_id=model_id, max_new_tokens=cfg.max_new_tokens,
        overwrite=overwrite, progress=progress,
    )
    metrics = {
        "suite": "mt_bench", "model_id": model_id, "questions": len(questions), "answers": str(answer_file),
        "settings": {"max_new_tokens": cfg.max_new_tokens, "limit": limit, "model": describe_model(model)},
        "judge": None, "scores": None, "expected": dict(expected or {}),
    }
    if judging:
        client = JudgeClient(cfg.judge_url, cfg.judge_model, api_key, timeout=cfg.judge_timeout,
                             max_retries=cfg.judge_max_retries)
        judgment_file = out / "model_judgment" / f"{_file_name(cfg.judge_model)}_single.jsonl"
        judgments = judge_answers(
            questions, answers, prompts, refs, client, judgment_file, model_id=model_id, progress=progress
        )
        metrics["judge"] = {"url": public_url(cfg.judge_url), "model": cfg.judge_model, "judgments": str(judgment_file)}
        metrics["scores"] = summarize_scores(judgments, questions)
        if expected and "mt_bench" in expected and metrics["scores"]["overall"] is not None:
            metrics["difference"] = {"mt_bench": round(metrics["scores"]["overall"] - float(expected["mt_bench"]), 4)}
    write_json(out / "metrics.json", metrics)
    return metrics
