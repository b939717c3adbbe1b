"""The attack battery (issue 13): bad input of every kind through the real `dora` entry point, in process.

Every case runs `dora_cli.cli.main()` with sys.argv patched, from the repository root, and asserts what
the README promises for refused input: exit status 2, exactly one stderr line and it starts with
`error:`, no traceback, and the test's directory byte-identical before and after (names, kinds, sizes,
mtimes and contents of everything under it). Inputs are built per case under the test's tmp_path;
outputs are pointed there too, so that anything written shows up in the snapshot.

CASES must all pass, and so must the cases that need the environment changed (a missing DeepSpeed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, TINY_TOKENIZER, dora_in_process, tiny_llama

SMOKE = (ROOT / "recipes" / "smoke.yaml").read_text()
BIG = "1" + "0" * 5000  # past Python's 4300-digit limit for int()
DEEP = "[" * 100_000 + "]" * 100_000  # past json's recursion limit
LAUGHS = "".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)]
)  # about 600 bytes, 9**10 values once expanded
GOOD_RECORD = {"instruction": "q?", "input": "", "output": "the correct answer is true", "answer": "true"}
CHAT = {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "yes"}]}
QUESTION = {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Shorter."]}


# --------------------------------------------------------------------------------------------------
# What a case builds its input from


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 2-step run of recipes/smoke.yaml (checkpoint `final` with its recipe and manifest)."""
    from dora_cli import train

    out = tmp_path_factory.mktemp("attack-run") / "run"
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        train.run_train(str(ROOT / "recipes" / "smoke.yaml"), [f"output_dir={out}", "train.max_steps=2",
                                                              "train.save_every=null"])
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local model directory: a tiny LLaMA (vocab 512) with the project's tiny tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("attack-model") / "model"
    tiny_llama(vocab_size=512).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(TINY_TOKENIZER)).save_pretrained(out)
    return out


@dataclass
class Kit:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    run_source: Path
    model_source: Path
    restore: list = field(default_factory=list)  # what a case changed outside the snapshot's view (permissions)
    deny: list = field(default_factory=list)  # paths made unreadable to the command (simulate_unreadable)

    def write(self, name: str, data: str | bytes | list | dict) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, (list, dict)):
            data = json.dumps(data)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def recipe(self, extra: str = "", text: str | None = None) -> str:
        """The smoke recipe writing into tmp/out, with `extra` YAML appended (new sections only)."""
        text = SMOKE.replace("output_dir: runs/smoke", f"output_dir: {self.tmp / 'out'}") if text is None else text
        return str(self.write("recipe.yaml", text + extra))

    def data(self, name: str, content: str | bytes | list) -> list[str]:
        """Overrides for training on one data file."""
        path = self.write(name, content)
        return [f"data.sources=[{{path: '{path}'}}]", "data.val_set_size=0"]

    def run(self) -> Path:
        """A copy of the tiny run under tmp (made once per case); its final checkpoint."""
        if not (self.tmp / "run").exists():
            shutil.copytree(self.run_source, self.tmp / "run")
        return self.tmp / "run" / "final"

    def model(self, mutate: Callable[[Path], object] = lambda d: None) -> str:
        """A copy of the tiny model directory under tmp, changed by `mutate`."""
        shutil.copytree(self.model_source, self.tmp / "model")
        mutate(self.tmp / "model")
        return str(self.tmp / "model")

    def local_model(self, path: str) -> list[str]:
        """Overrides that train on a model from disk instead of the smoke recipe's random one."""
        return [f"model.name_or_path={path}", "model.config=null", "model.tokenizer=null"]

    def unreadable(self, path: Path) -> Path:
        """`path` raises PermissionError when opened (mode 000 is readable for root, who runs the tests)."""
        simulate_unreadable(self, path)
        return path

    def eval_out(self) -> list[str]:
        return ["--out", str(self.tmp / "out")]

    def commonsense(self) -> list[str]:
        """Valid eval inputs (the smoke test set), output under tmp: what fails is the target."""
        return ["--tasks", "boolq", "--data-dir", "data/smoke/commonsense", *self.eval_out()]


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def gguf(k: Kit, data: bytes) -> str:
    return str(k.write("model.gguf", data))


def judge_files(k: Kit, prompts: list[dict] | str, refs: list[dict] | None = None, question: dict = QUESTION) -> list[str]:
    """An MT-Bench directory (one question), the given judge prompts, and a judge URL nobody serves."""
    k.write("bench/question.jsonl", json.dumps(question) + "\n")
    text = prompts if isinstance(prompts, str) else "".join(json.dumps(p) + "\n" for p in prompts)
    k.write("bench/judge_prompts.jsonl", text)
    if refs is not None:
        k.write("bench/reference_answer/gpt-4.jsonl", "".join(json.dumps(r) + "\n" for r in refs))
    return ["--suite", "mt_bench", "--questions", str(k.tmp / "bench" / "question.jsonl"),
            "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j", "--limit", "1", *k.eval_out()]


def prompts_with(template: str, per_name: dict[str, str] | None = None) -> list[dict]:
    names = ["single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"]
    return [{"name": n, "system_prompt": "s", "prompt_template": (per_name or {}).get(n, template)} for n in names]


DUPLICATE_LAUNCH = "launch: {num_processes: 1}\nlaunch: {strategy: ddp}\n"
BAD_MODEL_DIRS = {"empty": {}, "config-not-json": {"config.json": "{"}, "config-a-list": {"config.json": "[1, 2]"},
                  "no-model-type": {"config.json": "{}"}, "unknown-model-type": {"config.json": '{"model_type": "no_such_arch"}'}}
BAD_JUDGE_URLS = {"port-not-a-number": "http://u:SECRET@127.0.0.1:notaport/v1", "port-too-large": "http://h:70000/v1",
                  "no-scheme": "127.0.0.1:8000/v1", "ftp": "ftp://127.0.0.1/v1", "no-host": "http:///v1",
                  "query-name-twice": "http://127.0.0.1:8000/v1?key=SECRETSECRET&key=OTHER"}


def judge_url_case(url: str) -> Build:
    templates = prompts_with("{question}{answer}", {"single-v1-multi-turn": "{question_1}",
                                                   "single-math-v1-multi-turn": "{question_1}"})
    return lambda k: ["eval", str(k.run()), *judge_files(k, templates), f"eval.mt_bench.judge_url={url}"]


def dry_run_model_case(files: dict[str, str]) -> Build:
    return lambda k: ["train", k.recipe(), "--dry-run", f"model.name_or_path={model_dir_with(k, files)}"]


def child_of(base: str, k: Kit) -> str:
    return str(k.write("child.yaml", f"base: {base}\n"))


Build = Callable[[Kit], list[str]]

# --------------------------------------------------------------------------------------------------
# The cases: id -> argv builder

