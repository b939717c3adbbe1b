"""Commonsense evaluation end to end on a tiny random LLaMA + the tiny tokenizer: both modes, output
files, batched vs batch-1 agreement, log-likelihood against a plain reference, resuming, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_llama

from dora_cli.errors import UserError
from dora_cli.eval import commonsense
from dora_cli.eval.commonsense import evaluate_commonsense
from dora_cli.eval.predict import generate_batch, loglik_batch, loglik_batch_reference
from dora_cli.eval.tasks import TASKS, load_task
from dora_cli.prompts import eval_prompt

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "data" / "smoke" / "commonsense"
FAST = dict(num_beams=2, max_new_tokens=6, progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=512)


# One small test set per task in the LLM-Adapters layout, written here (different prompt lengths).
TEMPLATES = {
    "boolq": ("Please answer the following question with true or false, question: is {w} a word?", ["true", "false"]),
    "piqa": ("Please choose the correct solution to the question: {w}\n\nSolution1: a\n\nSolution2: b", ["solution1", "solution2"]),
    "social_i_qa": ("Please choose the correct answer to the question: {w}\n\nAnswer1: x Answer2: y Answer3: z", ["answer1", "answer2", "answer3"]),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: {w}\n\nEnding1: a Ending2: b Ending3: c Ending4: d", [f"ending{i}" for i in range(1, 5)]),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: {w} _\n\nOption1: x Option2: y", ["option1", "option2"]),
    "ARC-Easy": ("Please choose the correct answer to the question: {w}\n\nAnswer1: a Answer2: b Answer3: c Answer4: d", [f"answer{i}" for i in range(1, 5)]),
    "ARC-Challenge": ("Please choose the correct answer to the question: {w}\n\nAnswer1: a Answer2: b Answer3: c", ["answer1", "answer2", "answer3"]),
    "openbookqa": ("Please choose the correct answer to the question: {w}\n\nAnswer1: a Answer2: b Answer3: c Answer4: d", [f"answer{i}" for i in range(1, 5)]),
}
WORDS = ["cat", "a long question about the colour of the sky at noon", "dog?", "which tool cuts wood best", "sun"]


def make_root(root: Path, n: int = 4) -> Path:
    for task, (text, labels) in TEMPLATES.items():
        records = []
        for i in range(n):
            answer = labels[i % len(labels)]
            instruction = text.format(w=WORDS[i % len(WORDS)]) + "\n\nAnswer format: " + "/".join(labels)
            records.append({"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer})
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / "test.json").write_text(json.dumps(records, indent=1))
    return root


@pytest.fixture
def data_root(tmp_path):
    return make_root(tmp_path / "data")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- end to end --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["generate", "loglik"])
def test_all_tasks_end_to_end(model, tok, data_root, tmp_path, mode):
    out = tmp_path / "eval"
    expected = {"boolq": 70.0, "ARC-Easy": 80.0, "avg": 77.0}
    m = evaluate_commonsense(
        model, tok, out, data_dir=data_root, mode=mode, batch_size=3, limit=3, expected=expected,
        model_name="tiny", **FAST,
    )
    assert list(m["tasks"]) == list(TASKS)
    for t in m["tasks"].values():
        assert set(t) == {"accuracy", "se", "correct", "n", "no_answer_rate"} and t["n"] == 3
        assert t["accuracy"] == pytest.approx(100 * t["correct"] / 3, abs=1e-3)
        assert t["se"] == pytest.approx((t["accuracy"] * (100 - t["accuracy"]) / 3) ** 0.5, abs=1e-3)
        if mode == "loglik":
            assert t["no_answer_rate"] == 0
    assert m["average"] == pytest.approx(sum(t["accuracy"] for t in m["tasks"].values()) / 8)
    assert m["settings"]["mode"] == mode and m["settings"]["batch_size"] == 3 and m["settings"]["limit"] == 3
    assert m["settings"]["model"] == "tiny" and "LlamaForCausalLM" in m["settings"]["model_description"]
    assert (m["settings"]["num_beams"] == 2) == (mode == "generate")
    assert m["expected"] == expected
    assert m["difference"]["boolq"] == pytest.approx(m["tasks"]["boolq"]["accuracy"] - 70.0)
    assert m["difference"]["avg"] == pytest.approx(m["average"] - 77.0)
    assert json.loads((out / "metrics.json").read_text()) == m

    for task in TASKS:
        rows = [json.loads(line) for line in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == [f"{task}-{i}" for i in range(3)]
        for r in rows:
            assert {"id", "prompt", "output", "prediction", "answer", "correct"} <= set(r)
            assert r["prompt"].endswith("### Response:\n") and r["correct"] == (r["prediction"] == r["answer"])
            if mode == "loglik":
                assert r["prediction"] in r["scores"] and r["output"] == f"the correct answer is {r['prediction']}"
                assert r["scores"][r["prediction"]] == max(r["scores"].values())

    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| Model | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Avg |"
    assert table[2].startswith("| tiny | ") and table[2].count("|") == 11
    assert table[3] == "| paper | 70.0 | - | - | - | - | 80.0 | - | - | 77.0 |"
    assert not list(out.rglob("*.tmp"))


def test_smoke_data_generate(model, tok, tmp_path):
    if not (SMOKE / "boolq" / "test.json").is_file():
        pytest.skip("data/smoke is absent")
    m = evaluate_commonsense(model, tok, tmp_path, data_dir=SMOKE, tasks=["boolq", "ARC-Easy"], limit=4, batch_size=4, **FAST)
    assert {t: v["n"] for t, v in m["tasks"].items()} == {"boolq": 4, "ARC-Easy": 4}
    assert "| - |" in (tmp_path / "results.md").read_text()  # tasks not evaluated


# --- batching ----------------------------------------------------------------------------------------


def test_batched_generation_agrees_with_batch_1(model, tok, data_root):
    # Prompts of every task mixed, so that batches hold very different lengths (much left padding).
    prompts = [eval_prompt(e.instruction) for t in TASKS for e in load_task(t, make_root(data_root, n=5))]
    assert len(prompts) == 40 and len({len(tok(p)["input_ids"]) for p in prompts}) > 10
    one = [generate_batch(model, tok, [p], num_beams=4, max_new_tokens=16)[0] for p in prompts]
    batched = []
    for i in range(0, len(prompts), 8):
        batched += generate_batch(model, tok, prompts[i : i + 8], num_beams=4, max_new_tokens=16)
    agreement = sum(a == b for a, b in zip(one, batched)) / len(prompts)
    assert agreement >= 0.99, list(zip(one, batched))
    assert len(set(one)) > 1  # the outputs depend on the prompt (a real comparison)


def test_prompt_prefilled_once_gives_what_generate_gives_alone(model, tok, data_root):
    prompts = [eval_prompt(e.instruction) for t in ("boolq", "hellaswag", "ARC-Easy") for e in load_task(t, data_root)]
    shared = generate_batch(model, tok, prompts, num_beams=4, max_new_tokens=12, share_prefill=True)
    plain = generate_batch(model, tok, prompts, num_beams=4, max_new_tokens=12, share_prefill=False)
    assert shared == plain


@pytest.mark.parametrize("room", [0, 3, 40])  # 0 and 3: more tokens than planned for (it grows)
def test_beam_layer_holds_what_a_concatenating_cache_holds(room):
    """Updates and beam reorders (within each example, as beam search does) on a BeamLayer and on
    transformers' DynamicLayer: the same keys and values bit for bit at every step."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from dora_cli.eval.predict import BeamLayer

    gen = torch.Generator().manual_seed(0)
    examples, beams, heads, prompt, dim = 3, 4, 2, 5, 8
    plain = DynamicLayer()
    k = torch.randn(examples, heads, prompt, dim, generator=gen).repeat_interleave(beams, dim=0)
    plain.update(k, k + 1)
    ours = BeamLayer.of(plain, room)
    for step in range(12):
        new = torch.randn(examples * beams, heads, 1, dim, generator=gen)
        a, b = plain.update(new, -new), ours.update(new, -new)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        parents = torch.randint(0, beams, (examples, beams), generator=gen) + beams * torch.arange(examples)[:, None]
        plain.reorder_cache(parents.flatten())
        ours.reorder_cache(parents.flatten())
        assert torch.equal(plain.keys, ours.keys) and torch.equal(plain.values, ours.values), step
    assert ours.get_seq_length() == plain.get_seq_length() == prompt + 12


