"""End-to-end training speed: `dora train` against HF Trainer + PEFT on the very same tokenised examples,
and against the floor.

For every workload (a recipe) x method (LoRA, DoRA) x configuration, each side runs in a fresh process
(this script with --worker): ours is the real `dora train` command, with recipe overrides; HF's is
`transformers.Trainer` on `peft.get_peft_model`, fed the examples our pipeline tokenises
(`dora_cli.datasets.build_datasets`), in our micro-batches and our order, padded by our collator; the
floor is the frozen base model alone on the same micro-batches, loss and precision (forward + the backward
of input gradients only: what no adapter method can undercut). Rounds alternate the sides (ours, HF,
floor, ours, HF, floor, ...) so that load from other jobs hits all of them.

    .venv/bin/python bench/bench_e2e.py                                   # full run, see bench/README.md
    .venv/bin/python bench/bench_e2e.py --quick --out /tmp/e2e.json       # the harness on a tiny random model
    .venv/bin/python bench/bench_e2e.py --workloads demo --methods dora --configs baseline --rounds 3
    .venv/bin/python bench/bench_e2e.py --workloads demo --configs fp32,bf16 --omp-wait-policy ''   # the floor (issue 22)

Both workers measure the same way, from outside the training loops: a global optimizer-step hook
(`torch.optim.optimizer.register_optimizer_step_post_hook`) timestamps the end of every optimizer step,
and a wrapper around the collator records the real (unpadded) and padded tokens of every micro-batch.
Step k's time is end(k) - end(k - 1); the first `--warmup` steps are not timed. Peak RSS is the worker's
`ru_maxrss` as returned by `os.wait4`.

A configuration is a set of recipe overrides ("levers": train.compile, data.group_by_length,
data.packing, train.threads); one `dora train` refuses is recorded as "unsupported: <its error line>".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import _write_json_atomic, freeze_to_floor, machine_info  # noqa: E402  (a sibling script)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_OUT = REPO / "bench" / "results" / "e2e.json"
SMOKE_RECIPE = REPO / "recipes" / "smoke.yaml"


@dataclass(frozen=True)
class Workload:
    recipe: str
    mixed_lengths: bool
    needs_shared_data: bool
    note: str


WORKLOADS = {
    "demo": Workload("recipes/smollm2_demo.yaml", False, False,
                     "data/demo: one-line reviews, batch 8 x <=128 tokens, no accumulation"),
    "commonsense": Workload("recipes/smollm2_commonsense.yaml", True, True,
                            "BoolQ passages next to one-line ARC-Easy / OpenBookQA questions, batch 8 = 2 x 4, "
                            "<=256 tokens"),
}


@dataclass(frozen=True)
class Lever:
    """A configuration: recipe overrides for `dora train` (and the floor); HF Trainer options, None when HF has no
    counterpart; `both`: overrides of the recipe every side reads, HF's included (its precision follows the
    recipe's train.mixed_precision)."""

    ours: tuple[str, ...] = ()
    hf: dict | None = field(default_factory=dict)
    both: tuple[str, ...] = ()


LEVERS = {
    "baseline": Lever(),
    "group_by_length": Lever(("data.group_by_length=true",), {"group_by_length": True}),
    "packing": Lever(("data.packing=true",), None),
    "compile": Lever(("train.compile=true",), None),
    # the recipe's precision set explicitly, for every side ("baseline" is the recipe as written: the demo
    # recipe trains under bf16 autocast)
    "fp32": Lever(both=("train.mixed_precision=no",)),
    "bf16": Lever(both=("train.mixed_precision=bf16",)),
}
PRECISION_CONFIGS = {"fp32": " (fp32)", "bf16": " (bf16)"}
"""The configurations whose ours / floor ratios are issue 22's targets, and their tags in the ratio names."""
DEFAULT_CONFIGS = "baseline,group_by_length,packing,compile,threads1"
METHODS = ("lora", "dora")
COLLATE_FACTORIES = [("dora_cli.batching", "make_collate"), ("dora_cli.datasets", "make_collator")]
"""Where `dora train` gets its collate function from (the worker wraps what exists to count tokens)."""


