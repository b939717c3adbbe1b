"""MT-Bench single-answer grading by an LLM judge behind an OpenAI-compatible API; resumable.

Follows FastChat `fastchat/llm_judge/common.py` (run_judge_single, chat_compeletion_openai) and
`gen_judgment.py` (make_judge_single, NEED_REF_CATS) of lm-sys/FastChat:

- turn 1 is graded with `single-v1`, turn 2 with `single-v1-multi-turn` (the whole conversation);
  questions of the categories math, reasoning and coding use `single-math-v1` /
  `single-math-v1-multi-turn` with the reference answers (`ref_answer_1`, `ref_answer_2`);
- the template's `prompt_template` is filled with str.format (question / answer, or question_1,
  question_2, answer_1, answer_2); the request is [system: `system_prompt`, user: the filled
  template], temperature 0, max_tokens 2048, n 1;
- the rating is the first match of `\\[\\[(\\d+\\.?\\d*)\\]\\]`, else of `\\[(\\d+\\.?\\d*)\\]`, read with
  ast.literal_eval; no match is -1;
- a judgment line: question_id, model, judge [judge model, template name], user_prompt, judgment,
  score, turn, tstamp (and answer_id: the answer it judged, so that new answers are judged anew);
- the MT-Bench score is the mean over judged turns with a valid score (FastChat show_result drops -1).

HTTP: the `openai` client (`chat.completions.create` on `{judge_url}`), so any OpenAI-compatible endpoint
works, with the client's own timeouts and retries: connection errors, timeouts, HTTP 408 / 409 / 429 and 5xx
are retried up to `max_retries` times with exponential backoff (0.5 s doubling to 8 s, or the server's
Retry-After); other HTTP errors (401, 404, ...) are not. A judge on this machine is reached directly,
whatever proxy the environment names. The API key is read from the environment (the variable the recipe
names, never the client's own OPENAI_API_KEY fallback), sent as the bearer token (no Authorization header
without a key), and never written: every text that comes back from the network (the judgment, an error
body, a reason phrase, an exception message, and the `openai` / `httpx` log records while a request runs)
goes through `redact.Redactor` where it enters `JudgeClient.complete`, before it is cut, parsed into a
score, stored or printed. Messages name the endpoint without user:password@.
"""

from __future__ import annotations

import ast
import functools
import ipaddress
import json
import logging
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from dora_cli.console import progress_bar
from dora_cli.errors import UserError, clip, one_of, reading
from dora_cli.eval.redact import Redactor, public_url
from dora_cli.files import append_jsonl, read_jsonl, read_jsonl_resumable

NEED_REF_CATS = ("math", "reasoning", "coding")
TEMPLATES = {  # (multi_turn, needs_reference) -> judge_prompts.jsonl name
    (False, False): "single-v1",
    (False, True): "single-math-v1",
    (True, False): "single-v1-multi-turn",
    (True, True): "single-math-v1-multi-turn",
}
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
RETRY_STATUS = {408, 409, 429}
"""With every 5xx: the statuses the `openai` client retries."""
NETWORK_LOGGERS = ("openai", "httpx", "httpx2")
"""Loggers that may write text from the network (with OPENAI_LOG=debug, or a logging set up by a caller)."""
TEMPLATE_FIELDS = {  # what each template is filled with (ref_answer_2: when the reference answer has two turns)
    "single-v1": ("question", "answer"),
    "single-math-v1": ("question", "answer", "ref_answer_1", "ref_answer_2"),
    "single-v1-multi-turn": ("question_1", "question_2", "answer_1", "answer_2"),
    "single-math-v1-multi-turn": ("question_1", "question_2", "answer_1", "answer_2", "ref_answer_1", "ref_answer_2"),
}