CASES: dict[str, Build] = {
    # --- usage errors of every command (cli.py) ---
    "train-no-recipe": lambda k: ["train"],
    "train-unknown-option": lambda k: ["train", k.recipe(), "--bogus"],
    "train-misspelt-option": lambda k: ["train", k.recipe(), "--overwrit"],
    "train-nproc-not-int": lambda k: ["train", k.recipe(), "--nproc", "abc"],
    "train-nproc-zero": lambda k: ["train", k.recipe(), "--nproc", "0"],
    "train-nproc-negative": lambda k: ["train", k.recipe(), "--nproc", "-2"],
    "train-resume-and-overwrite": lambda k: ["train", k.recipe(), "--resume", "--overwrite"],
    "eval-no-target": lambda k: ["eval"],
    "eval-limit-not-int": lambda k: ["eval", str(k.run()), "--limit", "abc"],
    "eval-batch-size-float": lambda k: ["eval", str(k.run()), "--batch-size", "1.5"],
    "eval-limit-no-value": lambda k: ["eval", str(k.run()), "--limit"],
    "merge-no-checkpoint": lambda k: ["merge"],
    "merge-dtype-no-value": lambda k: ["merge", str(k.run()), "--dtype"],
    "merge-misspelt-option": lambda k: ["merge", str(k.run()), "--frce"],
    "analyze-no-checkpoint": lambda k: ["analyze"],
    "analyze-misspelt-option": lambda k: ["analyze", str(k.run()), "--module", "q_proj"],
    "sweep-ranks-no-value": lambda k: ["sweep-rank", k.recipe(), "--ranks"],
    "sweep-misspelt-option": lambda k: ["sweep-rank", k.recipe(), "--method", "lora"],
    "unknown-command": lambda k: ["trian", k.recipe()],
    # --- recipes (recipe.py): YAML, keys, numeric ranges ---
    "recipe-duplicate-section": lambda k: ["train", k.recipe("train: {max_steps: 1}\n")],
    "recipe-duplicate-key": lambda k: ["train", k.recipe(text=SMOKE.replace("  r: 8\n", "  r: 8\n  r: 4\n"))],
    "recipe-duplicate-key-in-base": lambda k: ["train", child_of(k.recipe(DUPLICATE_LAUNCH), k)],
    "recipe-billion-laughs": lambda k: ["train", k.recipe(LAUGHS)],
    "recipe-recursive-alias": lambda k: ["train", k.recipe("expected: &a {x: *a}\n")],
    "recipe-unknown-key-no-close-name": lambda k: ["train", k.recipe(), "adapter.rnak=8"],
    "recipe-negative-seed": lambda k: ["train", k.recipe(), "train.seed=-1"],
    "recipe-seed-past-numpy": lambda k: ["train", k.recipe(), f"train.seed={2**40}"],
    "recipe-data-seed-negative": lambda k: ["train", k.recipe(), "data.seed=-5"],
    "recipe-vera-seed-2-70": lambda k: ["train", k.recipe(), "adapter.method=vera", f"adapter.vera_seed={2**70}"],
    "recipe-beta-above-1": lambda k: ["train", k.recipe(), "optim.betas=[0.9,1.5]"],
    "recipe-beta-negative": lambda k: ["train", k.recipe(), "optim.betas=[-0.1,0.9]"],
    "recipe-no-target-modules": lambda k: ["train", k.recipe(), "adapter.target_modules=[]"],
    "recipe-weight-1e300": lambda k: ["train", k.recipe(), "data.sources=[{path: data/smoke/train.json, weight: 1e300}]"],
    "recipe-cutoff-1": lambda k: ["train", k.recipe(), "data.cutoff_len=1"],
    "recipe-cutoff-huge": lambda k: ["train", k.recipe(), f"data.cutoff_len={10**30}"],
    "recipe-max-steps-huge": lambda k: ["train", k.recipe(), f"train.max_steps={10**30}"],
    "recipe-micro-batch-huge": lambda k: ["train", k.recipe(), f"train.micro_batch_size={10**30}"],
    "recipe-rank-huge": lambda k: ["train", k.recipe(), f"adapter.r={10**9}"],
    "recipe-processes-huge": lambda k: ["train", k.recipe(), f"launch.num_processes={10**9}"],
    "recipe-epochs-1e300": lambda k: ["train", k.recipe(), "train.epochs=1e300", "train.max_steps=null"],
    "recipe-expected-inf": lambda k: ["train", k.recipe("expected: {boolq: 1e400}\n")],
    "recipe-5000-digits": lambda k: ["train", k.recipe(f"expected: {{boolq: {BIG}}}\n")],
    "override-5000-digits": lambda k: ["train", k.recipe(), f"train.seed={BIG}"],
    "recipe-not-utf8": lambda k: ["train", str(k.write("recipe.yaml", b"model: {name_or_path: \xff\xfe}\n"))],
    "recipe-is-a-directory": lambda k: ["train", str(k.tmp)],
    "recipe-unreadable": lambda k: ["train", str(k.unreadable(Path(k.recipe())))],
    "eval-num-beams-huge": lambda k: ["eval", str(k.run()), "eval.num_beams=1000000", *k.eval_out()],
    "sweep-duplicate-key": lambda k: ["sweep-rank", k.recipe("train: {max_steps: 1}\n"), "--ranks", "2"],
    "sweep-billion-laughs": lambda k: ["sweep-rank", k.recipe(LAUGHS), "--ranks", "2"],
    "sweep-rank-zero": lambda k: ["sweep-rank", k.recipe(), "--ranks", "0"],
    "sweep-unknown-method": lambda k: ["sweep-rank", k.recipe(), "--methods", "dorra"],
    # --- model configs and loaders (models.py) ---
    "config-vocab-not-int": lambda k: ["train", k.recipe(), "model.config.vocab_size=abc"],
    "config-hidden-past-int32": lambda k: ["train", k.recipe(), f"model.config.hidden_size={10**13}"],
    "config-hidden-past-memory": lambda k: ["train", k.recipe(), f"model.config.hidden_size={2**30}",
                                            "model.config.intermediate_size=1024"],
    "config-seed-negative": lambda k: ["train", k.recipe(), "model.config.seed=-1"],
    "config-heads-do-not-divide": lambda k: ["train", k.recipe(), "model.config.num_attention_heads=3",
                                             "model.config.num_key_value_heads=3"],
    "safetensors-truncated-eval": lambda k: ["eval", k.model(lambda d: truncate(d / "model.safetensors")),
                                             "--tasks", "boolq", "--data-dir", "data/smoke/commonsense", *k.eval_out()],
    "safetensors-truncated-train": lambda k: [
        "train", k.recipe(), *k.local_model(k.model(lambda d: truncate(d / "model.safetensors")))],
    "safetensors-garbage-header": lambda k: [
        "eval", k.model(lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64)),
        "--tasks", "boolq", "--data-dir", "data/smoke/commonsense", *k.eval_out()],
    "tokenizer-json-missing-section": lambda k: [
        "eval", k.model(lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')),
        "--tasks", "boolq", "--data-dir", "data/smoke/commonsense", *k.eval_out()],
    "tokenizer-json-random-bytes": lambda k: [
        "eval", k.model(lambda d: (d / "tokenizer.json").write_bytes(bytes(range(256)) * 3)),
        "--tasks", "boolq", "--data-dir", "data/smoke/commonsense", *k.eval_out()],
    "tokenizer-json-nested-100k": lambda k: [
        "train", k.recipe(), *k.local_model(k.model(lambda d: (d / "tokenizer.json").write_text(DEEP)))],
    "tokenizer-dir-corrupt-for-random-model": lambda k: [
        "train", k.recipe(), f"model.tokenizer={k.model(lambda d: (d / 'tokenizer.json').write_text('[]'))}"],
    "config-json-invalid": lambda k: [
        "eval", k.model(lambda d: (d / "config.json").write_text("{not json")),
        "--tasks", "boolq", "--data-dir", "data/smoke/commonsense", *k.eval_out()],
    "config-json-vocab-not-int": lambda k: [
        "eval", k.model(lambda d: edit_json(d / "config.json", vocab_size="abc")),
        "--tasks", "boolq", "--data-dir", "data/smoke/commonsense", *k.eval_out()],
    "tokenizer-larger-than-embedding-eval": lambda k: [
        "eval", k.model(lambda d: edit_json(d / "config.json", vocab_size=256)),
        "--tasks", "boolq", "--data-dir", "data/smoke/commonsense", *k.eval_out()],
    "tokenizer-larger-than-embedding-train": lambda k: [
        "train", k.recipe(), *k.local_model(k.model(lambda d: edit_json(d / "config.json", vocab_size=256)))],
    "gguf-random-bytes": lambda k: ["eval", gguf(k, bytes(range(256)) * 4), *k.commonsense()],
    "gguf-random-bytes-train": lambda k: ["train", k.recipe(), *k.local_model(gguf(k, b"\x00" * 100))],
    "gguf-empty": lambda k: ["eval", gguf(k, b""), *k.commonsense()],
    "gguf-bad-version": lambda k: ["eval", gguf(k, b"GGUF\x63\x00\x00\x00" + bytes(64)), *k.commonsense()],
    "gguf-damaged-counts": lambda k: ["eval", gguf(k, b"GGUF\x03\x00\x00\x00" + b"\xff" * 16 + bytes(64)), *k.commonsense()],
    "merge-base-garbage-gguf": lambda k: ["merge", str(k.run()), "--base", gguf(k, b"not a gguf"),
                                          "--out", str(k.tmp / "merged")],
    # --- training data (datasets.py) ---
    "data-json-nested-100k": lambda k: ["train", k.recipe(), *k.data("d.json", DEEP)],
    "data-jsonl-nested-100k": lambda k: ["train", k.recipe(), *k.data("d.jsonl", json.dumps(GOOD_RECORD) + "\n" + DEEP + "\n")],
    "data-json-5000-digits": lambda k: ["train", k.recipe(), *k.data("d.json", f'[{{"instruction": "q", "output": "a", "answer": {BIG}}}]')],
    "data-jsonl-5000-digits": lambda k: ["train", k.recipe(), *k.data("d.jsonl", f'{{"instruction": "q", "output": {BIG}}}\n')],
    "data-not-utf8": lambda k: ["train", k.recipe(), *k.data("d.json", b'[{"instruction": "\xff"}]')],
    "data-unreadable": lambda k: ["train", k.recipe(), *unreadable_data(k)],
    "data-object-not-list": lambda k: ["train", k.recipe(), *k.data("d.json", {"instruction": "q"})],
    "data-field-not-string": lambda k: ["train", k.recipe(), *k.data("d.json", [{**GOOD_RECORD, "output": 5}])],
    "data-empty-list": lambda k: ["train", k.recipe(), *k.data("d.json", [])],
    # --- eval inputs (eval/tasks.py, mtbench.py, mathqa.py, math_match.py, judge.py) ---
    "questions-nested-100k": lambda k: ["eval", str(k.run()), "--suite", "mt_bench",
                                        "--questions", str(k.write("q.jsonl", DEEP + "\n")), *k.eval_out()],
    "questions-not-utf8": lambda k: ["eval", str(k.run()), "--suite", "mt_bench",
                                     "--questions", str(k.write("q.jsonl", b'{"turns": ["\xff"]}\n')), *k.eval_out()],
    "questions-5000-digits": lambda k: ["eval", str(k.run()), "--suite", "mt_bench",
                                        "--questions", str(k.write("q.jsonl", f'{{"question_id": {BIG}}}\n')), *k.eval_out()],
    "questions-unreadable": lambda k: ["eval", str(k.run()), "--suite", "mt_bench", "--questions",
                                       str(k.unreadable(k.write("q.jsonl", json.dumps(QUESTION) + "\n"))), *k.eval_out()],
    "questions-turns-not-list": lambda k: ["eval", str(k.run()), "--suite", "mt_bench", "--questions",
                                           str(k.write("q.jsonl", json.dumps({**QUESTION, "turns": "x"}) + "\n")), *k.eval_out()],
    "math-answer-400-digit-int": lambda k: ["eval", str(k.run()), "--suite", "math", "--data-dir",
                                            str(k.write("m.jsonl", f'{{"question": "q", "answer": {"9" * 400}}}\n')), *k.eval_out()],
    "math-answer-400-digit-text": lambda k: ["eval", str(k.run()), "--suite", "math", "--data-dir",
                                             str(k.write("m.json", [{"question": "q", "answer": "so " + "9" * 400}])), *k.eval_out()],
    "math-file-nested-100k": lambda k: ["eval", str(k.run()), "--suite", "math", "--data-dir",
                                        str(k.write("m.json", DEEP)), *k.eval_out()],
    "math-file-5000-digits": lambda k: ["eval", str(k.run()), "--suite", "math", "--data-dir",
                                        str(k.write("m.json", f'[{{"question": "q", "answer": {BIG}}}]')), *k.eval_out()],
    "commonsense-test-nested-100k": lambda k: ["eval", str(k.run()), "--tasks", "boolq", "--data-dir",
                                               str(k.write("cs/boolq/test.json", DEEP).parents[1]), *k.eval_out()],
    "commonsense-test-5000-digits": lambda k: ["eval", str(k.run()), "--tasks", "boolq", "--data-dir",
                                               str(k.write("cs/boolq/test.json", f"[{BIG}]").parents[1]), *k.eval_out()],
    "commonsense-test-unreadable": lambda k: [
        "eval", str(k.run()), "--tasks", "boolq", "--data-dir",
        str(k.unreadable(k.write("cs/boolq/test.json", [GOOD_RECORD])).parents[1]), *k.eval_out()],
    "eval-unknown-suite": lambda k: ["eval", str(k.run()), "--suite", "mtbench", *k.eval_out()],
    "eval-unknown-task": lambda k: ["eval", str(k.run()), "--tasks", "boolqq", *k.eval_out()],
    "judge-template-unknown-field": lambda k: ["eval", str(k.run()), *judge_files(k, prompts_with("{question} {nope}"))],
    "judge-template-positional": lambda k: ["eval", str(k.run()), *judge_files(k, prompts_with("{0}"))],
    "judge-template-not-text": lambda k: ["eval", str(k.run()), *judge_files(k, prompts_with("x") + [
        {"name": "single-v1", "system_prompt": 1, "prompt_template": "x"}])],
    "judge-prompts-nested-100k": lambda k: ["eval", str(k.run()), *judge_files(k, DEEP + "\n")],
    # --- generate and chat (generate.py; the target as dora eval loads it) ---
    "generate-no-prompt": lambda k: ["generate", str(k.run())],
    "generate-empty-prompt": lambda k: ["generate", str(k.run()), "  "],
    "generate-missing-target": lambda k: ["generate", str(k.tmp / "nope"), "Name a fruit."],
    "generate-max-new-tokens-zero": lambda k: ["generate", str(k.run()), "q", "--max-new-tokens", "0"],
    "generate-max-new-tokens-huge": lambda k: ["generate", str(k.run()), "q", "--max-new-tokens", str(10**30)],
    "generate-temperature-negative": lambda k: ["generate", str(k.run()), "q", "--temperature", "-1"],
    "generate-temperature-nan": lambda k: ["generate", str(k.run()), "q", "--temperature", "nan"],
    "generate-temperature-inf": lambda k: ["generate", str(k.run()), "q", "--temperature", "inf"],
    "generate-seed-past-2-32": lambda k: ["generate", str(k.run()), "q", "--seed", str(2**70)],
    "generate-unknown-template": lambda k: ["generate", str(k.run()), "q", "--template", "alpacca"],
    "generate-chat-template-missing": lambda k: ["generate", str(k.run()), "q", "--template", "chat"],
    "generate-peft-adapter-without-base": lambda k: ["generate", str(peft_copy(k)), "q"],
    "generate-altered-adapter": lambda k: ["generate", str(alter_adapter(k.run())), "q"],
    "generate-garbage-gguf": lambda k: ["generate", gguf(k, b"not a gguf"), "q"],
    "chat-misspelt-option": lambda k: ["chat", str(k.run()), "--temprature", "1"],
    "chat-missing-target": lambda k: ["chat", "no/such/model"],
    "chat-unknown-template": lambda k: ["chat", str(k.run()), "--template", "chatml"],
    "chat-temperature-nan": lambda k: ["chat", str(k.run()), "--temperature", "nan"],
    "generate-prompt-undecodable-bytes": lambda k: ["generate", str(k.run()), "\udcff\udcfe"],
    "data-unpaired-surrogate": lambda k: ["train", k.recipe(), *k.data(
        "s.json", [GOOD_RECORD] * 19 + [{**GOOD_RECORD, "instruction": "\ud800"}])],
    "messages-role-not-a-string": lambda k: ["train", k.recipe(), "data.format=messages", *k.data("m.json", [CHAT] * 19 + [
        {"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]}])],
    "messages-content-unpaired-surrogate": lambda k: ["train", k.recipe(), "data.format=messages", *k.data("m.json", [
        CHAT] * 19 + [{"messages": [{"role": "user", "content": "x\udfff"}, {"role": "assistant", "content": "y"}]}])],
    # --- output paths: checked by the commands, or caught by the boundary net for OSErrors (errors.run_main) ---
    "output-dir-below-a-file": lambda k: ["train", k.recipe(), f"output_dir={k.write('afile', 'x') / 'out'}"],
    "output-dir-is-a-file": lambda k: ["train", k.recipe(), f"output_dir={k.write('afile', 'x')}"],
    "eval-out-below-a-file": lambda k: ["eval", str(k.run()), "--tasks", "boolq", "--limit", "1",
                                        "--out", str(k.write("afile", "x") / "out")],
    "merge-out-is-a-file": lambda k: ["merge", str(k.run()), "--out", str(k.write("afile", "x"))],
    "merge-out-inside-its-base": lambda k: ["merge", str(k.run()), "--base", k.model(), "--out", str(k.tmp / "model" / "m")],
    "merge-truncated-adapter": lambda k: ["merge", str(truncate_adapter(k.run())), "--out", str(k.tmp / "merged")],
    "analyze-missing-checkpoint": lambda k: ["analyze", str(k.tmp / "nope"), "--out", str(k.tmp / "analysis")],
    "analyze-out-is-a-file": lambda k: ["analyze", str(k.run()), "--out", str(k.write("afile", "x"))],
    "merge-out-dangling-symlink": lambda k: ["merge", str(k.run()), "--out", str(dangling(k))],
    # --- data loss and silent corruption (issue 11 fixed these; rundir.py, evaluate.py, merge.py, sweep.py) ---
    "overwrite-a-folder-that-is-not-a-run": lambda k: [
        "train", k.recipe(), "--overwrite", f"output_dir={k.write('mine/notes.txt', 'mine').parent}"],
    "output-dir-inside-a-checkpoint": lambda k: ["train", k.recipe(), f"output_dir={k.run() / 'again'}"],
    "eval-altered-adapter": lambda k: ["eval", str(alter_adapter(k.run())), "--tasks", "boolq", *k.eval_out()],
    "merge-altered-adapter": lambda k: ["merge", str(alter_adapter(k.run())), "--out", str(k.tmp / "merged")],
    "eval-output-locked": lambda k: ["eval", str(k.run()), "--tasks", "boolq", "--limit", "1", "--out", str(live_lock(k))],
    "sweep-ranks-unicode-digit": lambda k: ["sweep-rank", k.recipe(), "--ranks", "\u00b2"],
    "analyze-modules-match-no-adapter": lambda k: [
        "analyze", str(k.run()), "--modules", "lm_head", "--out", str(k.tmp / "analysis")],
    # --- issue 23: nothing of the user's is written over; every boundary wrapped ---
    "train-into-a-folder-of-the-user-s": lambda k: ["train", k.recipe(), f"output_dir={k.write('mine/notes.txt', 'x').parent}"],
    "train-into-the-data-s-folder": lambda k: ["train", k.recipe(), *k.data("mine/d.json", [GOOD_RECORD] * 20),
                                               f"output_dir={k.tmp / 'mine'}"],
    "train-resume-into-a-run-with-a-user-file": lambda k: [
        "train", k.recipe(), f"output_dir={user_file_in(k.run().parent)}", "--resume"],
    "train-overwrite-a-run-with-a-user-file": lambda k: [
        "train", k.recipe(), f"output_dir={user_file_in(k.run().parent)}", "--overwrite"],
    "train-inside-another-run": lambda k: ["train", k.recipe(), f"output_dir={k.run().parent / 'sub'}"],
    "train-into-an-eval-output": lambda k: ["train", k.recipe(), f"output_dir={eval_output(k)}"],
    "eval-out-inside-a-checkpoint": lambda k: ["eval", str(k.run()), "--tasks", "boolq", "--out", str(k.run() / "ev")],
    "eval-out-inside-another-run": lambda k: ["eval", str(k.run()), "--tasks", "boolq", "--out", str(k.run().parent / "ev")],
    "eval-out-a-folder-of-the-user-s": lambda k: [
        "eval", str(k.run()), "--tasks", "boolq", "--out", str(k.write("mine/notes.txt", "x").parent)],
    "merge-force-a-folder-of-the-user-s": lambda k: [
        "merge", str(k.run()), "--force", "--out", str(k.write("mine/notes.txt", "x").parent)],
    "merge-force-into-the-run": lambda k: ["merge", str(k.run()), "--force", "--out", str(k.run().parent)],
    "merge-out-inside-the-checkpoint": lambda k: ["merge", str(k.run()), "--out", str(k.run() / "m")],
    "analyze-out-a-folder-of-the-user-s": lambda k: [
        "analyze", str(k.run()), "--out", str(k.write("mine/analysis.json", "{}").parent)],
    "analyze-out-inside-the-run": lambda k: ["analyze", str(k.run()), "--out", str(k.run().parent / "an")],
    "sweep-into-a-folder-of-the-user-s": lambda k: [
        "sweep-rank", k.recipe(), "--ranks", "2", f"output_dir={k.write('mine/sweep/notes.txt', 'x').parents[1]}"],
    # a user's file inside a directory of ours, or linked in place of one of our files (files.OutputKind.foreign)
    "train-resume-a-run-whose-log-links-to-a-user-file": lambda k: [
        "train", k.recipe(), f"output_dir={linked(k, 'train.log', 'symlink')}", "--resume"],
    "train-resume-a-run-whose-recipe-is-hard-linked": lambda k: [
        "train", k.recipe(), f"output_dir={linked(k, 'recipe.yaml', 'hardlink')}", "--resume"],
    "train-overwrite-a-user-file-in-trackers": lambda k: [
        "train", k.recipe(), f"output_dir={user_file_in(k.run().parent, 'trackers/notes.txt')}", "--overwrite"],
    "train-overwrite-a-user-folder-in-a-checkpoint": lambda k: [
        "train", k.recipe(), f"output_dir={user_file_in(k.run().parent, 'final/tokenizer_old/notes.txt')}", "--overwrite"],
    "eval-overwrite-a-user-file-in-a-suite-folder": lambda k: [
        "eval", str(k.run()), "--tasks", "boolq", "--limit", "1", "--overwrite",
        "--out", str(user_file_in(eval_output(k), "commonsense/predictions/old/boolq.jsonl"))],
    "chat-stdin-closed": lambda k: ["chat", str(close_stdin(k, k.run()))],
    "generate-more-new-tokens-than-the-context": lambda k: ["generate", str(k.run()), "q", "--max-new-tokens", "99999999"],
    "chat-more-new-tokens-than-the-context": lambda k: ["chat", str(k.run()), "--max-new-tokens", "257"],
    # --- a value of the wrong kind that pydantic would convert, and one key given twice on the command line ---
    "recipe-rank-true": lambda k: ["train", k.recipe(), "--dry-run", "adapter.r=true"],
    "recipe-rank-true-in-the-file": lambda k: ["train", k.recipe(text=SMOKE.replace("  r: 8\n", "  r: true\n")), "--dry-run"],
    "recipe-lr-false": lambda k: ["train", k.recipe(), "--dry-run", "optim.lr=false"],
    "recipe-flag-a-number": lambda k: ["train", k.recipe(), "--dry-run", "model.gradient_checkpointing=1"],
    "recipe-alpha-negative": lambda k: ["train", k.recipe(), "--dry-run", "adapter.alpha=-16"],
    "recipe-alpha-zero": lambda k: ["train", k.recipe(), "--dry-run", "adapter.alpha=0"],
    "train-nproc-and-its-override": lambda k: ["train", k.recipe(), "--dry-run", "--nproc", "2", "launch.num_processes=1"],
    "eval-limit-and-its-override": lambda k: ["eval", str(k.run()), "--limit", "3", "eval.limit=2", *k.eval_out()],
    "eval-tasks-and-a-section-override": lambda k: ["eval", str(k.run()), "--tasks", "boolq", "eval={tasks: [piqa]}",
                                                    *k.eval_out()],
    "eval-judge-url-and-its-override": lambda k: ["eval", str(k.run()), "--judge-url", "http://127.0.0.1:9/v1",
                                                  "eval.mt_bench.judge_url=http://127.0.0.1:8/v1", *k.eval_out()],
    "export-into-the-tokenizer-it-reads": lambda k: ["export", str(run_with_own_tokenizer(k)), "--gguf",
                                                     str(k.tmp / "tok" / "x.gguf")],
    "merge-into-the-tokenizer-it-reads": lambda k: ["merge", str(run_with_own_tokenizer(k)), "--out", str(k.tmp / "tok" / "m")],
    "override-twice": lambda k: ["train", k.recipe(), "--dry-run", "adapter.r=4", "adapter={r: 16}"],
    "eval-override-twice": lambda k: ["eval", str(k.run()), "eval.limit=5", "eval.limit=6", *k.eval_out()],
    "eval-override-of-the-adapter": lambda k: ["eval", str(k.run()), "adapter.r=4", *k.eval_out()],
    "eval-override-of-training": lambda k: ["eval", str(k.run()), "train={max_steps: 3}", *k.eval_out()],
    "sweep-rank-repeated": lambda k: ["sweep-rank", k.recipe(), "--ranks", "4,4"],
    "sweep-method-repeated": lambda k: ["sweep-rank", k.recipe(), "--methods", "lora,lora"],
    "sweep-override-of-the-rank": lambda k: ["sweep-rank", k.recipe(), "--ranks", "2", "adapter.r=8"],
    "sweep-override-of-alpha-under-2r": lambda k: ["sweep-rank", k.recipe(), "--ranks", "2", "adapter.alpha=8"],
    "dry-run-every-response-cut-off": lambda k: ["train", k.recipe(), "--dry-run", "data.cutoff_len=8",
                                                 "data.train_on_inputs=false"],
    "dry-run-batch-larger-than-the-data": lambda k: ["train", k.recipe(), "--dry-run", "train.batch_size=512"],
    "dry-run-into-a-folder-of-the-user-s": lambda k: [
        "train", k.recipe(), "--dry-run", f"output_dir={k.write('mine/notes.txt', 'x').parent}"],
    "peft-adapter-whose-base-is-missing": lambda k: ["generate", str(peft_copy(k, base=k.tmp / "gone")), "q"],
    "peft-adapter-alpha-zero": lambda k: ["export", str(peft_edited(k, lora_alpha=0)), "--gguf", str(k.tmp / "o.gguf")],
    "peft-adapter-rank-true": lambda k: ["merge", str(peft_edited(k, r=True)), "--out", str(k.tmp / "merged")],
    "our-adapter-alpha-negative": lambda k: ["generate", str(ours_edited(k, alpha=-1.0)), "q"],
    "eval-peft-adapter-whose-base-is-missing": lambda k: ["eval", str(peft_copy(k, base=k.tmp / "gone")), *eval_flags(k)],
    "generate-chat-template-of-a-conversation-run-without-one": lambda k: ["generate", str(conversation_run(k)), "q"],
    "judge-template-single-turn-uses-a-second-answer": lambda k: ["eval", str(k.run()), *judge_files(
        k, prompts_with("{question}{answer}", {"single-v1": "{question} {answer} {answer_2}"}))],
    "judge-template-second-reference-of-a-one-turn-reference": lambda k: ["eval", str(k.run()), *judge_files(
        k, prompts_with("{question_1}{answer_1}{question_2}{answer_2}", {
            "single-v1": "{question}{answer}", "single-math-v1": "{question}{answer}{ref_answer_1}",
            "single-math-v1-multi-turn": "{question_1}{answer_1}{ref_answer_1}{ref_answer_2}"}),
        refs=[{"question_id": 2, "choices": [{"turns": ["4"]}]}], question={**QUESTION, "question_id": 2, "category": "math"})],
    # a judge URL the HTTP client cannot use is refused before any answer is generated (its credentials unshown)
    **{f"judge-url-{name}": judge_url_case(url) for name, url in BAD_JUDGE_URLS.items()},
    # dora merge writes its --out whole: a user's link there is refused, never replaced
    "merge-out-a-link-to-an-empty-folder": lambda k: [
        "merge", str(k.run()), "--out", str(link_to(k, k.tmp / "target", k.tmp / "link"))],
    "merge-out-a-link-to-an-empty-folder-force": lambda k: [
        "merge", str(k.run()), "--force", "--out", str(link_to(k, k.tmp / "target", k.tmp / "link"))],
    # a dry run refuses a model as the run does (model_config shares the load's checks)
    **{f"dry-run-model-{name}": dry_run_model_case(files) for name, files in BAD_MODEL_DIRS.items()},
    "judge-model-missing": lambda k: ["eval", str(k.run()), *judge_files(k, prompts_with("{question}{answer}", {
        "single-v1-multi-turn": "{question_1}", "single-math-v1-multi-turn": "{question_1}"})), "eval.mt_bench.judge_model=null"],
}


def link_to(k: Kit, target: Path, link: Path) -> Path:
    target.mkdir()
    link.symlink_to(target)
    return link


def model_dir_with(k: Kit, files: dict[str, str]) -> Path:
    model = k.tmp / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    return model


def user_file_in(directory: Path, name: str = "notes.txt") -> Path:
    (directory / name).parent.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("mine")
    return directory


def linked(k: Kit, name: str, how: str) -> Path:
    """A copy of the run whose `name` is a link to a file of the user's (beside the run, a copy of the run's:
    `ln run/recipe.yaml my-recipes/`)."""
    run = k.run().parent
    mine = k.write(f"mine-{name}", (run / name).read_bytes())
    (run / name).unlink()
    (run / name).symlink_to(mine) if how == "symlink" else (run / name).hardlink_to(mine)
    return run


def eval_output(k: Kit) -> Path:
    out = k.tmp / "ev" / "commonsense"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"suite": "commonsense", "settings": {}}))
    return out.parent


def close_stdin(k: Kit, target: Path) -> Path:
    k.monkeypatch.setattr("sys.stdin", None)  # `dora chat ... 0<&-`: Python has no stdin at all
    return target


def unreadable_data(k: Kit) -> list[str]:
    overrides = k.data("d.json", [GOOD_RECORD] * 20)
    k.unreadable(k.tmp / "d.json")
    return overrides


def alter_adapter(final: Path) -> Path:
    """The adapter file changed in place, same size (the manifest's sha256 no longer matches)."""
    path = final / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    return final


def peft_copy(k: Kit, base: Path | None = None) -> Path:
    """The run's adapter as a bare PEFT directory: adapter_config.json (no base model named, or `base`) and
    the weights."""
    final = k.run()
    peft_dir = k.tmp / "peft"
    peft_dir.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(final / name, peft_dir / name)
    if base is not None:
        edit_json(peft_dir / "adapter_config.json", base_model_name_or_path=str(base))
    return peft_dir


def peft_edited(k: Kit, **fields) -> Path:
    """A bare PEFT copy of the run's adapter with `fields` set in its adapter_config.json."""
    peft_dir = peft_copy(k)
    edit_json(peft_dir / "adapter_config.json", **fields)
    return peft_dir


def ours_edited(k: Kit, **fields) -> Path:
    """The run's final checkpoint with `fields` set in its own adapter config (dora_cli_adapter.json), resealed."""
    from dora_cli import rundir
    from dora_cli.adapters.checkpoint import OURS_NAME

    final = k.run()
    ours = json.loads((final / OURS_NAME).read_text())
    (final / OURS_NAME).write_text(json.dumps({**ours, "adapter": {**ours["adapter"], **fields}}))
    rundir.write_manifest(final)
    return final


def run_with_own_tokenizer(k: Kit) -> Path:
    """The tiny run's final checkpoint whose recipe reads its tokenizer from a copy under tmp (tok/)."""
    from dora_cli import rundir

    final = k.run()
    shutil.copytree(TINY_TOKENIZER, k.tmp / "tok")
    recipe = final / rundir.RECIPE_NAME
    recipe.write_text(recipe.read_text().replace(str(TINY_TOKENIZER), str(k.tmp / "tok")))
    rundir.write_manifest(final)
    return final


def conversation_run(k: Kit) -> Path:
    """The tiny run's final checkpoint as if trained on conversations (its recipe's data.format: messages)."""
    from dora_cli import rundir

    final = k.run()
    recipe = final / rundir.RECIPE_NAME
    recipe.write_text(recipe.read_text().replace("format: commonsense", "format: messages").replace(
        "template: llm_adapters", "template: chat"))
    rundir.write_manifest(final)
    return final


def truncate_adapter(final: Path) -> Path:
    truncate(final / "adapter_model.safetensors")
    return final


def live_lock(k: Kit) -> Path:
    out = k.tmp / "eval-out"
    k.write("eval-out/.lock", json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    return out


def dangling(k: Kit) -> Path:
    link = k.tmp / "merged"
    link.symlink_to(k.tmp / "nowhere" / "merged")
    return link


# --------------------------------------------------------------------------------------------------
# Running a case


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: kind, size, mtime and (for files) the sha256 of the content."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
            except PermissionError:  # made unreadable by the case (not as root)
                digest = "unreadable"
            found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return found


def dora(argv: list[str], monkeypatch, capfd) -> tuple[int, str]:
    """`dora ARGV` in this process: (exit status, stderr)."""
    code, _, err = dora_in_process(argv, monkeypatch, capfd)
    return code, err


@pytest.fixture
def kit(tmp_path, monkeypatch, tiny_run, tiny_model_dir, tmp_path_factory) -> Kit:
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    monkeypatch.setenv("DORA_CACHE", str(tmp_path_factory.mktemp("dora-cache")))
    return Kit(case_dir, monkeypatch, tiny_run, tiny_model_dir)


def assert_refused(build: Build, kit: Kit, monkeypatch, capfd) -> str:
    argv = build(kit)
    denied, kit.deny = kit.deny, []  # the snapshot reads what the case makes unreadable to the command
    before = snapshot(kit.tmp)
    kit.deny = denied
    code, err = dora(argv, monkeypatch, capfd)
    kit.deny = []
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert snapshot(kit.tmp) == before, "the refused command changed the disk"
    cache = Path(os.environ["DORA_CACHE"])
    assert not [p for p in cache.rglob("*") if p.name.endswith(".lock") or ".tmp-" in p.name]
    return lines[0]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_one_line_and_nothing_written(case, kit, monkeypatch, capfd):
    assert_refused(CASES[case], kit, monkeypatch, capfd)


SAYS = {  # what some cases' line says: refused for the reason the case is about, not another one on the way
    "recipe-rank-true": "override adapter.r=true: adapter.r: expected a number, got true",
    "recipe-rank-true-in-the-file": "adapter.r: expected a number, got true",
    "recipe-lr-false": "optim.lr: expected a number, got false",
    "recipe-flag-a-number": "model.gradient_checkpointing: expected true or false, got 1",
    "recipe-alpha-zero": "adapter.alpha: expected a value > 0.0, got 0",
    "train-nproc-and-its-override": "launch.num_processes: set by both --nproc and this override; give one",
    "eval-limit-and-its-override": "override eval.limit=2: eval.limit: set by both --limit and this override",
    "eval-tasks-and-a-section-override": "override eval={tasks: [piqa]}: eval.tasks: set by both --tasks",
    "eval-judge-url-and-its-override": "eval.mt_bench.judge_url: set by both --judge-url",
    "sweep-rank-repeated": "--ranks: rank 4 is listed twice",
    "sweep-method-repeated": "--methods: method lora is listed twice",
    "sweep-override-of-the-rank": "adapter.r: the sweep sets it (--ranks); give it there, not as an override",
    "export-into-the-tokenizer-it-reads": "/tok, which the export reads",
    "merge-into-the-tokenizer-it-reads": "/tok, which the merge reads",
    "override-twice": "override adapter={r: 16}: adapter.r: also set by the override adapter.r=4; give it once",
    "eval-override-twice": "eval.limit: also set by the override eval.limit=5",
    "eval-override-of-the-adapter": "override adapter.r=4: adapter.r: dora eval does not read it",
    "eval-override-of-training": "train.max_steps: dora eval does not read it",
    "peft-adapter-alpha-zero": "adapter_config.json: adapter alpha: Input should be greater than 0, got 0",
    "peft-adapter-rank-true": "adapter_config.json: adapter r: expected a number, got true",
    "our-adapter-alpha-negative": "dora_cli_adapter.json: adapter alpha: Input should be greater than 0, got -1.0",
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(SAYS))
def test_the_line_names_the_reason(case, kit, monkeypatch, capfd):
    assert SAYS[case] in assert_refused(CASES[case], kit, monkeypatch, capfd)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("strategy", ["deepspeed-recipe", "deepspeed-override"])
def test_a_missing_deepspeed_is_refused_before_the_launch(strategy, kit, monkeypatch, capfd):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name.split(".")[0] == "deepspeed" else real(name, *a, **kw))
    extra = ["launch.zero_stage=3"] if strategy == "deepspeed-override" else []
    line = assert_refused(lambda k: ["train", k.recipe(), "launch.strategy=deepspeed", *extra, "--nproc", "2"],
                          kit, monkeypatch, capfd)
    assert "DeepSpeed is not installed" in line and "dora_cli[deepspeed]" in line


# --------------------------------------------------------------------------------------------------
# Every command x each of its path arguments x {missing, truncated file, directory, symlink loop, unreadable}
# (issue 23). An input that should be a directory gets a file in its place for "directory"; its main file
# is the one truncated. Output directories get a file, a loop, an unwritable parent (missing is created).


@dataclass(frozen=True)
class PathArg:
    kind: str  # "file", "dir" or "out"
    good: Callable[[Kit], Path]  # the valid input, built under the case's directory
    argv: Callable[[Kit, Path], list[str]]
    main: str = ""  # a directory's file that "truncated" cuts


CONFIG = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\nmixed_precision: 'no'\n"


def copy_of(source: Path, name: str) -> Callable[[Kit], Path]:
    def build(k: Kit) -> Path:
        shutil.copytree(source, k.tmp / name)
        return k.tmp / name
    return build


def eval_flags(k: Kit) -> list[str]:
    return ["--tasks", "boolq", "--limit", "1", "--data-dir", "data/smoke/commonsense", *k.eval_out()]


PATH_ARGS: dict[str, PathArg] = {
    "train-RECIPE": PathArg("file", lambda k: Path(k.recipe()), lambda k, p: ["train", str(p)]),
    "train-data-source": PathArg("file", lambda k: k.write("d.json", [GOOD_RECORD] * 20), lambda k, p: [
        "train", k.recipe(), f"data.sources=[{{path: '{p}'}}]", "data.val_set_size=0"]),
    "train-model": PathArg("dir", lambda k: Path(k.model()), lambda k, p: ["train", k.recipe(), *k.local_model(str(p))],
                           "model.safetensors"),
    "train-tokenizer": PathArg("dir", copy_of(TINY_TOKENIZER, "tok"), lambda k, p: ["train", k.recipe(), f"model.tokenizer={p}"],
                               "tokenizer.json"),
    "train-launch-config-file": PathArg("file", lambda k: k.write("acc.yaml", CONFIG), lambda k, p: [
        "train", k.recipe(), f"launch.config_file={p}"]),
    "train-output-dir": PathArg("out", lambda k: k.tmp / "out", lambda k, p: ["train", k.recipe(), f"output_dir={p}"]),
    "train-dry-run-RECIPE": PathArg("file", lambda k: Path(k.recipe()), lambda k, p: ["train", str(p), "--dry-run"]),
    "eval-TARGET": PathArg("dir", lambda k: k.run(), lambda k, p: ["eval", str(p), *eval_flags(k)], "adapter_model.safetensors"),
    "eval-base": PathArg("dir", lambda k: Path(k.model()), lambda k, p: [
        "eval", str(peft_copy(k)), "--base", str(p), *eval_flags(k)], "model.safetensors"),
    "eval-data-dir": PathArg("dir", lambda k: k.write("cs/boolq/test.json", [GOOD_RECORD]).parents[1], lambda k, p: [
        "eval", str(k.run()), "--tasks", "boolq", "--data-dir", str(p), *k.eval_out()], "boolq/test.json"),
    "eval-questions": PathArg("file", lambda k: k.write("q.jsonl", json.dumps(QUESTION) + "\n"), lambda k, p: [
        "eval", str(k.run()), "--suite", "mt_bench", "--questions", str(p), *k.eval_out()]),
    "eval-out": PathArg("out", lambda k: k.tmp / "out", lambda k, p: [
        "eval", str(k.run()), "--tasks", "boolq", "--limit", "1", "--data-dir", "data/smoke/commonsense", "--out", str(p)]),
    "generate-TARGET": PathArg("dir", lambda k: k.run(), lambda k, p: ["generate", str(p), "q"], "adapter_model.safetensors"),
    "generate-base": PathArg("dir", lambda k: Path(k.model()), lambda k, p: ["generate", str(peft_copy(k)), "q", "--base", str(p)],
                             "model.safetensors"),
    "chat-TARGET": PathArg("dir", lambda k: k.run(), lambda k, p: ["chat", str(p)], "adapter_model.safetensors"),
    "chat-base": PathArg("dir", lambda k: Path(k.model()), lambda k, p: ["chat", str(peft_copy(k)), "--base", str(p)],
                         "model.safetensors"),
    "merge-CHECKPOINT": PathArg("dir", lambda k: k.run(), lambda k, p: ["merge", str(p), "--out", str(k.tmp / "m")],
                                "adapter_model.safetensors"),
    "merge-base": PathArg("dir", lambda k: Path(k.model()), lambda k, p: [
        "merge", str(peft_copy(k)), "--base", str(p), "--out", str(k.tmp / "m")], "model.safetensors"),
    "merge-out": PathArg("out", lambda k: k.tmp / "m", lambda k, p: ["merge", str(k.run()), "--out", str(p)]),
    "analyze-CHECKPOINT": PathArg("dir", lambda k: k.run(), lambda k, p: ["analyze", str(p), "--out", str(k.tmp / "an")],
                                  "adapter_model.safetensors"),
    "analyze-base": PathArg("dir", lambda k: Path(k.model()), lambda k, p: [
        "analyze", str(k.run()), "--base", str(p), "--out", str(k.tmp / "an")], "model.safetensors"),
    "analyze-out": PathArg("out", lambda k: k.tmp / "an", lambda k, p: ["analyze", str(k.run()), "--out", str(p)]),
    "sweep-RECIPE": PathArg("file", lambda k: Path(k.recipe()), lambda k, p: ["sweep-rank", str(p), "--ranks", "2"]),
    "sweep-data-source": PathArg("file", lambda k: k.write("d.json", [GOOD_RECORD] * 20), lambda k, p: [
        "sweep-rank", k.recipe(), "--ranks", "2", f"data.sources=[{{path: '{p}'}}]", "data.val_set_size=0"]),
    "sweep-output-dir": PathArg("out", lambda k: k.tmp / "sw", lambda k, p: ["sweep-rank", k.recipe(), "--ranks", "2", f"output_dir={p}"]),
}
INPUT_FAULTS = ["missing", "truncated", "directory", "symlink-loop", "unreadable"]
OUTPUT_FAULTS = ["a-file", "symlink-loop", "unwritable", "dangling-link"]


def simulate_unreadable(k: Kit, path: Path) -> None:
    """Opening or listing `path` (or anything under it) fails with EACCES, as chmod 000 does for anyone
    but root; the tests run as root here, for whom permissions do not deny reading."""
    import builtins
    import io

    k.deny.append(os.path.abspath(path))
    if len(k.deny) > 1:
        return  # the guards are in place

    def denied(name) -> bool:
        try:
            name = os.path.abspath(os.fsdecode(name))
        except TypeError:  # a file descriptor
            return False
        return any(name == root or name.startswith(root + os.sep) for root in k.deny)

    def guard(real, *, fail=None):
        def wrapper(name, *args, **kwargs):
            if denied(name):
                if fail is not None:
                    return fail
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(name))
            return real(name, *args, **kwargs)
        return wrapper

    mp = k.monkeypatch
    mp.setattr(builtins, "open", guard(builtins.open))
    mp.setattr(io, "open", guard(io.open))
    mp.setattr(os, "open", guard(os.open))
    mp.setattr(os, "listdir", guard(os.listdir))
    mp.setattr(os, "scandir", guard(os.scandir))
    real_access = os.access
    mp.setattr(os, "access", lambda name, mode, *a, **kw: False if denied(name) and mode & os.R_OK else real_access(name, mode, *a, **kw))


