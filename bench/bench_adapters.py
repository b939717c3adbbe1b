"""Training-step speed and peak memory of our LoRA / DoRA against PEFT's and against the floor, fp32 and 4-bit nf4 bases.

Every configuration runs in a fresh process (this script with --worker), so the peak RSS is the
configuration's own; rounds alternate the configurations (A B C D ... A B C D ...) so that the noise
of a shared machine hits all of them alike. Ratios are taken from the same run. A cheap sanity check
first proves that our DoRA and PEFT's compute the same loss (dropout off, non-trivial A, B, m).

    .venv/bin/python bench/bench_adapters.py                      # full default run (10-25 min on 2 cores)
    .venv/bin/python bench/bench_adapters.py --steps 2 --rounds 1 --configs ours_lora,ours_dora --seq 64

PEFT and bitsandbytes are optional: configurations that need a missing one are skipped, with the
reason in the JSON. See bench/README.md for what each number means.

The floor (`--configs floor,...`): the frozen base alone, forward + the backward of input gradients only
(every parameter frozen, the embedding output requiring grad), on the same batch, loss and precision: no
adapter method can train faster. `--precisions fp32,bf16` runs every configuration in both (bf16 = autocast
around forward + loss, as `train.mixed_precision: bf16`), and the ratios ours / floor per precision.

    .venv/bin/python bench/bench_adapters.py --configs floor,ours_lora,ours_dora --precisions fp32,bf16 \
        --batch 8 --seq 128 --trained 8 --fused --rounds 2 --steps 4 --warmup 2 --no-sanity --omp-wait-policy '' \
        --out bench/results/floor.json

(`--omp-wait-policy ''`: OpenMP threads as a user's shell leaves them, as `dora train` runs; see bench/README.md.)
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
import traceback
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_OUT = REPO / "bench" / "results" / "adapters.json"

# name -> (implementation, method, 4-bit base)
CONFIGS: dict[str, tuple[str, str | None, bool]] = {
    "floor": ("floor", None, False),
    "ours_lora": ("ours", "lora", False),
    "ours_dora": ("ours", "dora", False),
    "peft_lora": ("peft", "lora", False),
    "peft_dora": ("peft", "dora", False),
    "ours_qlora": ("ours", "lora", True),
    "ours_qdora": ("ours", "dora", True),
    "peft_qlora": ("peft", "lora", True),
    "peft_qdora": ("peft", "dora", True),
}

# (key, numerator, denominator, metric, target or None, note)
RATIOS = [
    ("ours_dora/ours_lora step time", "ours_dora", "ours_lora", "step", 1.10, ""),
    ("ours_dora/peft_dora step time", "ours_dora", "peft_dora", "step", 0.80, ""),
    ("ours_dora/ours_lora peak memory", "ours_dora", "ours_lora", "peak", 1.05,
     "whole-process peak RSS (ru_maxrss); the activation-part ratio is reported alongside"),
    ("ours_qdora/ours_qlora step time", "ours_qdora", "ours_qlora", "step", 1.15, ""),
    ("ours_lora/peft_lora step time", "ours_lora", "peft_lora", "step", 1.02, ""),
    ("peft_dora/peft_lora step time", "peft_dora", "peft_lora", "step", None, "reference"),
    ("ours_dora/ours_lora activation memory", "ours_dora", "ours_lora", "activation", None,
     "reference: peak RSS during training minus RSS after setup"),
    ("ours_qdora/ours_qlora peak memory", "ours_qdora", "ours_qlora", "peak", None, "reference"),
    ("ours_qdora/peft_qdora step time", "ours_qdora", "peft_qdora", "step", None, "reference"),
    ("ours_qlora/peft_qlora step time", "ours_qlora", "peft_qlora", "step", None, "reference"),
    ("peft_qdora/peft_qlora step time", "peft_qdora", "peft_qlora", "step", None, "reference"),
    ("ours_dora/peft_dora peak memory", "ours_dora", "peft_dora", "peak", None, "reference"),
]

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PRECISIONS = {"fp32": "float32 weights and compute",
              "bf16": "float32 weights, torch.autocast('cpu', bfloat16) around forward + loss (train.mixed_precision bf16)"}


# ----------------------------------------------------------------------------------------------------
# Small helpers (both sides)


def _status_kb() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _rss_mb() -> float | None:
    kb = _status_kb().get("VmRSS")
    return kb / 1024 if kb is not None else None


def _maxrss_mb() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes)
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 2**20 if sys.platform == "darwin" else value / 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux: clear_refs 5), so a later peak is the training's own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _median(xs):
    return statistics.median(xs) if xs else None


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------
# Worker: one configuration in its own process


def _setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    import transformers

    transformers.logging.set_verbosity_error()
    return torch


def _load_base(model_dir: str, quantized: bool):
    from dora_cli.models import load_model
    from dora_cli.recipe import ModelConfig

    quant = {"mode": "nf4", "double_quant": True, "compute_dtype": "float32"} if quantized else {"mode": "none"}
    model, _ = load_model(ModelConfig(name_or_path=model_dir, dtype="float32", quantization=quant))
    return model


def freeze_to_floor(model):
    """The floor: every parameter frozen and the embedding output requiring grad, so the backward computes the
    input gradients of every layer (the activations' gradients an adapter anywhere needs) and no weight gradient."""
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, out: out.requires_grad_(True))
    return model


