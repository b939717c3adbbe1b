"""`dora sweep-rank`: the rank study end to end on the smoke recipe, resumption, failed trials, bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_dora

from dora_cli import cli, sweep
from dora_cli.errors import RunFailure, UserError

# Short trials: 2 optimizer steps of 4 examples, a checkpoint after each, 4 validation examples, 2 test
# examples per task.
FAST = [
    "train.max_steps=2", "train.batch_size=4", "train.save_every=1", "data.val_set_size=4",
    "data.max_samples=16", "eval.limit=2",
]
PNG = b"\x89PNG\r\n\x1a\n"
TRIALS = ["lora-r2", "lora-r4", "dora-r2", "dora-r4"]


def cli_run(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`dora ARGS` in this process; (exit status, stderr)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["dora", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def copy_sweep(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(source, out)
    return out


def drop_results(out: Path, name: str) -> None:
    shutil.rmtree(out / "sweep" / name / "final")
    shutil.rmtree(out / "sweep" / name / "eval")


def load(out: Path) -> dict:
    return json.loads((out / "sweep" / "sweep.json").read_text())


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, str]:
    """One sweep of the smoke recipe through the real CLI: ranks 2, 4 x LoRA, DoRA."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    proc = run_dora("sweep-rank", "recipes/smoke.yaml", "--ranks", "4,2", "--methods", "lora,dora", f"output_dir={out}", *FAST)
    return out, proc.stderr


def test_sweep_trains_and_evaluates_every_trial_and_writes_the_reports(swept):
    out, stderr = swept
    doc = load(out)
    assert doc["settings"]["ranks"] == [2, 4] and doc["settings"]["methods"] == ["lora", "dora"]
    assert doc["summary"] == {"ok": 4, "failed": 0, "pending": 0}
    trials = {t["name"]: t for t in doc["trials"]}
    assert list(trials) == TRIALS
    for name, t in trials.items():
        assert t["status"] == "ok" and t["error"] is None
        assert t["alpha"] == 2 * t["rank"]  # the paper's rule by default
        assert set(t["tasks"]) == {"boolq", "ARC-Easy"}
        assert t["average"] == pytest.approx(sum(t["tasks"].values()) / 2)
        assert Path(t["paths"]["final"]).is_dir() and Path(t["paths"]["eval_metrics"]).is_file()
        trained = json.loads((out / "sweep" / name / "metrics.json").read_text())
        assert t["trainable_params"] == trained["trainable_params"] and trained["steps"] == 2
        # the honest signal of a short trial, the times, and the standard error of the average
        assert t["val_loss"] == trained["val_loss"] and t["val_loss"] > 0
        assert t["train_time_s"] == trained["wall_time_s"] > 0
        evaluated = json.loads(Path(t["paths"]["eval_metrics"]).read_text())
        assert t["eval_time_s"] == evaluated["wall_time_s"] > 0
        assert t["examples"] == 4 and t["average_se"] == evaluated["average_se"]
        ses = [100 * (a / 100 * (1 - a / 100) / 2) ** 0.5 for a in t["tasks"].values()]
        assert t["average_se"] == pytest.approx((ses[0] ** 2 + ses[1] ** 2) ** 0.5 / 2, abs=1e-3)
        recipe = (out / "sweep" / name / "recipe.yaml").read_text()
        assert f"method: {t['method']}" in recipe and f"r: {t['rank']}" in recipe
    # The paper's Table 15 convention: more trainable parameters with rank, DoRA (magnitudes) above LoRA.
    for method in ("lora", "dora"):
        assert trials[f"{method}-r2"]["trainable_percent"] < trials[f"{method}-r4"]["trainable_percent"]
    for r in (2, 4):
        assert trials[f"dora-r{r}"]["trainable_params"] > trials[f"lora-r{r}"]["trainable_params"]
    assert stderr.count("sweep [") >= 4 and "4 ok, 0 failed" in stderr

    md = (out / "sweep" / "sweep.md").read_text()
    assert "| Model | r | # Params (%) | BoolQ | ARC-e | Avg | Val loss | Train (s) | Eval (s) |" in md
    rows = [line for line in md.splitlines() if line.startswith(("| LoRA", "| DoRA"))]
    assert [row.split("|")[1:3] for row in rows] == [[" LoRA ", " 2 "], [" LoRA ", " 4 "], [" DoRA ", " 2 "], [" DoRA ", " 4 "]]
    for row, name in zip(rows, TRIALS):
        t = trials[name]
        assert f"{t['trainable_percent']:.2f}" in row and f"| {t['average']:.1f} ± {t['average_se']:.1f} |" in row
        assert f"| {t['val_loss']:.4f} |" in row
    assert "n = 4 test examples per trial (2 tasks)" in md
    assert "Paper Avg" not in md  # a tiny random model is not the paper's setting
    assert (out / "sweep" / "sweep.png").read_bytes()[:8] == PNG
    assert not list((out / "sweep").glob(".*tmp"))


