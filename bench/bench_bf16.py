"""What bf16 autocast costs in accuracy and gains in time: the demo recipe trained in fp32 and in bf16, per seed.

    .venv/bin/python bench/bench_bf16.py                          # 2 seeds x fp32 / bf16, 200 validation examples
    .venv/bin/python bench/bench_bf16.py --seeds 42 --steps 10 --out /tmp/bf16.json

Every run is the real `dora train recipes/smollm2_demo.yaml` (its own process) with `train.mixed_precision=no | bf16`,
`train.seed=S` and `data.val_set_size=N`: the same N examples held out of data/demo/train.json in every run (the
split follows data.seed, not train.seed), the validation loss computed at the end as training computes it (under
the run's autocast). Runs alternate precisions within a seed (fp32, bf16, fp32, bf16, ...). The JSON has per run
the validation loss, the first / last logged training loss, the wall time of the loop and the median logged
tokens/s; and per seed the bf16 - fp32 validation-loss difference, with its mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import _write_json_atomic, machine_info  # noqa: E402  (a sibling script)

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def run_one(args, precision: str, seed: int, tmp: Path) -> dict:
    out = tmp / f"{precision}-{seed}"
    cmd = [sys.executable, "-m", "dora_cli.cli", "train", args.recipe, f"output_dir={out}",
           f"train.mixed_precision={PRECISIONS[precision]}", f"train.seed={seed}",
           f"data.val_set_size={args.val}", "train.save_every=null"]
    if args.steps:
        cmd.append(f"train.max_steps={args.steps}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"status": f"error: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", "wall_s": wall}
    metrics = json.loads((out / "metrics.json").read_text())
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [e["tokens_per_s"] for e in events if "tokens_per_s" in e]
    return {
        "status": "ok", "precision": precision, "seed": seed, "val_loss": metrics["val_loss"],
        "train_loss_first": metrics["train_loss_first"], "train_loss": metrics["train_loss"],
        "loop_wall_s": metrics["wall_time_s"], "process_wall_s": wall,
        "median_tokens_per_s": statistics.median(rates) if rates else None,
        "losses": {e["step"]: e["loss"] for e in events if "loss" in e},
        "load_average_at_end": os.getloadavg(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/smollm2_demo.yaml")
    p.add_argument("--seeds", default="42,43", help="comma-separated train.seed values")
    p.add_argument("--val", type=int, default=200, help="data.val_set_size: examples held out for the validation loss")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the recipe's)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bf16.json")
    p.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of the runs ('' leaves it unset)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    report = {"benchmark": "bench/bench_bf16.py", "complete": False, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "settings": {"recipe": args.recipe, "seeds": seeds, "val_set_size": args.val, "max_steps": args.steps,
                           "precisions": PRECISIONS, "omp_wait_policy": args.omp_wait_policy or "unset"},
              "machine": machine_info(), "load_average_start": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as tmp:
        for seed in seeds:
            for precision in PRECISIONS:
                result = run_one(args, precision, seed, Path(tmp))
                report["runs"].append({"precision": precision, "seed": seed, **result})
                print(f"seed {seed} {precision}: {result['status']}"
                      + (f"  val loss {result['val_loss']:.4f}  loop {result['loop_wall_s']:.0f}s" if result["status"] == "ok" else ""),
                      flush=True)
                _write_json_atomic(args.out, report)
    by = {(r["precision"], r["seed"]): r for r in report["runs"] if r["status"] == "ok"}
    diffs = {s: by[("bf16", s)]["val_loss"] - by[("fp32", s)]["val_loss"] for s in seeds
             if ("bf16", s) in by and ("fp32", s) in by}
    speed = {s: by[("fp32", s)]["loop_wall_s"] / by[("bf16", s)]["loop_wall_s"] for s in diffs}
    report["val_loss_bf16_minus_fp32"] = {"per_seed": diffs, "mean": statistics.mean(diffs.values()) if diffs else None}
    report["loop_time_fp32_over_bf16"] = {"per_seed": speed, "median": statistics.median(speed.values()) if speed else None}
    report["load_average_end"] = os.getloadavg()
    report["complete"] = True
    _write_json_atomic(args.out, report)
    print(json.dumps({k: report[k] for k in ("val_loss_bf16_minus_fp32", "loop_time_fp32_over_bf16")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
