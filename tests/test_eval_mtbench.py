"""MT-Bench: answers on a tiny model (FastChat format, resumable), judging against a stub
OpenAI-compatible server on 127.0.0.1 (fixed ratings, flaky, down), FastChat template semantics,
and the API key never reaching a file."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import tiny_llama

from dora_cli.errors import UserError
from dora_cli.eval import mtbench
from dora_cli.eval.judge import (
    JudgeClient,
    JudgeUnavailable,
    judge_request,
    load_judge_prompts,
    load_reference_answers,
    parse_rating,
    summarize_scores,
)
from dora_cli.eval.mtbench import conversation_prompt, evaluate_mt_bench, load_questions
from dora_cli.recipe import MTBenchConfig

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "DORA_TEST_JUDGE_KEY"
KEY = "sk-planted-0123456789abcdef"

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a poem about a cat.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2+3?", "And times 4?"]},
    {"question_id": 131, "category": "extraction", "turns": ["Extract the year: {born 1990}.", "Now the month."]},
]
REFS = [{"question_id": 111, "answer_id": "r", "model_id": "gpt-4",
         "choices": [{"index": 0, "turns": ["2+3 = 5", "5*4 = 20"]}], "tstamp": 0}]
SINGLE = "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
MULTI = ("### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n"
         "### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's Conversation with User|>")
JUDGE_PROMPTS = [
    {"name": "single-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Instruction] rate it\n\n" + SINGLE, "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Instruction] rate with ref\n\n[Question]\n{question}\n\n[Ref]\n{ref_answer_1}\n[/Ref]\n\n" + SINGLE.split("\n\n", 1)[1],
     "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Judge the second turn.",
     "prompt_template": MULTI, "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "Judge the second turn with refs.",
     "prompt_template": "[Ref] {ref_answer_1} | {ref_answer_2} [/Ref]\n" + MULTI, "output_format": "[[rating]]"},
]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def bench_files(tmp_path) -> Path:
    d = tmp_path / "mt_bench"
    write_jsonl(d / "question.jsonl", QUESTIONS)
    write_jsonl(d / "judge_prompts.jsonl", JUDGE_PROMPTS)
    write_jsonl(d / "reference_answer" / "gpt-4.jsonl", REFS)
    return d


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=512)


# --- the stub judge ----------------------------------------------------------------------------------


class StubJudge:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 in a thread.

    Ratings: 8 for turn 1, 6 for turn 2, 3 for any math question (whose prompt has a reference).
    `fail_every=2`: every second request gets HTTP 500 (its body echoes the Authorization header);
    `down_after=n`: from the (n+1)-th request on, HTTP 503 always. Failures echo the header in their reason
    phrase too, and say `retry-after-ms: 1`, which the client honours instead of its own backoff.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_every = 0
        self.down_after: int | None = None
        self.count = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                stub.count += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization", "")
                failing = (stub.fail_every and stub.count % stub.fail_every == 0) or (
                    stub.down_after is not None and stub.count > stub.down_after
                )
                path, _, query = self.path.partition("?")
                if path != "/v1/chat/completions":
                    self._send(404, {"error": "no such route"})
                    return
                if failing:
                    self._send(500 if stub.down_after is None else 503, {"error": f"boom, your header was {auth}, query {query}"},
                               {"retry-after-ms": "1"}, reason=f"Boom {auth}")
                    return
                stub.requests.append({"body": body, "auth": auth, "query": urllib.parse.parse_qs(query)})
                user = body["messages"][1]["content"]
                if "[Ref]" in user:
                    text = "Compared with the reference... Rating: [[3]]"
                elif "Assistant A's Conversation" in user:
                    text = "The second answer is fine. Rating: [[6]]"
                else:
                    text = "Good. Rating: [[8]]"
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

            def _send(self, code, payload, headers=None, reason=None):
                data = json.dumps(payload).encode()
                self.send_response(code, reason)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge():
    stub = StubJudge()
    yield stub
    stub.close()


FAST_JUDGE = {"max_retries": 3, "timeout": 10}


def config(bench_files: Path, judge_url: str | None) -> MTBenchConfig:
    return MTBenchConfig(
        questions=str(bench_files / "question.jsonl"), judge_url=judge_url, judge_model="stub-judge",
        judge_api_key_env=KEY_ENV, max_new_tokens=5, judge_timeout=FAST_JUDGE["timeout"],
        judge_max_retries=FAST_JUDGE["max_retries"],
    )


def all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


# --- answers -----------------------------------------------------------------------------------------


def test_answers_in_fastchat_format_and_resumed(model, tok, bench_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    m = evaluate_mt_bench(model, tok, out, config(bench_files, None), model_id="tiny/ckpt", progress=False)
    assert "note: eval.mt_bench.judge_model is 'stub-judge' but no judge_url is set" in capsys.readouterr().err
    answer_file = out / "model_answer" / "tiny_ckpt.jsonl"
    rows = [json.loads(line) for line in answer_file.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 111, 131]
    for r in rows:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert r["model_id"] == "tiny/ckpt" and len(r["choices"]) == 1 and r["choices"][0]["index"] == 0
        assert len(r["choices"][0]["turns"]) == 2 and all(isinstance(t, str) for t in r["choices"][0]["turns"])
    assert m["scores"] is None and m["questions"] == 3
    assert json.loads((out / "metrics.json").read_text()) == m

    # Resumed per question: a killed run left two answers; only the third is generated.
    answer_file.write_text("".join(line + "\n" for line in answer_file.read_text().splitlines()[:2]))
    asked = []
    real = mtbench.answer_turn
    monkeypatch.setattr(mtbench, "answer_turn", lambda *a, **k: asked.append(a[2]) or real(*a, **k))
    evaluate_mt_bench(model, tok, out, config(bench_files, None), model_id="tiny/ckpt", progress=False)
    assert len(asked) == 2 and "Extract the year" in asked[0]  # question 131, both turns
    assert [json.loads(line)["question_id"] for line in answer_file.read_text().splitlines()] == [81, 111, 131]


def test_greedy_answers_are_deterministic_and_sampling_is_seeded(model, tok, bench_files, tmp_path):
    a = evaluate_mt_bench(model, tok, tmp_path / "a", config(bench_files, None), model_id="m", progress=False)
    b = evaluate_mt_bench(model, tok, tmp_path / "b", config(bench_files, None), model_id="m", progress=False)
    turns = [
        [json.loads(line)["choices"][0]["turns"] for line in Path(x["answers"]).read_text().splitlines()] for x in (a, b)
    ]
    assert turns[0] == turns[1]  # writing samples at 0.7, but with seed 0 per question


def test_conversation_prompts(tok):
    text, special = conversation_prompt(tok, ["Q1"], [])
    assert special and text.endswith("### Instruction:\nQ1\n\n### Response:\n")
    text2, _ = conversation_prompt(tok, ["Q1", "Q2"], ["A1"])
    assert text2 == text + "A1\n\n### Instruction:\nQ2\n\n### Response:\n"

    chat = tok.__class__.from_pretrained(str(ROOT / "data" / "tiny_tokenizer"))
    chat.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    text3, special3 = conversation_prompt(chat, ["Q1", "Q2"], ["A1"])
    assert not special3 and text3 == "<|user|>Q1\n<|assistant|>A1\n<|user|>Q2\n<|assistant|>"


# --- judging -----------------------------------------------------------------------------------------


def test_judged_scores_match_the_stub(model, tok, bench_files, tmp_path, judge, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "out"
    m = evaluate_mt_bench(model, tok, out, config(bench_files, judge.url), model_id="m", progress=False,
                          expected={"mt_bench": 5.5})
    # writing, extraction: 8 then 6; math: 3 and 3 (reference templates)
    assert m["scores"]["overall"] == pytest.approx((8 + 6 + 3 + 3 + 8 + 6) / 6, abs=1e-3)
    assert m["scores"]["turns"] == {"1": pytest.approx(19 / 3, abs=1e-3), "2": pytest.approx(5.0)}
    assert m["scores"]["categories"] == {"extraction": 7.0, "math": 3.0, "writing": 7.0}
    assert m["scores"]["per_question"] == {"81": [8, 6], "111": [3, 3], "131": [8, 6]}
    assert m["expected"] == {"mt_bench": 5.5} and m["difference"]["mt_bench"] == pytest.approx(34 / 6 - 5.5, abs=1e-3)
    assert m["judge"]["model"] == "stub-judge" and json.loads((out / "metrics.json").read_text()) == m

    assert len(judge.requests) == 6
    for r in judge.requests:
        body = r["body"]
        assert r["auth"] == f"Bearer {KEY}"
        assert body["model"] == "stub-judge" and body["temperature"] == 0 and body["max_tokens"] == 2048 and body["n"] == 1
        assert [msg["role"] for msg in body["messages"]] == ["system", "user"]
    users = [r["body"]["messages"][1]["content"] for r in judge.requests]
    assert any("{born 1990}" in u for u in users)  # braces in the data survive str.format
    assert any("2+3 = 5" in u and "5*4 = 20" in u for u in users)  # both reference turns for math turn 2

    lines = [json.loads(line) for line in (out / "model_judgment" / "stub-judge_single.jsonl").read_text().splitlines()]
    assert {(j["question_id"], j["turn"]) for j in lines} == {(q, t) for q in (81, 111, 131) for t in (1, 2)}
    names = {(j["question_id"], j["turn"]): j["judge"] for j in lines}
    assert names[(81, 1)] == ["stub-judge", "single-v1"] and names[(81, 2)] == ["stub-judge", "single-v1-multi-turn"]
    assert names[(111, 1)] == ["stub-judge", "single-math-v1"] and names[(111, 2)] == ["stub-judge", "single-math-v1-multi-turn"]

    # Run again: nothing is asked again.
    judge.requests.clear()
    again = evaluate_mt_bench(model, tok, out, config(bench_files, judge.url), model_id="m", progress=False,
                              expected={"mt_bench": 5.5})
    assert judge.requests == [] and again["scores"] == m["scores"]
    assert KEY.encode() not in all_bytes(out)


def test_flaky_judge_completes_through_retries(model, tok, bench_files, tmp_path, judge, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    judge.fail_every = 2  # HTTP 500 on every second request
    m = evaluate_mt_bench(model, tok, tmp_path, config(bench_files, judge.url), model_id="m", progress=False)
    assert m["scores"]["judged_turns"] == 6 and m["scores"]["overall"] == pytest.approx(34 / 6, abs=1e-3)
    assert judge.count >= 11  # 6 answers and the failures in between
    assert KEY.encode() not in all_bytes(tmp_path)


def test_judge_down_keeps_judged_turns_and_resumes(model, tok, bench_files, tmp_path, judge, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    judge.down_after = 2
    with pytest.raises(UserError) as err:
        evaluate_mt_bench(model, tok, tmp_path, config(bench_files, judge.url), model_id="m", progress=False)
    msg = str(err.value)
    judgment_file = tmp_path / "model_judgment" / "stub-judge_single.jsonl"
    assert "2 of 6 turns are judged" in msg and str(judgment_file) in msg and "HTTP 503" in msg and "4 tries" in msg
    assert KEY not in msg and "***" in msg  # the echoed header is redacted
    assert len(judgment_file.read_text().splitlines()) == 2
    assert not (tmp_path / "metrics.json").exists()
    assert KEY.encode() not in all_bytes(tmp_path)

    judge.down_after = None
    judge.requests.clear()
    m = evaluate_mt_bench(model, tok, tmp_path, config(bench_files, judge.url), model_id="m", progress=False)
    assert len(judge.requests) == 4 and m["scores"]["judged_turns"] == 6
    assert KEY.encode() not in all_bytes(tmp_path)


def test_judge_refusal_is_not_retried(judge):
    from dora_cli.eval.judge import JudgeUnavailable

    client = JudgeClient(judge.url.replace("/v1", "/nope") + "/", "stub", None, **FAST_JUDGE)
    assert client.endpoint == judge.url.replace("/v1", "/nope") + "/chat/completions"
    with pytest.raises(JudgeUnavailable, match="HTTP 404.*not retried"):
        client.complete("s", "u")
    assert judge.count == 1


def test_unreachable_judge_is_retried_then_reported():
    from dora_cli.eval.judge import JudgeUnavailable

    client = JudgeClient("http://127.0.0.1:9", "stub", KEY, max_retries=2, timeout=2)
    with pytest.raises(JudgeUnavailable, match="after 3 tries"):
        client.complete("s", "u")


def test_without_a_key_no_authorization_is_sent_whatever_openai_api_key_holds(judge, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-someone-elses-key-0123456789")
    assert JudgeClient(judge.url, "stub", None, **FAST_JUDGE).complete("s", "u") == "Good. Rating: [[8]]"
    assert judge.requests[-1]["auth"] == ""


def test_a_judge_that_never_answers_is_given_up_after_the_recipes_timeout_and_retries(model, tok, bench_files, tmp_path,
                                                                                       monkeypatch):
    import socket
    import time

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = config(bench_files, f"http://127.0.0.1:{silent.getsockname()[1]}/v1").model_copy(
        update={"judge_timeout": 0.5, "judge_max_retries": 1})
    started = time.monotonic()
    try:
        with pytest.raises(UserError, match="judge"):
            evaluate_mt_bench(model, tok, tmp_path / "out", cfg, model_id="m", progress=False)
    finally:
        silent.close()
    assert time.monotonic() - started < 60  # the defaults (120 s x 9 tries) would wait 18 minutes


def test_a_query_in_the_judge_url_goes_with_every_request_and_is_kept_out_of_messages(judge):
    secret = "query-key-0123456789"
    client = JudgeClient(f"{judge.url}?api_key={secret}&v=1", "stub", None, **FAST_JUDGE)
    assert client.complete("s", "u") == "Good. Rating: [[8]]"
    assert judge.requests[-1]["query"] == {"api_key": [secret], "v": ["1"]}
    judge.down_after = 0
    with pytest.raises(JudgeUnavailable) as info:
        JudgeClient(f"{judge.url}?api_key={secret}", "stub", None, timeout=5, max_retries=0).complete("s", "u")
    assert "your header was , query api_key=" in str(info.value) and secret not in str(info.value)


def test_log_records_of_the_network_libraries_are_redacted(judge, monkeypatch):
    """With OPENAI_LOG=debug (or a caller's logging), httpx logs each reason phrase and openai each request:
    an endpoint that echoes the key there must not get it printed."""
    import logging

    monkeypatch.setenv(KEY_ENV, KEY)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("openai", "httpx2", "httpx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    judge.fail_every = 2  # the 500s echo the Authorization header in their body and reason phrase
    try:
        client = JudgeClient(judge.url, "stub", KEY, **FAST_JUDGE)
        for _ in range(3):
            client.complete("s", "u")
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
            logger.removeHandler(handler)
    assert len(records) > 3 and any("Retrying" in r for r in records)
    assert not [r for r in records if KEY in r or KEY[8:20] in r]


def test_missing_reference_is_refused_before_any_answer(model, tok, bench_files, tmp_path, judge, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    write_jsonl(bench_files / "reference_answer" / "gpt-4.jsonl", [])
    with pytest.raises(UserError, match="question 111 .math. has no reference answer"):
        evaluate_mt_bench(model, tok, tmp_path / "out", config(bench_files, judge.url), model_id="m", progress=False)
    assert not (tmp_path / "out").exists() and judge.count == 0


@pytest.mark.parametrize(
    ("text", "rating"),
    [("Rating: [[7]]", 7), ("[[8.5]] and later [[2]]", 8.5), ("Rating: [9]", 9), ("[[10]]", 10),
     ("no rating", -1), ("Rating: [[x]]", -1), ("[[3]] [4]", 3), ("Rating: [[11]]", -1), ("[[0]]", -1),
     ("[[10.5]]", -1), ("[[1]]", 1)],
)
def test_parse_rating_as_fastchat(text, rating):
    assert parse_rating(text) == rating


def test_scores_skip_invalid_ratings():
    qs = [{"question_id": 1, "category": "a", "turns": ["x", "y"]}, {"question_id": 2, "category": "b", "turns": ["x", "y"]}]
    js = [{"question_id": 1, "turn": 1, "score": 4}, {"question_id": 1, "turn": 2, "score": -1},
          {"question_id": 2, "turn": 1, "score": 6}, {"question_id": 2, "turn": 2, "score": 8}]
    s = summarize_scores(js, qs)
    assert s["overall"] == 6.0 and s["turns"] == {"1": 5.0, "2": 8.0} and s["categories"] == {"a": 4.0, "b": 7.0}
    assert s["invalid_turns"] == 1 and s["per_question"]["1"] == [4, -1]


def test_bad_question_file(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "x", "turns": []}])
    with pytest.raises(UserError, match="line 1: 'turns'"):
        load_questions(p)
    with pytest.raises(UserError, match="does not exist"):
        load_questions(tmp_path / "absent.jsonl")


def test_real_fastchat_files_fill_every_template(shared_data):
    """The shared MT-Bench files: 80 questions, references for math / reasoning / coding, the 4 templates."""
    d = shared_data / "mt_bench"
    questions = load_questions(d / "question.jsonl")
    prompts = load_judge_prompts(d / "judge_prompts.jsonl")
    refs = load_reference_answers(d / "reference_answer" / "gpt-4.jsonl")
    assert len(questions) == 80
    used = set()
    for q in questions:
        answer = {"choices": [{"turns": ["FIRST {x}", "SECOND"]}]}
        for turn in (1, 2):
            name, system, user = judge_request(q, answer, turn, prompts, refs)
            used.add(name)
            assert ("FIRST {x}" in user) and (("SECOND" in user) == (turn == 2)) and system
            if q["category"] in ("math", "reasoning", "coding"):
                assert refs[q["question_id"]]["choices"][0]["turns"][0] in user
    assert used == {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"}


@pytest.mark.parametrize("body,content_type", [(b"<html>a proxy's page</html>", "text/html"), (b"not json", "application/json"),
                                               (b"", "application/json"), (b"[1, 2]", "application/json"),
                                               (b'{"choices": []}', "application/json")])
def test_a_judge_answering_200_with_what_is_not_a_chat_completion_is_one_line(body, content_type):
    """HTTP 200 whose body is not a JSON chat completion (a proxy's page, an empty body, another JSON): the
    client's error, never a traceback (issue 23)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dora_cli.eval.judge import JudgeClient, JudgeUnavailable

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = JudgeClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", "key", max_retries=0, timeout=5)
        with pytest.raises(JudgeUnavailable, match="HTTP 200 with a body that is not JSON|unexpected response"):
            client.complete("s", "u")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("value", [None, ""])
@pytest.mark.parametrize("variable", [KEY_ENV, "OPENAI_API_KEY"])
def test_no_key_for_a_judge_elsewhere_is_refused_before_any_answer(model, tok, bench_files, tmp_path, monkeypatch,
                                                                    variable, value):
    if value is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, value)
    cfg = config(bench_files, "https://judge.example/v1").model_copy(update={"judge_api_key_env": variable})
    with pytest.raises(UserError, match=f"^eval.mt_bench.judge_api_key_env: {variable} is not set or is empty, and the "
                                        "judge at https://judge.example/v1 is not on this machine"):
        evaluate_mt_bench(model, tok, tmp_path / "out", cfg, model_id="m", progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(variable, KEY)
    assert mtbench.mt_bench_inputs(cfg)[1][2] == KEY
    assert mtbench.mt_bench_inputs(cfg.model_copy(update={"judge_api_key_env": None}))[1][2] is None  # null: no key


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_key_variable_name_is_refused(bench_files, name):
    cfg = config(bench_files, "http://127.0.0.1:9/v1").model_copy(update={"judge_api_key_env": name})
    with pytest.raises(UserError, match="^eval.mt_bench.judge_api_key_env: empty: name the environment variable"):
        mtbench.mt_bench_inputs(cfg)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_no_key_for_a_judge_on_this_machine_calls_it_without_one_and_says_so(model, tok, bench_files, tmp_path, judge,
                                                                            monkeypatch, capsys, host):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = config(bench_files, judge.url.replace("127.0.0.1", host)).model_copy(update={"judge_api_key_env": "OPENAI_API_KEY"})
    m = evaluate_mt_bench(model, tok, tmp_path / "out", cfg, model_id="m", progress=False)
    assert m["scores"]["judged_turns"] == 6 and {r["auth"] for r in judge.requests} == {""}
    assert f"note: OPENAI_API_KEY is not set: the judge at http://{host}" in capsys.readouterr().err


@pytest.mark.parametrize(("missing", "setting", "says"), [
    ("question.jsonl", None, "eval.mt_bench.questions: {path} does not exist"),
    ("judge_prompts.jsonl", None, "eval.mt_bench.judge_prompts (unset: beside eval.mt_bench.questions): {path} does not exist"),
    ("judge_prompts.jsonl", "judge_prompts", "eval.mt_bench.judge_prompts: {path} does not exist"),
    ("reference_answer/gpt-4.jsonl", None, "eval.mt_bench.reference_answers (unset: beside eval.mt_bench.questions): {path}"),
    ("reference_answer/gpt-4.jsonl", "reference_answers", "eval.mt_bench.reference_answers: {path} does not exist"),
])
def test_a_missing_input_is_named_by_its_recipe_key(bench_files, missing, setting, says):
    path = bench_files / missing
    path.unlink()
    cfg = config(bench_files, "http://127.0.0.1:9/v1").model_copy(update={"judge_api_key_env": "OPENAI_API_KEY"})
    if setting:
        cfg = cfg.model_copy(update={setting: str(path)})
    with pytest.raises(UserError) as info:
        mtbench.mt_bench_inputs(cfg)
    assert str(info.value).startswith(says.format(path=path))