def test_generation_uses_the_beam_cache(model, tok, monkeypatch):
    """The shared prefill hands generate BeamLayers (and generate reorders them)."""
    from dora_cli.eval import predict

    reorders = []
    real = predict.BeamLayer.reorder_cache
    monkeypatch.setattr(predict.BeamLayer, "reorder_cache", lambda self, idx: reorders.append(1) or real(self, idx))
    generate_batch(model, tok, ["a question", "another, longer question"], num_beams=4, max_new_tokens=5)
    assert reorders


def test_loglik_prefix_sharing_matches_the_reference(model, tok, data_root):
    examples = [e for t in TASKS for e in load_task(t, data_root)]
    prompts = [eval_prompt(e.instruction) for e in examples]
    cands = [e.candidates for e in examples]
    fast = loglik_batch(model, tok, prompts, cands)
    ref = loglik_batch_reference(model, tok, prompts, cands)
    for f, r, c in zip(fast, ref, cands):
        assert list(f) == list(c)
        for label in c:
            assert f[label] == pytest.approx(r[label], abs=1e-4)
    # Batch composition does not change a score.
    alone = loglik_batch(model, tok, prompts[:1], cands[:1])[0]
    assert alone == pytest.approx(fast[0], abs=1e-4)


def test_both_modes_on_one_prefill_give_what_each_gives_alone(model, tok, data_root, monkeypatch):
    """generate_and_loglik: generate_batch's texts exactly, the reference's scores to float rounding, without
    falling back to a second pass over the prompts (loglik_batch is never called)."""
    from dora_cli.eval import predict

    examples = [e for t in TASKS for e in load_task(t, data_root)]
    prompts = [eval_prompt(e.instruction) for e in examples]
    cands = [e.candidates for e in examples]
    texts = generate_batch(model, tok, prompts, num_beams=4, max_new_tokens=10)
    ref = loglik_batch_reference(model, tok, prompts, cands)
    monkeypatch.setattr(predict, "loglik_batch", lambda *a, **k: pytest.fail("a second pass over the prompts"))
    both_texts, scores = predict.generate_and_loglik(model, tok, prompts, cands, num_beams=4, max_new_tokens=10)
    assert both_texts == texts
    for got, want, c in zip(scores, ref, cands):
        assert list(got) == list(c)
        for label in c:
            assert got[label] == pytest.approx(want[label], abs=1e-4)