def parse_rating(judgment: str) -> float:
    """FastChat's rating: `[[x]]`, else `[x]`; -1 when neither is there, or (unlike FastChat, which would average
    it in) when x is off the templates' scale of 1 to 10."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not match:
        return -1
    rating = ast.literal_eval(match.group(1))
    return rating if 1 <= rating <= 10 else -1


class JudgeUnavailable(Exception):
    """The judge did not answer after all retries (or refused the request for good)."""


class _RedactRecords(logging.Filter):
    """A log record's text with the key redacted (a filter on the network libraries' loggers)."""

    def __init__(self, redact):
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), ()
        return True


def _network_loggers() -> list[logging.Logger]:
    """The NETWORK_LOGGERS and their children (a logger's filters see only the records made on it)."""
    names = [n for n in logging.root.manager.loggerDict if any(n == p or n.startswith(p + ".") for p in NETWORK_LOGGERS)]
    return [logging.getLogger(n) for n in sorted({*NETWORK_LOGGERS, *names})]


@dataclass
class JudgeClient:
    """A chat-completions endpoint: `complete(system, user)` returns the judge's text."""

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 120.0
    max_retries: int = 8
    temperature: float = 0.0
    max_tokens: int = 2048

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        self.base_url = urllib.parse.urlunsplit(parts._replace(query="", fragment=""))
        self.query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))  # sent with every request
        secrets = (self.api_key, parts.password, *(v for v in self.query.values() if len(v) >= 8))  # a key, not `v=1`
        redactors = [Redactor(secret) for secret in secrets]
        self.redact = lambda text: functools.reduce(lambda done, redactor: redactor(done), redactors, text)
        self._openai = None  # made by the first request, then reused (one connection pool)

    @property
    def public_endpoint(self) -> str:
        """The endpoint for messages: without user:password@."""
        return public_url(self.endpoint)

    def _client(self):
        """The `openai` client of this endpoint: its timeout and retries; direct to a judge on this machine.

        The key is always given (a placeholder without one, whose header is then omitted), so that the client
        never falls back to an OPENAI_API_KEY the recipe did not name (and the redactor does not know)."""
        import openai

        if self._openai is None:
            local = on_this_machine(self.url)
            self._openai = openai.OpenAI(
                base_url=self.base_url, default_query=self.query or None, api_key=self.api_key or "no-key", timeout=self.timeout,
                max_retries=self.max_retries, http_client=openai.DefaultHttpxClient(trust_env=False) if local else None,
            )
        return self._openai

    def complete(self, system: str, user: str) -> str:
        """The judge's text for one request, with the API key redacted from it (and from every error)."""
        import openai

        guard = _RedactRecords(self.redact)
        loggers = _network_loggers()
        for logger in loggers:
            logger.addFilter(guard)
        try:
            response = self._client().chat.completions.create(
                model=self.model,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                temperature=self.temperature, max_tokens=self.max_tokens, n=1,
                extra_headers=None if self.api_key else {"Authorization": openai.Omit()},
            )
            return self._content(response)
        except openai.APIStatusError as err:
            raise JudgeUnavailable(self._status_problem(err)) from None
        except json.JSONDecodeError as err:  # a 200 whose body is not JSON (a proxy's page, an empty body)
            raise JudgeUnavailable(f"HTTP 200 with a body that is not JSON ({clip(self.redact(str(err)), 120)})") from None
        except openai.APIConnectionError as err:
            cause = err.__cause__ or err
            problem = f"timed out after {self.timeout:g} s" if isinstance(err, openai.APITimeoutError) else (
                f"{type(cause).__name__}: {cause}")
            raise JudgeUnavailable(f"{clip(self.redact(problem), 300)}, after {self.max_retries + 1} tries") from None
        finally:
            for logger in loggers:
                logger.removeFilter(guard)

    def _content(self, response) -> str:
        """The message content of a chat completion, redacted; JudgeUnavailable when it is not one."""
        if isinstance(response, (str, bytes)):  # the client hands over a body that is not JSON as it came
            text = response.decode("utf-8", "replace") if isinstance(response, bytes) else response
            raise JudgeUnavailable(f"HTTP 200 with a body that is not JSON ({clip(self.redact(text), 120)})")
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError) as err:
            raise JudgeUnavailable(clip(self.redact(f"unexpected response ({type(err).__name__}: {err})"), 300)) from None
        if not isinstance(content, str):
            raise JudgeUnavailable(f"unexpected response (the message content is {type(content).__name__}, not text)")
        return self.redact(content)

    def _status_problem(self, err) -> str:
        """`HTTP <status> <reason> <body>`, redacted and cut; whether it was retried."""
        response = err.response
        line = f"HTTP {response.status_code} {self.redact(response.reason_phrase)} {self._text(response.text)}"
        retried = response.status_code in RETRY_STATUS or response.status_code >= 500
        return clip(line, 300) + (f", after {self.max_retries + 1} tries" if retried else " (not retried)")

    def _text(self, body: str) -> str:
        """An error body as one redacted line; JSON is decoded first, so that an escaped key is seen as the key."""
        try:
            body = json.dumps(json.loads(body), ensure_ascii=False)
        except (ValueError, RecursionError):
            pass
        return self.redact(" ".join(body.split()))