def _inject(model, impl: str, method: str | None, args, dropout: float):
    """Wrap the targets; returns the model to train (PEFT wraps it in a PeftModel; the floor: frozen)."""
    if impl == "floor":
        return freeze_to_floor(model)
    if impl == "ours":
        from dora_cli.adapters import AdapterConfig, apply_adapters

        cfg = AdapterConfig(method=method, r=args.r, alpha=args.alpha, dropout=dropout, target_modules=TARGET_MODULES)
        apply_adapters(model, cfg)
        return model
    import peft

    cfg = peft.LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=dropout, target_modules=TARGET_MODULES,
        use_dora=(method == "dora"), bias="none", task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, cfg)


def _touch(model) -> None:
    """Read every parameter and buffer once. A fp32 safetensors load leaves the weights as lazily mapped
    file pages: without this the RSS "after setup" would miss the weights not yet read (LoRA reads none
    before its first step, DoRA reads its targets for ‖W0‖) and the activation part would include them."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel() and t.device.type == "cpu":
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()  # one element per page is enough


def _batch(args, vocab_size: int):
    """Random token ids; labels = input_ids everywhere, or (--trained N) on the last N positions of each row only
    (the rest -100, as a prompt under `train_on_inputs: false`)."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab_size, (args.batch, args.seq), generator=gen)
    labels = ids.clone()
    if args.trained:
        labels[:, : args.seq - args.trained] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _loss_fn(model, batch, precision: str):
    """loss() of one batch: dora_cli.lm_loss's loss (logits only at the trained positions where the base model
    takes logits_to_keep), under bf16 autocast for precision bf16, as `dora train` computes it."""
    import contextlib

    import torch

    from dora_cli.lm_loss import keeps_selected_logits, loss_terms, trained_positions

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes logits_to_keep on
    keep = trained_positions(batch["labels"]) if keeps_selected_logits(base) else None

    def loss():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            total, count = loss_terms(model, batch, keep)
            return total / count

    return loss, (None if keep is None else len(keep))


def _trainable(model) -> tuple[int, int]:
    from dora_cli.adapters import parameter_report

    rep = parameter_report(model)
    return rep.trainable, rep.total


