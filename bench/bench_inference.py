"""Inference speed of an unmerged DoRA adapter against LoRA's, and the time and memory of `dora export`.

Decoding: greedy, 64 new tokens, batch 1, SmolLM2-135M-Instruct in fp32 with r 16 on q / k / v / up / down,
as `dora generate` runs it (eval mode, `torch.inference_mode`). Loglik: one forward of 16 rows x 128 tokens,
as `dora eval`'s loglik mode runs it. Configurations: the base model, the DoRA adapter merged (a plain
model), unmerged LoRA, unmerged DoRA; every round runs each once (A B C D, then D C B A, ...), and the
figures are medians over the rounds, wall-clock and process CPU time (which descheduling by other jobs does
not inflate), the ratios taken from those medians.

Export: `dora export` of SmolLM2 with a DoRA checkpoint (merged on the fly) and of the plain model, to f16, each
in its own process: wall-clock time of the whole command, and its peak RSS against the model's f32 size.

    .venv/bin/python bench/bench_inference.py                     # about 5 minutes on 2 idle cores
    .venv/bin/python bench/bench_inference.py --rounds 5 --out bench/results/inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads on shared cores: slow and noisy

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_OUT = REPO / "bench" / "results" / "inference.json"
TARGETS = {"dora/lora decode, batch 1": 1.05, "dora/lora loglik, batch 16": 1.05}
PROMPT = "Name three fruits and say why each of them is healthy."


def adapter_model(model_dir: Path, method: str | None):
    """SmolLM2 with an r16 adapter (B and m moved off their initialisation), or the base model (None)."""
    from transformers import AutoModelForCausalLM

    from dora_cli.adapters import AdapterConfig, adapted_modules, apply_adapters

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method is not None:
        cfg = AdapterConfig(method=method, r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
        apply_adapters(model, cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, layer in adapted_modules(model):
                layer.lora_B.copy_(0.002 * torch.randn(layer.lora_B.shape, generator=g))
                if hasattr(layer, "magnitude"):
                    layer.magnitude.mul_(1 + 0.02 * torch.randn(layer.magnitude.shape, generator=g))
    return model.eval()


def merged(model):
    from dora_cli.adapters import unwrap

    return unwrap(model)


@torch.inference_mode()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of a greedy decode of `new_tokens` tokens."""
    start, cpu = time.perf_counter(), time.process_time()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start, time.process_time() - cpu


@torch.inference_mode()
def loglik_seconds(model, ids: torch.Tensor) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    return time.perf_counter() - start, time.process_time() - cpu


def measure_inference(model_dir: Path, rounds: int, new_tokens: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    batch = torch.randint(0, len(tokenizer), (16, 128), generator=torch.Generator().manual_seed(0))
    models = {"base": adapter_model(model_dir, None), "lora": adapter_model(model_dir, "lora"),
              "dora": adapter_model(model_dir, "dora")}
    models["merged"] = merged(adapter_model(model_dir, "dora"))
    for model in models.values():  # warm-up: first-call allocations, the DoRA norm cache filled
        decode_seconds(model, prompt, 4)
        loglik_seconds(model, batch[:2])
    runs = {(kind, clock): {name: [] for name in models} for kind in ("decode", "loglik") for clock in ("wall", "cpu")}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))  # A B C D, then D C B A
        for name in order:
            for kind, (wall, cpu) in (("decode", decode_seconds(models[name], prompt, new_tokens)),
                                      ("loglik", loglik_seconds(models[name], batch))):
                per = new_tokens if kind == "decode" else 1
                runs[kind, "wall"][name].append(wall / per)
                runs[kind, "cpu"][name].append(cpu / per)
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {runs['decode', 'wall'][n][-1] * 1e3:.1f} ms/token" for n in models), flush=True)
    median = {key: {n: statistics.median(v) for n, v in per_model.items()} for key, per_model in runs.items()}
    ratios = {}
    for kind, label in (("decode", "decode, batch 1"), ("loglik", "loglik, batch 16")):
        for clock, suffix in (("wall", ""), ("cpu", " (CPU time)")):
            m = median[kind, clock]
            for a, b in (("dora", "lora"), ("dora", "base"), ("lora", "base"), ("merged", "base")):
                ratios[f"{a}/{b} {label}{suffix}"] = m[a] / m[b]
    return {
        "decode_seconds_per_token": {clock: {"median": median["decode", clock], "rounds": runs["decode", clock]}
                                     for clock in ("wall", "cpu")},
        "loglik_seconds_per_forward": {clock: {"median": median["loglik", clock], "rounds": runs["loglik", clock]}
                                       for clock in ("wall", "cpu")},
        "ratios": ratios,
        "targets": {k: {"target": v, "measured": ratios[k], "met": ratios[k] <= v} for k, v in TARGETS.items()},
        "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens, "loglik_batch": list(batch.shape),
    }


def dora_checkpoint(model_dir: Path, out: Path) -> Path:
    from dora_cli.adapters import AdapterConfig, save_adapter

    model = adapter_model(model_dir, "dora")
    cfg = AdapterConfig(method="dora", r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    save_adapter(model, cfg, out, base_model=str(model_dir))
    return out


# `dora` in a child process that prints its peak RSS on exit: VmHWM, the high-water mark of the process's own
# memory since it started Python (ru_maxrss would also count the benchmark process it was forked from).
CHILD = """
import atexit, sys
def peak():
    with open("/proc/self/status") as status:
        print("peak_rss_kb", next(line.split()[1] for line in status if line.startswith("VmHWM")), file=sys.stderr)
atexit.register(peak)
sys.argv = ["dora", *sys.argv[1:]]
from dora_cli.cli import main
main()
"""


def measure_export(target: Path, out: Path) -> dict:
    """`dora export TARGET --gguf OUT --type f16` in its own process: wall-clock seconds and peak RSS."""
    command = [sys.executable, "-c", CHILD, "export", str(target), "--gguf", str(out), "--type", "f16", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dora export failed:\n{proc.stderr[-2000:]}")
    peak_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("peak_rss_kb")))
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "gguf_mb": out.stat().st_size / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: --model {args.model}: no config.json (make fetch-model)")
    torch.set_num_threads(args.threads)

    inference = measure_inference(args.model, args.rounds, args.new_tokens)
    params = sum(p.numel() for p in adapter_model(args.model, None).parameters())
    f32_mb = params * 4 / 2**20
    with tempfile.TemporaryDirectory(prefix="bench_inference-") as tmp:
        ckpt = dora_checkpoint(args.model, Path(tmp) / "dora-ckpt")
        export = {
            "dora checkpoint (merged on the fly)": measure_export(ckpt, Path(tmp) / "dora.gguf"),
            "model directory": measure_export(args.model, Path(tmp) / "base.gguf"),
        }
    for figures in export.values():
        figures["peak_rss_over_f32_size"] = figures["peak_rss_mb"] / f32_mb
        figures["targets_met"] = figures["seconds"] < 30 and figures["peak_rss_over_f32_size"] < 2
    report = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": args.threads, "note": "shared machine: ratios from one run, absolute times noisy"},
        "model": str(args.model), "parameters": params, "f32_size_mb": f32_mb,
        "adapter": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]},
        "rounds": args.rounds, "inference": inference, "export_f16": export,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ratios": inference["ratios"], "export_f16": export}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
