"""`dora sweep-rank`: the rank study end to end on the smoke recipe with seeds, confidence intervals and
paired differences; a grid chosen on the validation loss; shards; resumption; failed trials; bad input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, dora_in_process, run_dora

from dora_cli import stats, sweep, sweep_report
from dora_cli.errors import RunFailure, UserError

scipy_stats = pytest.importorskip("scipy.stats")

# Short trials: 2 optimizer steps of 4 examples, a checkpoint after each, 4 validation examples, 2 test
# examples per task; one thread, so that every process computes the same numbers.
FAST = [
    "train.max_steps=2", "train.batch_size=4", "train.save_every=1", "data.val_set_size=4",
    "data.max_samples=16", "eval.limit=2", "train.threads=1",
]
PNG = b"\x89PNG\r\n\x1a\n"
SEEDS = ["--seeds", "2"]
TRIALS = [f"{m}-r{r}-s{s}" for s in (1, 2) for m in ("lora", "dora") for r in (2, 4)]
NUMBERS = ("status", "tasks", "tasks_se", "average", "average_se", "examples", "val_loss", "trainable_params",
           "magnitude_change", "seed", "setting")


def copy_sweep(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(source, out)
    return out


def drop_results(out: Path, name: str) -> None:
    shutil.rmtree(out / "sweep" / name / "final")
    shutil.rmtree(out / "sweep" / name / "eval")


def load(out: Path) -> dict:
    return json.loads((out / "sweep" / "sweep.json").read_text())


def numbers(doc: dict) -> dict:
    """What two runs of one sweep must agree on: every trial's numbers, the groups and the differences
    (no times, no paths)."""
    trials = {t["name"]: {k: t[k] for k in NUMBERS} for t in doc["trials"]}
    groups = [{k: g[k] for k in ("method", "rank", "label", "seeds", "n", "average", "tasks", "val_loss", "selected")}
              for g in doc["groups"]]
    return {"trials": trials, "groups": groups, "differences": doc["differences"], "selection": doc["selection"]}


def fast(*args: str) -> list[str]:
    """FAST, then `args`: a key that `args` set is left out of FAST (a key set twice is refused)."""
    given = {a.partition("=")[0] for a in args if "=" in a}
    return [f for f in FAST if f.partition("=")[0] not in given] + list(args)


def sweep_args(out: Path, *extra: str) -> list[str]:
    return ["sweep-rank", "recipes/smoke.yaml", "--ranks", "4,2", "--methods", "lora,dora", *SEEDS, f"output_dir={out}", *fast(*extra)]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, str]:
    """One sweep of the smoke recipe through the real CLI: ranks 2, 4 x LoRA, DoRA x seeds 1, 2."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    proc = run_dora(*sweep_args(out))
    return out, proc.stderr


def test_sweep_trains_and_evaluates_every_trial_and_writes_the_reports(swept):
    out, stderr = swept
    doc = load(out)
    assert doc["settings"]["ranks"] == [2, 4] and doc["settings"]["methods"] == ["lora", "dora"]
    assert doc["settings"]["seeds"] == [1, 2] and doc["settings"]["grid"] == {}
    assert doc["summary"] == {"ok": 8, "failed": 0, "pending": 0}
    trials = {t["name"]: t for t in doc["trials"]}
    assert list(trials) == TRIALS  # seed by seed, then method, then rank
    for name, t in trials.items():
        assert t["status"] == "ok" and t["error"] is None
        assert t["alpha"] == 2 * t["rank"]  # the paper's rule by default
        assert set(t["tasks"]) == {"boolq", "ARC-Easy"}
        assert t["average"] == pytest.approx(sum(t["tasks"].values()) / 2)
        assert Path(t["paths"]["final"]).is_dir() and Path(t["paths"]["eval_metrics"]).is_file()
        trained = json.loads((out / "sweep" / name / "metrics.json").read_text())
        assert t["trainable_params"] == trained["trainable_params"] and trained["steps"] == 2
        assert t["val_loss"] == trained["val_loss"] and t["val_loss"] > 0
        assert t["train_time_s"] == trained["wall_time_s"] > 0
        evaluated = json.loads(Path(t["paths"]["eval_metrics"]).read_text())
        assert t["eval_time_s"] == evaluated["wall_time_s"] > 0
        assert t["examples"] == 4 and t["average_se"] == evaluated["average_se"]
        recipe = (out / "sweep" / name / "recipe.yaml").read_text()
        assert f"method: {t['method']}" in recipe and f"r: {t['rank']}" in recipe and f"seed: {t['seed']}" in recipe
        if t["method"] == "dora":  # the magnitude's relative change per module kind, from train's metrics.json
            assert set(t["magnitude_change"]) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
            assert all(v > 0 for v in t["magnitude_change"].values()) and t["warnings"] == []
    # Seeds differ in what they train: another initialisation and data order.
    assert trials["dora-r2-s1"]["val_loss"] != trials["dora-r2-s2"]["val_loss"]
    # The paper's Table 15 convention: more trainable parameters with rank, DoRA (magnitudes) above LoRA.
    for method in ("lora", "dora"):
        assert trials[f"{method}-r2-s1"]["trainable_percent"] < trials[f"{method}-r4-s1"]["trainable_percent"]
    for r in (2, 4):
        assert trials[f"dora-r{r}-s1"]["trainable_params"] > trials[f"lora-r{r}-s1"]["trainable_params"]
    assert stderr.count("sweep [") >= 8 and "8 ok, 0 failed, 0 pending" in stderr


