"""Real (non-padding) tokens per second of a DoRA training micro-step under the data levers of issue 16.

SmolLM2-135M-Instruct, fp32, DoRA r 16 on q, k, v, up, down (recipes/smollm2_commonsense.yaml: BoolQ
passages next to one-line ARC / OBQA questions, cutoff 256), forward + backward of one micro-batch, on
four layouts of the same epoch's first micro-batches:

    padded            the plain seeded order, right-padded to the longest example (today)
    grouped           data.group_by_length, right-padded
    packed            the plain order, data.packing (one padding-free row per micro-batch)
    grouped+packed    both

The four alternate micro-batch by micro-batch (A B C D, A B C D, ...) so that load from other jobs hits all
alike; the first `--warmup` micro-batches of each are not timed. Also reports the padding share of the
whole epoch under the plain and the grouped order (no model needed for that).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_batching.py            # ~10 min on 2 busy cores
    .venv/bin/python bench/bench_batching.py --micro-batches 6 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "bench" / "results" / "batching.json"
RECIPE = REPO / "recipes" / "smollm2_commonsense.yaml"
LAYOUTS = {"padded": (False, False), "grouped": (True, False), "packed": (False, True), "grouped+packed": (True, True)}


def epoch_padding(lengths: list[int], order: list[int], batch: int, micro: int) -> float:
    """Share of padding in the right-padded micro-batches of one epoch."""
    used = order[: len(order) - len(order) % batch]
    chunks = [used[j : j + micro] for j in range(0, len(used), micro)]
    padded = sum(len(c) * max(lengths[i] for i in c) for c in chunks)
    return 1 - sum(lengths[i] for i in used) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--micro-batches", type=int, default=10, help="per layout, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    os.environ.update(SMOLLM2_DIR=str(args.model), DORA_SHARED_DATA=str(args.data), HF_HUB_OFFLINE="1")
    torch.set_num_threads(args.threads)

    from dora_cli.adapters import apply_adapters
    from dora_cli.batching import length_grouped_order, pack, real_tokens, seeded_permutation
    from dora_cli.datasets import build_datasets, make_collator
    from dora_cli.models import load_model
    from dora_cli.recipe import load_recipe

    recipe = load_recipe(RECIPE, ["adapter.dropout=0"])
    model, tokenizer = load_model(recipe.model, for_training=True)
    apply_adapters(model, recipe.adapter)
    model.train()
    train, _ = build_datasets(recipe.data, tokenizer)
    lengths = [len(e["input_ids"]) for e in train]
    batch, micro, seed = recipe.train.batch_size, recipe.train.micro_batch_size, recipe.train.seed
    orders = {False: seeded_permutation(len(train), seed, 0), True: length_grouped_order(lengths, seed, 0, batch)}
    padded_collate = make_collator(tokenizer)

    def micro_batch(layout: str, k: int) -> dict:
        grouped, packed = LAYOUTS[layout]
        examples = [train[i] for i in orders[grouped][k * micro : (k + 1) * micro]]
        return pack(examples) if packed else padded_collate(examples)

    timings: dict[str, list[tuple[float, int, int]]] = {name: [] for name in LAYOUTS}
    for k in range(args.micro_batches):
        for name in LAYOUTS:
            inputs = micro_batch(name, k)
            start = time.perf_counter()
            model(**inputs, use_cache=False).loss.backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if k >= args.warmup:
                timings[name].append((elapsed, real_tokens(inputs), inputs["input_ids"].numel()))

    layouts = {}
    for name, rows in timings.items():
        seconds = sum(t for t, _, _ in rows)
        layouts[name] = {
            "real_tokens_per_s": round(sum(n for _, n, _ in rows) / seconds, 2),
            "median_micro_step_s": round(statistics.median(t for t, _, _ in rows), 3),
            "padding_share_timed": round(1 - sum(n for _, n, _ in rows) / sum(c for _, _, c in rows), 4),
        }
    base = layouts["padded"]["real_tokens_per_s"]
    for entry in layouts.values():
        entry["tokens_per_s_vs_padded"] = round(entry["real_tokens_per_s"] / base, 3)
    report = {
        "benchmark": "real tokens/s of one DoRA micro-step (forward + backward), SmolLM2-135M, commonsense mix",
        "recipe": str(RECIPE.relative_to(REPO)), "micro_batch": micro, "global_batch": batch,
        "timed_micro_batches": args.micro_batches - args.warmup, "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
        "machine": platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "epoch_padding_share": {
            "plain": round(epoch_padding(lengths, orders[False], batch, micro), 4),
            "grouped": round(epoch_padding(lengths, orders[True], batch, micro), 4),
        },
        "layouts": layouts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(report["epoch_padding_share"]))
    for name, entry in layouts.items():
        print(f"{name:15s} {entry['real_tokens_per_s']:8.1f} tok/s  x{entry['tokens_per_s_vs_padded']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