def test_evaluating_both_modes_writes_what_two_runs_write(model, tok, data_root, tmp_path):
    kwargs = dict(data_dir=data_root, tasks=["boolq", "ARC-Easy"], batch_size=3, limit=4, **FAST)
    both = commonsense.evaluate_commonsense_modes(
        model, tok, {"generate": tmp_path / "g", "loglik": tmp_path / "l"}, **kwargs)
    for mode, sub in (("generate", "g"), ("loglik", "l")):
        alone = evaluate_commonsense(model, tok, tmp_path / f"alone-{sub}", mode=mode, **kwargs)
        assert both[mode]["tasks"] == alone["tasks"] and both[mode]["settings"]["mode"] == mode
        for task in kwargs["tasks"]:
            ours, theirs = ([json.loads(x) for x in (tmp_path / d / "predictions" / f"{task}.jsonl").read_text().splitlines()]
                            for d in (sub, f"alone-{sub}"))
            assert [(r["id"], r["output"], r["prediction"]) for r in ours] == [(r["id"], r["output"], r["prediction"]) for r in theirs]
    # A rerun resumes each mode from its own predictions: nothing left to predict.
    again = commonsense.evaluate_commonsense_modes(
        model, tok, {"generate": tmp_path / "g", "loglik": tmp_path / "l"}, **kwargs)
    assert all(v is None for m in again.values() for v in m["examples_per_s"].values())


def test_loglik_scores_the_continuation_tokens_only(model, tok):
    import torch

    prompt = eval_prompt("Is fire hot?\n\nAnswer format: true/false")
    score = loglik_batch(model, tok, [prompt], [("true",)])[0]["true"]
    p_ids = tok(prompt)["input_ids"]
    full = tok(prompt + "the correct answer is true")["input_ids"]
    assert full[: len(p_ids)] == p_ids  # this tokenizer does not merge across the boundary
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0], -1)
    manual = sum(float(logp[t - 1, full[t]]) for t in range(len(p_ids), len(full)))
    assert score == pytest.approx(manual, abs=1e-4)


# --- resuming ----------------------------------------------------------------------------------------


