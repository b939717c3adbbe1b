"""`make demo`: DoRA on SmolLM2-135M-Instruct on a CPU, evaluated before, after and merged.

    python -m dora_cli.demo [--recipe recipes/smollm2_demo.yaml] [--out runs/demo] [--overwrite]

Phases, top to bottom (each prints a line when it starts and one when it ends):

    before   the base model (recipe `model:`) on the recipe's held-out eval split
    train    `run_train` of the recipe into OUT/train                     -> OUT/train/final
    after    the trained adapter (base + OUT/train/final), same protocols
    merge    `run_merge` of OUT/train/final                               -> OUT/merged
    merged   the merged model, same protocols (same numbers as after, up to float rounding)

Every evaluation runs two protocols on the same questions, as `dora eval` would in each mode (each batch's
prompts run once for both: eval.commonsense.evaluate_commonsense_modes):

    generate  the recipe's `eval:` section (the LLM-Adapters protocol: generate, take the first
              answer of the task's format in the response; a response without one is a "no answer"
              and counts as wrong)
    loglik    the same with `eval.mode=loglik`: the answer X whose `the correct answer is X` is most
              likely (never "no answer": it shows what the model knows, whatever it writes)

The evaluation code is `dora eval`'s (`load_for_eval` / `load_model`, the commonsense suite's settings);
predictions and metrics go to OUT/eval-<phase>/<protocol>/. At the end: a table (phase, accuracy,
no-answer rate, wall time) printed and written to OUT/demo.md and OUT/demo.json.

Re-running: a phase that finished is reused (its record is in OUT/demo_state.json and its outputs
are still there), so a second `make demo` only prints the table again; an interrupted phase resumes
(training from its newest checkpoint, evaluation from its saved predictions). When a phase runs
again, every later phase runs again from scratch. A different recipe in the same OUT is refused;
`--overwrite` starts over (every phase, outputs replaced).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

from dora_cli import rundir
from dora_cli.console import stderr_is_terminal
from dora_cli.errors import UserError, run_main
from dora_cli.files import write_json, write_text
from dora_cli.rundir import RunDir

DEFAULT_RECIPE = "recipes/smollm2_demo.yaml"
DEFAULT_OUT = "runs/demo"
STATE_NAME = "demo_state.json"
PHASES = ("before", "train", "after", "merge", "merged")
EVAL_PHASES = ("before", "after", "merged")
PROTOCOLS = ("generate", "loglik")
DEPENDS = {"after": "train", "merge": "train", "merged": "merge"}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ==================================================================================================
# Setup: the recipe, the questions, what a previous run left
# ==================================================================================================
def _load(recipe_path: str | Path, out: Path):
    """The recipe with output_dir = OUT/train, checked: eval suite, tasks and their questions."""
    from dora_cli.eval.tasks import load_task, validate_tasks
    from dora_cli.recipe import load_recipe

    recipe = load_recipe(recipe_path, [f"output_dir={out / 'train'}"])
    cfg = recipe.eval
    if cfg.suite != "commonsense":
        raise UserError(f"eval.suite: the demo evaluates multiple-choice questions (commonsense), got {cfg.suite!r}", where=str(recipe_path))
    if recipe.adapter.method == "full":
        raise UserError("adapter.method: the demo trains and merges an adapter, not a full fine-tune", where=str(recipe_path))
    examples = {task: load_task(task, cfg.data_dir, cfg.limit) for task in validate_tasks(cfg.tasks, cfg.data_dir)}
    n = {task: len(exs) for task, exs in examples.items()}
    # Chance accuracy (%): a uniform guess among the answers each question offers.
    chance = 100 * sum(1 / len(e.candidates) for exs in examples.values() for e in exs) / sum(n.values())
    return recipe, n, chance


def _fingerprint(recipe) -> str:
    from dora_cli.recipe import dump_recipe

    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()[:16]


def _outputs_present(phase: str, out: Path) -> bool:
    """The files a finished phase leaves (a phase whose outputs were deleted runs again)."""
    if phase == "train":
        return rundir.verify(RunDir(out / "train").final) is None
    if phase == "merge":
        return (out / "merged" / "config.json").is_file()
    return all((out / f"eval-{phase}" / p / "metrics.json").is_file() for p in PROTOCOLS)


def _previous_phases(out: Path, fingerprint: str, recipe_path, overwrite: bool) -> dict:
    """Finished phases of a previous run in OUT whose outputs (and inputs) are still there."""
    path = out / STATE_NAME
    if overwrite or not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not readable JSON; pass --overwrite to start over") from None
    if state.get("fingerprint") != fingerprint:
        raise UserError(
            f"{out}: holds a demo of another recipe ({state.get('recipe')}); "
            f"choose another --out or pass --overwrite to start over with {recipe_path}"
        )
    reused = {}
    for phase in PHASES:
        record = state.get("phases", {}).get(phase)
        if record is not None and _outputs_present(phase, out) and (phase not in DEPENDS or DEPENDS[phase] in reused):
            reused[phase] = {k: v for k, v in record.items() if k != "reused"}
    return reused


# ==================================================================================================
# Phases
# ==================================================================================================
def _evaluate(model, tokenizer, recipe, out_dir: Path, label: str, overwrite: bool) -> dict:
    """Both protocols on a loaded model, each batch's prompts run once for both; per protocol the demo task's
    accuracy, no-answer rate, n."""
    from dora_cli.eval.commonsense import evaluate_commonsense_modes
    from dora_cli.eval.suites import settings

    cfg = settings(recipe)  # the commonsense suite's defaults where the recipe leaves them unset
    every = evaluate_commonsense_modes(
        model, tokenizer, {protocol: out_dir / protocol for protocol in PROTOCOLS}, tasks=cfg.tasks,
        data_dir=cfg.data_dir, batch_size=cfg.batch_size, limit=cfg.limit, num_beams=cfg.num_beams,
        max_new_tokens=cfg.max_new_tokens, expected=recipe.expected, model_name=label, overwrite=overwrite,
        progress=stderr_is_terminal(),
    )
    results = {}
    for protocol in PROTOCOLS:
        tasks = every[protocol]["tasks"]
        results[protocol] = {
            "accuracy": every[protocol]["average"],
            "no_answer_rate": round(sum(m["no_answer_rate"] * m["n"] for m in tasks.values()) / sum(m["n"] for m in tasks.values()), 4),
            "n": sum(m["n"] for m in tasks.values()),
        }
        print(f"         {protocol:8s} accuracy {results[protocol]['accuracy']:5.1f}%   "
            f"no answer {100 * results[protocol]['no_answer_rate']:5.1f}%   (n={results[protocol]['n']})")
    return results


def phase_before(recipe, out: Path, overwrite: bool) -> dict:
    from dora_cli.models import load_model

    model, tokenizer = load_model(recipe.model, for_training=False)
    model.eval()
    name = _model_name(recipe)
    return {"model": name, "eval": _evaluate(model, tokenizer, recipe, out / "eval-before", f"base {name}", overwrite)}


def _model_name(recipe) -> str:
    return recipe.model.name_or_path or "a random model from model.config"


def phase_train(recipe_path, out: Path, overwrite: bool) -> dict:
    from dora_cli.recipe import load_recipe
    from dora_cli.train import train

    recipe = load_recipe(recipe_path, [f"output_dir={out / 'train'}"])
    run_dir = RunDir(recipe.output_dir)
    # An interrupted run resumes from its newest checkpoint (none left: it starts again from step 0).
    final = train(recipe, overwrite=overwrite, resume=not overwrite and run_dir.is_a_run())
    train_records = [r for r in run_dir.events() if "loss" in r]
    return {
        "final": str(final),
        "steps": train_records[-1]["step"] if train_records else None,
        "loss_first": train_records[0]["loss"] if train_records else None,
        "loss_last": train_records[-1]["loss"] if train_records else None,
    }


def phase_after(recipe, out: Path, overwrite: bool) -> dict:
    from dora_cli.evaluate import find_target, load_for_eval

    final = RunDir(out / "train").final
    model, tokenizer = load_for_eval(find_target(final), recipe)
    return {"model": str(final), "eval": _evaluate(model, tokenizer, recipe, out / "eval-after", f"adapter {final}", overwrite)}


def phase_merge(out: Path) -> dict:
    from dora_cli.merge import run_merge

    merged = run_merge(RunDir(out / "train").final, out=out / "merged", force=True)
    return {"merged": str(merged)}


def phase_merged(recipe, out: Path, overwrite: bool) -> dict:
    from dora_cli.evaluate import find_target, load_for_eval

    merged = out / "merged"
    model, tokenizer = load_for_eval(find_target(merged), recipe)
    return {"model": str(merged), "eval": _evaluate(model, tokenizer, recipe, out / "eval-merged", f"merged {merged}", overwrite)}


# ==================================================================================================
# The table
# ==================================================================================================
ROW_LABELS = {
    "before": "before (base model)",
    "train": "train",
    "after": "after (base + DoRA adapter)",
    "merge": "merge",
    "merged": "merged (adapter folded in)",
}


def _settings_line(recipe, n: dict, chance: float) -> str:
    from dora_cli.eval.suites import settings
    from dora_cli.eval.tasks import spec_of

    cfg = settings(recipe)  # the suite's defaults where the recipe leaves them unset
    questions = ", ".join(f"{task}: {count}" for task, count in n.items())
    answers = "; ".join(f"{task}: {' / '.join(spec_of(task).labels)}" for task in n)
    return (
        f"Held-out questions ({questions}; data_dir {cfg.data_dir}; answers {answers}). generate: "
        f"{cfg.num_beams} beam(s), {cfg.max_new_tokens} new tokens, the first answer in the response "
        f"(none = no answer, counted wrong); loglik: the most likely `the correct answer is X`. "
        f"Chance: {chance:.0f}%."
    )


def table(doc: dict) -> str:
    """The before / after / merged table in Markdown (train and merge rows carry their times)."""
    lines = [
        "| phase | generate accuracy | no answer | loglik accuracy | wall time |",
        "|---|---:|---:|---:|---:|",
    ]
    for phase in PHASES:
        rec = doc["phases"].get(phase)
        if rec is None:
            continue
        time_cell = _duration(rec["seconds"]) + (" (reused)" if rec.get("reused") else "")
        if phase in EVAL_PHASES:
            g, ll = rec["eval"]["generate"], rec["eval"]["loglik"]
            cells = [f"{g['accuracy']:.1f}%", f"{100 * g['no_answer_rate']:.1f}%", f"{ll['accuracy']:.1f}%"]
        elif phase == "train" and rec.get("steps"):
            cells = [f"{rec['steps']} steps, loss {rec['loss_first']:.2f} -> {rec['loss_last']:.2f}", "", ""]
        else:
            cells = ["", "", ""]
        lines.append(f"| {ROW_LABELS[phase]} | " + " | ".join(cells) + f" | {time_cell} |")
    lines.append(f"| total |  |  |  | {_duration(doc['seconds'])} |")
    return "\n".join(lines) + "\n\n" + doc["settings"] + "\n"


# ==================================================================================================
# Entry point
# ==================================================================================================
def run_demo(recipe_path: str | Path = DEFAULT_RECIPE, out: str | Path = DEFAULT_OUT, *, overwrite: bool = False) -> dict:
    """Run (or finish, or re-show) the demo; returns the document written to OUT/demo.json."""
    started = time.perf_counter()
    out = Path(out)
    recipe, n, chance = _load(recipe_path, out)  # everything that can refuse the run, before anything is written
    fingerprint = _fingerprint(recipe)
    reused = _previous_phases(out, fingerprint, recipe_path, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()

    state = {"recipe": str(recipe_path), "fingerprint": fingerprint, "phases": dict(reused)}
    write_json(out / STATE_NAME, state)  # claims OUT for this recipe before any phase writes

    ran: set[str] = set()
    for i, phase in enumerate(PHASES, 1):
        tag = f"[{i}/{len(PHASES)}] {phase}"
        stale = overwrite or DEPENDS.get(phase) in ran  # its input was just (re)made: start it from scratch
        if phase in reused and not stale:
            state["phases"][phase] = {**reused[phase], "reused": True}
            print(f"{tag}: reused from a previous run ({_duration(reused[phase]['seconds'])}); --overwrite to redo")
            continue
        print(f"{tag}: {_describe(phase, recipe, out, n)}")
        t0 = time.perf_counter()
        if phase == "before":
            record = phase_before(recipe, out, stale)
        elif phase == "train":
            record = phase_train(recipe_path, out, stale)
        elif phase == "after":
            record = phase_after(recipe, out, stale)
        elif phase == "merge":
            record = phase_merge(out)
        else:
            record = phase_merged(recipe, out, stale)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        state["phases"][phase] = record
        write_json(out / STATE_NAME, state)
        ran.add(phase)
        print(f"{tag}: done in {_duration(record['seconds'])}")

    doc = {
        **state,
        "seconds": round(time.perf_counter() - started + sum(r["seconds"] for r in state["phases"].values() if r.get("reused")), 1),
        "questions": n,
        "settings": _settings_line(recipe, n, chance),
        "eval": recipe.eval.model_dump(mode="json", include={"tasks", "data_dir", "limit", "num_beams", "max_new_tokens", "batch_size"}),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "cpu_count": os.cpu_count(),
    }
    text = table(doc)
    write_json(out / "demo.json", doc)
    write_text(out / "demo.md", text)
    print("")
    print(text.rstrip())
    print(f"\n(table in {out / 'demo.md'} and {out / 'demo.json'}; the adapter in {out / 'train' / 'final'}, "
        f"the merged model in {out / 'merged'})")
    return doc


def _describe(phase: str, recipe, out: Path, n: dict) -> str:
    questions = sum(n.values())
    if phase == "before":
        return f"evaluating the base model {_model_name(recipe)} on {questions} held-out questions (generate, loglik)"
    if phase == "train":
        t = recipe.train
        length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epoch(s)"
        return (f"{recipe.adapter.method} r={recipe.adapter.r} on {', '.join(s.path for s in recipe.data.sources)}, "
                f"{length} of {t.batch_size} examples -> {out / 'train'}")
    if phase == "after":
        return f"evaluating base + adapter {out / 'train' / 'final'}"
    if phase == "merge":
        return f"folding the adapter into the base weights -> {out / 'merged'}"
    return f"evaluating the merged model {out / 'merged'}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dora_cli.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe to run (default {DEFAULT_RECIPE})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--overwrite", action="store_true", help="start over: redo every phase, replace its outputs")
    args = parser.parse_args(argv)
    run_main(lambda: run_demo(args.recipe, args.out, overwrite=args.overwrite),
             interrupted="interrupted: run the same command again to continue")


if __name__ == "__main__":
    main()
