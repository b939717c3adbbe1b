"""The judge's API key never reaches stdout, stderr or a file, whatever the endpoint sends back (issue 13).

A stub judge on 127.0.0.1 echoes the request it received (the Authorization header and the body) in
every form an endpoint could use: as sent, after 190 characters of padding (so that a key straddles the
200-character cut of an error line), URL-encoded, base64-encoded, JSON-escaped, cut short, and in the
HTTP reason phrase; in a 200 answer (the judgment that is stored) and in 400 / 500 error bodies (the
error line that is printed). The checks look for the key's every form and for any 12 of its
consecutive characters.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT

from dora_cli import cli
from dora_cli.eval.judge import JudgeClient, JudgeUnavailable
from dora_cli.eval.redact import FRAGMENT, Redactor, public_url

KEY = "sk-test_9f+Q/x=" + "aB3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gI3kM5oQ7"
KEY_ENV = "DORA_SECRETS_TEST_KEY"
ECHOES = ["raw", "padded", "url", "base64", "json-escaped", "cut-short", "in-reason"]


def key_forms() -> list[str]:
    """Every 12-character window of the key and of its URL-encoded and base64 forms."""
    forms = {KEY, urllib.parse.quote(KEY, safe=""), urllib.parse.quote_plus(KEY)}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for offset in range(3):
            text = encode(b"\0" * offset + KEY.encode()).decode()
            forms.add(text[3 : len(text) - 4])
    return sorted({f[i : i + 12] for f in forms for i in range(len(f) - 11)})


def leaks(text: str) -> list[str]:
    return [w for w in key_forms() if w in text]


def echo(mode: str, request_text: str) -> str:
    """What an endpoint sends back about a request, in one of the ECHOES forms."""
    if mode == "padded":
        return "x" * 190 + request_text
    if mode == "url":
        return urllib.parse.quote(request_text)
    if mode == "base64":
        return base64.b64encode(request_text.encode()).decode()
    if mode == "cut-short":
        start = request_text.index(KEY)
        return request_text[: start + 20]
    return request_text


class EchoJudge:
    """An OpenAI-compatible endpoint that answers every request with the request itself (see ECHOES)."""

    def __init__(self, status: int, modes: list[str]):
        self.status, self.modes, self.count = status, modes, 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                request_text = f"{self.requestline}\r\n{self.headers}\r\n{body}"
                mode = stub.modes[stub.count % len(stub.modes)]
                stub.count += 1
                text = echo(mode, request_text)
                reason = f"Bad key {self.headers.get('Authorization')}" if mode == "in-reason" else None
                if stub.status == 200:
                    content = {"choices": [{"message": {"role": "assistant", "content": text + " Rating: [[5]]"}}]}
                else:
                    content = {"error": {"message": text}}
                data = json.dumps(content, ensure_ascii=mode != "json-escaped").encode()
                if mode == "json-escaped":  # every character of the key as a \\u escape
                    data = data.replace(KEY.encode(), "".join(f"\\u{ord(c):04x}" for c in KEY).encode())
                self.send_response(stub.status, reason)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def echo_judge(request):
    status, modes = request.param
    stub = EchoJudge(status, modes)
    yield stub
    stub.close()


def client(stub: EchoJudge) -> JudgeClient:
    return JudgeClient(stub.url, "echo", KEY, max_retries=1, timeout=10)


# --------------------------------------------------------------------------------------------------
# The client: the judgment and every error message are redacted


@pytest.mark.parametrize("echo_judge", [(200, [m]) for m in ECHOES], indirect=True, ids=ECHOES)
def test_an_echoed_key_never_reaches_the_judgment(echo_judge):
    text = client(echo_judge).complete("system", "user prompt")
    assert "Rating: [[5]]" in text and len(text) > 120  # the echo came back (cut short: ~150 characters)...
    assert leaks(text) == []  # ...without the key


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("echo_judge", [(None, [m]) for m in ECHOES], indirect=True, ids=ECHOES)
def test_an_echoed_key_never_reaches_an_error_message(echo_judge, status):
    echo_judge.status = status
    with pytest.raises(JudgeUnavailable) as info:
        client(echo_judge).complete("system", "user prompt")
    message = str(info.value)
    assert f"HTTP {status}" in message and leaks(message) == []


# --------------------------------------------------------------------------------------------------
# The whole command: stdout, stderr and every file written


@pytest.fixture(scope="module")
def tiny_final(tmp_path_factory) -> Path:
    from dora_cli import train

    out = tmp_path_factory.mktemp("secrets-run") / "run"
    train.run_train(str(ROOT / "recipes" / "smoke.yaml"), [f"output_dir={out}", "train.max_steps=1",
                                                          "train.save_every=null", "data.val_set_size=0"])
    return out / "final"


def bench(tmp: Path) -> Path:
    questions = [{"question_id": i, "category": "writing", "turns": [f"Question {i}?", "More?"]} for i in range(4)]
    names = ["single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"]
    prompts = [{"name": n, "system_prompt": "s", "prompt_template": "{question}{answer}" if "multi" not in n
                else "{question_1}{answer_1}{question_2}{answer_2}"} for n in names]
    (tmp / "bench").mkdir()
    (tmp / "bench" / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp / "bench" / "judge_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return tmp / "bench" / "question.jsonl"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("echo_judge", [(200, ECHOES), (400, ECHOES), (503, ["padded"])], indirect=True,
                         ids=["judgments", "refused", "down"])
def test_dora_eval_keeps_the_key_out_of_every_output(echo_judge, tiny_final, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr("dora_cli.eval.judge.time.sleep", lambda seconds: None)  # retries without the backoff
    run = tmp_path / "run"
    shutil.copytree(tiny_final.parent, run)
    argv = ["dora", "eval", str(run / "final"), "--suite", "mt_bench", "--questions", str(bench(tmp_path)),
            "--judge-url", echo_judge.url, "--judge-model", "echo", "--out", str(tmp_path / "out"),
            "eval.mt_bench.max_new_tokens=4", f"eval.mt_bench.judge_api_key_env={KEY_ENV}"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code
    out, err = capfd.readouterr()
    assert code == (0 if echo_judge.status == 200 else 2), err
    assert echo_judge.count >= 1
    files = {p: p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()}
    if echo_judge.status == 200:
        judgments = [p for p in files if p.parent.name == "model_judgment"]
        assert judgments and "Bearer ***" in files[judgments[0]]  # the echoes were stored, redacted
    else:
        assert err.splitlines()[-1].startswith("error: the judge at http://127.0.0.1:") and "Traceback" not in err
    assert leaks(out) == [] and leaks(err) == []
    assert {str(p): leaks(text) for p, text in files.items() if leaks(text)} == {}


# --------------------------------------------------------------------------------------------------
# The redactor itself


@pytest.mark.parametrize("cut", range(0, len(KEY) - FRAGMENT + 1, 5))
def test_any_long_enough_part_of_the_key_is_redacted(cut):
    redact = Redactor(KEY)
    for part in (KEY[cut:], KEY[: len(KEY) - cut], KEY[cut : cut + FRAGMENT + 3]):
        assert part not in redact(f"before {part} after")


def test_text_without_the_key_is_left_alone():
    redact = Redactor(KEY)
    text = "The answer is correct and helpful. Rating: [[8]] (sk-test is a prefix, not the key)"
    assert redact(text) == text
    assert Redactor(None)(KEY) == KEY and Redactor("")(text) == text


def test_credentials_in_the_judge_url_are_not_shown():
    assert public_url("https://u:p@host:8/v1") == "https://host:8/v1"
    assert public_url("http://host/v1") == "http://host/v1"
    assert public_url("http://host/v1?key=abc#frag") == "http://host/v1"
    judge = JudgeClient("http://user:hunter2secret@127.0.0.1:9/v1", "m", KEY, max_retries=0, timeout=2)
    assert judge.public_endpoint == "http://127.0.0.1:9/v1/chat/completions"
    with pytest.raises(JudgeUnavailable) as info:
        judge.complete("s", "u")
    assert "hunter2secret" not in str(info.value) and KEY not in repr(judge)


# --------------------------------------------------------------------------------------------------
# ${env:...}: a value taken from the environment is used, never saved or printed (issue 23)

PLANTED_ENV = "DORA_PLANTED_KEY"
# Every kind of place a recipe file can name an environment variable and still train: strings of every
# section (eval's judge settings, launch, a data source's split), a whole value and part of one, in the
# recipe and in the base file it inherits from.
PLANTED_BASE = f"""
eval:
  mt_bench:
    judge_model: judge-${{env:{PLANTED_ENV}}}