def test_groups_hold_the_mean_and_student_t_interval_over_seeds(swept):
    doc = load(swept[0])
    trials = {t["name"]: t for t in doc["trials"]}
    assert [(g["method"], g["rank"]) for g in doc["groups"]] == [("lora", 2), ("lora", 4), ("dora", 2), ("dora", 4)]
    for g in doc["groups"]:
        mine = [trials[f"{g['method']}-r{g['rank']}-s{s}"] for s in (1, 2)]
        assert g["n"] == 2 and g["seeds"] == [1, 2] and g["selected"]
        for estimate, values in [(g["average"], [t["average"] for t in mine]), (g["val_loss"], [t["val_loss"] for t in mine]),
                                 (g["tasks"]["boolq"], [t["tasks"]["boolq"] for t in mine])]:
            assert estimate["n"] == 2 and estimate["basis"] == stats.STUDENT_T
            assert estimate["mean"] == pytest.approx(np.mean(values))
            half = scipy_stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
            assert estimate["half_width"] == pytest.approx(half, abs=1e-9)


def test_paired_differences_are_taken_seed_by_seed_and_match_scipy(swept):
    doc = load(swept[0])
    trials = {t["name"]: t for t in doc["trials"]}
    assert [(d["rank"], d["method"], d["baseline"]) for d in doc["differences"]] == [(2, "dora", "lora"), (4, "dora", "lora")]
    for d in doc["differences"]:
        lora = [trials[f"lora-r{d['rank']}-s{s}"] for s in (1, 2)]
        dora = [trials[f"dora-r{d['rank']}-s{s}"] for s in (1, 2)]
        assert d["n"] == 2 and d["seeds"] == [1, 2]
        assert d["per_seed"] == {str(s): pytest.approx(b["average"] - a["average"]) for s, a, b in zip((1, 2), lora, dora)}
        losses = d["val_loss"]
        test = scipy_stats.ttest_rel([t["val_loss"] for t in dora], [t["val_loss"] for t in lora])
        assert losses["t"] == pytest.approx(test.statistic) and losses["p"] == pytest.approx(test.pvalue)
        assert losses["excludes_zero"] == (losses["low"] > 0 or losses["high"] < 0)

    md = (swept[0] / "sweep" / "sweep.md").read_text()
    assert "| Model | r | Seeds | # Params (%) | BoolQ | ARC-e | Avg | Val loss | Train (s) | Eval (s) |" in md
    rows = [line for line in md.splitlines() if line.startswith(("| LoRA |", "| DoRA |"))]
    assert [row.split("|")[1:4] for row in rows] == [[" LoRA ", " 2 ", " 2 "], [" LoRA ", " 4 ", " 2 "],
                                                      [" DoRA ", " 2 ", " 2 "], [" DoRA ", " 4 ", " 2 "]]
    for row, g in zip(rows, doc["groups"]):
        assert f"| {g['average']['mean']:.1f} ± {g['average']['half_width']:.1f} |" in row
        assert f"| {g['val_loss']['mean']:.4f} ± {g['val_loss']['half_width']:.4f} |" in row
    assert "## Paired differences: method − LoRA" in md and "| DoRA − LoRA | 2 | 2 |" in md
    assert "n = 4 test examples per trial (2 tasks)" in md and "Paper Avg" not in md
    assert (swept[0] / "sweep" / "sweep.png").read_bytes()[:8] == PNG
    assert not list((swept[0] / "sweep").glob(".*tmp*")) and not list((swept[0] / "sweep").glob("*.lock"))


