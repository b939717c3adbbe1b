"""AdamW's implementations on this CPU for an adapter parameter set: for-loop, foreach, fused, compiled.

The parameter set is the trainable one of SmolLM2-135M (LLaMA: hidden 576, intermediate 1536, 30 layers,
9 heads, 3 KV heads) with adapters on all 7 projections at r 16: LoRA 420 tensors, DoRA 630 (A, B and the
magnitude). The shapes come from the architecture built on the meta device, so no weights are needed.
Each implementation steps its own copy of the same parameters with the same gradients; rounds alternate
the implementations (A B C D, A B C D, ...) and the median step time over all rounds is reported, with the
largest parameter difference from the for-loop after the timed steps (how exact each one is).

    .venv/bin/python bench/bench_adamw.py                                  # ~1-3 min on 2 cores
    .venv/bin/python bench/bench_adamw.py --threads 1,2 --steps 20 --rounds 5 --no-compile

`torch.optim.AdamW` on a CPU defaults to the for-loop (foreach is the default on CUDA only).
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
DEFAULT_OUT = REPO / "bench" / "results" / "adamw.json"
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLEMENTATIONS = {
    "for-loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}


def adapter_shapes(method: str, r: int) -> list[torch.Size]:
    """Shapes of the trainable tensors of SmolLM2-135M with `method` adapters on all 7 projections."""
    from transformers import LlamaConfig

    from dora_cli.adapters import AdapterConfig, apply_adapters
    from dora_cli.models import build_meta_model

    model = build_meta_model(LlamaConfig(**SMOLLM2))
    apply_adapters(model, AdapterConfig(method=method, r=r, alpha=2 * r, target_modules=TARGETS))
    return [p.shape for p in model.parameters() if p.requires_grad]


class Contender:
    """One implementation: its own parameters (same start), the shared gradients, an optimizer."""

    def __init__(self, name: str, shapes, grads, compiled: bool):
        g = torch.Generator().manual_seed(0)
        self.name = name
        self.params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
        for p, grad in zip(self.params, grads, strict=True):
            p.grad = grad.clone()
        kwargs = IMPLEMENTATIONS["foreach" if compiled else name]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0, **kwargs)
        self.step = torch.compile(self.opt.step) if compiled else self.opt.step
        self.times: list[float] = []

    def timed(self) -> None:
        start = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - start)


def run(method: str, threads: int, args) -> dict:
    torch.set_num_threads(threads)
    shapes = adapter_shapes(method, args.r)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    names = list(IMPLEMENTATIONS) + ([] if args.no_compile else ["compiled"])
    contenders = [Contender(n, shapes, grads, compiled=n == "compiled") for n in names]
    for c in contenders:  # warm-up (and compilation)
        start = time.perf_counter()
        for _ in range(args.warmup):
            c.step()
        c.warmup_s = time.perf_counter() - start
    for _ in range(args.rounds):
        for c in contenders:
            for _ in range(args.steps):
                c.timed()
    reference = contenders[0]
    out = {
        "method": method, "threads": threads, "tensors": len(shapes),
        "parameters": sum(torch.Size(s).numel() for s in shapes), "implementations": {},
    }
    base = statistics.median(reference.times)
    for c in contenders:
        median = statistics.median(c.times)
        diff = max((p - q).abs().max().item() for p, q in zip(c.params, reference.params, strict=True))
        out["implementations"][c.name] = {
            "median_step_ms": round(1e3 * median, 3),
            "round_medians_ms": [
                round(1e3 * statistics.median(c.times[i * args.steps : (i + 1) * args.steps]), 3)
                for i in range(args.rounds)
            ],
            "speedup_vs_for_loop": round(base / median, 3),
            "warmup_s": round(c.warmup_s, 2),
            "max_abs_diff_vs_for_loop": diff,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,dora")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd step")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    results = [
        run(method, int(t), args) for method in args.methods.split(",") for t in args.threads.split(",")
    ]
    report = {
        "benchmark": "AdamW step on the SmolLM2-135M adapter parameter set (7 projections x 30 layers)",
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "r": args.r, "steps": args.steps, "rounds": args.rounds, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    for r in results:
        line = ", ".join(f"{k} {v['median_step_ms']} ms (x{v['speedup_vs_for_loop']})" for k, v in r["implementations"].items())
        print(f"{r['method']} threads {r['threads']} ({r['tensors']} tensors): {line}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