def parse_config(name: str) -> Lever:
    """`baseline`, a lever name, `threadsN`, a raw override `key=value`, or several joined by `+`."""
    parts = []
    for part in name.split("+"):
        if part in LEVERS:
            parts.append(LEVERS[part])
        elif re.fullmatch(r"threads\d+", part):
            parts.append(Lever((f"train.threads={part[7:]}",), None))
        elif "=" in part:
            parts.append(Lever((part,), None))
        else:
            raise ValueError(f"unknown configuration {part!r} (expected one of {', '.join(LEVERS)}, threadsN, "
                             "or a recipe override key=value; join several with +)")
    hf = None if any(p.hf is None for p in parts) else {k: v for p in parts for k, v in p.hf.items()}
    ours, both = tuple(o for p in parts for o in p.ours), tuple(o for p in parts for o in p.both)
    if len(ours + both) != len({o.split("=", 1)[0] for o in ours + both}):
        raise ValueError(f"configuration {name!r} sets the same key twice ({', '.join(ours + both)})")
    return Lever(ours, hf, both)


# ----------------------------------------------------------------------------------------------------
# Worker side: the probe, ours, HF


class Probe:
    """Timestamps of every optimizer step and the token counts of every collated micro-batch, in one worker."""

    def __init__(self):
        self.started = time.perf_counter()
        self.step_ends: list[tuple[float, float]] = []  # (wall, process CPU) after each optimizer.step()
        self.lrs: list[float] = []  # the learning rate each step used
        self.batches: list[tuple[int, int, int, float]] = []  # (steps done before it, real, padded, wall)
        self.optimizer: dict | None = None

    def install(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(self._on_step)

    def _on_step(self, optimizer, _args, _kwargs) -> None:
        self.stamp()
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))
        if self.optimizer is None:
            d = optimizer.defaults
            self.optimizer = {"class": type(optimizer).__name__, "fused": d.get("fused"), "foreach": d.get("foreach")}

    def stamp(self) -> None:
        """The end of a step (the floor, which has no optimizer, calls it itself)."""
        self.step_ends.append((time.perf_counter(), time.process_time()))

    def counting(self, collate):
        """`collate` that also records its micro-batch: real tokens = the examples' lengths, padded = the batch's
        input_ids (a padding-free packed row counts each token once). A collate counted already is returned as is."""
        if getattr(collate, "counted_by_bench", False):
            return collate

        def wrapped(examples):
            batch = collate(examples)
            real = sum(len(e["input_ids"]) for e in examples)
            self.batches.append((len(self.step_ends), real, int(batch["input_ids"].numel()), time.perf_counter()))
            return batch

        wrapped.counted_by_bench = True
        return wrapped

    def count_factories(self) -> list[str]:
        """Make every collate factory of dora_cli (COLLATE_FACTORIES that exist) return counted collates."""
        import importlib

        modules = {}
        for module_name, _ in COLLATE_FACTORIES:  # import all first: a module binds the originals it imports
            try:
                modules[module_name] = importlib.import_module(module_name)
            except ImportError:
                pass
        patched = []
        for module_name, attr in COLLATE_FACTORIES:
            factory = getattr(modules.get(module_name), attr, None)
            if factory is not None:
                setattr(modules[module_name], attr, lambda *a, _f=factory, **k: self.counting(_f(*a, **k)))
                patched.append(f"{module_name}.{attr}")
        return patched

    def record(self, **extra) -> dict:
        import torch

        return {"started": self.started, "step_ends": self.step_ends, "lrs": self.lrs, "batches": self.batches,
                "optimizer": self.optimizer, "torch_threads": torch.get_num_threads(), **extra}


def run_ours(spec: dict, probe: Probe) -> tuple[int, dict]:
    """`dora train RECIPE OVERRIDES` in this process, exactly as the command line runs it."""
    from dora_cli import cli

    patched = probe.count_factories()
    out = Path(spec["output_dir"])
    sys.argv = ["dora", "train", spec["recipe"], *spec["overrides"], f"output_dir={out}"]
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    losses = {}
    if (out / "metrics.jsonl").is_file():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if "loss" in rec:
                losses[rec["step"]] = rec["loss"]
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    from dora_cli.allocator import tune_allocator

    allocator = tune_allocator()  # what run_main applied (the same settings again): for the record
    return code, probe.record(micro_per_step=None, losses=losses, counted_factories=patched, allocator=allocator,
                              tokens_seen_by_dora=metrics.get("tokens"))


