"""The study's sweep.json / sweep.md / sweep.png from sweeps run apart, with dora's own report code.

`dora sweep-rank` reports the trials it finds on its disk. When the trial directories of one piece of a
study are gone (the rank-8 piece of the committed study: its machine was lost, its sweep.json kept),
the rest is run as a sweep of its own at the settings that piece selected, and the pieces' sweep.json
are combined here into the report one sweep of all the trials writes (tests/test_study_combine.py
checks exactly that):

    python studies/smollm2_commonsense/combine.py PIECE.json [PIECE.json ...] --out DIR

Every piece must be the same study (recipe, model, seeds, alpha rule, evaluation, the overrides that
change the training (NEUTRAL's may differ); methods among the study's; one grid when no piece selects),
and no trial may be in two pieces. At most one piece selects (--select-at); every trial of the
others must be at the setting it chose for that method. Anything else is refused in one line, exit 2,
nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dora_cli.files import write_json, write_text
from dora_cli.rundir import VOLATILE
from dora_cli.sweep_report import chosen_at, document, label, plot, render_table

SAME = ("recipe", "model", "seeds", "alpha_rule", "alpha", "eval", "paper_reference")
NEUTRAL = VOLATILE - {"train.skip_nonfinite"}
"""Override keys (a section's name: any key in it) that may differ between pieces: where a piece writes, the
evaluation (compared as settings.eval), how the same training runs (rundir.VOLATILE's, less the ones
that change what is trained)."""


def trained_overrides(overrides: list[str]) -> dict[str, str]:
    """The overrides that change what is trained, {key: value} (the last of a key wins, as in load_recipe)."""
    out: dict[str, str] = {}
    for item in overrides or []:
        key, _, value = str(item).partition("=")
        key = key.strip()
        if not any(key == n or key.startswith(n + ".") for n in NEUTRAL):
            out[key] = value.strip()
    return out


class Refused(Exception):
    """A piece that does not fit: one line for the user."""


def combine(pieces: dict[str, dict]) -> dict:
    """One sweep document from the pieces' ({name: sweep.json}): the union of their trials, the settings of
    the selecting piece (else the first) with every piece's ranks, and where each came from under
    settings["pieces"]."""
    if not pieces:
        raise Refused("no sweep.json given")
    (first_name, first), *rest = pieces.items()
    for name, doc in rest:
        for key in SAME:
            if doc["settings"].get(key) != first["settings"].get(key):
                raise Refused(f"{name}: settings.{key} is {doc['settings'].get(key)!r}, but "
                              f"{first_name} has {first['settings'].get(key)!r}: not the same study")
        mine, theirs = trained_overrides(doc["settings"].get("overrides")), trained_overrides(first["settings"].get("overrides"))
        if mine != theirs:
            key = next(k for k in sorted({*mine, *theirs}) if mine.get(k) != theirs.get(k))
            raise Refused(f"{name}: override {key}={mine.get(key)} but {first_name} has {key}={theirs.get(key)}: "
                          "not the same study")
    seen: dict[str, str] = {}
    for name, doc in pieces.items():
        for trial in doc["trials"]:
            if trial["name"] in seen:
                raise Refused(f"{name}: trial {trial['name']} is also in {seen[trial['name']]}: each trial comes from one piece")
            seen[trial["name"]] = name
    selecting = [name for name, doc in pieces.items() if doc["settings"].get("select_at")]
    if len(selecting) > 1:
        raise Refused(f"{selecting[1]}: a second piece that selects (also {selecting[0]}): one selection per study")
    if not selecting:  # each piece selected per (method, rank) over its own grid: one sweep has one grid
        for name, doc in rest:
            if doc["settings"].get("grid") != first["settings"].get("grid"):
                raise Refused(f"{name}: grid {doc['settings'].get('grid')!r}, but {first_name} has "
                              f"{first['settings'].get('grid')!r}, and no piece selects (--select-at): not one sweep")
    base = pieces[selecting[0]] if selecting else first
    methods = base["settings"]["methods"]
    for name, doc in pieces.items():
        if not set(doc["settings"]["methods"]) <= set(methods):
            raise Refused(f"{name}: methods {', '.join(doc['settings']['methods'])} are not among the study's "
                          f"({', '.join(methods)})")
    if selecting:
        chosen = chosen_at(base["trials"], methods)
        for name, doc in pieces.items():
            if name == selecting[0]:
                continue
            for trial in doc["trials"]:
                if not isinstance(chosen.get(trial["method"]), dict):
                    raise Refused(f"{selecting[0]}: no setting chosen for {trial['method']} (its selection is not finished)")
                if trial.get("setting") != chosen[trial["method"]]:
                    raise Refused(f"{name}: trial {trial['name']} is at {label(trial.get('setting'))}, but "
                                  f"{selecting[0]} chose {label(chosen.get(trial['method']))} for {trial['method']}")
    ranks = sorted({rank for doc in pieces.values() for rank in doc["settings"]["ranks"]})
    settings = {**base["settings"], "ranks": ranks,
                "pieces": [{"sweep_json": name, "methods": doc["settings"]["methods"], "ranks": doc["settings"]["ranks"],
                            "grid": doc["settings"]["grid"],
                            "overrides": doc["settings"]["overrides"], "select_at": doc["settings"].get("select_at")}
                           for name, doc in pieces.items()]}
    selector = selecting[0] if selecting else None
    records = [{**t, "selecting": bool(t.get("selecting")) and name == selector}
               for name, doc in pieces.items() for t in doc["trials"]]
    return document(settings, records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pieces", nargs="+", type=Path, help="the pieces' sweep.json")
    ap.add_argument("--out", type=Path, required=True, help="where sweep.json, sweep.md and sweep.png go")
    args = ap.parse_args(argv)
    try:
        docs = {}
        for path in args.pieces:
            if str(path) in docs:
                raise Refused(f"{path}: given twice")
            try:
                doc = json.loads(path.read_text())
                doc["settings"]["ranks"], doc["settings"]["methods"], doc["trials"]  # noqa: B018 (the keys combine reads)
                docs[str(path)] = doc
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise Refused(f"{path}: not a sweep.json of dora sweep-rank ({type(err).__name__}: {err})") from None
        doc = combine(docs)
    except Refused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "sweep.json", doc)
    write_text(args.out / "sweep.md", render_table(doc))
    plot(doc, args.out / "sweep.png")
    print(f"combined {len(docs)} sweeps ({doc['summary']['ok']} finished trials) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
