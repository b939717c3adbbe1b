"""run_eval: a checkpoint of ours (tiny random base from the smoke recipe + a DoRA adapter) evaluated
through its recipe's eval section, with overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_eval_commonsense import make_root
from test_eval_mtbench import JUDGE_PROMPTS, QUESTIONS, REFS, write_jsonl

from dora_cli.adapters import apply_adapters, save_adapter
from dora_cli.errors import UserError
from dora_cli.eval.commonsense import evaluate_commonsense
from dora_cli.evaluate import run_eval
from dora_cli.recipe import dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def setup(monkeypatch):
    if not (ROOT / "data" / "tiny_tokenizer" / "tokenizer.json").is_file():
        pytest.skip("data/tiny_tokenizer is absent")
    monkeypatch.chdir(ROOT)  # the smoke recipe's tokenizer path is relative to the repository
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def checkpoint(path: Path, overrides: list[str]):
    from dora_cli.models import load_model

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", overrides)
    model, tokenizer = load_model(recipe.model, for_training=False)
    apply_adapters(model, recipe.adapter)
    with torch.no_grad():  # a trained-looking adapter: not the identity
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    path.mkdir(parents=True)
    save_adapter(model, recipe.adapter, path, base_model=recipe.model.name_or_path)
    (path / "recipe.yaml").write_text(dump_recipe(recipe))
    return model.eval(), tokenizer


def test_commonsense_through_the_recipe(tmp_path):
    data = make_root(tmp_path / "data", n=3)
    ckpt = tmp_path / "run" / "final"
    model, tok = checkpoint(ckpt, [f"eval.data_dir={data}", "eval.tasks=[boolq,piqa]", "eval.mode=loglik",
                                   "expected.boolq=70.0"])
    m = run_eval(ckpt, ["eval.limit=2"], progress=False)
    out = tmp_path / "run" / "eval-final" / "commonsense"
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["settings"]["model"] == str(ckpt) and m["settings"]["limit"] == 2 and m["expected"] == {"boolq": 70.0}
    # the same predictions as the adapted model in memory
    direct = evaluate_commonsense(model, tok, tmp_path / "direct", data_dir=data, tasks=["boolq", "piqa"],
                                  mode="loglik", limit=2, progress=False)
    assert direct["tasks"] == m["tasks"]
    for task in ("boolq", "piqa"):
        a = [json.loads(x)["scores"] for x in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        b = [json.loads(x)["scores"] for x in (tmp_path / "direct" / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        assert len(a) == len(b) == 2 and all(x == pytest.approx(y, abs=1e-4) for x, y in zip(a, b))


def test_mt_bench_through_the_recipe(tmp_path):
    d = tmp_path / "mt"
    write_jsonl(d / "question.jsonl", QUESTIONS[:2])
    write_jsonl(d / "judge_prompts.jsonl", JUDGE_PROMPTS)
    write_jsonl(d / "reference_answer" / "gpt-4.jsonl", REFS)
    ckpt = tmp_path / "run" / "final"
    checkpoint(ckpt, ["eval.suite=mt_bench", f"eval.mt_bench.questions={d / 'question.jsonl'}", "eval.mt_bench.max_new_tokens=4"])
    m = run_eval(ckpt, out=tmp_path / "ev", progress=False)
    assert m["questions"] == 2 and m["scores"] is None
    rows = (tmp_path / "ev" / "mt_bench" / "model_answer" / "run-final.jsonl").read_text().splitlines()
    assert [json.loads(r)["question_id"] for r in rows] == [81, 111]


def test_bad_suite_inputs_fail_before_loading(tmp_path):
    ckpt = tmp_path / "run" / "final"
    checkpoint(ckpt, [f"eval.data_dir={tmp_path / 'nowhere'}", "eval.tasks=[boolq]"])
    with pytest.raises(UserError, match="not a directory"):
        run_eval(ckpt, progress=False)
    with pytest.raises(UserError, match='did you mean "winogrande"'):
        run_eval(ckpt, ["eval.tasks=[winogrand]"], progress=False)
    with pytest.raises(UserError, match="no such file"):
        run_eval(ckpt, ["eval.suite=math", f"eval.data_dir={tmp_path / 'absent.jsonl'}"], progress=False)
    assert not (tmp_path / "run" / "eval-final").exists()
    with pytest.raises(UserError, match="does not exist"):
        run_eval(tmp_path / "absent", progress=False)


def test_math_through_the_recipe(tmp_path):
    data = tmp_path / "orca_eval.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4"}) + "\n")
    ckpt = tmp_path / "run" / "final"
    checkpoint(ckpt, ["eval.suite=math", f"eval.data_dir={data}", "eval.num_beams=1", "eval.max_new_tokens=3",
                      "data.template=alpaca", "expected.exact_match=56.0"])
    m = run_eval(ckpt, progress=False)
    assert m["suite"] == "math" and m["n"] == 1 and m["settings"]["template"] == "alpaca"
    assert m["difference"]["exact_match"] == pytest.approx(m["exact_match"] - 56.0)
    assert (tmp_path / "run" / "eval-final" / "math" / "metrics.json").is_file()