def unreadable(k: Kit, path: Path) -> None:
    if os.geteuid() == 0:
        simulate_unreadable(k, path)
    else:
        mode = path.stat().st_mode
        path.chmod(0)
        k.restore.append(lambda: path.chmod(mode))


def fault_input(k: Kit, arg: PathArg, fault: str) -> Path:
    good = arg.good(k)
    if fault == "missing":
        return k.tmp / "nowhere" / good.name
    if fault == "symlink-loop":
        loop = k.tmp / f"loop-{good.name}"
        loop.symlink_to(loop)
        return loop
    if fault == "directory":
        if arg.kind == "dir":  # a file where a directory is expected
            return k.write(f"a-file-{good.name}", "x")
        (k.tmp / f"a-dir-{good.name}").mkdir()
        return k.tmp / f"a-dir-{good.name}"
    if fault == "truncated":
        truncate(good / arg.main if arg.kind == "dir" else good)
        return good
    unreadable(k, good)
    return good


def fault_output(k: Kit, arg: PathArg, fault: str) -> Path:
    place = arg.good(k)
    if fault == "a-file":
        return k.write(place.name, "mine")
    if fault == "symlink-loop":
        place.symlink_to(place)
        return place
    if fault == "dangling-link":
        place.symlink_to(k.tmp / "nowhere" / place.name)
        return place
    parent = k.tmp / "read-only"
    parent.mkdir()
    real_access = os.access
    k.monkeypatch.setattr(os, "access", lambda name, mode, *a, **kw: False if os.path.abspath(name) == str(parent)
                          and mode & os.W_OK else real_access(name, mode, *a, **kw))
    return parent / place.name