def hf_training_arguments(recipe, plan, group_by_length: bool, output_dir: str):
    """TrainingArguments with the recipe's hyperparameters; sampling sequential (our order) or by length.
    (The schedule is ours, set by `use_our_schedule`.)"""
    from transformers import TrainingArguments

    t, o = recipe.train, recipe.optim
    fields = TrainingArguments.__dataclass_fields__
    kwargs = dict(
        output_dir=output_dir, per_device_train_batch_size=plan.micro, gradient_accumulation_steps=plan.accumulation,
        max_steps=plan.total_steps, learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], adam_epsilon=o.eps,
        # ours always computes the gradient norm (clipping at inf when max_grad_norm is unset): the same work here
        max_grad_norm=t.max_grad_norm or float("inf"), logging_steps=t.log_every, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=t.seed, dataloader_num_workers=0, dataloader_pin_memory=False,
        remove_unused_columns=False, label_names=["labels"],
        bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16",
    )
    kwargs["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
    if "train_sampling_strategy" in fields:  # transformers >= 5
        kwargs["train_sampling_strategy"] = "group_by_length" if group_by_length else "sequential"
    else:
        kwargs["group_by_length"] = group_by_length
    return TrainingArguments(**kwargs)


def use_our_schedule(trainer, recipe, plan) -> None:
    """The Trainer's scheduler becomes `dora train`'s lr_factor as a LambdaLR: the same lr at every step
    (HF's own linear warm-up starts at 0, one step behind ours)."""
    import torch

    from dora_cli.train import lr_factor

    def create_scheduler(num_training_steps, optimizer=None):
        if trainer.lr_scheduler is None:
            trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or trainer.optimizer,
                lambda step: lr_factor(step, plan.total_steps, plan.warmup, recipe.schedule.type))
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


def hf_examples_in_our_order(recipe, tokenizer):
    """Our tokenised training examples, the ones `dora train` runs, in its micro-batch order; and its plan."""
    from dora_cli.batching import make_order
    from dora_cli.datasets import build_datasets, trained_labels
    from dora_cli.train import make_plan

    train_set, _ = build_datasets(recipe.data, tokenizer)
    # dora train's rule (make_setup): only examples with a trained label. The parent compares both sides'
    # tokens per step, so a drift shows as tokens_match false.
    train_set = [e for e in train_set if trained_labels(e)]
    order = make_order(recipe.data, [len(e["input_ids"]) for e in train_set], recipe.train.batch_size)
    plan = make_plan(recipe, len(train_set), 1, order)
    order = [i for step in range(plan.total_steps) for chunk in plan.micro_batches(step, 0, recipe.train.seed)
             for i in chunk]
    return [train_set[i] for i in order], plan


def run_hf(spec: dict, probe: Probe) -> tuple[int, dict]:
    """HF Trainer + PEFT on our examples: same model, adapter, hyperparameters, micro-batches and padding."""
    import peft
    import transformers
    from transformers import Trainer

    from dora_cli.datasets import make_collator
    from dora_cli.models import load_model
    from dora_cli.recipe import load_recipe

    transformers.logging.set_verbosity_error()
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    a = recipe.adapter
    if a.method not in METHODS:
        raise ValueError(f"the HF side runs lora and dora only, not {a.method}")
    transformers.set_seed(recipe.train.seed)
    model, tokenizer = load_model(recipe.model, for_training=True)  # AutoModelForCausalLM.from_pretrained
    dataset, plan = hf_examples_in_our_order(recipe, tokenizer)
    lora = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
                           use_dora=a.method == "dora", use_rslora=a.rslora, bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    args = hf_training_arguments(recipe, plan, bool(spec["hf"].get("group_by_length")), spec["output_dir"])
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=probe.counting(make_collator(tokenizer)))
    if not spec["hf"].get("group_by_length") and "train_sampling_strategy" not in type(args).__dataclass_fields__:
        import torch.utils.data

        trainer._get_train_sampler = lambda *_a, **_k: torch.utils.data.SequentialSampler(dataset)
    # ours scales each micro-batch's mean loss by 1 / accumulation; HF would weight by label tokens instead
    trainer.model_accepts_loss_kwargs = False
    use_our_schedule(trainer, recipe, plan)
    trainer.train()
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    optim = str(getattr(args.optim, "value", args.optim))
    return 0, probe.record(micro_per_step=plan.accumulation, losses=losses, hf_optim=optim,
                           hf_sampling=getattr(args, "train_sampling_strategy", None))


