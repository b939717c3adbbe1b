"""The lm_eval suite (EleutherAI's lm-evaluation-harness) and the cross-check of our loglik scorer against it.

- the shipped llm_adapters_* tasks render exactly our evaluation prompt, candidates and gold answer;
- the cross-check: on the same model and examples, lm-eval's choice is our loglik mode's on every example,
  the accuracies are equal, and lm-eval's log-likelihood of a candidate is ours plus log p("\\n" | prompt),
  computed here on its own (lm-eval moves the prompt's trailing newline into the continuation);
- the suite through `dora eval`: every kind of target (our adapter unmerged, merged, PEFT's adapter against
  lm-eval's own PEFT path, a model directory, a .gguf base), the README's local-file task, resuming and
  skipping, refusals (one line, exit 2, nothing written), and `dora sweep-rank` on the suite.

The cross-check on SmolLM2-135M is slow (`make test-slow`); with DORA_LMEVAL_REPORT=FILE its agreement
figures go to FILE as JSON.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED_DATA, TINY_TOKENIZER, dora_in_process, minimal_gguf, tiny_llama
from test_eval_commonsense import make_root
from test_sweep import fast

from dora_cli.adapters import AdapterConfig, apply_adapters, save_adapter
from dora_cli.eval.commonsense import evaluate_commonsense
from dora_cli.eval.harness import LLM_ADAPTERS, TAG, evaluate_harness, local_only, request_key, task_manager
from dora_cli.eval.predict import continuation, encode
from dora_cli.eval.tasks import TASKS, load_task
from dora_cli.files import read_jsonl
from dora_cli.prompts import eval_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = {task: name for name, task in LLM_ADAPTERS.items()}  # ARC-Easy -> llm_adapters_arc_easy
REAL = ["ARC-Easy", "boolq", "openbookqa", "piqa"]  # the test sets in ../shared/data/commonsense
EQUAL_LENGTHS = [t for t in TASKS if t != "boolq"]  # tasks whose candidates all have the same length
README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    """Small test sets of all eight tasks in the LLM-Adapters layout."""
    return str(make_root(tmp_path_factory.mktemp("harness") / "data", n=6))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


def adapted(tokenizer, method: str = "dora"):
    """A tiny LLaMA with trained-looking adapters, unmerged (contexts of up to 2048 tokens: lm-eval cuts longer
    ones at the model's maximum length, we do not)."""
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=2048)
    cfg = AdapterConfig(method=method, r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    apply_adapters(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model.eval(), cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny base model saved as a Hugging Face model directory (with the tokenizer)."""
    path = tmp_path_factory.mktemp("base") / "tiny"
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=2048).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- the shipped tasks render our prompts ----------------------------------------------------------------
def check_rendering(data_dir: str, tasks: list[str], limit: int | None) -> int:
    names = [SHIPPED[t] for t in tasks]
    loaded = task_manager(None, data_dir, names).load(names)["tasks"]
    checked = 0
    for task in tasks:
        lm_task = loaded[SHIPPED[task]]
        docs = list(lm_task.test_docs())[:limit]
        for doc, example in zip(docs, load_task(task, data_dir, limit), strict=True):
            assert lm_task.doc_to_text(doc) == eval_prompt(example.instruction)
            assert lm_task.doc_to_choice(doc) == [continuation(c) for c in example.candidates]
            assert lm_task.doc_to_target(doc) == example.candidates.index(example.answer)
            checked += 1
    return checked


def test_the_shipped_tasks_render_our_prompt_candidates_and_answer(synth):
    assert check_rendering(synth, list(TASKS), None) == 8 * 6
    if SHARED_DATA.is_dir():  # all of them: make test-slow
        assert check_rendering(str(SHARED_DATA / "commonsense"), REAL, 150) == 4 * 150
    names = {p.stem for p in (ROOT / "dora_cli" / "eval" / "lm_eval_tasks").glob("llm_adapters_*.yaml")}
    assert names == set(LLM_ADAPTERS) and set(LLM_ADAPTERS.values()) == set(TASKS)
    assert TAG in task_manager(None, synth, [TAG]).all_tasks


# ---- the cross-check ---------------------------------------------------------------------------------------
@torch.no_grad()
def newline_logprob(model, tokenizer, instruction: str) -> float:
    """log p("\\n" | the prompt without its trailing newline), from one forward pass of our own."""
    prompt = eval_prompt(instruction)
    ids = encode(tokenizer, prompt)
    assert encode(tokenizer, prompt.rstrip()) == ids[:-1]  # the newline is a token of its own
    logits = model(torch.tensor([ids[:-1]])).logits[0, -1].float()
    return float(torch.log_softmax(logits, -1)[ids[-1]])


def crosscheck(model, tokenizer, data_dir: str, tasks: list[str], limit: int, out: Path, newline_checks: int = 4) -> dict:
    """Our loglik mode and lm-eval (the shipped tasks, samples kept) on the same model and examples. Per task:
    n, the examples on which both choose the same answer (by lm-eval's acc, and by its acc_norm), the
    accuracies, the largest spread of (lm-eval's log-likelihood - ours) over one example's candidates, and
    the largest distance of that shift from log p("\\n" | prompt) on the first `newline_checks` examples."""
    ours = evaluate_commonsense(model, tokenizer, out / "ours", tasks=tasks, data_dir=data_dir, mode="loglik",
                                limit=limit, progress=False)
    theirs = evaluate_harness(model, tokenizer, out / "harness", tasks=[SHIPPED[t] for t in tasks], data_dir=data_dir,
                              limit=limit, samples=True, progress=False)
    report = {}
    for task in tasks:
        name, examples = SHIPPED[task], load_task(task, data_dir, limit)
        predictions = {r["id"]: r for r in read_jsonl(out / "ours" / "predictions" / f"{task}.jsonl", "predictions")}
        samples = sorted(read_jsonl(out / "harness" / "samples" / f"{name}.jsonl", "samples"), key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(len(examples)))
        same = same_norm = 0
        spread = newline_gap = 0.0
        for i, (sample, example) in enumerate(zip(samples, examples)):
            mine = predictions[example.id]
            # lm-eval was asked exactly our prompt and continuations
            assert [tuple(a) for a in sample["arguments"]] == [(eval_prompt(example.instruction), continuation(c)) for c in example.candidates]
            lls = [r[0] for r in sample["filtered_resps"]]
            shift = [ll - mine["scores"][c] for ll, c in zip(lls, example.candidates)]
            spread = max(spread, max(shift) - min(shift))
            choice = example.candidates[max(range(len(lls)), key=lls.__getitem__)]  # the first maximum, as np.argmax
            normed = [ll / len(continuation(c)) for ll, c in zip(lls, example.candidates)]
            choice_norm = example.candidates[max(range(len(lls)), key=normed.__getitem__)]
            assert sample["acc"] == float(choice == example.answer) and sample["acc_norm"] == float(choice_norm == example.answer)
            same += choice == mine["prediction"]
            same_norm += choice_norm == mine["prediction"]
            if i < newline_checks:
                newline_gap = max(newline_gap, abs(sum(shift) / len(shift) - newline_logprob(model, tokenizer, example.instruction)))
        metrics = theirs["tasks"][name]["metrics"]
        report[task] = {
            "n": len(examples), "same_choice": same, "same_choice_acc_norm": same_norm,
            "ours_accuracy": ours["tasks"][task]["accuracy"], "lm_eval_acc": round(100 * metrics["acc,none"], 4),
            "lm_eval_acc_norm": round(100 * metrics["acc_norm,none"], 4),
            "max_spread": spread, "max_newline_gap": newline_gap,
        }
        assert theirs["tasks"][name]["accuracy"] == pytest.approx(100 * metrics["acc,none"], abs=1e-3)
    return report


def assert_agreement(report: dict, tolerance: float) -> None:
    for task, r in report.items():
        assert r["same_choice"] == r["n"], (task, r)
        assert r["lm_eval_acc"] == pytest.approx(r["ours_accuracy"], abs=1e-3), (task, r)
        assert r["max_spread"] < tolerance and r["max_newline_gap"] < tolerance, (task, r)
        if task in EQUAL_LENGTHS:  # dividing by one length for all candidates changes no choice
            assert r["same_choice_acc_norm"] == r["n"] and r["lm_eval_acc_norm"] == r["lm_eval_acc"], (task, r)


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_lm_eval_picks_our_loglik_answer_on_every_example(method, synth, tokenizer, tmp_path):
    model, _ = adapted(tokenizer, method)
    report = crosscheck(model, tokenizer, synth, list(TASKS), None, tmp_path / "synth")
    assert_agreement(report, 1e-4)
    assert sum(r["n"] for r in report.values()) == 48
    if SHARED_DATA.is_dir():
        assert_agreement(crosscheck(model, tokenizer, str(SHARED_DATA / "commonsense"), REAL, 6, tmp_path / "real"), 1e-4)


@pytest.mark.slow
def test_smollm2_lm_eval_picks_our_loglik_answer_on_every_example(smollm2_dir, shared_data, tmp_path):
    """SmolLM2-135M-Instruct, the first 100 test examples of each of the four real tasks."""
    from dora_cli.models import load_model
    from dora_cli.recipe import ModelConfig

    assert check_rendering(str(shared_data / "commonsense"), REAL, None) == 2376 + 3270 + 500 + 1838
    model, tokenizer = load_model(ModelConfig(name_or_path=str(smollm2_dir)), for_training=False)
    report = crosscheck(model, tokenizer, str(shared_data / "commonsense"), REAL, 100, tmp_path, newline_checks=10)
    if os.environ.get("DORA_LMEVAL_REPORT"):
        doc = {"model": "SmolLM2-135M-Instruct", "limit": 100, "tasks": report,
               "agree": sum(r["same_choice"] for r in report.values()), "n": sum(r["n"] for r in report.values())}
        (ROOT / os.environ["DORA_LMEVAL_REPORT"]).write_text(json.dumps(doc, indent=2) + "\n")
    assert_agreement(report, 1e-3)


# ---- the suite through `dora eval` ---------------------------------------------------------------------------
def samples_of(out: Path, task: str) -> list[dict]:
    return sorted(read_jsonl(out / "lm_eval" / "samples" / f"{task}.jsonl", "samples"), key=lambda s: s["doc_id"])


def lls_of(out: Path, task: str) -> list[list[float]]:
    return [[r[0] for r in s["filtered_resps"]] for s in samples_of(out, task)]


def assert_same_answers(a: Path, b: Path, tasks: list[str], tolerance: float = 1e-4) -> None:
    for task in tasks:
        x, y = lls_of(a, task), lls_of(b, task)
        assert len(x) == len(y) > 0
        for u, v in zip(x, y):
            assert u == pytest.approx(v, abs=tolerance)
        assert [s["acc"] for s in samples_of(a, task)] == [s["acc"] for s in samples_of(b, task)]


PAIR = ["llm_adapters_boolq", "llm_adapters_piqa"]


def suite_args(synth: str, out: Path, *extra: str) -> list[str]:
    return ["--suite", "lm_eval", "--tasks", ",".join(PAIR), "--data-dir", synth, "--samples", "--out", out, *extra]


def test_every_kind_of_target_answers_alike(synth, tokenizer, model_dir, tmp_path, monkeypatch, capsys):
    """Our DoRA adapter unmerged = merged; PEFT's DoRA adapter through dora eval = PEFT's model through lm-eval's own
    HFLM; a .gguf base = its converted model directory."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dora_cli import models
    from dora_cli.merge import run_merge

    # ours: an adapter on the model directory, evaluated unmerged, then merged by dora merge
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_adapters(base, cfg)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    save_adapter(base, cfg, tmp_path / "ours", base_model=str(model_dir))
    merged = run_merge(tmp_path / "ours", out=tmp_path / "merged")
    for target, out in ((tmp_path / "ours", tmp_path / "ev-ours"), (merged, tmp_path / "ev-merged")):
        code, stdout, err = dora_in_process(["eval", target, *suite_args(synth, out)], monkeypatch, capsys)
        assert code == 0, err
        assert "| llm_adapters_boolq | 1.0 | 0 | acc * |" in stdout
    assert_same_answers(tmp_path / "ev-ours", tmp_path / "ev-merged", PAIR)

    # PEFT's DoRA adapter: dora eval (our engine loads it) against PEFT's model handed to lm-eval's HFLM
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    code, _, err = dora_in_process(["eval", tmp_path / "peft", *suite_args(synth, tmp_path / "ev-peft")], monkeypatch, capsys)
    assert code == 0, err
    oracle = lm_eval.simple_evaluate(model=HFLM(pretrained=peft_model.eval(), tokenizer=tokenizer, batch_size=4), tasks=PAIR,
                                     task_manager=task_manager(None, synth, PAIR), log_samples=True)
    for task in PAIR:
        expected = [[r[0] for r in s["filtered_resps"]] for s in sorted(oracle["samples"][task], key=lambda s: s["doc_id"])]
        for u, v in zip(lls_of(tmp_path / "ev-peft", task), expected, strict=True):
            assert u == pytest.approx(v, abs=1e-4)
        assert oracle["results"][task]["acc,none"] == json.loads((tmp_path / "ev-peft" / "lm_eval" / "metrics.json").read_text())["tasks"][task]["metrics"]["acc,none"]

    # a .gguf base: converted once (a stand-in conversion: the real one is the slow test of models.py)
    monkeypatch.setenv("DORA_CACHE", str(tmp_path / "cache"))
    gguf = minimal_gguf(tmp_path / "tiny.gguf")

    def convert(path, out_dir, **_):
        AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        return Path(out_dir)

    monkeypatch.setattr(models, "convert_gguf", convert)
    for target, out in ((gguf, tmp_path / "ev-gguf"), (model_dir, tmp_path / "ev-dir")):
        code, _, err = dora_in_process(["eval", target, *suite_args(synth, out)], monkeypatch, capsys)
        assert code == 0, err
    assert_same_answers(tmp_path / "ev-gguf", tmp_path / "ev-dir", PAIR, tolerance=0.0)


def test_metrics_resume_and_skip(synth, model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ev"
    code, stdout, err = dora_in_process(["eval", model_dir, *suite_args(synth, out, "--limit", "5")], monkeypatch, capsys)
    assert code == 0, err
    first = json.loads((out / "lm_eval" / "metrics.json").read_text())
    assert set(first["tasks"]) == set(PAIR) and first["suite"] == "lm_eval" and first["n"] == 10
    for task in PAIR:
        t, samples = first["tasks"][task], samples_of(out, task)
        p = sum(s["acc"] for s in samples) / len(samples)
        assert t["n"] == len(samples) == 5 and t["n_total"] == 6 and t["num_fewshot"] == 0 and t["version"] == 1.0
        assert t["metrics"]["acc,none"] == pytest.approx(p)
        assert t["metrics"]["acc_stderr,none"] == pytest.approx((p * (1 - p) / 4) ** 0.5)  # lm-eval's sample stderr (n - 1)
        assert t["metric"] == "acc,none" and t["accuracy"] == pytest.approx(100 * p, abs=1e-3)
        assert t["se"] == pytest.approx(100 * t["metrics"]["acc_stderr,none"], abs=1e-3)
    assert first["settings"]["lm_eval_version"] == __import__("lm_eval").__version__ and first["settings"]["limit"] == 5
    assert first["requests"] == {"answered": 20, "computed": 20, "resumed": 0}
    assert stdout.count("| llm_adapters_") == 4 and "Average of the headline metrics" in stdout
    assert (out / "lm_eval" / "results.md").read_text().strip() in stdout

    # the same settings again: skipped, nothing rewritten
    before = {p: p.read_bytes() for p in (out / "lm_eval").rglob("*") if p.is_file()}
    code, _, err = dora_in_process(["eval", model_dir, *suite_args(synth, out, "--limit", "5")], monkeypatch, capsys)
    assert code == 0 and "already evaluated with these settings; skipped" in err
    assert before == {p: p.read_bytes() for p in (out / "lm_eval").rglob("*") if p.is_file()}

    # killed halfway (a torn last line): the answers on disk are reused, the rest computed, the same metrics
    requests = out / "lm_eval" / "requests.jsonl"
    lines = requests.read_text().splitlines(keepends=True)
    requests.write_text("".join(lines[:8]) + lines[8][:20])
    (out / "lm_eval" / "metrics.json").unlink()
    code, _, err = dora_in_process(["eval", model_dir, *suite_args(synth, out, "--limit", "5")], monkeypatch, capsys)
    assert code == 0, err
    again = json.loads((out / "lm_eval" / "metrics.json").read_text())
    assert again["requests"] == {"answered": 20, "computed": 12, "resumed": 8}
    assert again["tasks"] == first["tasks"] and again["average"] == first["average"]
    keys = [r["key"] for r in read_jsonl(requests, "requests")]
    assert len(keys) == len(set(keys)) == 20

    # other tasks and limits: every request already answered is reused
    code, _, err = dora_in_process(["eval", model_dir, "--suite", "lm_eval", "--tasks", "llm_adapters_boolq",
                                    "--data-dir", synth, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    third = json.loads((out / "lm_eval" / "metrics.json").read_text())
    assert third["requests"] == {"answered": 12, "computed": 2, "resumed": 10}
    assert not (out / "lm_eval" / "samples").exists() or not list((out / "lm_eval" / "samples").iterdir())

    # another model into the same directory: refused, nothing changed
    before = {p: p.read_bytes() for p in (out / "lm_eval").rglob("*") if p.is_file()}
    other = tmp_path / "other"
    tiny_llama(seed=5, vocab_size=512, max_position_embeddings=2048).save_pretrained(other)
    code, _, err = dora_in_process(["eval", other, *suite_args(synth, out), f"model.tokenizer={model_dir}"], monkeypatch, capsys)
    # (refused once the model is loaded: the model is what differs; transformers' loading bar came before)
    assert code == 2 and err.count("error:") == 1 and "holds results made with other settings" in err.splitlines()[-1]
    assert before == {p: p.read_bytes() for p in (out / "lm_eval").rglob("*") if p.is_file()}


GENERATE_TASK = """task: boolq_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{instruction}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""
ROLLING_TASK = """task: boolq_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{instruction}}}}"
metric_list:
  - metric: word_perplexity
"""


def test_generated_and_rolling_answers_resume_as_they_were(synth, tokenizer, tmp_path):
    """Requests of every kind (loglikelihood, generate_until, loglikelihood_rolling) come back from requests.jsonl
    as lm-eval gave them; a task without a fraction metric (a perplexity) has no headline."""
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    data = Path(synth) / "boolq" / "test.json"
    (tasks_dir / "generate.yaml").write_text(GENERATE_TASK.format(data=data))
    (tasks_dir / "rolling.yaml").write_text(ROLLING_TASK.format(data=data))
    model, _ = adapted(tokenizer)
    tasks = ["boolq_generate", "boolq_perplexity", "llm_adapters_boolq"]
    run = dict(tasks=tasks, data_dir=synth, tasks_dir=str(tasks_dir), samples=True, progress=False)
    first = evaluate_harness(model, tokenizer, tmp_path / "ev", **run)
    assert first["requests"] == {"answered": 6 + 6 + 12, "computed": 24, "resumed": 0}
    assert first["tasks"]["boolq_generate"]["metric"] == "exact_match,none"
    perplexity = first["tasks"]["boolq_perplexity"]
    assert perplexity["metric"] is None and perplexity["accuracy"] is None and perplexity["metrics"]["word_perplexity,none"] > 1
    assert first["average"] == pytest.approx((first["tasks"]["boolq_generate"]["accuracy"] + first["tasks"]["llm_adapters_boolq"]["accuracy"]) / 2, abs=1e-3)
    samples = read_jsonl(tmp_path / "ev" / "samples" / "boolq_generate.jsonl", "samples")
    assert all(isinstance(s["resps"][0][0], str) for s in samples)
    (tmp_path / "ev" / "metrics.json").unlink()
    again = evaluate_harness(model, tokenizer, tmp_path / "ev", **run)
    assert again["requests"] == {"answered": 24, "computed": 0, "resumed": 24}
    assert again["tasks"] == first["tasks"]
    assert read_jsonl(tmp_path / "ev" / "samples" / "boolq_generate.jsonl", "samples") == samples


def test_a_changed_task_is_evaluated_again(synth, tokenizer, tmp_path):
    """A task YAML edited between two runs with the same settings (its prompt, its metrics): the second run is
    not skipped, and reports the task as it now is (answers to requests that did not change are reused)."""
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    task = tasks_dir / "generate.yaml"
    task.write_text(GENERATE_TASK.format(data=Path(synth) / "boolq" / "test.json"))
    model, _ = adapted(tokenizer)
    run = dict(tasks=["boolq_generate"], tasks_dir=str(tasks_dir), samples=True, progress=False)
    first = evaluate_harness(model, tokenizer, tmp_path / "ev", **run)
    task.write_text(task.read_text().replace('\\nAnswer:"', '\\nThe answer:"'))
    second = evaluate_harness(model, tokenizer, tmp_path / "ev", **run)
    assert second["requests"] == {"answered": 6, "computed": 6, "resumed": 0}
    sample = read_jsonl(tmp_path / "ev" / "samples" / "boolq_generate.jsonl", "samples")[0]
    assert sample["arguments"][0][0].endswith("\nThe answer:")
    task.write_text(task.read_text() + "  - metric: bleu\n")
    third = evaluate_harness(model, tokenizer, tmp_path / "ev", **run)
    assert third["requests"] == {"answered": 6, "computed": 0, "resumed": 6}
    assert "bleu,none" in third["tasks"]["boolq_generate"]["metrics"] and "bleu,none" not in second["tasks"]["boolq_generate"]["metrics"]
    assert first["settings"]["task_configs"] != second["settings"]["task_configs"] != third["settings"]["task_configs"]
    fourth = evaluate_harness(model, tokenizer, tmp_path / "ev", **run)  # unchanged: skipped
    assert fourth == third


def test_a_template_failing_on_a_later_document_is_one_line(tokenizer, tmp_path):
    """lm-eval checks a task's templates on its first document; one that fails on a later one fails while the
    requests are built: a UserError naming the tasks, not a traceback."""
    from dora_cli.errors import UserError

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "hint | q1", "answer": "true"}, {"instruction": "q2", "answer": "false"}]))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "t.yaml").write_text(GENERATE_TASK.format(data=data).replace("task: boolq_generate", "task: hinted")
                                      .replace('"{{instruction}}', '"{{instruction.split(\'|\')[1]}}'))
    model, _ = adapted(tokenizer)
    with pytest.raises(UserError, match=r"lm-eval cannot build the tasks \(UndefinedError: .*has no element 1"):
        evaluate_harness(model, tokenizer, tmp_path / "ev", tasks=["hinted"], tasks_dir=str(tasks_dir), progress=False)


def test_an_error_while_answering_is_not_called_a_task_error(synth, tokenizer, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def broken(self, requests, disable_tqdm=False):
        raise ValueError("the model broke")

    monkeypatch.setattr(HFLM, "loglikelihood", broken)
    model, _ = adapted(tokenizer)
    with pytest.raises(ValueError, match="the model broke"):
        evaluate_harness(model, tokenizer, tmp_path / "ev", tasks=["llm_adapters_boolq"], data_dir=synth, progress=False)


def test_a_group_without_an_aggregate_metric(synth, tokenizer, tmp_path):
    """lm-eval reports such a group with no metrics of its own (and no n): its tasks are reported, the group
    listed without metrics."""
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "group.yaml").write_text("group: two_tasks\ntask:\n  - llm_adapters_boolq\n  - llm_adapters_piqa\n")
    (tasks_dir / "wider.yaml").write_text("group: wider\ntask:\n  - two_tasks\n  - arc_easy\n")
    model, _ = adapted(tokenizer)
    # a group of local tasks needs no index of lm-eval's own (seconds); one naming one of lm-eval's tasks does
    local = task_manager(str(tasks_dir), synth, ["two_tasks"])
    assert "arc_easy" not in local.all_tasks and "wider" in local.all_groups and not local_only("wider", local)
    metrics = evaluate_harness(model, tokenizer, tmp_path / "ev", tasks=["two_tasks"], tasks_dir=str(tasks_dir),
                               data_dir=synth, progress=False)
    assert set(metrics["tasks"]) == {"llm_adapters_boolq", "llm_adapters_piqa"} and metrics["n"] == 12
    assert metrics["groups"] == {"two_tasks": {}}
    assert "| two_tasks |" not in (tmp_path / "ev" / "results.md").read_text()


def test_a_few_shot_count_a_task_does_not_take_is_said(synth, tokenizer, tmp_path, capsys):
    """lm-eval keeps a task whose config fixes num_fewshot 0 at zero shots whatever --num-fewshot says (and logs
    it at a level we keep off the console): we say it, and report the count used."""
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "generate.yaml").write_text(GENERATE_TASK.format(data=Path(synth) / "boolq" / "test.json"))
    model, _ = adapted(tokenizer)
    metrics = evaluate_harness(model, tokenizer, tmp_path / "ev", tasks=["llm_adapters_boolq", "boolq_generate"],
                               data_dir=synth, tasks_dir=str(tasks_dir), num_fewshot=2, progress=False)
    assert metrics["tasks"]["llm_adapters_boolq"]["num_fewshot"] == 0 and metrics["tasks"]["boolq_generate"]["num_fewshot"] == 2
    err = capsys.readouterr().err
    assert "llm_adapters_boolq: its config fixes num_fewshot 0; --num-fewshot 2 does not apply to it" in err
    assert "boolq_generate:" not in err


def test_request_keys_tell_repeated_requests_apart():
    assert request_key("loglikelihood", ("a", "b"), 0) != request_key("loglikelihood", ("a", "b"), 1)
    assert request_key("loglikelihood", ("a", "b"), 0) != request_key("generate_until", ("a", "b"), 0)
    assert request_key("generate_until", ("a", {"until": ["\n"], "do_sample": False}), 0) == \
        request_key("generate_until", ("a", {"do_sample": False, "until": ["\n"]}), 0)


def readme_task() -> str:
    match = re.search(r"```yaml\n( *# tasks/arc_easy_local\.yaml\n.*?)```", README, re.S)
    assert match, "README: the local-file task example"
    return textwrap.dedent(match.group(1))


def test_the_readme_local_file_task_runs_offline(shared_data, synth, model_dir, tmp_path, monkeypatch, capsys):
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "arc_easy_local.yaml").write_text(readme_task())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ev"
    code, stdout, err = dora_in_process(["eval", model_dir, "--suite", "lm_eval", "--tasks", "arc_easy_local",
                                         "--tasks-dir", tasks_dir, "--limit", "8", "--out", out], monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((out / "lm_eval" / "metrics.json").read_text())
    task = metrics["tasks"]["arc_easy_local"]
    assert task["n"] == 8 and task["n_total"] == 2376 and set(task["metrics"]) == {"acc,none", "acc_stderr,none"}
    assert "| arc_easy_local |" in stdout


# ---- refusals: one line, exit 2, nothing written ------------------------------------------------------------------
REFUSALS = {
    "unknown task": (["--tasks", "arc_eazy"], 'unknown lm-eval task "arc_eazy" (did you mean "arc_easy"?)'),
    "a commonsense name": (["--tasks", "ARC-Easy"], 'unknown lm-eval task "ARC-Easy" (did you mean "arc_easy"?)'),
    "the commonsense default list": ([], "eval.tasks: the lm_eval suite takes lm-eval task names"),
    "tasks dir": (["--tasks", "arc_easy", "--tasks-dir", "nowhere"], "eval.lm_eval.tasks_dir: nowhere is not a directory"),
    "no data dir": (["--tasks", "llm_adapters_boolq"], "eval.data_dir is not set"),
    "a task of the tag without data": (["--tasks", "llm_adapters", "--data-dir", "{broken}"], "no test file for task hellaswag"),
    "a bad record": (["--tasks", "llm_adapters_winogrande", "--data-dir", "{broken}"], "'answer' must be one of option1 or option2"),
    "few-shot count": (["--tasks", "arc_easy", "--num-fewshot", "-1"], "eval.lm_eval.num_fewshot: expected a value >= 0"),
    "a dataset not on this machine": (["--tasks", "arc_easy"], "the dataset of a task could not be loaded"),
    "a task running model-written code": (["--tasks", "unsafe_local", "--tasks-dir", "{unsafe}"],
                                          "unsafe_local: the task runs code the model wrote (unsafe_code)"),
    "a task lm-eval cannot build": (["--tasks", "bad_output_type", "--tasks-dir", "{bad}"],
                                    "lm-eval cannot build the tasks (ValueError: Got invalid output_type 'multiple_choise'"),
    "a task's template that fails": (["--tasks", "bad_template", "--tasks-dir", "{bad}"],
                                     "lm-eval cannot build the tasks (UndefinedError: 'no_such_field' is undefined)"),
    "a group and one of its tasks": (["--tasks", "member_group,member", "--tasks-dir", "{bad}"],
                                     "lm-eval cannot build the tasks (ValueError: Duplicate task 'member'"),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """The LLM-Adapters layout without hellaswag's test set and with a bad winogrande record."""
    root = make_root(tmp_path_factory.mktemp("broken"), n=2)
    (root / "hellaswag" / "test.json").unlink()
    (root / "winogrande" / "test.json").write_text(json.dumps([{"instruction": "q _\n\nAnswer format: option1/option2", "answer": "3"}]))
    return root


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_exit_2_and_write_nothing(case, model_dir, broken, tmp_path, monkeypatch, capsys):
    args, expected = REFUSALS[case]
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    (unsafe / "task.yaml").write_text(GENERATE_TASK.format(data=broken / "boolq" / "test.json").replace(
        "task: boolq_generate", "task: unsafe_local\nunsafe_code: true"))
    bad = tmp_path / "bad"
    bad.mkdir()
    member = GENERATE_TASK.format(data=broken / "boolq" / "test.json")
    (bad / "member.yaml").write_text(member.replace("task: boolq_generate", "task: member"))
    (bad / "group.yaml").write_text("group: member_group\ntask:\n  - member\n")
    (bad / "output.yaml").write_text(member.replace("task: boolq_generate", "task: bad_output_type").replace(
        "output_type: generate_until", "output_type: multiple_choise"))
    (bad / "template.yaml").write_text(member.replace("task: boolq_generate", "task: bad_template").replace(
        '"{{answer}}"', '"{{no_such_field}}"'))
    args = [a.format(broken=broken, unsafe=unsafe, bad=bad) for a in args]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ev"
    code, _, err = dora_in_process(["eval", model_dir, "--suite", "lm_eval", *args, "--out", out], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err
    assert not out.exists()


def test_without_lm_eval_the_extra_is_named(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    out = tmp_path / "ev"
    code, _, err = dora_in_process(["eval", model_dir, "--suite", "lm_eval", "--tasks", "arc_easy", "--out", out], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'dora_cli[lm_eval]'" in err and not out.exists()


def test_without_lm_eval_the_sweeps_settings_name_the_extra(monkeypatch):
    from dora_cli.errors import UserError
    from dora_cli.eval.harness import checked_task_configs

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(UserError, match=re.escape("pip install 'dora_cli[lm_eval]'")):
        checked_task_configs(["arc_easy_fresh_name"], tasks_dir=None, data_dir="/nowhere/new", limit=None)


# ---- the rank sweep scores lm-eval tasks ---------------------------------------------------------------------
def test_the_rank_sweep_takes_the_lm_eval_suite(synth, tmp_path, monkeypatch, capsys):
    from dora_cli import sweep
    from dora_cli.errors import UserError

    monkeypatch.chdir(ROOT)
    overrides = [f"output_dir={tmp_path / 'out'}", *fast("eval.suite=lm_eval", f"eval.tasks=[{','.join(PAIR)}]", f"eval.data_dir={synth}", "eval.limit=3")]
    doc = sweep.run_sweep("recipes/smoke.yaml", overrides, ranks=["2"], methods=["lora", "dora"])
    assert doc["summary"] == {"ok": 2, "failed": 0, "pending": 0}
    for trial in doc["trials"]:
        assert set(trial["tasks"]) == set(PAIR) and trial["examples"] == 6 and trial["average"] is not None
        metrics = json.loads(Path(trial["paths"]["eval_metrics"]).read_text())
        assert metrics["suite"] == "lm_eval" and trial["tasks"]["llm_adapters_boolq"] == metrics["tasks"]["llm_adapters_boolq"]["accuracy"]
    table = (tmp_path / "out" / "sweep" / "sweep.md").read_text()
    assert "| llm_adapters_boolq | llm_adapters_piqa | Avg |" in table and "headline metric" in table
    capsys.readouterr()
    sweep.run_sweep("recipes/smoke.yaml", overrides, ranks=["2"], methods=["lora", "dora"])
    assert capsys.readouterr().err.count(": skipped (done") == 2
    with pytest.raises(UserError, match="compares per-task accuracies"):
        sweep.plan_sweep("recipes/smoke.yaml", [o.replace("suite=lm_eval", "suite=math") for o in overrides], ranks=["2"],
                         methods=["dora"])