def test_resume_after_interruption_does_not_recompute(model, tok, data_root, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    kwargs = dict(data_dir=data_root, tasks=["boolq", "piqa"], batch_size=2, limit=4, **FAST)
    real = commonsense.generate_batch
    calls: list[int] = []

    def interrupted(model, tok, prompts, **kw):
        if len(calls) == 3:  # boolq done (2 batches), then one piqa batch, then killed
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(commonsense, "generate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_commonsense(model, tok, out, **kwargs)
    assert not (out / "metrics.json").exists()
    assert len((out / "predictions" / "piqa.jsonl").read_text().splitlines()) == 2
    with open(out / "predictions" / "piqa.jsonl", "a") as f:  # a write cut by the kill
        f.write('{"id": "piqa-3", "prompt": "Below is')

    def counting(model, tok, prompts, **kw):
        calls.append(len(prompts))
        return real(model, tok, prompts, **kw)

    calls.clear()
    monkeypatch.setattr(commonsense, "generate_batch", counting)
    resumed = evaluate_commonsense(model, tok, out, **kwargs)
    assert sum(calls) == 2  # only the two piqa examples that were not done
    for task in ("boolq", "piqa"):
        ids = [json.loads(line)["id"] for line in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        assert sorted(ids) == [f"{task}-{i}" for i in range(4)]

    calls.clear()
    again = evaluate_commonsense(model, tok, out, **{**kwargs, "batch_size": 3})  # batch size is not a setting
    assert calls == [] and again["tasks"] == resumed["tasks"]
    assert resumed["examples_per_s"]["piqa"] > 0 and again["examples_per_s"] == {"boolq": None, "piqa": None}

    fresh = evaluate_commonsense(model, tok, tmp_path / "fresh", **kwargs)
    assert fresh["tasks"] == resumed["tasks"]


def test_other_settings_are_refused_before_writing(model, tok, data_root, tmp_path):
    out = tmp_path / "eval"
    evaluate_commonsense(model, tok, out, data_dir=data_root, tasks=["boolq"], limit=2, **FAST)
    before = snapshot(out)
    with pytest.raises(UserError, match="mode: 'generate' then, 'loglik' now"):
        evaluate_commonsense(model, tok, out, data_dir=data_root, tasks=["boolq"], limit=2, mode="loglik", progress=False)
    with pytest.raises(UserError, match="num_beams"):
        evaluate_commonsense(model, tok, out, data_dir=data_root, tasks=["boolq"], limit=2, **{**FAST, "num_beams": 3})
    assert snapshot(out) == before
    m = evaluate_commonsense(model, tok, out, data_dir=data_root, tasks=["boolq"], limit=2, mode="loglik", overwrite=True, progress=False)
    assert m["settings"]["mode"] == "loglik"
    assert all("scores" in json.loads(line) for line in (out / "predictions" / "boolq.jsonl").read_text().splitlines())


# --- bad inputs --------------------------------------------------------------------------------------


def test_bad_inputs_leave_no_files(model, tok, data_root, tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(UserError) as err:
        evaluate_commonsense(model, tok, out, data_dir=data_root, tasks=["boolq", "hellaswg"], **FAST)
    assert 'did you mean "hellaswag"' in str(err.value) and "winogrande" in str(err.value)
    (data_root / "piqa" / "test.json").unlink()
    with pytest.raises(UserError, match="no test file for task piqa"):
        evaluate_commonsense(model, tok, out, data_dir=data_root, tasks=["boolq", "piqa"], **FAST)
    records = json.loads((data_root / "winogrande" / "test.json").read_text())
    records[2]["answer"] = "option3"
    (data_root / "winogrande" / "test.json").write_text(json.dumps(records))
    with pytest.raises(UserError) as err:
        evaluate_commonsense(model, tok, out, data_dir=data_root, tasks=["winogrande"], **FAST)
    assert "winogrande/test.json" in str(err.value) and "record 2" in str(err.value)
    with pytest.raises(UserError, match="mode"):
        evaluate_commonsense(model, tok, out, data_dir=data_root, tasks=["boolq"], mode="greedy", progress=False)
    with pytest.raises(UserError, match="expected"):
        evaluate_commonsense(model, tok, out, data_dir=data_root, tasks=["boolq"], expected={"bolq": 1.0}, **FAST)
    assert not out.exists()
