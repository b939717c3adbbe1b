"""torch.compile of a LLaMA with adapters on the CPU: graph breaks, agreement with eager, step time.

Graph breaks (tiny LLaMA, 2 layers, hidden 64, adapters on all 7 projections, train mode) are counted
three ways, for DoRA (detached and full norm, with and without dropout) and LoRA:
  - `torch._dynamo.explain` of the forward (model + loss);
  - `torch._dynamo.explain` of forward + `loss.backward()` with `trace_autograd_ops` on;
  - `torch.compile(model)` trained forward + backward over five sequence lengths, padded and packed
    (position ids restarting): dynamo's graph-break counter, the number of graphs compiled, and the
    largest gradient difference from eager.
Step time (forward + backward + AdamW) of eager against compiled, alternated step by step after the
first compiled step (which compiles), on a mid-size LLaMA (4 layers, hidden 256, vocab 2048) and, with
--smollm2, on SmolLM2-135M; batch 4 x 128 fixed.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_compile.py              # ~5 min on 2 cores
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_compile.py --smollm2    # + SmolLM2 (~20 min)
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
sys.path.insert(0, str(REPO / "tests"))
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_OUT = REPO / "bench" / "results" / "compile.json"
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {  # name -> (method, dropout, detach_norm)
    "dora": ("dora", 0.0, True),
    "dora_dropout": ("dora", 0.05, True),
    "dora_full_norm_gradient": ("dora", 0.0, False),
    "lora_dropout": ("lora", 0.05, True),
}


def adapted(model, method: str, dropout: float, detach_norm: bool = True, targets=ALL7):
    """`model` with adapters; B drawn at random so that every adapter parameter gets a gradient."""
    from dora_cli.adapters import AdapterConfig, apply_adapters

    cfg = AdapterConfig(method=method, r=16, alpha=32, dropout=dropout, detach_norm=detach_norm,
                        target_modules=targets)
    apply_adapters(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def _breaks(explained) -> list[dict]:
    return [
        {"reason": b.reason.splitlines()[0][:300],
         "where": [f"{f.filename}:{f.lineno}: {(f.line or '').strip()}" for f in b.user_stack[-2:]]}
        for b in explained.break_reasons
    ]


def explain_variant(method: str, dropout: float, detach_norm: bool) -> dict:
    import torch._dynamo as dynamo
    from conftest import tiny_llama

    model = adapted(tiny_llama(), method, dropout, detach_norm)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def forward(x):
        return model(input_ids=x, labels=x, use_cache=False).loss

    def forward_backward(x):
        loss = forward(x)
        loss.backward()
        return loss.detach()  # a returned loss whose grad_fn the traced backward consumed makes dynamo restart

    dynamo.reset()
    fwd = dynamo.explain(forward)(ids)
    code = fwd.graphs[0].code if fwd.graphs else ""
    dynamo.reset()
    with dynamo.config.patch(trace_autograd_ops=True):
        both = dynamo.explain(forward_backward)(ids)
    dynamo.reset()
    return {
        "forward": {"graphs": fwd.graph_count, "graph_breaks": fwd.graph_break_count, "ops": fwd.op_count,
                    "breaks": _breaks(fwd), "autograd_function_in_graph": "autograd_function_apply" in code},
        "forward_backward": {"graphs": both.graph_count, "graph_breaks": both.graph_break_count,
                             "ops": both.op_count, "breaks": _breaks(both)},
    }


def compiled_training(packed: bool) -> dict:
    """torch.compile(model): forward + backward over five lengths; breaks, graphs, gradients vs eager."""
    import torch._dynamo as dynamo
    from conftest import tiny_llama
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    model = adapted(tiny_llama(), "dora", 0.0)
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for length in (16, 24, 16, 31, 40):
        x = torch.randint(0, 256, (1, length) if packed else (2, length), generator=g)
        inputs = dict(input_ids=x, labels=x, use_cache=False)
        if packed:
            inputs["position_ids"] = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)])[None]
        grads = []
        for m in (compiled, model):
            model.zero_grad(set_to_none=True)
            m(**inputs).loss.backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(*grads, strict=True)))
    result = {"graph_breaks": sum(counters["graph_break"].values()), "break_reasons": dict(counters["graph_break"]),
              "graphs_compiled": counters["stats"]["unique_graphs"], "max_grad_diff_vs_eager": worst}
    dynamo.reset()
    return result


def step_times(model, vocab: int, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (4, 128), generator=g) for _ in range(3)]

    def step(m, x) -> float:
        start = time.perf_counter()
        m(input_ids=x, labels=x, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step(compiled, batches[0])
    step(model, batches[0])
    eager, comp = [], []
    for i in range(steps):
        eager.append(step(model, batches[i % 3]))
        comp.append(step(compiled, batches[i % 3]))
    e, c = statistics.median(eager), statistics.median(comp)
    return {"first_compiled_step_s": round(first, 2), "eager_step_s": round(e, 4), "compiled_step_s": round(c, 4),
            "eager_over_compiled": round(e / c, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smollm2", action="store_true", help="also time SmolLM2-135M (--model)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from conftest import tiny_llama

    report = {
        "benchmark": "torch.compile of a LLaMA with adapters, CPU", "torch": torch.__version__,
        "machine": platform.machine(), "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "explain": {name: explain_variant(*v) for name, v in VARIANTS.items()},
        "compiled_training": {"padded": compiled_training(False), "packed": compiled_training(True)},
        "step_time": {},
    }
    mid = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4, vocab_size=2048)
    five = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    for method in ("dora", "lora"):
        model = adapted(tiny_llama(**mid), method, 0.05, targets=five)
        report["step_time"][f"mid_llama_{method}"] = step_times(model, 2048, args.steps)
        if args.smollm2:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
            model = adapted(model, method, 0.05, targets=five)
            report["step_time"][f"smollm2_{method}"] = step_times(model, model.config.vocab_size, args.steps)
    report["load_avg_1m"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps({k: report[k] for k in ("compiled_training", "step_time")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