def run_worker(args) -> dict:
    from dora_cli.allocator import tune_allocator

    allocator = tune_allocator()  # every configuration, the floor and PEFT's included, as `dora train` runs
    torch = _setup_torch(args.threads)
    impl, method, quantized = CONFIGS[args.worker]
    floor = impl == "floor"
    rss_start = _rss_mb()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = _load_base(str(args.model), quantized)
    rss_loaded = _rss_mb()
    model = _inject(model, impl, method, args, args.dropout)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = None if floor else torch.optim.AdamW(params, lr=args.lr, fused=args.fused or None)
    batch = _batch(args, model.config.vocab_size)
    loss_of, head_positions = _loss_fn(model, batch, args.precision)
    setup_s = time.perf_counter() - t0
    import gc

    rss_untouched = _rss_mb()
    _touch(model)
    gc.collect()
    rss_setup = _rss_mb()
    peak_setup = _maxrss_mb()
    peak_reset = _reset_peak_rss()

    steps, losses = [], []
    def step():
        c_a, t_a = time.process_time(), time.perf_counter()
        loss = loss_of()
        t_b = time.perf_counter()
        loss.backward()
        t_c = time.perf_counter()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t_d, c_d = time.perf_counter(), time.process_time()
        losses.append(float(loss.detach()))
        return {"step": t_d - t_a, "forward": t_b - t_a, "backward": t_c - t_b, "optimizer": t_d - t_c, "cpu": c_d - c_a}

    for i in range(args.warmup + args.steps):
        timing = step()
        if i >= args.warmup:
            steps.append(timing)
    peak_train = _maxrss_mb()
    if args.profile:  # after the timed steps: their figures are the profiler's overhead-free ones
        _profile(step, Path(args.profile) / f"{args.worker}@{args.precision}.txt")
    trainable, total = _trainable(model)
    return {
        "config": args.worker,
        "allocator": allocator,
        "implementation": impl,
        "method": method,
        "base": "nf4" if quantized else "fp32",
        "precision": args.precision,
        "head_positions": head_positions,
        "optimizer": None if opt is None else {"class": type(opt).__name__, "fused": bool(opt.defaults.get("fused"))},
        "grad_tensors": sum(p.requires_grad for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "total_params": total,
        "setup_s": setup_s,
        "rss_start_mb": rss_start,
        "rss_after_load_mb": rss_loaded,
        "rss_after_setup_untouched_mb": rss_untouched,
        "rss_after_setup_mb": rss_setup,
        "peak_rss_setup_mb": peak_setup,
        "peak_rss_train_mb": peak_train if peak_reset else None,
        "peak_rss_mb": max(peak_setup, peak_train),
        "step_times_s": [s["step"] for s in steps],
        "step_cpu_s": [s["cpu"] for s in steps],
        "phase_times_s": steps,
        "losses": losses,
    }


def _profile(step, path: Path) -> None:
    """Two steps under torch.profiler: the operator table by self CPU time, and by total CPU time, to `path`."""
    from torch.profiler import ProfilerActivity, profile

    step()  # nothing of the profiler's first steps' set-up in the table
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(2):
            step()
    table = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("two steps, by self CPU time\n" + table.table(sort_by="self_cpu_time_total", row_limit=45)
                    + "\n\ntwo steps, by CPU time (with children)\n" + table.table(sort_by="cpu_time_total", row_limit=45))


# ----------------------------------------------------------------------------------------------------
# Sanity worker: our DoRA and PEFT's compute the same loss


def _perturb_values(name: str, a_shape, b_shape, m_init, seed: int):
    """Deterministic non-trivial (A, B, m) for a module: B ≠ 0 and m ≠ ‖W0‖, so the norm really matters."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / a_shape[1] ** 0.5
    a = (torch.rand(a_shape, generator=gen) * 2 - 1) * bound
    b = torch.randn(b_shape, generator=gen) * 0.05
    m = m_init.detach().float() * (1 + 0.1 * torch.randn(m_init.shape, generator=gen))
    return a, b, m


def _loss(model, batch) -> float:
    out = model(**batch)
    return float(out.loss.detach())


def run_sanity(args) -> dict:
    """Loss of our DoRA and PEFT's on the first batch, dropout off, at init and with perturbed A, B, m."""
    torch = _setup_torch(args.threads)
    import peft  # noqa: F401  (the parent only asks for this when PEFT is importable)

    from dora_cli.adapters import adapted_modules

    result = {"tolerance": 1e-4, "dropout": 0.0, "mode": "model.train(), dropout 0, grad enabled, first batch"}
    bases = ["fp32"] + (["nf4"] if args.sanity_4bit else [])
    for base in bases:
        quantized = base == "nf4"
        try:
            ours = _inject(_load_base(str(args.model), quantized), "ours", "dora", args, 0.0).train()
            theirs = _inject(_load_base(str(args.model), quantized), "peft", "dora", args, 0.0).train()
        except Exception as e:
            if not quantized:
                raise
            result[base] = {"error": f"{type(e).__name__}: {e}", "pass": None}  # PEFT 4-bit on CPU may not run
            continue
        batch = _batch(args, ours.config.vocab_size)
        entry = {"loss_ours_init": _loss(ours, batch), "loss_peft_init": _loss(theirs, batch)}
        peft_modules = dict(theirs.base_model.model.named_modules())
        n = 0
        with torch.no_grad():
            for name, layer in adapted_modules(ours):
                a, b, m = _perturb_values(name, layer.lora_A.shape, layer.lora_B.shape, layer.magnitude, args.seed)
                p = peft_modules[name]
                m_peft = p.lora_magnitude_vector["default"].weight
                if not torch.allclose(m_peft.float(), layer.magnitude.float(), rtol=1e-5, atol=1e-6):
                    entry.setdefault("magnitude_init_mismatch", []).append(name)
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
                layer.magnitude.copy_(m)
                p.lora_A["default"].weight.copy_(a)
                p.lora_B["default"].weight.copy_(b)
                m_peft.copy_(m)
                n += 1
        entry["modules"] = n
        entry["loss_ours"] = _loss(ours, batch)
        entry["loss_peft"] = _loss(theirs, batch)
        entry["abs_diff_init"] = abs(entry["loss_ours_init"] - entry["loss_peft_init"])
        entry["abs_diff"] = abs(entry["loss_ours"] - entry["loss_peft"])
        entry["pass"] = entry["abs_diff"] < result["tolerance"] and entry["abs_diff_init"] < result["tolerance"]
        result[base] = entry
        del ours, theirs
    result["pass"] = all(result[b]["pass"] is not False for b in bases) and result["fp32"]["pass"]
    return result


def worker_main(args) -> int:
    try:
        data = run_sanity(args) if args.worker == "sanity" else run_worker(args)
        status = 0
    except Exception as e:  # the parent records why a configuration could not run (e.g. PEFT 4-bit on CPU)
        data = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        status = 1
    _write_json_atomic(Path(args.result), data)
    return status


# ----------------------------------------------------------------------------------------------------
# Parent: rounds, aggregation, ratios


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
    }
    try:
        info["mem_total_mb"] = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, IndexError, ValueError):
        pass
    return info


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run_key(config: str, precision: str) -> str:
    """The name of a configuration's results: `ours_dora` in fp32, `ours_dora@bf16` under bf16 autocast."""
    return config if precision == "fp32" else f"{config}@{precision}"


