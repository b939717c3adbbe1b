"""Benchmark the commonsense evaluation: generate at batch 1, batched generate, log-likelihood.

    python bench/bench_eval.py --model .cache/models/SmolLM2-135M-Instruct \
        --data ../shared/data/commonsense --out bench_eval.json [--task ARC-Easy --n 100 --batch 16]

The examples are sorted by prompt length, longest first (as `evaluate_commonsense` does), and cut into
chunks of --batch. Every chunk runs the ways in turn, the order alternating from chunk to chunk
(A B C D, D C B A, ...), after one warm-up of each, so that a busy machine slows them all alike; the
ratios are computed over the whole run and as the median of the per-chunk ratios.

Reported: examples/s of each way; the speed-ups (targets: batched generate >= 4x batch 1, loglik >=
10x batch-1 generate); agreement of batched with batch-1 generation (identical extracted predictions,
target >= 99 %, and identical raw text); accuracy of each way. A fourth way, batch 1 with plain
`generate` (the prompt run once per beam, as the LLM-Adapters code does; ours runs it once per
example), is timed for reference; the targets are computed against our own batch 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dora_cli.eval.commonsense import predict_examples  # noqa: E402
from dora_cli.eval.predict import describe_model, encode, generate_batch  # noqa: E402
from dora_cli.eval.tasks import extract_answer, load_task  # noqa: E402
from dora_cli.prompts import eval_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model directory")
    ap.add_argument("--data", required=True, help="root of the LLM-Adapters layout (<root>/<task>/test.json)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--task", default="ARC-Easy")
    ap.add_argument("--n", type=int, default=100, help="examples (the first n of the test set)")
    ap.add_argument("--batch", type=int, default=16, help="batch size of batched generate and loglik")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    examples = load_task(args.task, args.data, limit=args.n)
    examples.sort(key=lambda e: -len(encode(tok, eval_prompt(e.instruction))))
    gen = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)

    def batch1(chunk):
        return [r for e in chunk for r in predict_examples(model, tok, [e], mode="generate", **gen)]

    def batch1_plain(chunk):
        """Batch 1 as the reference implementation runs it: `generate` alone, the prompt run once per beam."""
        records = []
        for e in chunk:
            prompt = eval_prompt(e.instruction)
            (output,) = generate_batch(model, tok, [prompt], share_prefill=False, **gen)
            pred = extract_answer(e.task, prompt + output)
            records.append({"id": e.id, "output": output, "prediction": pred, "correct": pred == e.answer})
        return records

    ways = {
        "generate_batch1_plain": batch1_plain,
        "generate_batch1": batch1,
        "generate_batched": lambda chunk: predict_examples(model, tok, chunk, mode="generate", **gen),
        "loglik": lambda chunk: predict_examples(model, tok, chunk, mode="loglik", **gen),
    }
    for fn in ways.values():  # warm-up
        fn(examples[:2])

    chunks = [examples[i : i + args.batch] for i in range(0, len(examples), args.batch)]
    seconds = {w: [] for w in ways}
    records = {w: [] for w in ways}
    for c, chunk in enumerate(chunks):
        order = list(ways) if c % 2 == 0 else list(reversed(ways))
        for w in order:
            t0 = time.perf_counter()
            records[w] += ways[w](chunk)
            seconds[w].append(time.perf_counter() - t0)
        done = sum(len(ch) for ch in chunks[: c + 1])
        print(f"chunk {c + 1}/{len(chunks)} ({done} examples): "
              + ", ".join(f"{w} {len(chunk) / seconds[w][-1]:.3f} ex/s" for w in ways), flush=True)

    n = len(examples)
    eps = {w: n / sum(s) for w, s in seconds.items()}

    def chunk_ratio(a, b):
        return statistics.median(sb / sa for sa, sb in zip(seconds[a], seconds[b]))

    one, many = records["generate_batch1"], records["generate_batched"]
    same_pred = sum(a["prediction"] == b["prediction"] for a, b in zip(one, many)) / n
    same_text = sum(a["output"] == b["output"] for a, b in zip(one, many)) / n
    same_plain = sum(a["output"] == b["output"] for a, b in zip(records["generate_batch1_plain"], one)) / n
    speed_batched = eps["generate_batched"] / eps["generate_batch1"]
    speed_loglik = eps["loglik"] / eps["generate_batch1"]
    result = {
        "model": describe_model(model), "model_dir": args.model, "task": args.task, "examples": n,
        "batch_size": args.batch, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "examples_per_s": {w: round(v, 4) for w, v in eps.items()},
        "seconds": {w: round(sum(s), 2) for w, s in seconds.items()},
        "speedup": {
            "generate_batched_vs_batch1": round(speed_batched, 3),
            "generate_batched_vs_batch1_median_chunk": round(chunk_ratio("generate_batched", "generate_batch1"), 3),
            "loglik_vs_generate_batch1": round(speed_loglik, 3),
            "loglik_vs_generate_batch1_median_chunk": round(chunk_ratio("loglik", "generate_batch1"), 3),
            # against batch 1 without the shared prompt prefill (plain `generate`, as LLM-Adapters runs it)
            "generate_batched_vs_batch1_plain": round(eps["generate_batched"] / eps["generate_batch1_plain"], 3),
            "generate_batch1_vs_batch1_plain": round(eps["generate_batch1"] / eps["generate_batch1_plain"], 3),
        },
        "agreement_batched_vs_batch1": {"predictions": round(same_pred, 4), "raw_outputs": round(same_text, 4)},
        "agreement_batch1_vs_batch1_plain": {"raw_outputs": round(same_plain, 4)},
        "accuracy": {w: round(100 * sum(r["correct"] for r in rs) / n, 2) for w, rs in records.items()},
        "no_answer_rate": {w: round(sum(r["prediction"] == "" for r in rs) / n, 4) for w, rs in records.items()},
        "targets": {
            "generate_batched_4x": speed_batched >= 4, "agreement_99": same_pred >= 0.99, "loglik_10x": speed_loglik >= 10,
        },
        "disagreements": [
            {"id": a["id"], "batch1": a["output"], "batched": b["output"]} for a, b in zip(one, many) if a["output"] != b["output"]
        ][:10],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("examples_per_s", "speedup", "agreement_batched_vs_batch1", "targets")}, indent=2))


if __name__ == "__main__":
    main()
