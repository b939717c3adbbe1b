"""Every shipped recipe: it loads, names its paper row, carries the paper's numbers, trains one step on a
tiny stand-in of its model, and has the paper's trainable-parameter share on the real architecture.
Also the orca-math data format (`data.format: orca_math`) the QLoRA / QDoRA recipes read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT

from dora_cli.adapters import apply_adapters, parameter_report
from dora_cli.datasets import load_records, tokenize_record, validate_records
from dora_cli.errors import UserError
from dora_cli.eval.tasks import TASKS
from dora_cli.models import PAPER_CONFIGS, build_meta_model
from dora_cli.recipe import DataConfig, DataSource, load_recipe

RECIPE_DIR = ROOT / "recipes"
STUDIES = sorted((ROOT / "studies").glob("*/recipe.yaml"))  # the committed studies' recipes
RECIPES = sorted(RECIPE_DIR.glob("*.yaml")) + STUDIES
ENV_VARS = sorted({m for p in [*RECIPES, *RECIPE_DIR.glob("base/*.yaml")]
                   for m in re.findall(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)", p.read_text())})


def is_paper_recipe(path: Path) -> bool:
    """Every recipe reproduces a paper row except the CPU ones (smoke, SmolLM2, the studies)."""
    return path.parent == RECIPE_DIR and path.name != "smoke.yaml" and not path.name.startswith("smollm2_")


def recipe_id(path: Path) -> str:
    return path.stem if path.parent == RECIPE_DIR else f"studies/{path.parent.name}"


PAPER = [p for p in RECIPES if is_paper_recipe(p)]
IDS = [recipe_id(p) for p in RECIPES]
PAPER_IDS = [p.stem for p in PAPER]

# The paper's "# Params (%)" (the paper's tables, docs/MATH.md); the orca-math rows have no paper value: theirs is
# checked against the closed form in test_llama3_orca_share_is_the_closed_form.
SHARES = {
    "commonsense_7b": 0.84, "commonsense_7b_half": 0.43, "commonsense_7b_lora": 0.83, "commonsense_7b_qkv": 0.39,
    "commonsense_7b_qdora": 0.84,
    "commonsense_13b": 0.68, "commonsense_13b_half": 0.35, "commonsense_13b_lora": 0.67, "commonsense_13b_qkv": 0.31,
    **{f"alpaca_{m}_{a}": s for m in ("llama7b", "llama2_7b")
       for a, s in (("lora", 2.31), ("dora", 2.33), ("vera", 0.02), ("dvora", 0.04))},
    "qdora_llama3_8b_orca_math": 1.86, "qlora_llama3_8b_orca_math": 1.85,
}
HUB_CONFIGS = {
    "yahma/llama-7b-hf": "llama-7b",
    "yahma/llama-13b-hf": "llama-13b",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
}
TINY_LLAMA = ("{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
              "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, "
              "tie_word_embeddings: false, seed: 0}")


@pytest.fixture(autouse=True)
def env_defaults(monkeypatch):
    """Recipes are checked with their ${env:VAR,default} defaults in effect."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def header(path: Path) -> str:
    """The opening comment block of a recipe, without the `#`."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


def test_the_recipe_set_is_complete():
    names = {p.stem for p in RECIPES}
    assert set(SHARES) <= names
    assert set(PAPER_IDS) == set(SHARES), "every paper recipe needs its share in SHARES"
    assert {"smoke", "smollm2_arc_easy"} <= names


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_loads_with_its_env_defaults(path):
    recipe = load_recipe(path)
    assert recipe.model.name_or_path or recipe.model.config
    assert recipe.data.sources
    text = json.dumps(recipe.model_dump(mode="json"))
    assert "${env:" not in text
    if is_paper_recipe(path):
        assert recipe.output_dir == f"runs/{path.stem}"


@pytest.mark.parametrize("path", PAPER, ids=PAPER_IDS)
def test_paper_recipe_names_its_row_numbers_hardware_and_command(path):
    recipe, text = load_recipe(path), header(path)
    assert re.search(r"\b(Table|Figure) \d+", text), "the opening comment names the table (or figure)"
    assert re.search(r'\b(row|bar) "[^"]+"', text), 'the opening comment names the row: row "..."'
    assert "Hardware (estimate" in text and "GPU" in text
    assert f"dora train recipes/{path.name}" in text
    expected = recipe.expected
    assert expected, "the paper's numbers go in expected:"
    if recipe.eval.suite == "commonsense":
        assert set(expected) <= {*TASKS, "avg"} and "avg" in expected
    elif recipe.eval.suite == "mt_bench":
        assert set(expected) == {"mt_bench"}
    else:
        assert set(expected) == {"exact_match"}
    for key, value in expected.items():  # every number of expected: is in the comment, as printed
        shown = f"{value / 100:.2f}" if key == "exact_match" else f"{value:.1f}"
        assert shown in text, f"expected.{key}={value} is not in the opening comment"


QKVUD = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (method, r, alpha, lr) of each row: Tables 1 / 6 / 8 / 11 and the QDoRA notes; alpha None = not used
ROWS = {
    "commonsense_7b": ("dora", 32, 64, 2e-4), "commonsense_7b_half": ("dora", 16, 32, 2e-4),
    "commonsense_7b_lora": ("lora", 32, 64, 3e-4), "commonsense_7b_qkv": ("dora", 32, 64, 2e-4),
    "commonsense_7b_qdora": ("dora", 32, 64, 2e-4),
    "commonsense_13b": ("dora", 32, 64, 2e-4), "commonsense_13b_half": ("dora", 16, 32, 3e-4),
    "commonsense_13b_lora": ("lora", 32, 64, 3e-4), "commonsense_13b_qkv": ("dora", 32, 64, 2e-4),
    **{f"alpaca_{m}_{a}": (a, r, alpha, lr) for m in ("llama7b", "llama2_7b")
       for a, r, alpha, lr in (("lora", 64, 16, 4e-4), ("dora", 64, 16, 4e-4),
                               ("vera", 1024, None, 4e-3), ("dvora", 1024, None, 4e-3))},
    "qdora_llama3_8b_orca_math": ("dora", 64, 16, 1e-5), "qlora_llama3_8b_orca_math": ("lora", 64, 16, 1e-5),
}


@pytest.mark.parametrize("path", PAPER, ids=PAPER_IDS)
def test_paper_recipe_settings(path):
    r = load_recipe(path)
    method, rank, alpha, lr = ROWS[path.stem]
    assert (r.adapter.method, r.adapter.r, r.optim.lr) == (method, rank, pytest.approx(lr))
    if alpha is not None:
        assert r.adapter.alpha == alpha
    if path.stem.startswith("commonsense_"):
        assert r.data.sources[0].path == "zwhe99/commonsense_170k" and r.data.template == "llm_adapters"
        assert (r.data.cutoff_len, r.data.val_set_size, r.train.epochs) == (256, 120, 3)
        assert (r.train.batch_size, r.train.micro_batch_size) == (16, 4)
        assert (r.schedule.type, r.schedule.warmup_steps, r.adapter.dropout) == ("linear", 100, 0.05)
        assert (r.eval.suite, r.eval.mode, len(r.eval.tasks)) == ("commonsense", "generate", 8)
        assert r.eval.data_dir == "LLM-Adapters/dataset"
        if path.stem.endswith("_qkv"):
            assert r.adapter.target_modules == QKVUD[:3]
            assert r.adapter.magnitude_only_modules == ["o_proj", "gate_proj", "up_proj", "down_proj"]
        else:
            assert r.adapter.target_modules == QKVUD and not r.adapter.magnitude_only_modules
        assert r.model.quantization.mode == ("nf4" if path.stem.endswith("_qdora") else "none")
    elif path.stem.startswith("alpaca_"):
        assert r.data.sources[0].path == "yahma/alpaca-cleaned" and r.data.format == "alpaca"
        assert (r.data.max_samples, r.train.epochs, r.adapter.dropout) == (10000, 1, 0.0)
        assert (r.train.batch_size, r.train.micro_batch_size) == (16, 4)
        assert (r.schedule.type, r.schedule.warmup_ratio) == ("cosine", 0.1)
        assert r.adapter.target_modules == ALL7
        assert r.eval.suite == "mt_bench" and r.eval.mt_bench.questions.endswith("mt_bench/question.jsonl")
    else:
        q = r.model.quantization
        assert (q.mode, q.double_quant, q.compute_dtype) == ("nf4", True, "bfloat16")
        assert r.data.sources[0].path == "microsoft/orca-math-word-problems-200k"
        assert (r.data.format, r.data.max_samples, r.data.seed, r.data.cutoff_len) == ("orca_math", 100000, 42, 2048)
        assert r.adapter.target_modules == [*QKVUD, "gate_proj"] and r.adapter.dropout == 0.1
        assert (r.launch.strategy, r.train.micro_batch_size, r.eval.suite, r.eval.limit) == ("fsdp", 4, "math", 500)


@pytest.mark.parametrize("path", [p for p in RECIPES if not is_paper_recipe(p)], ids=recipe_id)
def test_cpu_recipes_do_not_claim_paper_numbers(path):
    assert not load_recipe(path).expected


@pytest.mark.parametrize("name", ["commonsense", "alpaca", "qdora_orca_math"])
def test_base_recipes_exist_and_rows_use_them(name):
    assert (RECIPE_DIR / "base" / f"{name}.yaml").is_file()
    users = [p for p in PAPER if f"base: base/{name}.yaml" in p.read_text()]
    assert users


# ---------------------------------------------------------------------------------------------- shares


def real_architecture(recipe):
    return build_meta_model(PAPER_CONFIGS[HUB_CONFIGS[recipe.model.name_or_path]]())


@pytest.mark.parametrize("path", PAPER, ids=PAPER_IDS)
def test_trainable_share_on_the_real_architecture_matches_the_paper(path):
    recipe = load_recipe(path)
    model = real_architecture(recipe)
    apply_adapters(model, recipe.adapter)
    share = SHARES[path.stem]
    assert parameter_report(model).percent == pytest.approx(share, abs=0.01)
    assert f"trainable parameters: {share:.2f}%" in header(path)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_llama3_orca_share_is_the_closed_form(method):
    """r * (in + out) per adapted linear (+ out for DoRA's magnitude), over Llama-3-8B's 32 layers."""
    recipe = load_recipe(RECIPE_DIR / f"q{method}_llama3_8b_orca_math.yaml")
    h, mlp, kv, layers, r = 4096, 14336, 1024, 32, recipe.adapter.r
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "up_proj": (h, mlp),
              "gate_proj": (h, mlp), "down_proj": (mlp, h)}
    assert set(recipe.adapter.target_modules) == set(shapes)
    per_layer = sum(r * (i + o) + (o if method == "dora" else 0) for i, o in shapes.values())
    trainable = layers * per_layer
    total = 8_030_261_248 + trainable
    model = real_architecture(recipe)
    apply_adapters(model, recipe.adapter)
    report = parameter_report(model)
    assert (report.trainable, report.total) == (trainable, total)
    assert report.percent == pytest.approx(100 * trainable / total)


# ---------------------------------------------------------------------------------------------- the study


def test_the_committed_study_plans_its_whole_sweep_from_one_command(real_recipe_env, tmp_path):
    """studies/smollm2_commonsense: LoRA and DoRA at ranks 4, 8, 16, 3 seeds, >= 200 steps of 8 examples, the
    learning rate chosen from >= 2 values at rank 8 with seed 1, loglik on every test split in ../shared/data."""
    import importlib.util

    from dora_cli import sweep

    spec = importlib.util.spec_from_file_location("run_study", ROOT / "studies" / "smollm2_commonsense" / "run_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    args = dict(zip(study.SWEEP[::2], study.SWEEP[1::2]))
    plan = sweep.plan_sweep(study.RECIPE, [*study.OVERRIDES, f"output_dir={tmp_path / 'out'}"], ranks=study.RANKS.split(","),
                            methods=args["--methods"].split(","), seeds=args["--seeds"], grid=[args["--grid"]],
                            select_at=args["--select-at"])
    assert (plan.methods, plan.ranks, plan.seeds, plan.select_at) == (["lora", "dora"], [4, 8, 16], [1, 2, 3], 8)
    assert len(plan.settings) >= 2 and plan.grid[0][0].key == "optim.lr"
    tests = sorted(d.name for d in (real_recipe_env[1] / "commonsense").iterdir() if (d / "test.json").is_file())
    for trial in plan.trials.values():
        r = trial.recipe
        assert r.train.max_steps >= 200 and r.train.batch_size == 8 and r.data.val_set_size > 0
        assert r.train.keep_last * r.train.save_every >= r.train.max_steps  # the analysed steps are kept
        assert (r.eval.mode, sorted(r.eval.tasks)) == ("loglik", tests)
        assert r.model.name_or_path == str(real_recipe_env[0])
    assert [s.selecting for s in plan.slots].count(True) == 2 * len(plan.settings)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- one step

SMOKE_DATA = "data/smoke/train.json"


def tiny_overrides(recipe, data_path: str, out: Path) -> list[str]:
    """The recipe's model swapped for a 2-layer LLaMA of the same kind, its data for a small local file.

    The 4-bit recipes stay 4-bit (bitsandbytes runs NF4 on the CPU); bf16 weights, bf16 compute and bf16
    autocast become float32: bf16 matmuls are slow on many CPUs and this is a test of the recipe, not
    of bf16 numerics.
    """
    overrides = [
        "model.name_or_path=null", "model.tokenizer=data/tiny_tokenizer", f"model.config={TINY_LLAMA}",
        "model.dtype=float32", "train.mixed_precision='no'",
        f"data.sources=[{{path: {data_path}}}]", "data.val_set_size=0", "data.cutoff_len=128",
        "train.max_steps=1", "train.epochs=null", "train.batch_size=2", "train.micro_batch_size=1",
        "train.save_every=null", "train.eval_every=null", "train.log_every=1",
        "launch.num_processes=1", f"output_dir={out}",
    ]
    if recipe.model.quantization.mode != "none":
        overrides.append("model.quantization.compute_dtype=float32")
    return overrides


def write_orca_math(path: Path, n: int = 12) -> Path:
    rows = [{"question": f"Tom has {i} apples and buys {i + 3} more. How many apples does he have?",
             "answer": f"Tom starts with {i} apples and buys {i + 3}, so he has {i} + {i + 3} = {2 * i + 3} apples."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_one_training_step_on_a_tiny_model(path, tmp_path, monkeypatch):
    from dora_cli.train import run_train

    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    data = str(write_orca_math(tmp_path / "orca.jsonl")) if recipe.data.format == "orca_math" else SMOKE_DATA
    out = tmp_path / "run"
    final = run_train(path, tiny_overrides(recipe, data, out))
    assert final == out / "final" and (final / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["method"] == recipe.adapter.method
    assert metrics["train_loss"] is not None and metrics["train_loss"] == metrics["train_loss"]  # not NaN
    assert metrics["expected"] == recipe.expected
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["r"] == recipe.adapter.r


# ---------------------------------------------------------------------------------------------- orca-math data


def test_orca_math_records_become_instruction_and_output():
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5. The answer is 5.", "extra": 1}]
    (rec,) = validate_records(rows, "orca_math", origin="orca.jsonl")
    assert rec == {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5.",
                   "answer": "2 + 3 = 5. The answer is 5."}


@pytest.mark.parametrize("row,message", [
    ({"answer": "5"}, "record [0]: missing field 'question' (a orca_math record needs string fields question and answer)"),
    ({"question": "2 + 3?"}, "record [0]: missing field 'answer'"),
    ({"question": "2 + 3?", "answer": 5}, "record [0]: field 'answer' must be a string, got a number"),
    ({"instruction": "2 + 3?", "output": "5"}, "missing field 'question'"),
    ("2 + 3 = 5", "record [0]: expected an object, got a string"),
])
def test_orca_math_records_are_validated(row, message):
    with pytest.raises(UserError) as err:
        validate_records([row], "orca_math", origin="orca.jsonl")
    assert message in str(err.value) and "orca.jsonl" in str(err.value)


def test_an_unknown_format_names_the_formats():
    with pytest.raises(UserError, match=r"unknown format 'orca-math' \(expected alpaca, commonsense, messages, orca_math or sharegpt\)"
                                        r' \(did you mean "orca_math"\?\)'):
        validate_records([], "orca-math", origin="x")


def test_orca_math_file_loads_subsets_and_masks_the_question(tmp_path):
    from transformers import AutoTokenizer

    path = write_orca_math(tmp_path / "orca.jsonl", n=20)
    cfg = DataConfig(format="orca_math", sources=[DataSource(path=str(path))], template="alpaca",
                     train_on_inputs=False, max_samples=5, seed=42)
    records = load_records(cfg)
    assert len(records) == 5 and all(r["output"] == r["answer"] for r in records)
    assert records == load_records(cfg)  # the seeded subset is the same every time
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny_tokenizer")
    example = tokenize_record(records[0], tokenizer, cfg)
    masked = sum(1 for x in example["labels"] if x == -100)
    assert 0 < masked < len(example["labels"])  # the prompt is masked, the answer is trained on


def test_the_math_eval_reads_the_gold_number_from_orca_answers():
    from dora_cli.eval import math_correct

    (rec,) = validate_records([{"question": "q", "answer": "He has 3 + 4 = 7 apples. The answer is 7."}],
                              "orca_math", origin="x")
    assert math_correct("so 7", rec["answer"]) and not math_correct("so 8", rec["answer"])


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_loss_decreases_on_a_smollm2_dora_run_of_50_steps(real_recipe_env, tmp_path):
    """The issue's slow test: recipes/smollm2_arc_easy.yaml as shipped (SmolLM2-135M, DoRA, 50 steps)."""
    from dora_cli.train import run_train

    out = tmp_path / "run"
    run_train(RECIPE_DIR / "smollm2_arc_easy.yaml", [f"output_dir={out}", "train.save_every=null"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 50
    # mean loss of steps 46-50 against steps 1-5 (log_every 5)
    assert metrics["train_loss"] < 0.8 * metrics["train_loss_first"], metrics
    assert metrics["val_loss"] is not None and metrics["val_loss"] < metrics["train_loss_first"]