def _spawn(args, worker: str, log, precision: str = "fp32") -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--result", str(result),
               "--precision", precision]
        for opt in ("model", "steps", "warmup", "seq", "batch", "threads", "r", "alpha", "dropout", "lr", "seed", "trained"):
            cmd += [f"--{opt}", str(getattr(args, opt))]
        if not args.sanity_4bit:
            cmd.append("--no-sanity-4bit")
        if args.fused:
            cmd.append("--fused")
        if args.profile:
            cmd += ["--profile", str(args.profile)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   **({"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            stderr, code = proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stderr, code = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""), None
        wall = time.perf_counter() - t0
        if result.is_file():
            data = json.loads(result.read_text())
        else:
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            data = {"error": f"worker exited with status {code} and no result" if code is not None
                    else f"worker timed out after {args.timeout}s", "stderr_tail": tail}
        data["wall_s"] = wall
        log(f"  {run_key(worker, precision)}: {'error: ' + data['error'] if 'error' in data else 'ok'} ({wall:.0f}s)")
        return data


def _aggregate(name: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"status": "error", "error": runs[0].get("error") if runs else "not run",
                "detail": runs[0].get("traceback") or runs[0].get("stderr_tail") if runs else None}
    all_steps = [t for r in ok for t in r["step_times_s"]]
    phases = {k: _median([p[k] for r in ok for p in r["phase_times_s"]]) for k in ("forward", "backward", "optimizer")}
    peak = max(r["peak_rss_mb"] for r in ok)
    setup_rss = _median([r["rss_after_setup_mb"] for r in ok])
    train_peaks = [r["peak_rss_train_mb"] for r in ok if r.get("peak_rss_train_mb") is not None]
    act = [((r["peak_rss_train_mb"] if r.get("peak_rss_train_mb") is not None else r["peak_rss_mb"])
            - r["rss_after_setup_mb"]) for r in ok]
    first = ok[0]
    return {
        "status": "ok",
        "implementation": first["implementation"],
        "method": first["method"],
        "base": first["base"],
        "precision": first["precision"],
        "head_positions": first["head_positions"],
        "optimizer": first["optimizer"],
        "grad_tensors": first["grad_tensors"],
        "trainable_params": first["trainable_params"],
        "total_params": first["total_params"],
        "median_step_s": _median(all_steps),
        "min_step_s": min(all_steps),
        "max_step_s": max(all_steps),
        "timed_steps": len(all_steps),
        "per_round_median_step_s": [_median(r["step_times_s"]) for r in ok],
        "median_step_cpu_s": _median([t for r in ok for t in r["step_cpu_s"]]),
        "per_round_median_step_cpu_s": [_median(r["step_cpu_s"]) for r in ok],
        "median_phase_s": phases,
        "peak_rss_mb": peak,
        "per_round_peak_rss_mb": [r["peak_rss_mb"] for r in ok],
        "peak_rss_train_mb": max(train_peaks) if train_peaks else None,
        "rss_after_load_mb": _median([r["rss_after_load_mb"] for r in ok]),
        "rss_after_setup_mb": setup_rss,
        "activation_mb": _median(act),
        "per_round_activation_mb": act,
        "first_loss": first["losses"][0],
        "last_loss": first["losses"][-1],
        "setup_s": _median([r["setup_s"] for r in ok]),
    }


def _ratio(results: dict, num: str, den: str, metric: str):
    a, b = results.get(num, {}), results.get(den, {})
    if a.get("status") != "ok" or b.get("status") != "ok":
        missing = [n for n, r in ((num, a), (den, b)) if r.get("status") != "ok"]
        return None, None, f"not available: {', '.join(missing)} " + "/".join(
            str(results.get(n, {}).get("error") or results.get(n, {}).get("status") or "not run") for n in missing)
    if metric == "step_cpu":
        value = a["median_step_cpu_s"] / b["median_step_cpu_s"]
        rounds = [x / y for x, y in zip(a["per_round_median_step_cpu_s"], b["per_round_median_step_cpu_s"],
                                        strict=False)]
    elif metric == "step":
        value = a["median_step_s"] / b["median_step_s"]
        rounds = [x / y for x, y in zip(a["per_round_median_step_s"], b["per_round_median_step_s"], strict=False)]
    elif metric == "peak":
        value = a["peak_rss_mb"] / b["peak_rss_mb"]
        rounds = [x / y for x, y in zip(a["per_round_peak_rss_mb"], b["per_round_peak_rss_mb"], strict=False)]
    else:
        value = a["activation_mb"] / b["activation_mb"]
        rounds = [x / y for x, y in zip(a["per_round_activation_mb"], b["per_round_activation_mb"], strict=False)]
    return value, rounds, None


FLOOR_TARGETS = {"ours_lora": 1.05, "ours_dora": 1.10}
"""ours / floor step time, per precision (issue 22)."""


def ratio_list(precisions: list[str]) -> list[tuple]:
    """RATIOS (fp32 names) and, per precision, every configuration over the floor of that precision."""
    out = list(RATIOS)
    for precision in precisions:
        floor = run_key("floor", precision)
        for config in ("ours_lora", "ours_dora", "peft_lora", "peft_dora"):
            num = run_key(config, precision)
            out.append((f"{num}/{floor} step time", num, floor, "step", FLOOR_TARGETS.get(config),
                        "" if config in FLOOR_TARGETS else "reference"))
    return out


def compute_ratios(results: dict, precisions: list[str] = ("fp32",)) -> list[dict]:
    out = []
    for key, num, den, metric, target, note in ratio_list(list(precisions)):
        if num not in results or den not in results:  # a configuration not asked for (skipped ones are there)
            continue
        value, rounds, why = _ratio(results, num, den, metric)
        entry = {"name": key, "numerator": num, "denominator": den,
                 "metric": {"step": "median step time", "peak": "whole-process peak RSS",
                            "activation": "peak RSS during training - RSS after setup"}[metric],
                 "value": value, "per_round": rounds, "target": target,
                 "pass": (value <= target) if (target is not None and value is not None) else None}
        if metric == "step":
            cpu, cpu_rounds, _ = _ratio(results, num, den, "step_cpu")
            entry["cpu_time_value"] = cpu  # process CPU time per step: insensitive to being descheduled
            entry["cpu_time_per_round"] = cpu_rounds
        if metric == "peak" and num == "ours_dora" and den == "ours_lora":
            act, act_rounds, _ = _ratio(results, num, den, "activation")
            entry["activation_value"] = act
            entry["activation_per_round"] = act_rounds
        if note:
            entry["note"] = note
        if why:
            entry["note"] = why
        out.append(entry)
    return out


def _table(results: dict, ratios: list[dict]) -> str:
    lines = [f"{'config':<12} {'median s':>9} {'cpu s':>7} {'fwd s':>7} {'bwd s':>7} {'opt s':>7} {'peak MB':>8} "
             f"{'setup MB':>9} {'act MB':>7}  rounds (median s)"]
    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"{name:<12} {r.get('status')}: {str(r.get('error'))[:90]}")
            continue
        ph = r["median_phase_s"]
        lines.append(
            f"{name:<12} {r['median_step_s']:9.3f} {r['median_step_cpu_s']:7.2f} {ph['forward']:7.3f} {ph['backward']:7.3f} {ph['optimizer']:7.3f} "
            f"{r['peak_rss_mb']:8.0f} {r['rss_after_setup_mb']:9.0f} {r['activation_mb']:7.0f}  "
            + " ".join(f"{x:.3f}" for x in r["per_round_median_step_s"]))
    lines.append("")
    for e in ratios:
        v = "n/a" if e["value"] is None else f"{e['value']:.3f}"
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[e["pass"]]
        t = "" if e["target"] is None else f"target <= {e['target']:.2f}  {verdict}"
        extra = ""
        if e.get("activation_value") is not None:
            extra = f"  (activation part: {e['activation_value']:.3f})"
        if e.get("per_round"):
            extra += "  rounds " + " ".join(f"{x:.3f}" for x in e["per_round"])
        if e.get("cpu_time_value") is not None:
            extra += f"  cpu-time {e['cpu_time_value']:.3f}"
        lines.append(f"{e['name']:<40} {v:>7}  {t}{extra}")
    return "\n".join(lines)


def parent_main(args) -> int:
    def log(msg):
        print(msg, flush=True)

    names = list(CONFIGS) if args.configs is None else [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: --configs: unknown {', '.join(unknown)} (choose from {', '.join(CONFIGS)})", file=sys.stderr)
        return 2
    if not (Path(args.model) / "config.json").is_file():
        print(f"error: --model: {args.model} has no config.json", file=sys.stderr)
        return 2

    skipped: dict[str, str] = {}
    has_peft, has_bnb = _importable("peft"), _importable("bitsandbytes")
    if not has_bnb or not any(CONFIGS[n][2] for n in names):
        args.sanity_4bit = False
    for n in names:
        impl, _, quantized = CONFIGS[n]
        if impl == "peft" and not has_peft:
            skipped[n] = "peft is not importable (optional benchmark dependency)"
        elif quantized and not has_bnb:
            skipped[n] = "bitsandbytes is not importable"
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if not precisions or any(x not in PRECISIONS for x in precisions):
        print(f"error: --precisions: expected a comma-separated subset of {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    run_names = [(n, pr) for pr in precisions for n in names if n not in skipped]

    out = Path(args.out)
    report = {
        "benchmark": "bench/bench_adapters.py",
        "complete": False,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "settings": {
            "model": str(args.model), "dtype": "float32", "device": "cpu", "batch": args.batch, "seq": args.seq,
            "precisions": {pr: PRECISIONS[pr] for pr in precisions},
            "data": f"random token ids, torch.Generator seed {args.seed}, labels = input_ids"
                    + (f" on the last {args.trained} positions of each row, -100 elsewhere" if args.trained else ""),
            "loss": "dora_cli.lm_loss.loss_terms: logits only at the trained positions (logits_to_keep), summed "
                    "cross-entropy in fp32 / trained tokens",
            "r": args.r, "alpha": args.alpha, "dropout": args.dropout, "target_modules": TARGET_MODULES,
            "optimizer": f"AdamW(lr={args.lr}{', fused=True' if args.fused else ''})", "mode": "model.train()",
            "step": "forward + loss + backward + optimizer.step + zero_grad",
            "floor": "the base model alone: every parameter frozen (requires_grad False), the input embeddings' "
                     "output requiring grad (a forward hook), the same batch, loss and precision; its step = "
                     "forward + loss + backward (input gradients of every layer, no weight gradient), no optimizer",
            "omp_wait_policy": args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY") or "unset",
            "allocator": "dora_cli.allocator.tune_allocator() in every worker, as `dora train` runs (glibc: mmap from "
                         "32 MiB, heap top kept up to 1 GiB); each run records what it ran with",
            "timing": "wall clock (time.perf_counter) per step, median over all timed steps of all rounds; targets "
                      "use it. cpu-time = time.process_time() per step (all threads of the worker), reported "
                      "alongside: it does not count time the worker spends descheduled by other jobs",
            "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.rounds, "threads": args.threads,
            "quantization": "nf4, double quant, compute dtype float32 (dora_cli.models.load_model)",
            "ours_dora_dropout_mode": "fast (default: one base GEMM; PEFT applies dropout to the whole delta: two)",
            "configs": names, "order": "each round runs every configuration once, in this order, each in a fresh process",
            "memory": "peak = ru_maxrss of the worker (whole process, setup included); activation part = peak RSS "
                      "during training (high-water mark reset after setup) minus RSS after load + injection + "
                      "optimizer creation, with every weight paged in (fp32 safetensors weights are lazily "
                      "mapped file pages)",
        },
        "skipped": skipped,
    }
    log(f"configs: {', '.join(run_key(n, pr) for n, pr in run_names)}" + (f"; skipped: {skipped}" if skipped else ""))

    if not args.no_sanity and has_peft:
        log("sanity check: ours vs PEFT DoRA loss, dropout off")
        report["sanity"] = _spawn(args, "sanity", log)
        s = report["sanity"]
        if "error" not in s:
            for base in ("fp32", "nf4"):
                if base in s and "error" in s[base]:
                    log(f"  {base}: could not run: {s[base]['error']}")
                elif base in s:
                    log(f"  {base}: ours {s[base]['loss_ours']:.6f} peft {s[base]['loss_peft']:.6f} "
                        f"|diff| {s[base]['abs_diff']:.2e} (init {s[base]['abs_diff_init']:.2e}) "
                        f"{'PASS' if s[base]['pass'] else 'FAIL'}")
        _write_json_atomic(out, report)
    elif not has_peft:
        report["sanity"] = {"skipped": "peft is not importable"}

    runs: dict[str, list[dict]] = {run_key(n, pr): [] for n, pr in run_names}
    failed: set[str] = set()
    for rnd in range(args.rounds):
        log(f"round {rnd + 1}/{args.rounds}")
        for n, precision in run_names:
            key = run_key(n, precision)
            if key in failed:
                continue
            data = _spawn(args, n, log, precision)
            data["round"] = rnd + 1
            runs[key].append(data)
            if "error" in data:
                failed.add(key)  # recorded once; a configuration that cannot run is not retried
            report["runs"] = runs
            _write_json_atomic(out, report)

    results = {key: _aggregate(key, rounds) for key, rounds in runs.items()}
    for n, why in skipped.items():
        results[n] = {"status": "skipped", "error": why}
    report["results"] = results
    report["ratios"] = compute_ratios(results, precisions)
    report["targets_pass"] = {e["name"]: e["pass"] for e in report["ratios"] if e["target"] is not None}
    report["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["complete"] = True
    _write_json_atomic(out, report)
    log("")
    log(_table(results, report["ratios"]))
    log(f"\nwrote {out}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model directory (fp32)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--rounds", type=int, default=2, help="rounds of A B C D ... alternation")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--no-sanity", action="store_true", help="skip the ours-vs-PEFT loss check")
    p.add_argument("--no-sanity-4bit", dest="sanity_4bit", action="store_false",
                   help="check the loss on the fp32 base only")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY of the workers ('' = leave unset). PASSIVE: OpenMP threads sleep instead of "
                        "spinning, 3-4x faster steps when other jobs oversubscribe the cores")
    p.add_argument("--precisions", default="fp32",
                   help=f"comma-separated of {','.join(PRECISIONS)}: every configuration runs in each")
    p.add_argument("--trained", type=int, default=0,
                   help="labels on the last N positions of each row only (0: every position, labels = input_ids)")
    p.add_argument("--fused", action="store_true", help="fused AdamW (dora train's default) instead of the for-loop")
    p.add_argument("--profile", type=Path, default=None,
                   help="also run two steps under torch.profiler in every worker; operator tables to DIR/<config>@<precision>.txt")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