def run_floor(spec: dict, probe: Probe) -> tuple[int, dict]:
    """The floor of the recipe: `dora train`'s micro-batches (order, collate, dropout seeds, logits at the trained
    positions, autocast of train.mixed_precision, threads) through the frozen base model, forward + backward of
    the input gradients only (bench_adapters.freeze_to_floor); no adapter, no optimizer, no gradient norm."""
    import contextlib

    import torch

    from dora_cli.allocator import tune_allocator
    from dora_cli.batching import make_collate, make_order
    from dora_cli.datasets import build_datasets, trained_labels
    from dora_cli.launch import set_threads
    from dora_cli.lm_loss import keeps_selected_logits, loss_terms, trained_positions
    from dora_cli.models import load_model
    from dora_cli.recipe import load_recipe
    from dora_cli.train import make_plan, micro_batch_seed

    allocator = tune_allocator()  # as `dora train` (errors.run_main) does: the floor runs under ours's allocator
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    t = recipe.train
    set_threads(t.threads, "cpu")
    torch.manual_seed(t.seed)
    model, tokenizer = load_model(recipe.model, for_training=True)
    freeze_to_floor(model).train()
    selective = keeps_selected_logits(model)
    if t.compile:
        model.compile()
    train_set, _ = build_datasets(recipe.data, tokenizer)
    train_set = [e for e in train_set if trained_labels(e)]
    plan = make_plan(recipe, len(train_set), 1, make_order(recipe.data, [len(e["input_ids"]) for e in train_set],
                                                          t.batch_size))
    collate = probe.counting(make_collate(recipe.data, tokenizer))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
    for step in range(plan.total_steps):
        chunks = plan.micro_batches(step, 0, t.seed)
        for j, chunk in enumerate(chunks):
            torch.manual_seed(micro_batch_seed(t.seed, step, j))
            batch = collate([train_set[i] for i in chunk])
            keep = trained_positions(batch["labels"]) if selective else None
            with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
                total, count = loss_terms(model, batch, keep)
                loss = total / count
            (loss / len(chunks)).backward()
        probe.stamp()
    return 0, probe.record(micro_per_step=None, losses={}, allocator=allocator)


def worker_main(spec_json: str) -> int:
    from dora_cli import errors

    spec = json.loads(spec_json)
    probe = Probe()
    probe.install()
    try:
        code, record = {"ours": run_ours, "hf": run_hf, "floor": run_floor}[spec["side"]](spec, probe)
    except errors.UserError as err:  # the floor's recipe refused (ours prints the same line itself)
        print(f"error: {err}", file=sys.stderr)
        return 2
    record["finished"] = time.perf_counter()
    _write_json_atomic(Path(spec["result"]), record)
    return code


# ----------------------------------------------------------------------------------------------------
# Parent: jobs, processes, figures


@dataclass(frozen=True)
class Job:
    workload: str
    method: str
    config: str
    side: str  # "ours", "hf" or "floor"

    @property
    def key(self) -> str:
        return f"{self.side}/{self.config}"


def plan_jobs(args) -> list[list[Job]]:
    """One list per round, ours, HF and the floor alternating: workload > method > configuration > side."""
    one = []
    for wl in args.workloads:
        for method in args.methods:
            for config in args.configs:
                sides = ["ours"] + (["hf"] if parse_config(config).hf is not None else []) + (["floor"] * args.floor)
                one += [Job(wl, method, config, side) for side in sides]
    return [one for _ in range(args.rounds)]


def worker_spec(job: Job, args, recipe: str, tmp: Path) -> dict:
    lever = parse_config(job.config)
    common = [f"adapter.method={job.method}", f"train.max_steps={args.warmup + args.steps}", "train.save_every=null"]
    if not args.tiny:
        common.append(f"model.name_or_path={args.model}")
    return {"side": job.side, "recipe": recipe, "result": str(tmp / "result.json"),
            "output_dir": str(tmp / "run"),
            "overrides": common + list(lever.both) + (list(lever.ours) if job.side != "hf" else []),
            "hf": lever.hf or {}}


def run_process(cmd: list[str], env: dict, tmp: Path, timeout: float) -> tuple[int | None, float, float]:
    """(exit code or None on timeout, peak RSS MB from wait4, wall seconds); output goes to files in tmp."""
    t0 = time.perf_counter()
    with open(tmp / "stdout.txt", "w") as out, open(tmp / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=err)
    timed_out = False
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not timed_out and time.perf_counter() - t0 > timeout:
                proc.kill()  # our own child, by its pid
                timed_out = True
            time.sleep(0.2)
    except BaseException:  # Ctrl-C or SIGTERM of the benchmark: the worker goes with it
        proc.kill()
        os.wait4(proc.pid, 0)
        proc.returncode = -9
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return (None if timed_out else proc.returncode), usage.ru_maxrss / 1024, time.perf_counter() - t0


