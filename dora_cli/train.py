"""`dora train RECIPE [key=value ...]`: fine-tune a causal LM from a recipe, on Accelerate.

Features, top to bottom:
- recipe loading with dotted overrides; `--dry-run` prints the resolved recipe and the trainable
  share (model built on the `meta` device: no weights are loaded) and writes nothing
- one process, or N (`launch.num_processes`, `--nproc`) through Accelerate's launcher
- LoRA / DoRA / VeRA / DVoRA / magnitude-only / full fine-tuning, on fp or 4-/8-bit bases
- deterministic data order: a seeded permutation per epoch, global batches split into micro-batches
  (process k takes micro-batches k, k+P, ...), so N processes see exactly the batches of one
- gradient accumulation, mixed precision, gradient checkpointing, clipping, a non-finite guard
- checkpoints written atomically with a manifest, `keep_last`, `--resume` from the newest intact one
  (bitwise identical to an uninterrupted run on the CPU), SIGINT / SIGTERM save and exit 130 / 143
- a progress bar (loss, lr, tokens/s), `metrics.jsonl` every `log_every` steps, `metrics.json` at the end
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from dora_cli import rundir
from dora_cli.errors import RunFailure, UserError
from dora_cli.recipe import Recipe, check_batch, dump_recipe, load_recipe, safe_load

RECIPE_NAME = "recipe.yaml"
STATE_DIR = "trainer_state"
# Keys that may change between a run and its resumption without changing what is trained.
VOLATILE = {"output_dir", "eval", "expected", "launch"}
VOLATILE_TRAIN = {"log_every", "eval_every", "save_every", "keep_last", "max_steps", "epochs", "skip_nonfinite"}


_log_file: Path | None = None


def log(message: str) -> None:
    """A line for the user (stderr) and, once a run owns its output_dir, for output_dir/train.log."""
    print(message, file=sys.stderr, flush=True)
    if _log_file is not None:
        with _writing(_log_file), open(_log_file, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


# ==================================================================================================
# Entry point
# ==================================================================================================
def run_train(
    recipe_path: str | Path,
    overrides: list[str],
    *,
    dry_run: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    nproc: int | None = None,
) -> Path | None:
    """Train from a recipe; returns output_dir/final (None for a dry run)."""
    recipe = load_recipe(recipe_path, overrides)
    launched = _inside_launch()
    processes = int(os.environ.get("WORLD_SIZE", "1")) if launched else (nproc or recipe.launch.num_processes)
    check_batch(recipe, processes)
    if dry_run:
        return _dry_run(recipe, processes)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    output_dir = Path(recipe.output_dir)
    if not launched:
        _check_output_dir(recipe, output_dir, resume=resume, overwrite=overwrite)
        if processes > 1:
            return _relaunch(recipe, recipe_path, overrides, processes, resume=resume, overwrite=overwrite)
    return Trainer(recipe, resume=resume, overwrite=overwrite).run()


def _inside_launch() -> bool:
    return os.environ.get("DORA_LAUNCHED") == "1" or "LOCAL_RANK" in os.environ


def identity(recipe: Recipe) -> dict:
    """What makes two runs the same run (resumable into each other)."""
    data = safe_load(dump_recipe(recipe))
    for key in VOLATILE:
        data.pop(key, None)
    for key in VOLATILE_TRAIN:
        data["train"].pop(key, None)
    return data


def _check_output_dir(recipe: Recipe, output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output_dir that holds another recipe's run (unless --overwrite), before writing anything."""
    saved = output_dir / RECIPE_NAME
    if not saved.is_file() or overwrite:
        return
    try:
        previous = Recipe.model_validate(safe_load(saved.read_text()))
    except Exception:  # an unreadable or foreign file: not a run we can resume
        raise UserError(
            f"{output_dir}: holds {RECIPE_NAME} that is not a dora_cli recipe; pass --overwrite to replace it"
        ) from None
    mine, theirs = identity(recipe), identity(previous)
    if mine != theirs:
        key = first_difference(mine, theirs)
        raise UserError(
            f"{output_dir}: holds a run of a different recipe ({key} differs); "
            "choose another output_dir or pass --overwrite to replace it"
        )
    if not resume and (rundir.checkpoints(output_dir) or (output_dir / "final").exists()):
        raise UserError(f"{output_dir}: holds a run of this recipe; pass --resume to continue it or --overwrite to start over")


