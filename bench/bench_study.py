"""Time one trial of the committed study (studies/smollm2_commonsense) and estimate the whole study's wall time.

    python bench/bench_study.py --out bench/results/study_timing.json [--rounds 2]

One trial is DoRA r=8 on SmolLM2-135M-Instruct with the study's recipe, one thread (`train.threads=1`).
Every piece is a `dora` process of its own, timed by its CPU seconds (resource.getrusage of the child: a
busy machine stretches wall time, much less CPU time) and its wall time:

- training steps, in fp32 and under bf16 autocast (train.mixed_precision): a run of LONG steps minus a run
  of SHORT steps, divided by LONG - SHORT, is one step (model loading, the 200-example validation and the
  final save cancel); the SHORT run less its steps is that fixed part. The validation losses of fp32 and
  bf16 after LONG steps are compared (the study uses bf16 only if they match);
- full fine-tuning steps (method full, fp32), for the study's Figure 2 run, the same way;
- the evaluation (loglik, fp32) per test split: `dora eval --limit` at two limits, the difference per example.

Pieces alternate (fp32, bf16, ...; the order reversed every round) over --rounds rounds; medians. The
estimate for an idle machine with 2 cores takes one-thread CPU seconds as wall seconds: on this model a
second thread gains little (bench/results/e2e_commonsense.json, idle, 2 threads: DoRA r=16 with
group_by_length 4.1 s a step, about what one thread costs here at r=8), so the estimate errs long if at all.
`--estimate-only FILE` recomputes the estimates of an earlier run's measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "studies" / "smollm2_commonsense" / "recipe.yaml"
TASKS = {"boolq": 3270, "piqa": 1838, "ARC-Easy": 2376, "openbookqa": 500}  # test examples in ../shared/data
STEPS_PER_TRIAL = 200
TRIALS = 20  # LoRA and DoRA: 2 x 2 learning rates at r=8 (seed 1), then 2 x 3 ranks x 3 seeds (2 shared)
SHORT, LONG = 2, 10
EVAL_LIMITS = (8, 40)
LIMITS = (None, 1000, 500)  # per-split example limits the estimate considers


def dora(*args: str) -> tuple[float, float]:
    """Run `dora ARGS`; (CPU seconds, wall seconds) of that process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dora_cli.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"dora {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def train(out: Path, steps: int, *overrides: str) -> dict:
    cpu, wall = dora("train", str(RECIPE), f"output_dir={out}", f"train.max_steps={steps}", "train.save_every=null",
                     "train.threads=1", *overrides)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"cpu_s": cpu, "wall_s": wall, "val_loss": metrics["val_loss"]}


def per_step(work: Path, name: str, *overrides: str) -> dict:
    """CPU and wall seconds of one step and of the fixed part (load, validation, save): two run lengths."""
    short = train(work / f"{name}-short", SHORT, *overrides)
    long = train(work / f"{name}-long", LONG, *overrides)
    step = {k: (long[k] - short[k]) / (LONG - SHORT) for k in ("cpu_s", "wall_s")}
    return {"step_cpu_s": step["cpu_s"], "step_wall_s": step["wall_s"], "fixed_cpu_s": short["cpu_s"] - SHORT * step["cpu_s"],
            "val_loss": long["val_loss"], "final": work / f"{name}-long" / "final"}


def eval_per_example(final: Path, work: Path) -> dict[str, float]:
    """CPU seconds per test example of each split (loglik, fp32, one thread)."""
    out = {}
    for task in TASKS:
        cpu = []
        for limit in EVAL_LIMITS:
            cpu.append(dora("eval", str(final), "--mode", "loglik", "--tasks", task, "--limit", str(limit),
                            "--out", str(work / f"eval-{task}-{limit}"), "--batch-size", "16")[0])
        out[task] = (cpu[1] - cpu[0]) / (EVAL_LIMITS[1] - EVAL_LIMITS[0])
    return out