def test_a_second_run_skips_finished_trials_and_redoes_only_a_deleted_one(swept, tmp_path, monkeypatch, capsys):
    out = copy_sweep(swept[0], tmp_path)
    args = ["sweep-rank", "recipes/smoke.yaml", "--ranks", "2,4", "--methods", "lora,dora", f"output_dir={out}", *FAST]
    stamps = {name: (out / "sweep" / name / "metrics.json").stat().st_mtime_ns for name in TRIALS}

    code, err = cli_run(monkeypatch, capsys, *args)
    assert code == 0, err
    assert err.count("skipped (done") == 4 and "training ->" not in err and "evaluating ->" not in err
    assert stamps == {name: (out / "sweep" / name / "metrics.json").stat().st_mtime_ns for name in TRIALS}

    drop_results(out, "dora-r4")  # killed after its last checkpoint: final/ and the evaluation are gone
    code, err = cli_run(monkeypatch, capsys, *args)
    assert code == 0, err
    assert err.count("skipped (done") == 3
    assert "dora r=4 alpha=8: resuming ->" in err and "resuming from checkpoint-2" in err
    for name in TRIALS[:3]:
        assert (out / "sweep" / name / "metrics.json").stat().st_mtime_ns == stamps[name]
    assert (out / "sweep" / "dora-r4" / "final").is_dir()
    assert load(out)["summary"] == {"ok": 4, "failed": 0, "pending": 0}


def test_other_eval_settings_evaluate_again_without_training(swept, tmp_path, monkeypatch, capsys):
    out = copy_sweep(swept[0], tmp_path)
    stamps = {name: (out / "sweep" / name / "metrics.json").stat().st_mtime_ns for name in TRIALS}
    code, err = cli_run(monkeypatch, capsys, "sweep-rank", "recipes/smoke.yaml", "--ranks", "2,4", f"output_dir={out}", *FAST, "eval.limit=1")
    assert code == 0, err
    assert err.count("evaluating again (eval settings changed) ->") == 4 and "training ->" not in err and "skipped" not in err
    assert stamps == {name: (out / "sweep" / name / "metrics.json").stat().st_mtime_ns for name in TRIALS}
    doc = load(out)
    assert doc["settings"]["eval"]["limit"] == 1 and doc["summary"]["ok"] == 4
    for t in doc["trials"]:
        metrics = json.loads(Path(t["paths"]["eval_metrics"]).read_text())
        assert metrics["settings"]["limit"] == 1 and metrics["tasks"]["boolq"]["n"] == 1


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(swept, tmp_path, monkeypatch):
    import dora_cli.train

    out = copy_sweep(swept[0], tmp_path)
    drop_results(out, "lora-r2")
    drop_results(out, "lora-r4")
    real = dora_cli.train.train
    calls = []

    def train(recipe, **kw):
        name = Path(recipe.output_dir).name  # the trial's directory: <method>-r<rank>
        calls.append(name)
        if name == "lora-r2":
            raise RunFailure("step 1: the loss is nan; training stopped. No checkpoint was written (lower optim.lr)")
        return real(recipe, **kw)

    monkeypatch.setattr(dora_cli.train, "train", train)
    monkeypatch.chdir(ROOT)
    doc = sweep.run_sweep("recipes/smoke.yaml", [f"output_dir={out}", *FAST], ranks=["2", "4"], methods=["lora", "dora"])

    assert calls == ["lora-r2", "lora-r4"]  # the DoRA trials were done already
    trials = {t["name"]: t for t in load(out)["trials"]}
    assert doc["summary"] == {"ok": 3, "failed": 1, "pending": 0}
    assert trials["lora-r2"]["status"] == "failed" and "the loss is nan" in trials["lora-r2"]["error"]
    assert trials["lora-r2"]["average"] is None
    assert [trials[n]["status"] for n in TRIALS[1:]] == ["ok", "ok", "ok"]
    md = (out / "sweep" / "sweep.md").read_text()
    assert "| LoRA | 2 |" in md and "| failed |" in md.split("| LoRA | 2 |")[1].splitlines()[0]
    assert "- lora-r2: step 1: the loss is nan" in md
    assert (out / "sweep" / "sweep.png").read_bytes()[:8] == PNG