def on_this_machine(url: str) -> bool:
    """Whether the URL's host is this machine (localhost, a loopback address)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_judge_prompts(path: str | Path, what: str = "eval.mt_bench.judge_prompts") -> dict[str, dict]:
    """judge_prompts.jsonl by name; the four single-answer templates must be there. `what` names it when absent."""
    with reading(path):
        prompts = {p.get("name"): p for p in read_jsonl(path, what)}
    missing = [n for n in TEMPLATES.values() if n not in prompts]
    if missing:
        raise UserError(f"missing judge templates {one_of(missing)}", where=str(path))
    for name in TEMPLATES.values():
        _check_template(prompts[name], path)
    return prompts


def _check_template(template: dict, path: str | Path) -> None:
    """A judge template has a string system_prompt and a prompt_template that str.format can fill with
    the fields its kind of judgment gets (TEMPLATE_FIELDS: a single-turn template has no answer_2)."""
    where = f"{path}: template {template['name']}"
    if not isinstance(template.get("system_prompt"), str) or not isinstance(template.get("prompt_template"), str):
        raise UserError("needs string fields system_prompt and prompt_template", where=where)
    fields = TEMPLATE_FIELDS[template["name"]]
    try:
        template["prompt_template"].format(**dict.fromkeys(fields, ""))
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise UserError(
            f"prompt_template cannot be filled ({type(err).__name__}: {clip(str(err), 80)}); a {template['name']} "
            f"judgment has the fields {', '.join('{' + f + '}' for f in fields)}", where=where,
        ) from None


def load_reference_answers(path: str | Path, what: str = "eval.mt_bench.reference_answers") -> dict[int, dict]:
    """Reference answers (FastChat model_answer format) by question_id. `what` names the file when absent."""
    refs = {}
    with reading(path):
        records = read_jsonl(path, what)
    for i, rec in enumerate(records):
        try:
            turns = rec["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            turns = None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise UserError(f"line {i + 1}: expected choices[0].turns, a non-empty list of strings", where=str(path))
        refs[rec.get("question_id")] = rec
    return refs


def judge_request(question: dict, answer: dict, turn: int, prompts: dict, refs: dict) -> tuple[str, str, str]:
    """(template name, system prompt, user prompt) for judging `turn` (1 or 2) of an answer."""
    needs_ref = question["category"] in NEED_REF_CATS
    template = prompts[TEMPLATES[(turn == 2, needs_ref)]]
    kwargs = {}
    if needs_ref:
        ref_turns = refs[question["question_id"]]["choices"][0]["turns"]
        kwargs["ref_answer_1"] = ref_turns[0]
        if len(ref_turns) > 1:
            kwargs["ref_answer_2"] = ref_turns[1]
    turns = answer["choices"][0]["turns"]
    if turn == 2:
        user = template["prompt_template"].format(
            question_1=question["turns"][0], question_2=question["turns"][1],
            answer_1=turns[0], answer_2=turns[1], **kwargs,
        )
    else:
        user = template["prompt_template"].format(question=question["turns"][0], answer=turns[0], **kwargs)
    return template["name"], template["system_prompt"], user


def check_judge_inputs(questions: list[dict], answers: dict[int, dict] | None, prompts: dict, refs: dict,
                       prompts_file: str | Path = "judge_prompts.jsonl") -> None:
    """Everything judging needs is there, before the first request: a reference answer where the category
    needs one, an answer to every question (None: not answered yet), and every template filled with the
    fields each of its judgments will get (a reference answer of one turn has no ref_answer_2)."""
    for q in questions:
        qid = q["question_id"]
        if q["category"] in NEED_REF_CATS and qid not in refs:
            raise UserError(f"question {qid} ({q['category']}) has no reference answer; the judge needs one")
        if answers is not None and qid not in answers:
            raise UserError(f"question {qid} has no answer to judge")
        placeholder = {"choices": [{"turns": [""] * len(q["turns"])}]}
        for turn in (1, 2)[: min(2, len(q["turns"]))]:
            try:
                judge_request(q, placeholder, turn, prompts, refs)
            except (KeyError, IndexError) as err:
                name = TEMPLATES[(turn == 2, q["category"] in NEED_REF_CATS)]
                raise UserError(
                    f"{prompts_file}: template {name}: uses {{{clip(str(err).strip(chr(39)), 40)}}}, which the judgment of question "
                    f"{qid} turn {turn} does not have (its reference answer has "
                    f"{len(refs.get(qid, {}).get('choices', [{}])[0].get('turns', []))} turn(s))"
                ) from None


def judge_answers(
    questions: list[dict],
    answers: dict[int, dict],
    prompts: dict,
    refs: dict,
    client: JudgeClient,
    judgment_file: str | Path,
    *,
    model_id: str,
    progress: bool = True,
) -> list[dict]:
    """Grade turn 1 and turn 2 of every answer; one judgment line appended per turn; skips judged turns."""
    check_judge_inputs(questions, answers, prompts, refs)
    judgment_file = Path(judgment_file)
    keys = [(q, t) for q in questions for t in (1, 2)[: min(2, len(q["turns"]))]]
    previous = read_jsonl_resumable(judgment_file)
    # A judgment counts for the answer it judged: answers made again (overwrite) are judged again.
    answer_ids = {qid: a.get("answer_id") for qid, a in answers.items()}
    done = {
        (r.get("question_id"), r.get("turn")): r
        for r in previous
        if r.get("model") == model_id and r.get("answer_id") == answer_ids.get(r.get("question_id"))
    }
    todo = [(q, t) for q, t in keys if (q["question_id"], t) not in done]
    with progress_bar(progress) as bar:
        job = bar.add_task("MT-Bench judge", total=len(keys), completed=len(keys) - len(todo))
        for q, turn in todo:
            name, system, user = judge_request(q, answers[q["question_id"]], turn, prompts, refs)
            try:
                judgment = client.complete(system, user)
            except JudgeUnavailable as err:
                judged = len(keys) - len(todo) + todo.index((q, turn))
                raise UserError(
                    f"the judge at {client.public_endpoint} is not answering ({err}); {judged} of {len(keys)} turns "
                    f"are judged and kept in {judgment_file}; run again to judge the rest"
                ) from None
            record = {
                "question_id": q["question_id"], "model": model_id, "answer_id": answer_ids[q["question_id"]],
                "judge": [client.model, name],
                "user_prompt": user, "judgment": judgment, "score": parse_rating(judgment),
                "turn": turn, "tstamp": time.time(),
            }
            append_jsonl(judgment_file, [record])
            done[(q["question_id"], turn)] = record
            bar.update(job, advance=1)
    return [done[(q["question_id"], t)] for q, t in keys]


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarize_scores(judgments: list[dict], questions: list[dict]) -> dict:
    """Mean score overall, per turn and per category, over judged turns with a valid score (not -1)."""
    category = {q["question_id"]: q["category"] for q in questions}
    valid = [j for j in judgments if j["score"] != -1]
    turns = sorted({j["turn"] for j in judgments})
    cats = sorted({category[j["question_id"]] for j in judgments})
    per_question: dict[str, list] = {}
    for j in judgments:
        per_question.setdefault(str(j["question_id"]), [None, None])[j["turn"] - 1] = j["score"]
    return {
        "overall": _mean([j["score"] for j in valid]),
        "turns": {str(t): _mean([j["score"] for j in valid if j["turn"] == t]) for t in turns},
        "categories": {c: _mean([j["score"] for j in valid if category[j["question_id"]] == c]) for c in cats},
        "judged_turns": len(judgments),
        "invalid_turns": len(judgments) - len(valid),
        "per_question": per_question,
    }