def estimates(step_cpu: dict[str, float], fixed_cpu: dict[str, float], cpu_per_example: dict[str, float]) -> dict:
    """The study's wall time on an idle 2-core machine (one-thread CPU seconds as wall seconds), per
    training precision and per-split evaluation limit."""
    out = {}
    full = STEPS_PER_TRIAL * step_cpu["full"] + fixed_cpu["full"]
    for precision in ("fp32", "bf16"):
        train = STEPS_PER_TRIAL * step_cpu[precision] + fixed_cpu[precision]
        for limit in LIMITS:
            evaluate = sum(min(n, limit or n) * cpu_per_example[t] for t, n in TASKS.items())
            out[f"{precision}, eval limit {limit or 'none'}"] = {
                "trial_train_min": round(train / 60, 1), "trial_eval_min": round(evaluate / 60, 1),
                "full_finetuning_min": round(full / 60, 1), "study_h": round((TRIALS * (train + evaluate) + full) / 3600, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "study_timing.json")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--estimate-only", type=Path, help="recompute the estimates of this earlier output")
    args = ap.parse_args()
    if args.estimate_only:
        doc = json.loads(args.estimate_only.read_text())
        doc["estimates_idle_2_cores"] = estimates(doc["step_cpu_s"], doc["fixed_cpu_s"], doc["eval_cpu_s_per_example"])
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc["estimates_idle_2_cores"], indent=1))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="bench_study-"))
    runs: dict[str, list[dict]] = {"fp32": [], "bf16": [], "full": []}
    evals: list[dict[str, float]] = []
    started = time.time()
    for rnd in range(args.rounds):
        order = ["fp32", "bf16", "full"] if rnd % 2 == 0 else ["full", "bf16", "fp32"]
        for kind in order:
            overrides = {"fp32": [], "bf16": ["train.mixed_precision=bf16"], "full": ["adapter.method=full", "optim.lr=2e-5"]}[kind]
            runs[kind].append(per_step(work / str(rnd), kind, *overrides))
            r = runs[kind][-1]
            print(f"round {rnd} {kind}: step {r['step_cpu_s']:.2f} CPU s ({r['step_wall_s']:.2f} wall s), "
                  f"fixed {r['fixed_cpu_s']:.1f} CPU s, val loss {r['val_loss']:.4f}", flush=True)
            write(args.out, document(args, runs, evals, started))  # what is measured so far: a crash keeps it
        evals.append(eval_per_example(runs["fp32"][-1]["final"], work / str(rnd)))
        print(f"round {rnd} eval CPU s per example: {evals[-1]}", flush=True)
        write(args.out, document(args, runs, evals, started))
    print(args.out.read_text())


def document(args, runs: dict[str, list[dict]], evals: list[dict[str, float]], started: float) -> dict:
    """The measurements so far (medians over rounds, every round's values) and, once all are in, the estimates."""
    measured = {k: rs for k, rs in runs.items() if rs}
    step_cpu = {k: statistics.median(r["step_cpu_s"] for r in rs) for k, rs in measured.items()}
    fixed_cpu = {k: statistics.median(r["fixed_cpu_s"] for r in rs) for k, rs in measured.items()}
    cpu_per_example = {t: statistics.median(e[t] for e in evals) for t in TASKS} if evals else {}
    doc = {
        "what": "one DoRA r=8 trial of studies/smollm2_commonsense on SmolLM2-135M-Instruct, and the study's estimate",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "rounds": args.rounds, "steps": [SHORT, LONG], "eval_limits": list(EVAL_LIMITS), "threads": 1,
        "step_cpu_s": step_cpu, "fixed_cpu_s": fixed_cpu, "eval_cpu_s_per_example": cpu_per_example,
        "val_loss_after_steps": {k: [r["val_loss"] for r in rs] for k, rs in measured.items()},
        "every_round": {k: [{key: r[key] for key in ("step_cpu_s", "step_wall_s", "fixed_cpu_s")} for r in rs]
                        for k, rs in measured.items()} | {"eval_cpu_s_per_example": evals},
        "trials": TRIALS, "steps_per_trial": STEPS_PER_TRIAL,
        "bench_wall_s": round(time.time() - started),
        "note": "taken on a shared, loaded machine (wall seconds there mean little); one-thread CPU seconds stand "
                "for idle wall seconds: an estimate, to be checked by the study's own wall time",
    }
    if "fp32" in step_cpu and "bf16" in step_cpu:
        doc["bf16_over_fp32_step_cpu"] = step_cpu["bf16"] / step_cpu["fp32"]
    if len(step_cpu) == 3 and cpu_per_example:
        doc["estimates_idle_2_cores"] = estimates(step_cpu, fixed_cpu, cpu_per_example)
    return doc


def write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")

if __name__ == "__main__":
    main()