def error_line(stderr: str) -> str:
    """The `error: ...` line a user error prints, else the last non-empty line (a traceback's exception)."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def run_job(job: Job, args, recipe: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as name:
        tmp = Path(name)
        spec = worker_spec(job, args, recipe, tmp)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        load = os.getloadavg()
        code, peak_mb, wall = run_process(cmd, env, tmp, args.timeout)
        result = tmp / "result.json"
        if code == 0 and result.is_file():
            return {"status": "ok", **figures(json.loads(result.read_text()), args.warmup),
                    "peak_rss_mb": peak_mb, "wall_s": wall, "load_average_at_start": load}
        why = f"timed out after {args.timeout:.0f} s" if code is None else error_line((tmp / "stderr.txt").read_text())
        lever = job.side != "hf" and job.config != "baseline"
        return {"status": f"{'unsupported' if lever and code == 2 else 'error'}: {why}", "exit_code": code,
                "wall_s": wall}


def tokens_per_step(batches: list, steps: int, micro_per_step: int | None) -> tuple[list[int], list[int]]:
    """(real, padded) tokens of each optimizer step. HF's dataloader collates one micro-batch ahead, so its
    micro-batches are assigned by position (micro_per_step each); ours by the step during which they were made."""
    real, padded = [0] * steps, [0] * steps
    for i, (done, r, p, _) in enumerate(batches):
        step = i // micro_per_step if micro_per_step else done
        if step < steps:
            real[step] += r
            padded[step] += p
    return real, padded


def figures(rec: dict, warmup: int) -> dict:
    ends = rec["step_ends"]
    n = len(ends)
    if n <= warmup:
        raise RuntimeError(f"the worker made {n} optimizer steps, not more than the {warmup} warm-up steps")
    times = [ends[k][0] - ends[k - 1][0] for k in range(warmup, n)]
    cpu = [ends[k][1] - ends[k - 1][1] for k in range(warmup, n)]
    return {
        "steps": n,
        "step_time_s": statistics.median(times),
        "step_times_s": times,
        "cpu_step_time_s": statistics.median(cpu),
        **token_figures(rec, n, warmup, sum(times)),
        "torch_threads": rec["torch_threads"],
        "optimizer": rec["optimizer"],
        "lr_per_step": rec["lrs"],
        "losses": rec["losses"],
        **{k: rec[k] for k in ("hf_optim", "hf_sampling") if k in rec},
    }


def token_figures(rec: dict, steps: int, warmup: int, timed_s: float) -> dict:
    """Real / padded tokens per step and per second; None (with a note) when no micro-batch was counted."""
    if not rec["batches"]:
        keys = ("real_tokens_per_s", "padded_tokens_per_s", "padding_fraction", "real_tokens_per_step",
                "padded_tokens_per_step", "setup_s")
        return {**dict.fromkeys(keys), "tokens_note": "no micro-batch counted: dora train took its collate "
                f"function from none of {', '.join(m + '.' + a for m, a in COLLATE_FACTORIES)}"}
    real, padded = tokens_per_step(rec["batches"], steps, rec["micro_per_step"])
    out = {
        "real_tokens_per_s": sum(real[warmup:]) / timed_s,
        "padded_tokens_per_s": sum(padded[warmup:]) / timed_s,
        "padding_fraction": 1 - sum(real) / sum(padded),
        "real_tokens_per_step": real,
        "padded_tokens_per_step": padded,
        "setup_s": rec["batches"][0][3] - rec["started"],
    }
    if rec.get("tokens_seen_by_dora") is not None:  # dora train's own count (metrics.json "tokens")
        out["tokens_seen_by_dora"] = rec["tokens_seen_by_dora"]
    return out


SCALARS = ("step_time_s", "cpu_step_time_s", "real_tokens_per_s", "padded_tokens_per_s", "padding_fraction",
           "peak_rss_mb", "setup_s", "wall_s")


def summarise(rounds: list[dict]) -> dict:
    """Status and, over the rounds that ran, the median of every scalar figure."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if not ok:
        return {"status": rounds[0]["status"] if rounds else "not run", "rounds": rounds}
    median = {k: statistics.median([r[k] for r in ok]) for k in SCALARS if all(r.get(k) is not None for r in ok)}
    return {"status": "ok", "median": median, "rounds": rounds}


# ----------------------------------------------------------------------------------------------------
# Ratios the targets name


@dataclass(frozen=True)
class RatioSpec:
    name: str
    figure: str
    numerator: tuple[str, str]  # (method, run key)
    denominator: tuple[str, str]
    target: tuple[str, float] | None
    mixed_only: bool = False


FLOOR_TARGETS = {"lora": 1.05, "dora": 1.10}
"""ours / floor step time, fp32 and bf16 autocast (issue 22)."""
HF_GUARD = {"lora": 1.0, "dora": 1.6}
"""HF Trainer + PEFT / ours step time, at least (issue 22's guard), in every precision configuration."""