def test_when_every_trial_fails_the_sweep_fails(tmp_path, monkeypatch):
    import torch

    import dora_cli.train

    errors = iter([RunFailure("step 3: the gradient norm is inf; training stopped"), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")])

    def train(recipe, **kw):
        raise next(errors)

    monkeypatch.setattr(dora_cli.train, "train", train)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    with pytest.raises(RunFailure, match="every trial of the sweep failed"):
        sweep.run_sweep("recipes/smoke.yaml", [f"output_dir={out}", *FAST], ranks=["2", "4"], methods=["lora"])
    trials = load(out)["trials"]
    assert [t["status"] for t in trials] == ["failed", "failed"]
    assert "gradient norm is inf" in trials[0]["error"]
    assert trials[1]["error"].startswith("OutOfMemoryError: CUDA out of memory")


BAD = {
    "rank not an integer": (["--ranks", "4,x"], "--ranks: 'x' is not a positive integer"),
    "rank zero": (["--ranks", "0,4"], "--ranks: '0' is not a positive integer"),
    "no rank": (["--ranks", ","], "--ranks: expected at least one rank"),
    "unknown method": (["--methods", "lora,dorra"], 'unknown method \'dorra\' (did you mean "dora"?)'),
    "full is not a rank method": (["--methods", "full"], "--methods: unknown method 'full'"),
    "alpha rule": (["--alpha-rule", "2x"], "--alpha-rule: expected 2r or fixed"),
    "unknown key": (["adapter.rr=4"], 'adapter.rr: unknown key (did you mean "r"?)'),
    "wrong type": (["train.max_steps=abc"], "train.max_steps: expected an integer"),
    "missing eval data": (["eval.data_dir=data/smoke/nowhere"], "nowhere"),
    "batch not divisible": (["train.batch_size=6"], "train.batch_size=6 is not divisible"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    args, expected = BAD[case]
    out = tmp_path / "out"
    code, err = cli_run(monkeypatch, capsys, "sweep-rank", "recipes/smoke.yaml", f"output_dir={out}", *FAST, *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err
    assert not out.exists()


def test_a_trial_directory_of_another_recipe_is_refused_before_anything_runs(swept, tmp_path, monkeypatch, capsys):
    out = copy_sweep(swept[0], tmp_path)
    before = (out / "sweep" / "sweep.json").read_bytes()
    code, err = cli_run(monkeypatch, capsys, "sweep-rank", "recipes/smoke.yaml", "--ranks", "2,4", f"output_dir={out}", *FAST, "optim.lr=0.001")
    assert code == 2 and err.count("\n") == 1
    assert "lora-r2: holds a trial of a different recipe (optim.lr differs)" in err
    assert (out / "sweep" / "sweep.json").read_bytes() == before


def test_the_default_recipe_is_the_papers_and_its_absence_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep.default_recipe() == ROOT / "recipes" / "commonsense_7b.yaml"
    monkeypatch.setattr(sweep, "REPO_ROOT", tmp_path)
    with pytest.raises(UserError, match=r"recipes/commonsense_7b.yaml .*is missing"):
        sweep.run_sweep(None, [], ranks=["4"], methods=["dora"])
    # `dora sweep-rank --ranks 4 output_dir=DIR`: the first override lands in RECIPE; it is an override.
    with pytest.raises(UserError, match=r"recipes/commonsense_7b.yaml .*is missing"):
        sweep.run_sweep(f"output_dir={tmp_path / 'out'}", [], ranks=["4"], methods=["dora"])
    assert not (tmp_path / "out").exists()


def test_alpha_rules_and_each_trials_expected_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    common = [f"output_dir={tmp_path / 'out'}", "expected={avg: 50.0}"]
    plan = sweep.plan_sweep("recipes/smoke.yaml", common, ranks=["16", "8"], methods=["dora", "lora"])
    by_name = {t.name: t for t in plan.trials}
    assert list(by_name) == ["dora-r8", "dora-r16", "lora-r8", "lora-r16"]
    assert [t.recipe.adapter.alpha for t in plan.trials] == [16, 32, 16, 32]
    assert by_name["dora-r16"].recipe.output_dir == str(tmp_path / "out" / "sweep" / "dora-r16")
    # The recipe's own row (dora, r 8, alpha 16) keeps its paper numbers; the other rows have none.
    assert by_name["dora-r8"].recipe.expected == {"avg": 50.0}
    assert by_name["lora-r8"].recipe.expected == {} and by_name["dora-r16"].recipe.expected == {}
    fixed = sweep.plan_sweep("recipes/smoke.yaml", common, ranks=["4", "32"], methods=["lora"], alpha_rule="fixed")
    assert [t.recipe.adapter.alpha for t in fixed.trials] == [16, 16]
    assert not (tmp_path / "out").exists()


def _paper_doc(status: dict[str, str]) -> dict:
    ranks = [4, 8, 16, 32, 64]
    trials = []
    for method in ("lora", "dora"):
        for r in ranks:
            name = f"{method}-r{r}"
            ok = status.get(name, "ok") == "ok"
            trials.append({
                "name": name, "method": method, "rank": r, "alpha": 2 * r, "status": status.get(name, "ok"),
                "error": None if ok else "step 9: the loss is nan", "trainable_percent": r * (0.027 if method == "lora" else 0.0275),
                "tasks": {"boolq": 60.0 + r / 8} if ok else {}, "average": 60.0 + r / 8 if ok else None,
                "average_se": 1.0 if ok else None, "examples": 200 if ok else None, "val_loss": 1.25 if ok else None,
                "train_time_s": 60.0 if ok else None, "eval_time_s": 30.0 if ok else None,
                "paper_average": sweep.PAPER_TABLE15[method][r],
            })
    settings = {
        "model": sweep.PAPER_MODEL, "methods": ["lora", "dora"], "ranks": ranks, "alpha_rule": "2r", "alpha": "2r",
        "eval": {"tasks": ["boolq"], "mode": "generate", "limit": None}, "paper_reference": "Table 15 (LLaMA-7B)",
    }
    return {"settings": settings, "trials": trials}


def test_the_papers_setting_shows_table_15_beside_ours(tmp_path):
    doc = _paper_doc({"lora-r4": "failed", "dora-r64": "pending"})
    md = sweep.render_table(doc)
    assert "| Model | r | # Params (%) | BoolQ | Avg | Val loss | Train (s) | Eval (s) | Paper Avg |" in md
    assert "| LoRA | 4 | 0.11 | - | failed | - | - | - | 39.5 |" in md
    assert "| DoRA | 32 | 0.88 | 64.0 | 64.0 ± 1.0 | 1.2500 | 60 | 30 | 78.1 |" in md
    assert "| DoRA | 64 | 1.76 | - | pending | - | - | - | 72.1 |" in md
    assert "- lora-r4: step 9: the loss is nan" in md
    sweep.plot(doc, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


@pytest.mark.parametrize("tasks, data_dir", [(["demo"], "data"), (["boolq", "ARC-Easy"], None)])
def test_the_sweep_accepts_every_task_dora_eval_accepts(tasks, data_dir, tmp_path, monkeypatch):
    """One check of the eval inputs (the suite registry) serves `dora eval` and the sweep: a custom task
    from eval.data_dir, as `dora eval --tasks demo --data-dir data` reads it, plans a sweep."""
    from dora_cli.eval.suites import suite_of

    monkeypatch.chdir(ROOT)
    overrides = [f"output_dir={tmp_path / 'out'}", f"eval.tasks=[{','.join(tasks)}]", *FAST]
    if data_dir:
        overrides.append(f"eval.data_dir={data_dir}")
    plan = sweep.plan_sweep("recipes/smoke.yaml", overrides, ranks=["2"], methods=["dora"])
    suite_of(plan.base).check_inputs(plan.base)  # what `dora eval` checks before loading the model
    assert plan.trials[0].recipe.eval.tasks == tasks and not (tmp_path / "out").exists()
