"""studies/smollm2_commonsense/combine.py: the pieces of a study run apart report exactly what one sweep of
all their trials reports; pieces that are not one study are refused in one line."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from conftest import ROOT, dora_in_process
from test_sweep import FAST, _record, _settings, load, numbers

from dora_cli import sweep_report

_spec = importlib.util.spec_from_file_location("study_combine", ROOT / "studies" / "smollm2_commonsense" / "combine.py")
combine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(combine)

GRID = "optim.lr=1e-3,3e-2"


def sweep(out, methods: str, *extra: str) -> list[str]:
    return ["sweep-rank", "recipes/smoke.yaml", "--methods", methods, "--seeds", "2", f"output_dir={out}", *FAST, *extra]


def test_pieces_combine_into_the_report_of_one_sweep_of_their_trials(tmp_path, monkeypatch, capsys):
    # Piece 1: the selection at rank 4 and the study's seeds there.
    first = tmp_path / "rank4"
    code, _, err = dora_in_process(sweep(first, "lora,dora", "--ranks", "4", "--grid", GRID, "--select-at", "4"), monkeypatch, capsys)
    assert code == 0, err
    chosen = {s["method"]: s["setting"]["optim.lr"] for s in load(first)["selection"]["selected"]}
    # Then rank 2 at each method's choice: a sweep per method (the two may choose differently).
    pieces = [first]
    for method, lr in chosen.items():
        pieces.append(tmp_path / f"rank2-{method}")
        code, _, err = dora_in_process(sweep(pieces[-1], method, "--ranks", "2", "--grid", f"optim.lr={lr}"), monkeypatch, capsys)
        assert code == 0, err
    # One sweep of all ranks over the same trial directories: --report, nothing trained.
    whole = tmp_path / "whole"
    shutil.copytree(first, whole)
    for piece in pieces[1:]:
        for trial in (piece / "sweep").glob("*-r2-*"):
            shutil.copytree(trial, whole / "sweep" / trial.name)
    code, _, err = dora_in_process(sweep(whole, "lora,dora", "--ranks", "2,4", "--grid", GRID, "--select-at", "4", "--report"),
                                   monkeypatch, capsys)
    assert code == 0, err
    assert "training ->" not in err
    expected = load(whole)
    assert expected["summary"] == {"ok": 10, "failed": 0, "pending": 0}  # 4 selecting, 2 more at rank 4, 4 at rank 2

    out = tmp_path / "combined"
    assert combine.main([str(p / "sweep" / "sweep.json") for p in pieces] + ["--out", str(out)]) == 0
    got = json.loads((out / "sweep.json").read_text())
    assert numbers(got) == numbers(expected)
    assert got["settings"]["ranks"] == [2, 4] and got["settings"]["grid"] == {"optim.lr": ["1e-3", "3e-2"]}
    assert [p["ranks"] for p in got["settings"]["pieces"]] == [[4], [2], [2]]
    assert [d["n"] for d in got["differences"]] == [2, 2]
    md = (out / "sweep.md").read_text()
    assert md == sweep_report.render_table({**expected, "settings": got["settings"]})
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _piece(ranks: list[int], lrs: dict[str, str], select: bool, **settings) -> dict:
    """A sweep.json of LoRA and DoRA at `ranks`, seeds 1-3, each method at its lr (select: also the other lr at
    the first rank, seed 1, with a higher validation loss, and --select-at there)."""
    records = []
    for rank in ranks:
        for method, lr in lrs.items():
            for seed in (1, 2, 3):
                records.append({**_record(method, rank, seed, lr, 1.0 + 0.01 * seed, 50.0 + seed + rank),
                                "selecting": select and seed == 1 and rank == ranks[0]})
            if select:
                other = "1e-4" if lr != "1e-4" else "1e-3"
                records.append({**_record(method, rank, 1, other, 2.0, 99.0), "selecting": True})
    grid = {"optim.lr": ["1e-4", "1e-3"]} if select else {"optim.lr": sorted(set(lrs.values()))}
    base = _settings(ranks=ranks, grid=grid, overrides=[], recipe="r.yaml",
                     select_at={"rank": ranks[0], "seed": 1} if select else None)
    return sweep_report.document({**base, **settings}, records)


LRS = {"lora": "1e-3", "dora": "1e-4"}

REFUSED = {
    "a trial in two pieces": ([_piece([8], LRS, True), _piece([8], LRS, False)], "is also in"),
    "another setting than chosen": ([_piece([8], LRS, True), _piece([4], {"lora": "1e-4", "dora": "1e-4"}, False)],
                                    "chose optim.lr=1e-3 for lora"),
    "another evaluation": ([_piece([8], LRS, True), _piece([4], LRS, False, eval={"tasks": ["piqa"], "mode": "loglik", "limit": None})],
                           "settings.eval is"),
    "two selections": ([_piece([8], LRS, True), _piece([4], LRS, True)], "a second piece that selects"),
    "a method not in the study": ([_piece([8], LRS, True), _piece([4], LRS, False, methods=["lora", "dora", "vera"])],
                                  "are not among the study's"),
    "other training overrides": ([_piece([8], LRS, True, overrides=["train.max_steps=1000"]),
                                  _piece([4], LRS, False, overrides=["train.max_steps=2"])], "override train.max_steps=2"),
    "another grid and no selection": ([_piece([8], LRS, False), _piece([4], {"lora": "1e-3", "dora": "1e-3"}, False)],
                                      "no piece selects"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_pieces_that_are_not_one_study_are_refused_in_one_line_and_nothing_is_written(case, tmp_path, capsys):
    docs, message = REFUSED[case]
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"piece{i}.json")
        paths[-1].write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert combine.main([*map(str, paths), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not out.exists()


def test_a_piece_given_twice_is_refused(tmp_path, capsys):
    piece = tmp_path / "piece.json"
    piece.write_text(json.dumps(_piece([8], LRS, True)))
    assert combine.main([str(piece), str(piece), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {piece}: given twice\n" and not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_sweep_json_is_refused(tmp_path, capsys):
    bad = tmp_path / "notes.json"
    bad.write_text('{"trials": []}')
    assert combine.main([str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not a sweep.json") and err.count("\n") == 1


def test_combining_valid_pieces_keeps_every_trial_and_the_selection():
    doc = combine.combine({"a": _piece([8], LRS, True), "b": _piece([4, 16], LRS, False)})
    assert doc["settings"]["ranks"] == [4, 8, 16] and doc["summary"]["ok"] == 3 * 2 * 3 + 2
    chosen = {(s["method"], s["rank"]): s["label"] for s in doc["selection"]["selected"]}
    assert chosen == {(m, r): f"optim.lr={LRS[m]}" for m in LRS for r in (4, 8, 16)}
    assert [(d["rank"], d["n"]) for d in doc["differences"]] == [(4, 3), (8, 3), (16, 3)]
    assert sum(t["selecting"] for t in doc["trials"]) == 4  # the selecting piece's only


def test_overrides_that_do_not_change_the_training_may_differ():
    """Where a piece wrote, its checkpoints kept and its evaluation override (compared as settings.eval) are
    not the study's identity; the training's are (the case above)."""
    a = _piece([8], LRS, True, overrides=["train.keep_last=8", "output_dir=runs/a", "train.max_steps=50"])
    b = _piece([4], LRS, False, overrides=["output_dir=runs/b", "train.threads=1", "train.max_steps=50"])
    doc = combine.combine({"a": a, "b": b})
    assert doc["settings"]["ranks"] == [4, 8]


def test_pieces_without_a_selection_report_the_same_in_any_order():
    """Without --select-at, pieces of one grid combine to the same groups, selection and differences
    whichever comes first (two grids are refused above: the first one's would be the report's)."""
    a, b = _piece([8], LRS, False), _piece([4], LRS, False)
    ab, ba = combine.combine({"a": a, "b": b}), combine.combine({"b": b, "a": a})
    for key in ("groups", "selection", "differences"):
        assert ab[key] == ba[key]