def first_difference(a, b, prefix: str = "") -> str:
    """The dotted key of the first difference between two recipe documents ("the recipe" at the top)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "the recipe"


# ==================================================================================================
# Dry run: the resolved recipe and the trainable share, no weights
# ==================================================================================================
def _dry_run(recipe: Recipe, processes: int) -> None:
    from dora_cli.adapters import apply_adapters, parameter_report
    from dora_cli.models import meta_model

    model = meta_model(recipe.model)
    apply_adapters(model, recipe.adapter)
    report = parameter_report(model)
    accumulation = check_batch(recipe, processes)
    print(dump_recipe(recipe), end="")
    print(f"# processes: {processes}, gradient accumulation: {accumulation}")
    print(f"# {report}")
    return None


# ==================================================================================================
# Many processes: the same command again under Accelerate's launcher
# ==================================================================================================
def accelerate_config(recipe: Recipe, processes: int) -> dict:
    """Accelerate's config file for the recipe's launch strategy."""
    cuda = torch.cuda.is_available()
    cfg: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": processes,
        "mixed_precision": recipe.train.mixed_precision,
        "use_cpu": not cuda,
        "distributed_type": "MULTI_GPU",  # on a CPU-only machine this launches torchrun; we select gloo
        "dynamo_config": {},
        "main_training_function": "main",
    }
    if recipe.launch.strategy == "fsdp":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_activation_checkpointing": recipe.model.gradient_checkpointing,
        }
    elif recipe.launch.strategy == "deepspeed":
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "zero_stage": 2,
            "gradient_accumulation_steps": check_batch(recipe, processes),
            "gradient_clipping": recipe.train.max_grad_norm or 1.0,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": False,
        }
    return cfg


def launch_command(recipe: Recipe, recipe_path, overrides, processes: int, config_file: Path, flags: list[str]) -> list[str]:
    """argv of the relaunch: a list, never a shell string."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file), "--num_processes", str(processes), "--main_process_port", str(port),
        "-m", "dora_cli.cli", "train", str(recipe_path), *overrides, *flags,
    ]


def _relaunch(recipe: Recipe, recipe_path, overrides, processes: int, *, resume: bool, overwrite: bool) -> Path:
    with tempfile.TemporaryDirectory(prefix="dora-launch-") as tmp:
        config_file = Path(tmp) / "accelerate.yaml"
        config_file.write_text(yaml.safe_dump(accelerate_config(recipe, processes)))
        flags = (["--resume"] if resume else []) + (["--overwrite"] if overwrite else [])
        cmd = launch_command(recipe, recipe_path, overrides, processes, config_file, flags)
        env = dict(os.environ, DORA_LAUNCHED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        log(f"launching {processes} processes ({recipe.launch.strategy})")
        code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise SystemExit(code)
    return Path(recipe.output_dir) / "final"


# ==================================================================================================
# The schedule and the data order: pure functions of the step
# ==================================================================================================
def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based): linear warm-up, then linear / cosine / constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def micro_batch_seed(seed: int, step: int, micro_batch: int) -> int:
    return (seed * 1_000_003 + step) * 10_007 + micro_batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass
