"""The whole committed study, one command: `make study` (or `python studies/smollm2_commonsense/run_study.py`).

Resumable: run it again after an interruption (or a kill) and every finished piece is kept. Steps:

1. the rank study, LoRA vs DoRA (dora sweep-rank): each method's learning rate chosen on the validation loss
   at rank 8 with seed 1 from the grid LRS, then ranks 4, 8, 16 x seeds 1, 2, 3 at the chosen rate; scored
   in loglik mode on every test split in ../shared/data (sweep.json / sweep.md / sweep.png)
2. one full fine-tuning run of the same recipe (method full, FT_LR, seed 1), for the analysis
3. dora analyze of the full, the LoRA and the DoRA run at rank 8, seed 1, each at steps 50, 100, 150, 200
   (the paper's Figure 2: the correlation of ΔD with ΔM per method)

Everything trained goes to studies/smollm2_commonsense/runs/ (not committed); the results are copied to
studies/smollm2_commonsense/results/: sweep.json, sweep.md, sweep.png, analysis/analysis.{json,png} and
study.json (the commands, and the wall time of each step summed over every invocation: runs/wall_time.json
keeps the count between them).

    python studies/smollm2_commonsense/run_study.py [--shard K/N]   # N machines: step 1 only, one shard each
    python studies/smollm2_commonsense/run_study.py --ranks 8       # the rank-8 study alone (hours less)

The committed results/ were made in two pieces: rank 8 (the selection, its seeds, the full fine-tuning and the
analysis), whose trial directories were then lost with a machine, and ranks 4 and 16 as a sweep of their own at
the rates rank 8 chose (the same trial names and recipes the whole study gives them); combine.py joined the two
sweep.json (results/pieces/) into results/sweep.*, as one sweep of all the trials reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parent
ROOT = STUDY.parents[1]
RECIPE = STUDY / "recipe.yaml"
RUNS = STUDY / "runs"
RESULTS = STUDY / "results"
LRS = "2e-4,1e-3"  # each method's learning rate is chosen from these on the validation loss
FT_LR = "2e-5"  # full fine-tuning (one run, for the analysis only)
RANKS = "4,8,16"
# keep_last 8: an interrupted trial adds a checkpoint (its step at the signal), and the analysis needs 50 / 100 / 150.
SWEEP = ["--methods", "lora,dora", "--seeds", "3", "--grid", f"optim.lr={LRS}", "--select-at", "8"]
OVERRIDES = ["train.keep_last=8"]
ANALYSED_STEPS = ("checkpoint-50", "checkpoint-100", "checkpoint-150", "final")


def dora(*args: str) -> None:
    """`dora ARGS` from the repository root, its output shown as it comes; a failure stops the study."""
    command = [sys.executable, "-m", "dora_cli.cli", *args]
    print(f"$ dora {' '.join(args)}", flush=True)
    code = subprocess.run(command, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1")).returncode
    if code:
        raise SystemExit(f"study: `dora {' '.join(args)}` exited with status {code}; fix it and run the study again")


def selected_runs(sweep: dict) -> dict[str, Path]:
    """The rank-8, seed-1 trial of each method at its chosen learning rate (from sweep.json)."""
    chosen = {(s["method"], s["rank"]): s["setting"] for s in sweep["selection"]["selected"]}
    found = {}
    for t in sweep["trials"]:
        if t["rank"] == 8 and t["seed"] == 1 and t["status"] == "ok" and t["setting"] == chosen.get((t["method"], 8)):
            found[t["method"]] = Path(t["paths"]["output_dir"])
    missing = {"lora", "dora"} - set(found)
    if missing:
        raise SystemExit(f"study: no finished rank-8 seed-1 trial of {', '.join(sorted(missing))} at its chosen rate")
    return found


def timed(step: str, work) -> None:
    """Run `work()`, adding its wall seconds to `step` in runs/wall_time.json (summed over invocations)."""
    path = RUNS / "wall_time.json"
    started = time.time()
    try:
        work()
    finally:
        seconds = json.loads(path.read_text()) if path.is_file() else {}
        seconds[step] = round(seconds.get(step, 0) + time.time() - started)
        RUNS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(seconds, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shard", help="K/N: run only this shard of the rank study (step 1); then run without it")
    ap.add_argument("--ranks", default=RANKS, help=f"the ranks of the rank study (default {RANKS}); 8 first is a "
                                                   "complete study of one rank, and later ranks reuse its trials")
    args = ap.parse_args()
    recipe = str(RECIPE.relative_to(ROOT))
    sweep_args = ["--ranks", args.ranks, *SWEEP, *OVERRIDES]

    # 1. The rank study.
    timed("sweep_s", lambda: dora("sweep-rank", recipe, *sweep_args, *(["--shard", args.shard] if args.shard else [])))
    if args.shard:
        print(f"study: shard {args.shard} done; when every shard is, run the study once without --shard")
        return

    # 2. One full fine-tuning run (the analysis's FT).
    full = RUNS / "full"
    if not (full / "final").is_dir():
        resume = ["--resume"] if (full / "recipe.yaml").is_file() else []
        timed("full_finetuning_s", lambda: dora("train", recipe, "adapter.method=full", f"optim.lr={FT_LR}", "train.seed=1",
                                                f"output_dir={full}", *resume))

    # 3. The weight-decomposition analysis of FT, LoRA and DoRA (Figure 2).
    sweep = json.loads((RUNS / "sweep" / "sweep.json").read_text())
    runs = selected_runs(sweep)
    checkpoints = [str(run / step) for run in (full, runs["lora"], runs["dora"]) for step in ANALYSED_STEPS]
    timed("analysis_s", lambda: dora("analyze", *checkpoints, "--out", str(RUNS / "analysis")))

    # The results, into the study folder.
    RESULTS.mkdir(exist_ok=True)
    for name in ("sweep.json", "sweep.md", "sweep.png"):
        shutil.copyfile(RUNS / "sweep" / name, RESULTS / name)
    shutil.copytree(RUNS / "analysis", RESULTS / "analysis", dirs_exist_ok=True)
    seconds = json.loads((RUNS / "wall_time.json").read_text())
    study = {"recipe": recipe, "sweep": ["dora", "sweep-rank", recipe, *sweep_args], "full_finetuning_lr": FT_LR,
             "analysed": checkpoints, "wall_time_s": {**seconds, "total_s": sum(seconds.values())}}
    (RESULTS / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    print(f"study: results in {RESULTS} ({sum(seconds.values()) / 3600:.1f} hours of work over every invocation)")


if __name__ == "__main__":
    main()