def ratio_specs() -> list[RatioSpec]:
    out = []
    for config, tag in (("baseline", ""), *PRECISION_CONFIGS.items()):  # baseline: the recipe as written
        for method in METHODS:
            target = ("<=", FLOOR_TARGETS[method]) if config in PRECISION_CONFIGS else None
            out.append(RatioSpec(f"{method}: ours / floor step time{tag}", "step_time_s", (method, f"ours/{config}"),
                                 (method, f"floor/{config}"), target))
            out.append(RatioSpec(f"{method}: ours / floor step time{tag} (CPU time)", "cpu_step_time_s",
                                 (method, f"ours/{config}"), (method, f"floor/{config}"), None))
            for figure in ("step_time_s", "cpu_step_time_s"):  # the guard: not slower than HF Trainer + PEFT
                cpu = figure.startswith("cpu")
                out.append(RatioSpec(f"{method}: HF step time / ours{tag}" + (" (CPU time)" if cpu else ""), figure,
                                     (method, f"hf/{config}"), (method, f"ours/{config}"),
                                     None if cpu else (">=", HF_GUARD[method])))
        out += [
            RatioSpec(f"ours DoRA / ours LoRA step time{tag}", "step_time_s", ("dora", f"ours/{config}"),
                      ("lora", f"ours/{config}"), ("<=", 1.05)),
            RatioSpec(f"ours DoRA / ours LoRA step time{tag} (CPU time)", "cpu_step_time_s", ("dora", f"ours/{config}"),
                      ("lora", f"ours/{config}"), None),
            RatioSpec(f"ours DoRA / ours LoRA peak RSS{tag}", "peak_rss_mb", ("dora", f"ours/{config}"),
                      ("lora", f"ours/{config}"), ("<=", 1.03)),
        ]
    for method in METHODS:
        out.append(RatioSpec(f"{method}: ours packing / HF group_by_length real tokens/s", "real_tokens_per_s",
                             (method, "ours/packing"), (method, "hf/group_by_length"), (">=", 2.0), mixed_only=True))
        out.append(RatioSpec(f"{method}: HF group_by_length / HF baseline real tokens/s (reference)",
                             "real_tokens_per_s", (method, "hf/group_by_length"), (method, "hf/baseline"), None,
                             mixed_only=True))
    return out


def compute_ratio(runs: dict, spec: RatioSpec) -> dict:
    def side(method, key):
        entry = runs.get(method, {}).get(key, {"status": "not run"})
        ok = entry["status"] == "ok"
        return {"method": method, "run": key, "status": entry["status"],
                "value": entry["median"].get(spec.figure) if ok else None,
                "per_round": [r.get(spec.figure) if r["status"] == "ok" else None for r in entry.get("rounds", [])]}

    num, den = side(*spec.numerator), side(*spec.denominator)
    value = num["value"] / den["value"] if num["value"] is not None and den["value"] else None
    per_round = [a / b if a is not None and b else None for a, b in zip(num["per_round"], den["per_round"])]
    passed = None
    if spec.target is not None and value is not None:
        op, goal = spec.target
        passed = value >= goal if op == ">=" else value <= goal
    return {"name": spec.name, "figure": spec.figure, "value": value, "per_round": per_round,
            "target": f"{spec.target[0]} {spec.target[1]}" if spec.target else None, "pass": passed,
            "numerator": num, "denominator": den}


def tokens_match(runs: dict, config: str) -> list[bool] | None:
    """Per round: did HF train on exactly the real and padded tokens per step of ours, in this configuration?"""
    ours, hf = runs.get(f"ours/{config}", {}).get("rounds", []), runs.get(f"hf/{config}", {}).get("rounds", [])
    pairs = [(a, b) for a, b in zip(ours, hf) if a["status"] == b["status"] == "ok"]
    if not pairs:
        return None
    return [a["real_tokens_per_step"] == b["real_tokens_per_step"]
            and a["padded_tokens_per_step"] == b["padded_tokens_per_step"] for a, b in pairs]


# ----------------------------------------------------------------------------------------------------
# Parent: the run


def tiny_recipe(workload: Workload, tmp: Path) -> str:
    """The workload's recipe with the smoke recipe's tiny random model (and tokenizer) in place of SmolLM2."""
    import yaml

    data = yaml.safe_load((REPO / workload.recipe).read_text())
    data["model"] = yaml.safe_load(SMOKE_RECIPE.read_text())["model"]
    path = tmp / f"tiny_{Path(workload.recipe).name}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def worker_env(args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               SMOLLM2_DIR=str(args.model), DORA_SHARED_DATA=str(args.data),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    return env