class Plan:
    """How the examples become optimizer steps."""

    examples: int
    batch: int  # global batch
    micro: int
    processes: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    warmup: int

    def micro_batches(self, step: int, rank: int, seed: int) -> list[list[int]]:
        """Example indices of the micro-batches process `rank` runs at optimizer step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.examples, seed, epoch)[i * self.batch : (i + 1) * self.batch]
        chunks = [order[j : j + self.micro] for j in range(0, self.batch, self.micro)]
        return chunks[rank :: self.processes]


def make_plan(recipe: Recipe, examples: int, processes: int) -> Plan:
    t = recipe.train
    accumulation = check_batch(recipe, processes)
    steps_per_epoch = examples // t.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"train.batch_size={t.batch_size} is larger than the {examples} training examples; "
            "lower train.batch_size or add data"
        )
    total = t.max_steps if t.max_steps is not None else max(1, int(t.epochs * steps_per_epoch))
    s = recipe.schedule
    warmup = s.warmup_steps if s.warmup_steps is not None else int(round((s.warmup_ratio or 0.0) * total))
    return Plan(examples, t.batch_size, t.micro_batch_size, processes, accumulation, steps_per_epoch, total, warmup)


# ==================================================================================================
# The trainer
# ==================================================================================================
@dataclass
class Window:
    """What happened since the last log line."""

    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


class Trainer:
    def __init__(self, recipe: Recipe, *, resume: bool, overwrite: bool):
        self.recipe = recipe
        self.resume = resume
        self.overwrite = overwrite
        self.output_dir = Path(recipe.output_dir)
        self.stop_signal: int | None = None
        self._saved_handlers: dict = {}

    # ---- setup --------------------------------------------------------------------------------------
    def run(self) -> Path:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        r = self.recipe
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=r.train.mixed_precision)
        self.main = self.acc.is_main_process
        set_seed(r.train.seed)
        self._setup()  # everything that can refuse the run, before anything is written
        self.lock = rundir.RunLock(self.output_dir)
        if self.main:
            self.lock.acquire()
        try:
            self.acc.wait_for_everyone()
            self._claim_output_dir()
            return self._train()
        finally:
            global _log_file
            _log_file = None
            self._restore_signal_handlers()
            self.acc.wait_for_everyone()
            if self.main:
                self.lock.release()

    def _claim_output_dir(self) -> None:
        if self.main:
            if self.overwrite:
                for child in self.output_dir.iterdir():
                    if child.name != rundir.LOCK_NAME:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            rundir.clean_temporaries(self.output_dir)
            global _log_file
            _log_file = self.output_dir / "train.log"
            if self.recipe.model.trust_remote_code:
                log("model.trust_remote_code is on: the model's own Python code runs")
        self.acc.wait_for_everyone()
        if self.resume:
            self._restore()
        if self.main:
            (self.output_dir / RECIPE_NAME).write_text(dump_recipe(self.recipe))
            log(f"{self.report}")
            log(
                f"{len(self.train_set)} training examples, {len(self.val_set)} validation; "
                f"{self.plan.total_steps} steps of {self.plan.batch} "
                f"({self.plan.accumulation} x {self.plan.micro} x {self.plan.processes} processes)"
            )

    def _setup(self) -> None:
        from dora_cli.adapters import apply_adapters, parameter_report
        from dora_cli.datasets import build_datasets, make_collator
        from dora_cli.models import load_model

        r, acc = self.recipe, self.acc
        model, self.tokenizer = load_model(r.model, for_training=True)
        apply_adapters(model, r.adapter)
        self.report = parameter_report(model)
        train_set, self.val_set = build_datasets(r.data, self.tokenizer)
        # An example whose response is cut off entirely by cutoff_len (train_on_inputs false) has no
        # token to learn from: its loss would be 0 / 0.
        self.train_set = [e for e in train_set if any(label != -100 for label in e["labels"])]
        if len(self.train_set) < len(train_set) and self.main:
            log(f"{len(train_set) - len(self.train_set)} training examples have no response token within "
                f"data.cutoff_len={r.data.cutoff_len} and are left out")
        if not self.train_set:
            raise UserError("data: no training examples with a response token left (after the validation split and data.cutoff_len)")
        self.collate = make_collator(self.tokenizer)
        self.plan = make_plan(r, len(self.train_set), acc.num_processes)

        params = [p for p in model.parameters() if p.requires_grad]
        o = r.optim
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.params = params
        self.step = 0
        self.tokens_seen = 0

    # ---- the loop -----------------------------------------------------------------------------------
    def _train(self) -> Path:
        r, plan = self.recipe, self.plan
        t = r.train
        self._install_signal_handlers()
        window = Window()
        skipped = 0
        last_saved = self.step if self.resume else -1
        val_loss = None
        started = time.perf_counter()
        first_loss = None
        progress = self._progress()
        self.model.train()
        with progress:
            task = progress.add_task("train", total=plan.total_steps, completed=self.step, loss=float("nan"), lr=0.0, tps=0.0)
            while self.step < plan.total_steps:
                lr = r.optim.lr * lr_factor(self.step, plan.total_steps, plan.warmup, r.schedule.type)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, tokens = self._accumulate()
                if self.stop_signal is not None:  # interrupted mid-step: the step is dropped
                    break
                grad_norm = self._grad_norm()
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    value = loss if not math.isfinite(loss) else grad_norm
                    if skipped < t.skip_nonfinite:
                        skipped += 1
                        self.optimizer.zero_grad(set_to_none=True)
                        self._log_event({"step": self.step + 1, "skipped": f"non-finite {what} ({value})"})
                        log(f"step {self.step + 1}: non-finite {what} ({value}); skipped ({skipped}/{t.skip_nonfinite})")
                        self.step += 1
                        continue
                    raise RunFailure(
                        f"step {self.step + 1}: the {what} is {value}; training stopped. "
                        f"{self._last_good()} (lower optim.lr, or set train.skip_nonfinite)"
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += tokens
                first_loss = loss if first_loss is None else first_loss
                window.loss_sum += loss
                window.steps += 1
                window.tokens += tokens

                if self.step % t.log_every == 0 or self.step == plan.total_steps:
                    record = self._log_step(window, lr, grad_norm)
                    progress.update(task, completed=self.step, loss=record["loss"], lr=lr, tps=record["tokens_per_s"])
                    window = Window()
                else:
                    progress.update(task, completed=self.step)
                if t.eval_every and self.step % t.eval_every == 0 and self.val_set:
                    val_loss = self.evaluate()
                    self._log_event({"step": self.step, "val_loss": val_loss})
                if t.save_every and self.step % t.save_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
                if self.stop_signal is not None:
                    break

        if self.stop_signal is not None:
            if last_saved != self.step:
                self.save_checkpoint()
            code = 128 + self.stop_signal
            if self.main:
                log(f"interrupted by signal {self.stop_signal}: saved checkpoint-{self.step}; continue with --resume")
            raise SystemExit(code)

        if self.val_set:
            val_loss = self.evaluate()
        final = self.save_final()
        if self.main:
            self._write_metrics(started, first_loss, val_loss)
            log(f"done: {final}")
        return final

    def _accumulate(self) -> tuple[float, int]:
        """Forward and backward over this process's micro-batches of the step; (mean loss over all, tokens)."""
        acc = self.acc
        chunks = self.plan.micro_batches(self.step, acc.process_index, self.recipe.train.seed)
        total_loss = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for j, chunk in enumerate(chunks):
            if self.stop_signal is not None:
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan"), 0
            # Dropout masks are a function of (seed, step, micro-batch): the same for any number of
            # processes, and nothing to restore on resume.
            torch.manual_seed(micro_batch_seed(self.recipe.train.seed, self.step, acc.process_index + j * acc.num_processes))
            batch = self.collate([self.train_set[i] for i in chunk])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = j == len(chunks) - 1
            with acc.no_sync(self.model) if not sync else contextlib.nullcontext():
                with acc.autocast():
                    loss = self.model(**batch).loss
                acc.backward(loss / len(chunks))
            total_loss += loss.detach().double().cpu()
            tokens += int(batch["attention_mask"].sum())
        stats = torch.tensor([total_loss.item() / len(chunks), float(tokens)], device=acc.device, dtype=torch.float64)
        stats = acc.reduce(stats, reduction="sum") if acc.num_processes > 1 else stats
        return stats[0].item() / acc.num_processes, int(stats[1].item())

    def _grad_norm(self) -> float:
        max_norm = self.recipe.train.max_grad_norm
        norm = self.acc.clip_grad_norm_(self.params, max_norm if max_norm else float("inf"))
        return float(norm)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the validation set (each process takes its share)."""
        acc = self.acc
        self.model.eval()
        micro = self.plan.micro
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
        for start in range(acc.process_index * micro, len(self.val_set), micro * acc.num_processes):
            batch = self.collate(self.val_set[start : start + micro])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            totals += torch.tensor([loss.item(), float((labels != -100).sum())], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        self.model.train()
        return totals[0].item() / max(1.0, totals[1].item())

    # ---- logging ------------------------------------------------------------------------------------
    def _progress(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        return Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
            TimeRemainingColumn(), console=console, disable=not (self.main and console.is_terminal),
        )

    def _log_step(self, window: Window, lr: float, grad_norm: float) -> dict:
        elapsed = time.perf_counter() - window.started
        record = {
            "step": self.step,
            "epoch": round(self.step / self.plan.steps_per_epoch, 4),
            "loss": window.loss_sum / max(1, window.steps),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": window.tokens / elapsed if elapsed > 0 else 0.0,
            "peak_memory_mb": peak_memory_mb(),
        }
        self._log_event(record)
        if self.main:
            log(
                f"step {self.step}/{self.plan.total_steps}  loss {record['loss']:.4f}  lr {lr:.2e}  "
                f"grad {grad_norm:.3f}  {record['tokens_per_s']:.0f} tok/s"
            )
        return record

    def _log_event(self, record: dict) -> None:
        if self.main:
            path = self.output_dir / "metrics.jsonl"
            with _writing(path), open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _write_metrics(self, started: float, first_loss: float | None, val_loss: float | None) -> None:
        lines = [json.loads(x) for x in (self.output_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses = [x["loss"] for x in lines if "loss" in x]
        metrics = {
            "method": self.recipe.adapter.method,
            "train_loss": losses[-1] if losses else None,
            "train_loss_first": losses[0] if losses else first_loss,
            "val_loss": val_loss,
            "steps": self.step,
            "epochs": round(self.step / self.plan.steps_per_epoch, 4),
            "tokens": self.tokens_seen,
            "wall_time_s": round(time.perf_counter() - started, 3),
            "trainable_params": self.report.trainable,
            "total_params": self.report.total,
            "trainable_percent": self.report.percent,
            "peak_memory_mb": peak_memory_mb(),
            "processes": self.acc.num_processes,
            "expected": self.recipe.expected,
        }
        _write_json(self.output_dir / "metrics.json", metrics)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _fill_checkpoint(self, directory: Path, *, trainer_state: bool) -> None:
        from dora_cli.adapters import save_adapter

        model = self.acc.unwrap_model(self.model)
        if self.recipe.adapter.method == "full":
            model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        else:
            save_adapter(model, self.recipe.adapter, directory, base_model=self.recipe.model.name_or_path)
        (directory / RECIPE_NAME).write_text(dump_recipe(self.recipe))
        if trainer_state:  # no RNG state: data order and dropout masks are functions of the step
            state = directory / STATE_DIR
            state.mkdir()
            torch.save(self.optimizer.state_dict(), state / "optimizer.pt")
            _write_json(state / "state.json", {"step": self.step, "tokens_seen": self.tokens_seen})

    def save_checkpoint(self) -> Path:
        target = self.output_dir / f"checkpoint-{self.step}"
        path = self._atomic(target, trainer_state=True)
        if self.main:
            rundir.prune(self.output_dir, self.recipe.train.keep_last)
        return path

    def save_final(self) -> Path:
        return self._atomic(self.output_dir / "final", trainer_state=False)

    def _atomic(self, target: Path, *, trainer_state: bool) -> Path:
        """The main process writes the checkpoint under a temporary name and renames it into place."""
        if self.main:
            with _deferred_signals(), _writing(target):
                rundir.atomic_directory(target, lambda tmp: self._fill_checkpoint(tmp, trainer_state=trainer_state))
        self.acc.wait_for_everyone()
        return target

    def _restore(self) -> None:
        found = rundir.newest_intact(self.output_dir, say=log if self.main else lambda _: None)
        if found is None:
            if self.main:
                log(f"{self.output_dir}: no complete checkpoint to resume from; starting from step 0")
            return
        step, path = found
        model = self.acc.unwrap_model(self.model)
        if self.recipe.adapter.method == "full":
            from safetensors.torch import load_model as load_weights

            shards = sorted(path.glob("model*.safetensors"))
            for shard in shards:
                load_weights(model, str(shard), strict=len(shards) == 1)
        else:
            from dora_cli.adapters.checkpoint import load_adapter_weights

            load_adapter_weights(model, path)
        self.optimizer.load_state_dict(load_tensors_only(path / STATE_DIR / "optimizer.pt"))
        state = json.loads((path / STATE_DIR / "state.json").read_text())
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        if self.main:
            _truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
            log(f"resuming from {path.name} (step {self.step})")

    def _last_good(self) -> str:
        found = rundir.checkpoints(self.output_dir)
        return f"The last good checkpoint is {found[-1][1]}" if found else "No checkpoint was written"

    # ---- signals --------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            if self.stop_signal is None:
                self.stop_signal = signum
                if self.main:
                    log(f"signal {signum}: saving a checkpoint at the end of the current step, then stopping")

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        """The caller's handlers come back when the run ends (a sweep keeps its own Ctrl-C)."""
        for sig, handler in self._saved_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved_handlers.clear()


class _deferred_signals:
    """Hold SIGINT / SIGTERM while a checkpoint is renamed into place (they are delivered afterwards)."""

    def __enter__(self):
        self.blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.blocked)
        return False


def load_tensors_only(path: Path):
    """torch.load restricted to tensors and plain containers: a file carrying other pickled objects is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise UserError(f"{path}: refused: not a plain tensor file ({str(err).splitlines()[0][:120]})") from None


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with _writing(path):
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)


@contextlib.contextmanager
def _writing(path: Path):
    """A failed write (disk full, read-only, permissions) ends the run with one line naming what failed."""
    try:
        yield
    except OSError as err:
        raise RunFailure(
            f"could not write {path}: {err.strerror or err}; complete checkpoints already written are intact"
        ) from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint a run resumes from (the killed run wrote them)."""
    if not path.is_file():
        return
    kept = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x).get("step", 0) <= step]
    path.write_text("".join(k + "\n" for k in kept))