def test_a_second_run_skips_finished_trials_and_redoes_only_a_deleted_one(swept, tmp_path, monkeypatch, capsys):
    out = copy_sweep(swept[0], tmp_path)
    stamps = {name: (out / "sweep" / name / "metrics.json").stat().st_mtime_ns for name in TRIALS}

    code, _, err = dora_in_process(sweep_args(out), monkeypatch, capsys)
    assert code == 0, err
    assert err.count("skipped (done") == 8 and "training ->" not in err and "evaluating ->" not in err
    assert stamps == {name: (out / "sweep" / name / "metrics.json").stat().st_mtime_ns for name in TRIALS}

    drop_results(out, "dora-r4-s2")  # killed after its last checkpoint: final/ and the evaluation are gone
    code, _, err = dora_in_process(sweep_args(out), monkeypatch, capsys)
    assert code == 0, err
    assert err.count("skipped (done") == 7
    assert "dora r=4 alpha=8 seed=2: resuming ->" in err and "resuming from checkpoint-2" in err
    assert all((out / "sweep" / n / "metrics.json").stat().st_mtime_ns == stamps[n] for n in TRIALS if n != "dora-r4-s2")
    assert numbers(load(out)) == numbers(load(swept[0]))  # resumed: the same numbers


def test_other_eval_settings_evaluate_again_without_training(swept, tmp_path, monkeypatch, capsys):
    out = copy_sweep(swept[0], tmp_path)
    stamps = {name: (out / "sweep" / name / "metrics.json").stat().st_mtime_ns for name in TRIALS}
    code, _, err = dora_in_process(sweep_args(out, "eval.limit=1"), monkeypatch, capsys)
    assert code == 0, err
    assert err.count("evaluating again (eval settings changed) ->") == 8 and "training ->" not in err and "skipped" not in err
    assert stamps == {name: (out / "sweep" / name / "metrics.json").stat().st_mtime_ns for name in TRIALS}
    doc = load(out)
    assert doc["settings"]["eval"]["limit"] == 1 and doc["summary"]["ok"] == 8
    for t in doc["trials"]:
        metrics = json.loads(Path(t["paths"]["eval_metrics"]).read_text())
        assert metrics["settings"]["limit"] == 1 and metrics["tasks"]["boolq"]["n"] == 1


def test_a_failed_trial_is_recorded_the_sweep_goes_on_and_report_keeps_it(swept, tmp_path, monkeypatch, capsys):
    import dora_cli.train

    out = copy_sweep(swept[0], tmp_path)
    drop_results(out, "lora-r2-s1")
    drop_results(out, "lora-r4-s1")
    real = dora_cli.train.train
    calls = []

    def train(recipe, **kw):
        name = Path(recipe.output_dir).name  # the trial's directory: <method>-r<rank>-s<seed>
        calls.append(name)
        if name == "lora-r2-s1":
            raise RunFailure("step 1: the loss is nan; training stopped. No checkpoint was written (lower optim.lr)")
        return real(recipe, **kw)

    monkeypatch.setattr(dora_cli.train, "train", train)
    monkeypatch.chdir(ROOT)
    doc = sweep.run_sweep("recipes/smoke.yaml", [f"output_dir={out}", *FAST], ranks=["2", "4"], methods=["lora", "dora"], seeds="2")

    assert calls == ["lora-r2-s1", "lora-r4-s1"]  # the other trials were done already
    trials = {t["name"]: t for t in load(out)["trials"]}
    assert doc["summary"] == {"ok": 7, "failed": 1, "pending": 0}
    assert trials["lora-r2-s1"]["status"] == "failed" and "the loss is nan" in trials["lora-r2-s1"]["error"]
    assert trials["lora-r2-s1"]["average"] is None
    lora2 = next(g for g in doc["groups"] if (g["method"], g["rank"]) == ("lora", 2))
    assert lora2["n"] == 1 and lora2["failed"] == 1 and lora2["average"]["basis"] == stats.BINOMIAL
    diff2 = next(d for d in doc["differences"] if d["rank"] == 2)
    assert diff2["n"] == 1 and diff2["seeds"] == [2]  # paired over the seeds both finished
    md = (out / "sweep" / "sweep.md").read_text()
    assert "| LoRA | 2 | 1 of 2ᵇ |" in md and "- lora-r2-s1: step 1: the loss is nan" in md
    assert (out / "sweep" / "sweep.png").read_bytes()[:8] == PNG

    # Another process (a shard, or --report) keeps the failure from sweep.json until the trial runs again.
    code, stdout, err = dora_in_process([*sweep_args(out), "--report"], monkeypatch, capsys)
    assert code == 0 and "training ->" not in err and "7 ok, 1 failed, 0 pending" in err
    assert {t["name"]: t["status"] for t in load(out)["trials"]}["lora-r2-s1"] == "failed"
    assert "| DoRA − LoRA | 2 | 1ᵇ |" in stdout


