"""Bad input to `dora train`: one clear line, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from dora_cli import cli

SMOKE = (ROOT / "recipes" / "smoke.yaml").read_text()


def run(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["dora", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr().err


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def smoke_with(tmp_path: Path, extra: str = "", data: list | None = None) -> Path:
    """The smoke recipe writing into tmp_path/out, with `extra` YAML appended (new keys only: a key
    written twice is refused)."""
    text = SMOKE.replace("output_dir: runs/smoke", f"output_dir: {tmp_path / 'out'}")
    if data is not None:
        write(tmp_path / "data.json", json.dumps(data))
        text = text.replace("data/smoke/train.json", str(tmp_path / "data.json"))
    return write(tmp_path / "recipe.yaml", text + extra)


GOOD = {"instruction": "q?", "input": "", "output": "the correct answer is true", "answer": "true"}

CASES = {
    "malformed YAML": (lambda t: write(t / "r.yaml", "model:\n  name_or_path: x\n bad: [\n"), [], r"re:r.yaml:\d+: malformed YAML"),
    "unknown key": (lambda t: smoke_with(t), ["adapter.rr=4"], 'adapter.rr: unknown key (did you mean "r"?)'),
    "wrong type": (lambda t: smoke_with(t), ["train.max_steps=abc"], "train.max_steps: expected an integer"),
    "missing data file": (lambda t: smoke_with(t), ["data.sources=[{path: data/smoke/trian.json}]"], "trian.json"),
    "empty dataset": (lambda t: smoke_with(t, data=[]), [], "empty"),
    "record missing a field": (lambda t: smoke_with(t, data=[GOOD, {"instruction": "q?"}] * 40), [], r"re:\[1\].*output"),
    "batch not divisible": (lambda t: smoke_with(t), ["train.batch_size=10"], "train.batch_size=10 is not divisible"),
    "unknown base": (lambda t: write(t / "r.yaml", "base: nowhere.yaml\n"), [], "nowhere.yaml"),
    "base cycle": (lambda t: (write(t / "a.yaml", "base: b.yaml\n"), write(t / "b.yaml", "base: a.yaml\n"))[0], [], "cycle"),
    "unset env": (lambda t: write(t / "recipe.yaml", smoke_with(t).read_text().replace(
        "data/smoke/train.json", "${env:DORA_TEST_UNSET_VAR}")), [], "DORA_TEST_UNSET_VAR"),
    "no module matches": (lambda t: smoke_with(t), ["adapter.target_modules=[q_prj]"], 'did you mean "q_proj"'),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DORA_TEST_UNSET_VAR", raising=False)
    make, overrides, expected = CASES[case]
    recipe = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run(monkeypatch, capsys, "train", recipe, f"output_dir={tmp_path / 'out'}", *overrides)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    if expected.startswith("re:"):
        assert re.search(expected[3:], lines[0]), lines[0]
    else:
        assert expected in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no output_dir
