"""`python -m dora_cli.demo`: the orchestration of `make demo` on the tiny smoke setup (seconds), re-runs,
and (slow) the real demo recipe on SmolLM2-135M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from dora_cli.demo import run_demo
from dora_cli.errors import UserError

ROWS = ("before (base model)", "after (base + DoRA adapter)", "merged (adapter folded in)")

# recipes/smoke.yaml (tiny random LLaMA, data/smoke) evaluated on the smoke ARC-Easy split (16 questions).
TINY = """\
base: {smoke}
train:
  max_steps: 6
  save_every: 3
  log_every: 3
eval:
  tasks: [ARC-Easy]
  data_dir: {root}/data/smoke/commonsense
  mode: generate
  num_beams: 1
  max_new_tokens: 6
  batch_size: 8
"""


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, OUT) of one `python -m dora_cli.demo` run on the tiny recipe, as `make demo` runs it."""
    tmp = tmp_path_factory.mktemp("demo")
    recipe = tmp / "tiny_demo.yaml"
    recipe.write_text(TINY.format(smoke=ROOT / "recipes" / "smoke.yaml", root=ROOT))
    out = tmp / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dora_cli.demo", "--recipe", str(recipe), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return recipe, out


def test_demo_writes_the_table_with_the_three_rows(tiny_demo):
    _, out = tiny_demo
    stdout = (out / "stdout.txt").read_text()
    for i, phase in enumerate(("before", "train", "after", "merge", "merged"), 1):
        assert f"[{i}/5] {phase}: done in" in stdout  # a progress line per phase
    md = (out / "demo.md").read_text()
    assert all(f"| {row} |" in md for row in ROWS) and md in stdout
    doc = json.loads((out / "demo.json").read_text())
    assert list(doc["phases"]) == ["before", "train", "after", "merge", "merged"]
    assert doc["questions"] == {"ARC-Easy": 16}
    assert "answers ARC-Easy: answer1 / answer2 / answer3 / answer4 / answer5" in doc["settings"]
    assert doc["settings"].endswith("Chance: 25%.")  # every smoke question offers four answers
    assert "generate: 1 beam(s), 6 new tokens" in doc["settings"], doc["settings"]  # as evaluated
    for phase in ("before", "after", "merged"):
        for protocol in ("generate", "loglik"):
            m = doc["phases"][phase]["eval"][protocol]
            assert m["n"] == 16 and 0 <= m["accuracy"] <= 100 and 0 <= m["no_answer_rate"] <= 1
            assert (out / f"eval-{phase}" / protocol / "metrics.json").is_file()
        assert doc["phases"][phase]["seconds"] > 0
    assert doc["phases"]["train"]["steps"] == 6
    assert (out / "train" / "final" / "manifest.json").is_file() and (out / "merged" / "config.json").is_file()


def test_merged_model_predicts_what_the_adapter_predicts(tiny_demo):
    _, out = tiny_demo
    for protocol in ("generate", "loglik"):
        after = [json.loads(x) for x in (out / "eval-after" / protocol / "predictions" / "ARC-Easy.jsonl").read_text().splitlines()]
        merged = [json.loads(x) for x in (out / "eval-merged" / protocol / "predictions" / "ARC-Easy.jsonl").read_text().splitlines()]
        key = "output" if protocol == "generate" else "prediction"
        assert sorted((r["id"], r[key]) for r in after) == sorted((r["id"], r[key]) for r in merged)


def test_second_run_reuses_finished_phases_and_redoes_what_is_missing(tiny_demo, capsys):
    import shutil

    recipe, out = tiny_demo
    first = json.loads((out / "demo.json").read_text())
    doc = run_demo(recipe, out)  # nothing to do: every phase is reused
    assert all(p["reused"] for p in doc["phases"].values())
    assert "reused from a previous run" in capsys.readouterr().out
    assert doc["phases"]["after"]["eval"] == first["phases"]["after"]["eval"]

    shutil.rmtree(out / "merged")  # a deleted output: its phase and the phases after it run again
    doc = run_demo(recipe, out)
    assert [p for p, r in doc["phases"].items() if not r.get("reused")] == ["merge", "merged"]
    assert doc["phases"]["merged"]["eval"]["loglik"] == first["phases"]["merged"]["eval"]["loglik"]


def test_another_recipe_in_the_same_out_is_refused_before_anything_is_written(tiny_demo, tmp_path):
    recipe, out = tiny_demo
    other = tmp_path / "other.yaml"
    other.write_text(recipe.read_text().replace("max_steps: 6", "max_steps: 7"))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserError, match="holds a demo of another recipe.*--overwrite"):
        run_demo(other, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_bad_input_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'recipes' / 'smoke.yaml'}\neval:\n  tasks: [dmeo]\n  data_dir: {ROOT / 'data'}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dora_cli.demo", "--recipe", str(bad), "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[-1]
    ]
    assert 'unknown task "dmeo" (did you mean "demo"?)' in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_demo_after_training_beats_before(smollm2_dir, tmp_path):
    """The whole `make demo` recipe on SmolLM2-135M (about 10 minutes on 2 idle cores)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", SMOLLM2_DIR=str(smollm2_dir))
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "dora_cli.demo", "--out", str(out)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads((out / "demo.json").read_text())["phases"]
    before, after, merged = (phases[p]["eval"] for p in ("before", "after", "merged"))
    assert after["generate"]["accuracy"] >= before["generate"]["accuracy"] + 30
    assert after["loglik"]["accuracy"] >= before["loglik"]["accuracy"] + 15
    assert after["generate"]["no_answer_rate"] <= 0.05
    assert abs(merged["loglik"]["accuracy"] - after["loglik"]["accuracy"]) <= 1.0


def test_the_caption_names_the_generation_settings_the_suite_uses():
    from dora_cli.demo import _settings_line
    from dora_cli.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", [])  # num_beams / max_new_tokens left to the suite
    assert recipe.eval.num_beams is None and recipe.eval.max_new_tokens is None
    assert "generate: 4 beam(s), 32 new tokens" in _settings_line(recipe, {"boolq": 2}, 0.5)