def skipped_workloads(args) -> dict[str, str]:
    out = {}
    for wl in args.workloads:
        if WORKLOADS[wl].needs_shared_data and not (Path(args.data) / "commonsense").is_dir():
            out[wl] = f"skipped: {args.data}/commonsense is absent (--data or DORA_SHARED_DATA)"
    return out


def settings(args) -> dict:
    return {
        "model": "tiny random llama of recipes/smoke.yaml" if args.tiny else str(args.model),
        "data": str(args.data), "warmup_steps": args.warmup, "timed_steps": args.steps,
        "optimizer_steps_per_process": args.warmup + args.steps, "rounds": args.rounds,
        "workloads": {w: {"recipe": WORKLOADS[w].recipe, "mixed_lengths": WORKLOADS[w].mixed_lengths,
                          "note": WORKLOADS[w].note} for w in args.workloads},
        "methods": args.methods,
        "configs": {c: {"ours_overrides": list(parse_config(c).ours), "hf": parse_config(c).hf,
                        "every_side_overrides": list(parse_config(c).both)} for c in args.configs},
        "omp_wait_policy": worker_env(args).get("OMP_WAIT_POLICY", "unset"),
        "allocator": "dora_cli.allocator.tune_allocator() for ours (errors.run_main) and the floor (glibc: mmap from 32 MiB, heap "
                     "top kept up to 1 GiB; DORA_CLI_MALLOC=system: glibc's defaults); HF Trainer + PEFT with the "
                     "defaults its users have",
        "order": "every round: workload > method > configuration > ours, HF, the floor; each a fresh process",
        "step_time": "end of optimizer step k minus end of step k-1 (global optimizer post-hook), steps after "
                     "the warm-up; median per process; figures over rounds are medians of the per-process ones",
        "tokens": "real = lengths of the tokenised examples given to the collator (no padding); padded = "
                  "elements of the collated input_ids",
        "peak_rss": "ru_maxrss of the worker process (os.wait4), MB",
        "hf_side": "transformers.Trainer + peft.get_peft_model(LoraConfig(use_dora=...)) on the model of "
                   "dora_cli.models.load_model, our examples in our micro-batch order (sequential sampler) or "
                   "HF's LengthGroupedSampler over the same examples (group_by_length), our collator (right "
                   "padding, labels -100), loss / accumulation per micro-batch as ours (model_accepts_loss_kwargs "
                   "off), the recipe's lr / betas / eps / weight decay, our schedule (dora_cli.train.lr_factor as "
                   "a LambdaLR: the same lr every step), grad norm computed "
                   "every step (max_grad_norm inf when the recipe sets none), HF's default optimizer",
        "ours_side": "dora train RECIPE adapter.method=M train.max_steps=N train.save_every=null [levers], "
                     "in-process through dora_cli.cli.main (the collator wrapped to count tokens)",
        "floor_side": "the recipe's frozen base model (every parameter requires_grad False, the input embeddings' "
                      "output requiring grad): dora train's micro-batches, order, collate, dropout seeds, logits "
                      "at the trained positions (lm_loss.py), autocast of train.mixed_precision and threads; "
                      "forward + backward of the input gradients only, no optimizer, no gradient norm; step time "
                      "between the ends of consecutive steps as the others" if args.floor else None,
    }