launch:
  main_process_ip: ${{env:{PLANTED_ENV}}}
"""
PLANTED = f"""
data:
  sources:
    - path: data/smoke/train.json
      split: ${{env:{PLANTED_ENV}}}
eval:
  mt_bench:
    judge_url: http://user:${{env:{PLANTED_ENV}}}@judge.example/v1?key=${{env:{PLANTED_ENV}}}
    judge_api_key_env: ${{env:DORA_PLANTED_UNSET,OPENAI_API_KEY}}
    questions: ${{env:DORA_PLANTED_UNSET,bench}}/${{env:{PLANTED_ENV}}}.jsonl
"""


def planted_recipe(tmp: Path) -> Path:
    text = (ROOT / "recipes" / "smoke.yaml").read_text()
    base = tmp / "base.yaml"
    base.write_text(text.replace("output_dir: runs/smoke", f"output_dir: {tmp / 'run'}")
                    .replace("eval:\n", "eval:" + PLANTED_BASE.split("eval:", 1)[1].split("launch:")[0], 1)
                    + "launch:" + PLANTED_BASE.split("launch:", 1)[1])
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"base: {base}\n" + PLANTED)
    return recipe


@pytest.mark.usefixtures("one_thread")
def test_a_key_planted_through_env_references_is_never_written_or_printed(tmp_path, monkeypatch, capfd):
    from conftest import dora_in_process

    secret = "sk-planted" + "Q7x9Zr2LmN4vB8cD1eF3gH5jK"
    monkeypatch.setenv(PLANTED_ENV, secret)
    recipe = planted_recipe(tmp_path)
    run = tmp_path / "run"
    fast = ["train.max_steps=3", "train.save_every=1", "train.log_every=1", "data.val_set_size=4", "train.eval_every=2"]
    commands = [
        ["train", recipe, "--dry-run", *fast],
        ["train", recipe, *fast, "train.report_to=[tensorboard]"],
        ["eval", run / "final", "--out", tmp_path / "ev", "--limit", "2", "--tasks", "boolq", "--mode", "loglik",
         "--data-dir", ROOT / "data" / "smoke" / "commonsense"],
        ["merge", run / "final", "--out", tmp_path / "merged"],
        ["analyze", run / "final", "--out", tmp_path / "an"],
        ["sweep-rank", recipe, "--ranks", "2", "--methods", "lora", f"output_dir={tmp_path / 'sw'}", *fast,
         "eval.limit=1", "eval.tasks=[boolq]", f"eval.data_dir={ROOT / 'data' / 'smoke' / 'commonsense'}"],
    ]
    printed = []
    for argv in commands:
        code, out, err = dora_in_process(argv, monkeypatch, capfd)
        assert code == 0, (argv, err)
        printed += [out, err]
    shutil.rmtree(run / "final")  # resumed: the checkpoint's recipe is read back with its references
    code, out, err = dora_in_process(["train", recipe, *fast, "--resume"], monkeypatch, capfd)
    assert code == 0, err
    printed += [out, err]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path]  # not the user's recipe
    assert len(files) > 30 and any("events.out.tfevents" in p.name for p in files)
    forms = [secret, urllib.parse.quote(secret), secret[5:17], base64.b64encode(secret.encode()).decode()[4:16]]
    found = {str(p): f for p in files for f in forms if f.encode() in p.read_bytes()}
    assert found == {}
    assert [f for text in printed for f in forms if f in text] == []
    saved = (run / "recipe.yaml").read_text()  # the references are there, as written
    assert f"http://user:${{env:{PLANTED_ENV}}}@judge.example/v1?key=${{env:{PLANTED_ENV}}}" in saved
    assert f"judge-${{env:{PLANTED_ENV}}}" in saved and f"split: ${{env:{PLANTED_ENV}}}" in saved
    # Without the key: what does not use it works (a commonsense eval, analyze, generate); what does is refused.
    monkeypatch.delenv(PLANTED_ENV)
    for argv in (["eval", run / "final", "--out", tmp_path / "ev2", "--limit", "1", "--tasks", "boolq", "--mode", "loglik",
                  "--data-dir", ROOT / "data" / "smoke" / "commonsense"],
                 ["analyze", run / "final", "--out", tmp_path / "an2"], ["generate", run / "final", "q", "--max-new-tokens", "2"]):
        code, _, err = dora_in_process(argv, monkeypatch, capfd)
        assert code == 0, (argv, err)
    code, _, err = dora_in_process(["eval", run / "final", "--suite", "mt_bench", "--questions", tmp_path / "q.jsonl"],
                                   monkeypatch, capfd)
    assert code == 2 and f"environment variable {PLANTED_ENV} is not set" in err