MATRIX = [(name, fault) for name, arg in PATH_ARGS.items() for fault in (OUTPUT_FAULTS if arg.kind == "out" else INPUT_FAULTS)]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name,fault", MATRIX, ids=[f"{n}-{f}" for n, f in MATRIX])
def test_every_path_argument_refuses_every_fault_in_one_line(name, fault, kit, monkeypatch, capfd):
    arg = PATH_ARGS[name]

    def build(k: Kit) -> list[str]:
        argv = arg.argv(k, Path("PLACEHOLDER"))  # builds the other inputs first (a run, a PEFT copy)
        path = fault_output(k, arg, fault) if arg.kind == "out" else fault_input(k, arg, fault)
        return [str(path) if a == "PLACEHOLDER" else a.replace("PLACEHOLDER", str(path)) for a in argv]

    try:
        line = assert_refused(build, kit, monkeypatch, capfd)
    finally:
        for restore in kit.restore:
            restore()
    assert "Traceback" not in line


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("target", ["gguf", "mt-bench-without-judge-model"])
def test_a_refusal_with_the_default_output_writes_not_even_a_directory(target, kit, monkeypatch, capfd):
    """`dora eval` on a garbage .gguf (default output runs/eval-<name> under the current directory), an MT-Bench
    refusal (default output eval-final in the run directory): nothing written, no directory made."""
    if target == "gguf":
        argv = ["eval", gguf(kit, b"GGUF\x03\x00\x00\x00" + bytes(64)), "--tasks", "boolq",
                "--data-dir", str(ROOT / "data" / "smoke" / "commonsense")]
    else:
        argv = ["eval", str(kit.run()), *judge_files(kit, prompts_with("{question}{answer}", {
            "single-v1-multi-turn": "{question_1}", "single-math-v1-multi-turn": "{question_1}"}))[:-2],
            "eval.mt_bench.judge_model=null"]
    before = snapshot(kit.tmp)
    code, _, err = dora_in_process(argv, monkeypatch, capfd, cwd=kit.tmp)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert snapshot(kit.tmp) == before