def test_when_every_trial_fails_the_sweep_fails(tmp_path, monkeypatch):
    import torch

    import dora_cli.train

    errors = iter([RunFailure("step 3: the gradient norm is inf; training stopped"), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")])

    def train(recipe, **kw):
        raise next(errors)

    monkeypatch.setattr(dora_cli.train, "train", train)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    with pytest.raises(RunFailure, match="every finished trial of the sweep failed"):
        sweep.run_sweep("recipes/smoke.yaml", [f"output_dir={out}", *FAST], ranks=["2", "4"], methods=["lora"])
    trials = load(out)["trials"]
    assert [t["status"] for t in trials] == ["failed", "failed"]
    assert [t["name"] for t in trials] == ["lora-r2-s42", "lora-r4-s42"]  # the recipe's seed by default
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
    "seed not a number": (["--seeds", "1,x"], "--seeds: 'x' is not a seed"),
    "seed negative": (["--seeds", "-1,2"], "--seeds: '-1' is not a seed"),
    "seed too large": (["--seeds", f"{2**32},"], f"--seeds: '{2**32}' is not a seed"),
    "no seed": (["--seeds", ","], "--seeds: expected a number of seeds or a list"),
    "seed count zero": (["--seeds", "0"], "--seeds: 0 is a number of seeds: expected 1 .. 10"),
    "seed count meant a seed": (["--seeds", "42"], "for the one seed 42 write --seeds 42,"),
    "seed repeated": (["--seeds", "1,2,1"], "--seeds: seed 1 is listed twice"),
    "rank repeated": (["--ranks", "4,8,04"], "--ranks: rank 4 is listed twice"),
    "method repeated": (["--methods", "dora,lora,DoRA"], "--methods: method dora is listed twice"),
    "override of the rank": (["adapter.r=8"], "override adapter.r=8: adapter.r: the sweep sets it (--ranks); give it there"),
    "override of the method in a mapping": (["adapter={method: vera}"], "adapter.method: the sweep sets it (--methods)"),
    "override of alpha under 2r": (["adapter.alpha=8"], "adapter.alpha: alpha is 2r under --alpha-rule 2r; pass --alpha-rule fixed to set it"),
    "override of the seed beside --seeds": (["--seeds", "1,2", "train.seed=3"], "train.seed: the sweep sets it (--seeds)"),
    "grid without values": (["--grid", "optim.lr"], "--grid: expected KEY=v1,v2,..."),
    "grid unknown key": (["--grid", "optim.llr=1e-4,2e-4"], '--grid optim.llr=1e-4: optim.llr: unknown key (did you mean "lr"?)'),
    "grid value of the wrong type": (["--grid", "optim.lr=1e-4,fast"], "--grid optim.lr=fast: optim.lr: expected a number, got 'fast'"),
    "grid value out of range": (["--grid", "optim.lr=1e-4,-1"], "--grid optim.lr=-1: optim.lr: expected a value > 0"),
    "grid literal": (["--grid", "schedule.type=linear,cosin"], '--grid schedule.type=cosin: schedule.type: expected one of constant, cosine or linear'),
    "grid empty value": (["--grid", "optim.lr=1e-4,,2e-4"], "--grid optim.lr: an empty value"),
    "grid repeated value": (["--grid", "optim.lr=1e-4,1e-4"], "--grid optim.lr: the value 1e-4 is listed twice"),
    "grid one value written twice": (["--grid", "optim.lr=1e-3,2e-3,1e-03"], "--grid optim.lr: 1e-3 and 1e-03 are the same value"),
    "grid one list written twice": (["--grid", "adapter.target_modules=[q_proj],['q_proj']"],
                                    "--grid adapter.target_modules: [q_proj] and ['q_proj'] are the same value"),
    "grid key twice": (["--grid", "optim.lr=1e-4", "--grid", "optim.lr=2e-4"], "--grid optim.lr: given twice"),
    "grid key also an override": (["--grid", "optim.lr=1e-4,2e-4", "optim.lr=3e-4"],
                                  "override optim.lr=3e-4: optim.lr: also set by --grid optim.lr=...; keep one of them"),
    "grid key also in a section override": (["--grid", "optim.lr=1e-4,2e-4", "optim={lr: 3e-4}"], "optim.lr: also set by --grid"),
    "grid a swept key": (["--grid", "adapter.r=4,8"], "--grid adapter.r: the sweep sets it (--ranks)"),
    "grid the seed": (["--grid", "train.seed=1,2"], "--grid train.seed: the sweep sets it (--seeds)"),
    "grid alpha under 2r": (["--grid", "adapter.alpha=8,16"], "alpha is 2r under --alpha-rule 2r"),
    "grid an eval key": (["--grid", "eval.limit=1,2"], "--grid eval.limit: every trial is scored the same way"),
    "grid the precision": (["--grid", "train.mixed_precision=no,bf16"], "keeps one mixed precision"),
    "grid without validation": (["--grid", "optim.lr=1e-4,2e-4", "data.val_set_size=0"], "chosen on the validation loss, and there is none"),
    "select-at without grid": (["--select-at", "4"], "--select-at: there is nothing to select without --grid"),
    "select-at another rank": (["--grid", "optim.lr=1e-4,2e-4", "--select-at", "8"], "--select-at: rank 8 is not one of --ranks 2,4"),
    "select-at not a number": (["--select-at", "eight"], "--select-at: 'eight' is not a rank (e.g. --select-at 8)"),
    "shard malformed": (["--shard", "1of2"], "--shard: expected K/N with 0 <= K < N"),
    "shard out of range": (["--shard", "2/2"], "--shard: expected K/N with 0 <= K < N (e.g. --shard 0/4 ... --shard 3/4), got '2/2'"),
    "shard of zero": (["--shard", "0/0"], "--shard: expected K/N"),
    "report of one shard": (["--report", "--shard", "0/2"], "--report writes the combined results of every shard"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    args, expected = BAD[case]
    out = tmp_path / "out"
    code, _, err = dora_in_process(["sweep-rank", "recipes/smoke.yaml", "--ranks", "2,4", f"output_dir={out}", *fast(*args)],
                                   monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err
    assert not out.exists()


@pytest.mark.parametrize("text, seeds", [(None, [42]), ("3", [1, 2, 3]), ("1", [1]), ("7,", [7]), ("5, 3,9", [5, 3, 9]),
                                         ("0,", [0]), (f"{2**32 - 1},", [2**32 - 1])])
def test_seeds_are_a_count_or_a_list(text, seeds):
    assert sweep.parse_seeds(text, 42) == seeds


@pytest.mark.parametrize("text, values", [
    ("1e-4,2e-4", ["1e-4", "2e-4"]),
    ("[q_proj,v_proj],[q_proj]", ["[q_proj,v_proj]", "[q_proj]"]),
    ("{a: 1, b: 2},'x,y'", ["{a: 1, b: 2}", "'x,y'"]),
    (" 3 ", ["3"]),
])
def test_grid_values_split_on_top_level_commas(text, values):
    assert sweep.split_values(text) == values


def test_a_trial_directory_of_another_recipe_is_refused_before_anything_runs(swept, tmp_path, monkeypatch, capsys):
    out = copy_sweep(swept[0], tmp_path)
    before = (out / "sweep" / "sweep.json").read_bytes()
    code, _, err = dora_in_process(sweep_args(out, "optim.lr=0.001"), monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "lora-r2-s1: holds a trial of a different recipe (optim.lr differs)" in err
    assert (out / "sweep" / "sweep.json").read_bytes() == before


def test_a_sweep_directory_made_before_seeds_serves_as_its_seeds_trial(swept, tmp_path, monkeypatch, capsys):
    """OUTPUT/sweep/<method>-r<r>/ of an older sweep holds the run of the recipe's seed: it is used where it
    is (not trained again); for another seed it is not the same run, and a new directory is made."""
    out = tmp_path / "out"
    (out / "sweep").mkdir(parents=True)
    shutil.copytree(swept[0] / "sweep" / "lora-r2-s1", out / "sweep" / "lora-r2")
    shutil.copyfile(swept[0] / "sweep" / "sweep.json", out / "sweep" / "sweep.json")  # its reports: ours, unmarked
    args = ["sweep-rank", "recipes/smoke.yaml", "--ranks", "2", "--methods", "lora", f"output_dir={out}", *FAST]
    code, _, err = dora_in_process([*args, "--seeds", "1,"], monkeypatch, capsys)
    assert code == 0, err
    assert "lora-r2 (a sweep made before seeds) holds the trial lora-r2-s1: used where it is" in err
    assert "skipped (done in" in err and "training ->" not in err
    [trial] = load(out)["trials"]
    assert trial["name"] == "lora-r2-s1" and trial["paths"]["output_dir"] == str(out / "sweep" / "lora-r2")
    assert trial["average"] == next(t for t in load(swept[0])["trials"] if t["name"] == "lora-r2-s1")["average"]
    monkeypatch.chdir(ROOT)
    plan = sweep.plan_sweep("recipes/smoke.yaml", [f"output_dir={out}", *FAST], ranks=["2"], methods=["lora"], seeds="2,")
    [other] = plan.trials.values()
    assert not other.legacy and other.dir == out / "sweep" / "lora-r2-s2"


def test_two_shards_started_at_once_write_what_one_process_writes(swept, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    shards = [subprocess.Popen([sys.executable, "-m", "dora_cli.cli", *sweep_args(out, "--shard", f"{k}/2")], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    results = [p.communicate(timeout=600) for p in shards]
    for p, (_, err) in zip(shards, results):
        assert p.returncode == 0, err[-3000:]
    # Each shard ran its own trials (index K mod 2) and wrote the combined reports.
    for k, (_, err) in enumerate(results):
        ran = {line.split("] (shard")[0] for line in err.splitlines() if ": ok, avg" in line}
        assert ran == {f"sweep [{i + 1}/8" for i in range(8) if i % 2 == k}
    assert numbers(load(out)) == numbers(load(swept[0]))
    assert load(out)["summary"] == {"ok": 8, "failed": 0, "pending": 0}
    assert not list((out / "sweep").glob("*.lock"))


def test_a_trial_claimed_by_a_live_process_is_left_to_it(swept, tmp_path, monkeypatch, capsys):
    out = copy_sweep(swept[0], tmp_path)
    drop_results(out, "dora-r4-s2")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = out / "sweep" / "dora-r4-s2.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": 0}))
        code, _, err = dora_in_process(sweep_args(out), monkeypatch, capsys)
        assert code == 0, err
        assert f"dora r=4 alpha=8 seed=2: claimed by pid {holder.pid}" in err and "training ->" not in err
        assert {t["name"]: t["status"] for t in load(out)["trials"]}["dora-r4-s2"] == "pending"
        assert lock.is_file()  # not ours to remove
    finally:
        holder.kill()
        holder.wait()


def test_report_writes_the_combined_results_and_trains_nothing(swept, tmp_path, monkeypatch, capsys):
    out = copy_sweep(swept[0], tmp_path)
    for name in ("sweep.json", "sweep.md", "sweep.png"):
        (out / "sweep" / name).unlink()
    drop_results(out, "lora-r4-s2")
    code, stdout, err = dora_in_process([*sweep_args(out), "--report"], monkeypatch, capsys)
    assert code == 0, err
    assert "training ->" not in err and "evaluating ->" not in err and "7 ok, 0 failed, 1 pending" in err
    doc = load(out)
    assert {t["name"]: t["status"] for t in doc["trials"]}["lora-r4-s2"] == "pending"
    expected = numbers(load(swept[0]))
    assert {n: t for n, t in numbers(doc)["trials"].items() if n != "lora-r4-s2"} == {
        n: t for n, t in expected["trials"].items() if n != "lora-r4-s2"}
    assert "| LoRA | 4 | 1 of 2ᵇ |" in stdout and (out / "sweep" / "sweep.png").read_bytes()[:8] == PNG
    assert not (out / "sweep" / "lora-r4-s2" / "final").exists()


def test_the_grid_is_chosen_at_one_rank_and_seed_on_the_validation_loss_then_used_everywhere(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["sweep-rank", "recipes/smoke.yaml", "--ranks", "2,4", "--methods", "lora,dora", f"output_dir={out}", *FAST,
            "--grid", "optim.lr=1e-3,3e-2", "--select-at", "4"]
    code, _, err = dora_in_process(args, monkeypatch, capsys)
    assert code == 0, err
    doc = load(out)
    names = [t["name"] for t in doc["trials"]]
    selecting = [t for t in doc["trials"] if t["selecting"]]
    assert [t["name"] for t in selecting] == ["lora-r4-lr=1e-3-s42", "lora-r4-lr=3e-2-s42", "dora-r4-lr=1e-3-s42", "dora-r4-lr=3e-2-s42"]
    for method in ("lora", "dora"):
        mine = [t for t in selecting if t["method"] == method]
        best = min(mine, key=lambda t: t["val_loss"])["setting"]["optim.lr"]
        assert f"{method}-r2-lr={best}-s42" in names  # the study trial at the other rank uses the chosen value
        assert not any(n.startswith(f"{method}-r2-") and n != f"{method}-r2-lr={best}-s42" for n in names)
        recipe = (out / "sweep" / f"{method}-r2-lr={best}-s42" / "recipe.yaml").read_text()
        assert f"lr: {float(best)}" in recipe
        chosen = [g for g in doc["groups"] if g["method"] == method and g["selected"]]
        assert [(g["rank"], g["setting"]) for g in chosen] == [(2, {"optim.lr": best}), (4, {"optim.lr": best})]
    assert doc["summary"] == {"ok": 6, "failed": 0, "pending": 0}
    assert doc["selection"]["basis"].startswith("each method's setting with the lowest validation loss at r=4, seed 42")
    md = (out / "sweep" / "sweep.md").read_text()
    assert "| Model | r | Setting | Seeds |" in md and " ★ |" in md and "## Selected on the validation loss" in md
    assert "| 4 (for all) |" in md


def _record(method: str, rank: int, seed: int, lr: str, val_loss: float, average: float) -> dict:
    return {
        "name": f"{method}-r{rank}-lr={lr}-s{seed}", "method": method, "rank": rank, "seed": seed, "setting": {"optim.lr": lr},
        "status": "ok", "error": None, "trainable_percent": 0.1, "tasks": {"boolq": average}, "tasks_se": {"boolq": 1.0},
        "average": average, "average_se": 1.0, "examples": 100, "val_loss": val_loss, "train_time_s": 1.0,
        "eval_time_s": 1.0, "paper_average": None, "warnings": [], "magnitude_change": {}, "selecting": False,
    }


def _settings(**extra) -> dict:
    return {"model": "m", "methods": ["lora", "dora"], "ranks": [8], "seeds": [1, 2, 3], "grid": {"optim.lr": ["1e-4", "1e-3"]},
            "select_at": None, "alpha_rule": "2r", "alpha": "2r", "paper_reference": None,
            "eval": {"tasks": ["boolq"], "mode": "loglik", "limit": None}, **extra}


def test_each_method_and_rank_takes_the_setting_with_the_lowest_mean_validation_loss_never_the_test_accuracy():
    records = []
    for seed, noise in zip((1, 2, 3), (0.01, -0.02, 0.005)):
        # LoRA: 1e-3 has the lower loss but the lower test accuracy; DoRA: 1e-4 the lower loss.
        records += [_record("lora", 8, seed, "1e-4", 1.30 + noise, 70.0 + seed), _record("lora", 8, seed, "1e-3", 1.20 + noise, 60.0 + seed),
                    _record("dora", 8, seed, "1e-4", 1.10 + noise, 62.0 + 2 * seed), _record("dora", 8, seed, "1e-3", 1.25, 80.0)]
    doc = sweep_report.document(_settings(), records)
    chosen = {(s["method"], s["rank"]): s["label"] for s in doc["selection"]["selected"]}
    assert chosen == {("lora", 8): "optim.lr=1e-3", ("dora", 8): "optim.lr=1e-4"}
    [d] = doc["differences"]
    assert (d["setting"], d["baseline_setting"]) == ("optim.lr=1e-4", "optim.lr=1e-3")
    lora = [60.0 + s for s in (1, 2, 3)]
    dora = [62.0 + 2 * s for s in (1, 2, 3)]
    test = scipy_stats.ttest_rel(dora, lora)
    assert d["average"]["mean"] == pytest.approx(np.mean(np.subtract(dora, lora)))
    assert d["average"]["p"] == pytest.approx(test.pvalue) and d["average"]["t"] == pytest.approx(test.statistic)
    assert d["average"]["excludes_zero"]
    md = sweep_report.render_table(doc)
    assert "| LoRA | 8 | optim.lr=1e-3 ★ | 3 |" in md and "| LoRA | 8 | optim.lr=1e-4 | 3 |" in md
    assert f"| {d['average']['mean']:+.1f} ± {d['average']['half_width']:.1f} † |" in md


def test_selection_waits_for_a_trial_another_process_runs(swept, tmp_path, monkeypatch):
    """A shard that needs a selection trial held by another process waits for it, then chooses."""
    out = tmp_path / "out"
    monkeypatch.chdir(ROOT)
    plan = sweep.plan_sweep("recipes/smoke.yaml", [f"output_dir={out}", *FAST], ranks=["2"], methods=["lora"], seeds="1,",
                            grid=["optim.lr=1e-3,3e-3"], select_at=2, shard="1/2")
    first, second = (plan.trial(s) for s in plan.slots if s.selecting)
    shutil.copytree(swept[0] / "sweep" / "lora-r2-s1", second.dir)  # lr 3e-3: the smoke recipe's, the fixture's run
    claimed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (plan.dir / (first.name + sweep.CLAIM_SUFFIX)).write_text(json.dumps({"pid": claimed.pid, "host": socket.gethostname()}))
        waits = []

        def sleep(seconds):  # the process holding lr 1e-3 dies; its claim is stale now
            waits.append(seconds)
            claimed.kill()
            claimed.wait()

        monkeypatch.setattr(sweep.time, "sleep", sleep)
        import dora_cli.train

        def train(recipe, **kw):
            raise RunFailure("step 1: the loss is nan")

        monkeypatch.setattr(dora_cli.train, "train", train)
        runner = sweep.Runner(plan)
        state = sweep._settle_selection(plan, runner)
    finally:
        claimed.kill()
        claimed.wait()
    assert waits == [sweep.POLL_S]
    assert first.name in runner.failed  # taken over once its holder was gone, and it failed
    assert state == {"lora": ("chosen", plan.settings[1])}


def test_alpha_rules_and_each_trials_expected_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    common = [f"output_dir={tmp_path / 'out'}", "expected={avg: 50.0}"]
    plan = sweep.plan_sweep("recipes/smoke.yaml", common, ranks=["16", "8"], methods=["dora", "lora"])
    by_name = {t.name: t for t in plan.trials.values()}
    assert [plan.trial(s).name for s in plan.slots] == ["dora-r8-s42", "dora-r16-s42", "lora-r8-s42", "lora-r16-s42"]
    assert [by_name[n].recipe.adapter.alpha for n in ("dora-r8-s42", "dora-r16-s42")] == [16, 32]
    assert by_name["dora-r16-s42"].recipe.output_dir == str(tmp_path / "out" / "sweep" / "dora-r16-s42")
    # The recipe's own row (dora, r 8, alpha 16) keeps its paper numbers; the other rows have none.
    assert by_name["dora-r8-s42"].recipe.expected == {"avg": 50.0}
    assert by_name["lora-r8-s42"].recipe.expected == {} and by_name["dora-r16-s42"].recipe.expected == {}
    seeded = sweep.plan_sweep("recipes/smoke.yaml", [*common, "train.seed=7", "adapter.alpha=4"], ranks=["4"],
                              methods=["lora"], alpha_rule="fixed")  # no --seeds: the recipe's seed, as overridden
    assert [(t.seed, t.recipe.adapter.alpha) for t in seeded.trials.values()] == [(7, 4)]
    fixed = sweep.plan_sweep("recipes/smoke.yaml", common, ranks=["4", "32"], methods=["lora"], alpha_rule="fixed",
                             grid=["adapter.alpha=16,8"], seeds="2")
    assert sorted((t.rank, t.seed, t.recipe.adapter.alpha) for t in fixed.trials.values()) == [
        (r, s, a) for r in (4, 32) for s in (1, 2) for a in (8, 16)]
    assert fixed.slots[0] == sweep.Slot("lora", 4, 1, (sweep.GridValue("adapter.alpha", "16"),))
    assert not (tmp_path / "out").exists()


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


def _paper_records(status: dict[str, str]) -> list[dict]:
    records = []
    for method in ("lora", "dora"):
        for r in (4, 8, 16, 32, 64):
            name = f"{method}-r{r}-s42"
            ok = status.get(name, "ok") == "ok"
            records.append({
                "name": name, "method": method, "rank": r, "seed": 42, "setting": {}, "status": status.get(name, "ok"),
                "error": None if ok else "step 9: the loss is nan", "trainable_percent": r * (0.027 if method == "lora" else 0.0275),
                "tasks": {"boolq": 60.0 + r / 8} if ok else {}, "tasks_se": {"boolq": 1.0} if ok else {},
                "average": 60.0 + r / 8 if ok else None, "average_se": 1.0 if ok else None, "examples": 200 if ok else None,
                "val_loss": 1.25 if ok else None, "train_time_s": 60.0 if ok else None, "eval_time_s": 30.0 if ok else None,
                "paper_average": sweep.PAPER_TABLE15[method][r], "warnings": [], "magnitude_change": {}, "selecting": False,
            })
    return records


def test_the_papers_setting_shows_table_15_beside_ours(tmp_path):
    settings = {
        "model": sweep.PAPER_MODEL, "methods": ["lora", "dora"], "ranks": [4, 8, 16, 32, 64], "seeds": [42], "grid": {},
        "select_at": None, "alpha_rule": "2r", "alpha": "2r",
        "eval": {"tasks": ["boolq"], "mode": "generate", "limit": None}, "paper_reference": "Table 15 (LLaMA-7B)",
    }
    doc = sweep_report.document(settings, _paper_records({"lora-r4-s42": "failed", "dora-r64-s42": "pending"}))
    md = sweep_report.render_table(doc)
    assert "| Model | r | Seeds | # Params (%) | BoolQ | Avg | Val loss | Train (s) | Eval (s) | Paper Avg |" in md
    assert "| LoRA | 4 | 0 of 1 | 0.11 | - | failed | - | - | - | 39.5 |" in md
    # One seed: the binomial interval of the test examples (1.96 standard errors), labelled.
    assert "| DoRA | 32 | 1ᵇ | 0.88 | 64.0 ± 2.0 | 64.0 ± 2.0 | 1.2500 | 60 | 30 | 78.1 |" in md
    assert "| DoRA | 64 | 0 of 1 | 1.76 | - | pending | - | - | - | 72.1 |" in md
    assert "- lora-r4-s42: step 9: the loss is nan" in md and "ᵇ one seed" in md
    sweep_report.plot(doc, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


def test_magnitude_warnings_reach_sweep_md():
    records = _paper_records({})
    records[5]["warnings"] = ["the magnitude did not train: the q_proj magnitude is exactly its initial value after 9 steps"]
    settings = {"model": "m", "methods": ["lora", "dora"], "ranks": [4, 8, 16, 32, 64], "seeds": [42], "grid": {}, "select_at": None,
                "alpha_rule": "2r", "alpha": "2r", "eval": {"tasks": ["boolq"], "mode": "loglik", "limit": None}, "paper_reference": None}
    md = sweep_report.render_table(sweep_report.document(settings, records))
    assert "Runs whose magnitude did not train:\n\n- dora-r4-s42: the magnitude did not train: the q_proj magnitude" in md


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
    assert [t.recipe.eval.tasks for t in plan.trials.values()] == [tasks] and not (tmp_path / "out").exists()