def parent_main(args) -> int:
    def log(msg):
        print(msg, flush=True)

    if not args.tiny and not (Path(args.model) / "config.json").is_file():
        print(f"error: --model: {args.model} has no config.json (make fetch-model)", file=sys.stderr)
        return 2
    try:
        import peft  # noqa: F401

        has_peft = True
    except ImportError:
        has_peft = False
    out = Path(args.out)
    skipped = skipped_workloads(args)
    report = {"benchmark": "bench/bench_e2e.py", "complete": False, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "settings": settings(args), "environment": environment(), "runs": {}}
    runs: dict = report["runs"]
    for wl in args.workloads:
        runs[wl] = {m: {} for m in args.methods} if wl not in skipped else {"status": skipped[wl]}
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-recipes-"))
    try:
        recipes = {w: tiny_recipe(WORKLOADS[w], tmp) if args.tiny else WORKLOADS[w].recipe for w in args.workloads}
        env = worker_env(args)
        gone: dict[tuple, str] = {}  # (workload, method, key) -> status of a configuration that cannot run
        for rnd, jobs in enumerate(plan_jobs(args), 1):
            log(f"round {rnd}/{args.rounds}")
            for job in jobs:
                if job.workload in skipped:
                    continue
                ident = (job.workload, job.method, job.key)
                if job.side == "hf" and not has_peft:
                    result = {"status": "skipped: peft is not importable (pip install -e '.[bench]')"}
                elif ident in gone:
                    result = {"status": gone[ident]}
                else:
                    result = run_job(job, args, recipes[job.workload], env)
                if result["status"] != "ok":
                    gone[ident] = result["status"]
                entry = runs[job.workload][job.method].setdefault(job.key, {"rounds": []})
                entry["rounds"].append(result)
                entry.update({k: v for k, v in summarise(entry["rounds"]).items() if k != "rounds"})
                log(f"  {job.workload:<12} {job.method:<5} {job.key:<22} {describe(result)}")
                _write_json_atomic(out, report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    configs = set(args.configs)
    report["ratios"] = {wl: [compute_ratio(runs[wl], s) for s in ratio_specs()
                             if (WORKLOADS[wl].mixed_lengths or not s.mixed_only)
                             and {s.numerator[1].split("/")[1], s.denominator[1].split("/")[1]} <= configs]
                        for wl in args.workloads if wl not in skipped}
    levers = {c: parse_config(c) for c in args.configs}
    same_order = [c for c, lever in levers.items() if lever.hf is not None and not lever.hf.get("group_by_length")]
    report["tokens_match"] = {wl: {m: {c: tokens_match(runs[wl][m], c) for c in same_order} for m in args.methods}
                              for wl in args.workloads if wl not in skipped}
    report["environment"]["load_average_end"] = os.getloadavg()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["complete"] = True
    _write_json_atomic(out, report)
    mismatched = [f"{wl} {m} {c}" for wl, per in report["tokens_match"].items() for m, by in per.items()
                  for c, ok in by.items() if ok is not None and not all(ok)]
    if mismatched:
        log(f"WARNING: HF did not train on our tokens per step ({', '.join(mismatched)}): the comparison is off")
    log("\n" + ratio_table(report["ratios"]) + f"\n\nwrote {out}")
    return 0


def environment() -> dict:
    info = machine_info()
    info["load_average_start"] = os.getloadavg()
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def describe(result: dict) -> str:
    if result["status"] != "ok":
        return result["status"]
    return (f"{result['step_time_s']:.3f} s/step  {result['real_tokens_per_s']:.0f} real tok/s  "
            f"pad {result['padding_fraction']:.2f}  {result['peak_rss_mb']:.0f} MB  (load {result['load_average_at_start'][0]:.1f})")


def ratio_table(ratios: dict) -> str:
    lines = []
    for wl, entries in ratios.items():
        lines.append(f"{wl}:")
        for e in entries:
            value = "n/a" if e["value"] is None else f"{e['value']:.3f}"
            rounds = " ".join("n/a" if x is None else f"{x:.3f}" for x in e["per_round"])
            verdict = {True: "PASS", False: "MISS", None: ""}[e["pass"]]
            target = f"target {e['target']} {verdict}" if e["target"] else ""
            lines.append(f"  {e['name']:<58} {value:>7}  [{rounds}]  {target}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="SmolLM2 directory (fp32, HF layout)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("DORA_SHARED_DATA") or REPO.parent / "shared" / "data"),
                   help="the shared data root (commonsense/...) the commonsense workload reads")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per process (default 12; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps, >= 1 (default 3; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of the alternation (default 2; quick 1)")
    p.add_argument("--workloads", default=None, help=f"comma-separated of {','.join(WORKLOADS)} (default all; quick demo)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated of lora,dora")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated configurations: baseline (the recipe as written), fp32, bf16, "
                        "group_by_length, packing, compile, threadsN, a recipe override key=value, or several joined "
                        "by + (HF runs those it has: baseline, fp32, bf16, group_by_length)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="the tiny random model of recipes/smoke.yaml, 3 steps, 1 round")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY of the workers ('' leaves it unset, as a user's shell would)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the floor (the frozen base's forward + input-gradient backward on the same batches)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return args
    quick = args.quick
    args.tiny = quick
    args.steps = args.steps if args.steps is not None else (3 if quick else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 2)
    args.workloads = _csv(args.workloads) if args.workloads else (["demo"] if quick else list(WORKLOADS))
    args.methods = _csv(args.methods)
    args.configs = _csv(args.configs)
    problems = [f"--workloads: unknown {w}" for w in args.workloads if w not in WORKLOADS]
    problems += [f"--methods: unknown {m}" for m in args.methods if m not in METHODS]
    for c in args.configs:
        try:
            parse_config(c)
        except ValueError as err:
            problems.append(f"--configs: {err}")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        problems.append("--warmup, --steps and --rounds must be >= 1 (step k is timed from the end of step k-1)")
    if problems:
        p.error("; ".join(problems))
    return args


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds: the running worker is killed, temporary files removed


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return parent_main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