@pytest.mark.usefixtures("one_thread")
def test_the_error_names_what_the_user_gave(kit, monkeypatch, capfd):
    """A PEFT adapter's missing base is named where it is written (adapter_config.json), not a recipe.yaml that
    does not exist; `--template` is this command's option, never the recipe's data.template."""
    line = assert_refused(lambda k: ["generate", str(peft_copy(k, base=k.tmp / "gone")), "q"], kit, monkeypatch, capfd)
    assert "peft/adapter_config.json: base_model_name_or_path:" in line and "recipe.yaml" not in line
    final = conversation_run(kit)
    code, err = dora(["generate", str(final), "q", "--template", "alpaca", "--max-new-tokens", "2"], monkeypatch, capfd)
    assert code == 0, err
    code, err = dora(["generate", str(final), "q"], monkeypatch, capfd)
    assert code == 2 and "data.template: chat: the tokenizer" in err and "use data.template: llm_adapters" in err
    code, err = dora(["generate", str(final), "q", "--template", "chat"], monkeypatch, capfd)
    assert code == 2 and "--template chat:" in err and "--template llm_adapters or alpaca" in err


def test_the_path_matrix_covers_every_command():
    assert {name.split("-")[0] for name in PATH_ARGS} == {"train", "eval", "generate", "chat", "merge", "analyze", "sweep"}
    assert len(MATRIX) >= 100


def test_the_battery_is_large_enough():
    """Issue 13 asks for at least 60 cases through the real CLI."""
    assert len(CASES) >= 60


# --------------------------------------------------------------------------------------------------
# Promises of issue 13 that are not refusals, in the lead's rooms (strict xfails, as above)


@pytest.mark.usefixtures("one_thread")
def test_a_rerun_merge_removes_an_interrupted_merge_s_leftovers(kit, monkeypatch, capfd):
    final = kit.run()
    gone = subprocess.Popen(["true"])  # a process that has ended: the killed merge
    gone.wait()
    leftover = kit.tmp / f".tmp-merged-{gone.pid}"  # files.atomic_directory's temporary of --out merged
    (leftover / "model.safetensors").parent.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1024)
    code, err = dora(["merge", str(final), "--out", str(kit.tmp / "merged")], monkeypatch, capfd)
    assert code == 0, err
    assert not leftover.exists()


@pytest.mark.usefixtures("one_thread")
def test_the_largest_seed_the_schema_takes_trains(kit, monkeypatch, capfd):
    code, err = dora(["train", kit.recipe(), "train.seed=4294967295", "train.max_steps=1", "train.save_every=null"],
                     monkeypatch, capfd)
    assert code == 0, err
