"""`dora train RECIPE [key=value ...]`: fine-tune a causal LM from a recipe, on Accelerate.

Features, top to bottom:
- `train(recipe)` (library) / `run_train(path, overrides)` (CLI); `--dry-run` prints the resolved recipe
  and the trainable share (model built on the `meta` device: no weights are loaded) and writes nothing
- one process, or N (`launch.num_processes`, `--nproc`) through Accelerate's launcher (launch.py)
- LoRA / DoRA / VeRA / DVoRA / magnitude-only / full fine-tuning, on fp or 4-/8-bit bases
- deterministic data order: a seeded permutation per epoch, global batches split into micro-batches
  (process k takes micro-batches k, k+P, ...), so N processes see exactly the batches of one
- optional length-grouped order and padding-free packed micro-batches (dora_cli/batching.py)
- gradient accumulation, mixed precision, gradient checkpointing, clipping, a non-finite guard
- speed: the LM head at trained positions only (lm_loss.py), fused AdamW (optim.fused), one device read
  per step, train.compile, CPU threads that leave a busy machine's cores (launch.set_threads)
- checkpoints written atomically with a manifest, `keep_last`, `--resume` from the newest intact one
  (bitwise identical to an uninterrupted run on the CPU), SIGINT / SIGTERM save and exit 130 / 143
  (several processes agree on the step they stop after; checkpoints go through run_state.RunState)
- a progress bar (loss, lr, tokens/s), a log line every `log_every` steps (with the remaining time) and at
  every validation, `metrics.jsonl` (the same records, also to `train.report_to`'s trackers: trackers.py),
  `metrics.json` at the end; the output directory and its files belong to rundir.RunDir
- the recipe is saved with absolute paths (recipe.absolute_paths): its checkpoints work from any directory
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dora_cli import trackers
from dora_cli.batching import real_tokens
from dora_cli.console import duration, say
from dora_cli.errors import RunFailure, Terminated, UserError
from dora_cli.launch import (
    check_launch,
    check_started,
    checks_output_dir,
    cpu_cores,
    effective_config,
    inside_launch,
    make_accelerator,
    needs_launch,
    process_count,
    relaunch,
    set_threads,
    set_wrap,
    stopped_by,
    whole_model_loading,
)
from dora_cli.lm_loss import keeps_selected_logits, loss_terms, trained_positions
from dora_cli.recipe import Recipe, absolute_paths, check_batch, dump_recipe, load_recipe
from dora_cli.run_state import RunState
from dora_cli.rundir import RunDir, RunLock, checkpoints, prune


# ==================================================================================================
# Entry points
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
    """`dora train`: the recipe file with its overrides; returns output_dir/final (None for a dry run)."""
    recipe = load_recipe(recipe_path, overrides)
    if dry_run:
        return print_dry_run(recipe, nproc, resume=resume, overwrite=overwrite)
    return train(recipe, resume=resume, overwrite=overwrite, nproc=nproc)


def check_run(recipe: Recipe, nproc: int | None, *, resume: bool, overwrite: bool) -> tuple[RunDir, int]:
    """(the run directory, the processes): what refuses a run before anything is loaded or written, for the
    run and its dry run alike (trackers, the launch, output_dir and, for --resume, the run's inputs)."""
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc: expected a number of processes >= 1, got {nproc}")
    trackers.check(recipe.train.report_to)
    processes = process_count(recipe, nproc)
    check_launch(recipe, processes)
    run_dir = RunDir(recipe.output_dir)
    if checks_output_dir(recipe):  # the other machines never write to output_dir
        run_dir.check(recipe, resume=resume, overwrite=overwrite)  # before anything is written
    return run_dir, processes


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, nproc: int | None = None) -> Path:
    """Train `recipe` into its output_dir (in `nproc` processes); returns output_dir/final."""
    recipe = absolute_paths(recipe)  # as saved with the run: its checkpoints work from any directory
    run_dir, processes = check_run(recipe, nproc, resume=resume, overwrite=overwrite)
    if resume and not inside_launch() and run_dir.finished():  # its final/ is never written again
        say(f"{run_dir.final}: the run is finished; nothing to resume (--overwrite starts it over)")
        return run_dir.final
    if not inside_launch() and needs_launch(recipe, processes):
        relaunch(recipe, processes, ["--resume"] * resume + ["--overwrite"] * overwrite)
        return run_dir.final
    return Trainer(recipe, run_dir, resume=resume, overwrite=overwrite).run()


def print_dry_run(recipe: Recipe, nproc: int | None, *, resume: bool = False, overwrite: bool = False) -> None:
    """What the run would do, checked as the run checks it (check_run, the data and its trained tokens, the
    plan), from the architecture alone (no weights), then printed: the resolved recipe, the trainable share,
    the data (example counts, token statistics, one training example with its masked text marked)."""
    from dora_cli.adapters import apply_adapters, parameter_report
    from dora_cli.datasets import load_records, split_train_val
    from dora_cli.models import meta_model

    run = absolute_paths(recipe)  # what the run checks and reads
    _, processes = check_run(run, nproc, resume=resume, overwrite=overwrite)
    accumulation = check_batch(run, processes)
    model = meta_model(run.model)
    apply_adapters(model, run.adapter)
    data = run.data
    records = load_records(data)
    train_records, val_records = split_train_val(records, data.val_set_size, data.seed)
    lines = [
        f"# processes: {processes}, gradient accumulation: {accumulation}",
        f"# {parameter_report(model)}",
        f"# data: {len(records)} {data.format} records: {len(train_records)} for training, "
        f"{len(val_records)} for validation",
        *_token_lines(run, train_records, processes),
    ]
    print(dump_recipe(recipe), end="")
    print("\n".join(lines))
    return None


def _token_lines(recipe: Recipe, records: list[dict], processes: int) -> list[str]:
    """Token statistics of the training records and the first of them as trained, after the checks of the
    run (`trained_examples`, `make_plan`); the tokenizer is loaded (a hub tokenizer that cannot be reached
    skips this part, as the architecture falls back to a known one)."""
    from dora_cli.datasets import marked_text, token_stats, tokenize_records
    from dora_cli.models import load_tokenizer, resolve_source

    data = recipe.data
    try:
        tokenizer = load_tokenizer(recipe.model)
    except UserError as err:
        if resolve_source(recipe.model.tokenizer or recipe.model.name_or_path).kind != "hub":
            raise
        return [f"# tokens: not counted, the tokenizer cannot be loaded ({err})"]
    notes: list[str] = []
    kept, _ = trained_examples(recipe, tokenizer, lambda line: notes.append(f"# {line}"))
    plan = make_plan(recipe, len(kept), processes, lambda seed, epoch: list(range(len(kept))))
    examples = tokenize_records(records, tokenizer, data)
    st = token_stats(records, examples, tokenizer, data)
    return [
        *notes,
        f"# tokens per training example (before data.cutoff_len): min {st.shortest}, median {st.median:g}, "
        f"max {st.longest}; {st.cut} of {st.examples} are longer than cutoff_len {data.cutoff_len} and cut",
        f"# trained tokens (with a loss): {st.trained:,} of {st.tokens:,} ({st.trained / max(1, st.tokens):.1%})"
        + (f"; {st.untrained_examples} examples have none and are left out" if st.untrained_examples else ""),
        f"# {plan.total_steps} steps of {plan.batch} examples",
        "# the first training example as trained: [[masked text]] has no loss, the rest is trained",
        marked_text(kept[0], tokenizer),
    ]


def trained_examples(recipe: Recipe, tokenizer, log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """(training examples with a token to learn from, validation examples): the data read, validated and
    tokenised; the run and its dry run refuse the same data. An example whose response is cut off entirely
    by cutoff_len (train_on_inputs false) has no token to learn from (its loss would be 0 / 0): left out,
    and said through `log`."""
    from dora_cli.datasets import build_datasets, trained_labels

    data = recipe.data
    train_set, val_set = build_datasets(data, tokenizer)
    kept = [e for e in train_set if trained_labels(e)]
    if not kept:
        raise UserError("data: no training examples with a response token left (after the validation split and "
                        f"data.cutoff_len={data.cutoff_len}); raise data.cutoff_len or set data.train_on_inputs: true")
    if len(kept) < len(train_set):
        log(f"{len(train_set) - len(kept)} training examples have no response token within "
            f"data.cutoff_len={data.cutoff_len} and are left out")
    return kept, val_set


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
    """The dropout seed of one micro-batch (torch seeds are < 2**64)."""
    return ((seed * 1_000_003 + step) * 10_007 + micro_batch) % 2**64


@dataclass(frozen=True)
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
    order: Callable[[int, int], list[int]]  # (seed, epoch) -> the epoch's permutation (batching.make_order)

    def micro_batches(self, step: int, rank: int, seed: int) -> list[list[int]]:
        """Example indices of the micro-batches process `rank` runs at optimizer step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = self.order(seed, epoch)[i * self.batch : (i + 1) * self.batch]
        chunks = [order[j : j + self.micro] for j in range(0, self.batch, self.micro)]
        return chunks[rank :: self.processes]


def make_plan(recipe: Recipe, examples: int, processes: int, order: Callable[[int, int], list[int]]) -> Plan:
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
    return Plan(examples, t.batch_size, t.micro_batch_size, processes, accumulation, steps_per_epoch, total, warmup, order)


# ==================================================================================================
# The trainer
# ==================================================================================================
@dataclass(frozen=True)
class Setup:
    """Everything built before the first step (and before anything is written)."""

    model: torch.nn.Module  # prepared by Accelerate
    optimizer: torch.optim.Optimizer
    tokenizer: object
    params: list[torch.nn.Parameter]
    train_set: list[dict]
    val_set: list[dict]
    collate: object  # training micro-batches (packed with data.packing)
    eval_collate: object  # validation batches (right-padded)
    plan: Plan
    report: object  # adapters.ParamReport
    launch: tuple[dict, dict | None]  # launch.effective_config: accelerate.yaml, deepspeed.json
    selective_logits: bool  # the LM head runs on trained positions only (lm_loss.py)
    start: dict[str, torch.Tensor]  # the adapter's initial tensors (PEFT keys, CPU): how far training moved them


def make_setup(recipe: Recipe, acc, log) -> Setup:
    """Everything that can refuse the run, before anything is written: model, adapters, data, plan,
    optimizer, prepared for the strategy. `log(line)`: the run log (main process)."""
    from dora_cli.adapters import apply_adapters, parameter_report
    from dora_cli.adapters.change import layer_tensors
    from dora_cli.batching import check_packing, make_collate, make_order
    from dora_cli.datasets import make_collator
    from dora_cli.models import load_model

    r = recipe
    with whole_model_loading(acc):
        model, tokenizer = load_model(r.model, for_training=True)
    apply_adapters(model, r.adapter)
    # The initial values (a resumed run draws the same ones: the seed is set before the adapters are made).
    start = layer_tensors(model)
    check_packing(model, r.data)
    report = parameter_report(model)
    kept, val_set = trained_examples(r, tokenizer, log)
    order = make_order(r.data, [len(e["input_ids"]) for e in kept], r.train.batch_size)
    plan = make_plan(r, len(kept), acc.num_processes, order)
    selective = keeps_selected_logits(model)  # asked before wrappers hide the forward's signature
    o = r.optim
    fused = o.fused if o.fused is not None else acc.distributed_type.name in ("NO", "MULTI_CPU", "MULTI_GPU")
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=o.lr, betas=o.betas, eps=o.eps,
        weight_decay=o.weight_decay, fused=fused or None,
    )
    set_wrap(acc, model)
    model, optimizer = acc.prepare(model, optimizer)
    if r.train.compile:
        model.compile()  # in place: parameter names, unwrapping and checkpoints are unchanged
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP's sharded ones, after prepare
    collate, eval_collate = make_collate(r.data, tokenizer), make_collator(tokenizer)
    return Setup(model, optimizer, tokenizer, params, kept, val_set, collate, eval_collate, plan, report,
                 effective_config(acc, r), selective, start)


@dataclass
class Eta:
    """The remaining time, from the pace of the steps this process ran so far (resumed steps excluded)."""

    first_step: int
    total: int
    started: float = field(default_factory=time.perf_counter)

    def remaining(self, step: int) -> float | None:
        done = step - self.first_step
        return (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else None


@dataclass
class Window:
    """What happened since the last log line."""

    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


class Trainer:
    """One training run: setup, claim the output directory, the loop, the final save."""

    def __init__(self, recipe: Recipe, run_dir: RunDir, *, resume: bool, overwrite: bool):
        self.recipe = recipe
        self.dir = run_dir
        self.resume = resume
        self.overwrite = overwrite
        self.acc = None  # the Accelerator, made in run()
        self.threads = ""  # what set_threads did, for the log
        self.s: Setup | None = None
        self.state: RunState | None = None  # checkpoints in and out (run_state.py)
        self.step = 0
        self.tokens_seen = 0
        self.seconds_before = 0.0  # training seconds up to the checkpoint a resumed run starts from
        self.loop_started = time.perf_counter()
        self.skipped = 0
        self.eta: Eta | None = None
        self.last_val: tuple[int, float] | None = None  # (step, validation loss) of the newest validation
        self.signals = StopSignals(self.log)
        self.stop_signal: int | None = None  # the signal every process stops for (after the same step)

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def log(self, message: str) -> None:
        if self.main:
            self.dir.log(message)

    # ---- setup ----------------------------------------------------------------------------------------
    def run(self) -> Path:
        from accelerate.utils import set_seed

        r = self.recipe
        self.acc = make_accelerator(r, **trackers.accelerator_options(r, self.dir))
        check_started(self.acc, r)  # the processes and strategy asked for, before anything is set up
        # One process stops at once when signalled during setup; several note the signal, finish setting up
        # and stop together (one alone would leave the others waiting in a collective).
        self.signals.immediate = self.acc.num_processes == 1
        with self.signals:
            self.threads = set_threads(r.train.threads, self.acc.device.type)
            set_seed(r.train.seed)
            self.s = make_setup(r, self.acc, self.log)  # everything that can refuse the run, before anything is written
            self._stop_if_signalled_in_setup()
            self.signals.immediate = False
            return self._claim_and_train()

    def _stop_if_signalled_in_setup(self) -> None:
        """Several processes: stop, all of them, before anything is written when any was signalled."""
        if self.acc.num_processes == 1:
            return
        signum = int(self._agreed_signal().item())
        if signum:
            self.log(f"interrupted by signal {signum} while setting up: nothing written")
            raise SystemExit(stopped_by(signum, self.acc.is_local_main_process))

    def _claim_and_train(self) -> Path:
        self.state = RunState(self.acc, self.recipe, self.dir, self.s.model, self.s.optimizer, self.s.tokenizer)
        lock = RunLock(self.dir.path)
        if self.main:
            lock.acquire()
        try:
            self.acc.wait_for_everyone()
            self._claim()
            return self._loop()
        finally:
            trackers.finish(self.acc)
            self.dir.close()
            self.acc.wait_for_everyone()
            if self.main:
                lock.release()
            if self.acc.num_processes > 1:
                self.acc.end_training()  # the process group closed on every process before any exits

    def _claim(self) -> None:
        """Under the lock: clear / mark the directory, resume, write the recipe, say what will happen."""
        if self.main:
            self.dir.claim(self.recipe, overwrite=self.overwrite)
            if self.recipe.model.trust_remote_code:
                self.log("model.trust_remote_code is on: the model's own Python code runs")
        self.acc.wait_for_everyone()
        if self.resume:
            self._restore()
        if self.main:
            s, plan = self.s, self.s.plan
            self.dir.write_recipe(dump_recipe(self.recipe))
            self.dir.write_launch(*s.launch)
            self.log(f"{s.report}")
            self.log(self._setup_line())
            self.log(self.threads)
            self.log(
                f"{len(s.train_set)} training examples, {len(s.val_set)} validation; "
                f"{plan.total_steps} steps of {plan.batch} ({plan.accumulation} x {plan.micro} x {plan.processes} processes)"
            )
        trackers.start(self.acc, self.recipe, self.dir, self.step)

    def _setup_line(self) -> str:
        """How the run is spread: the strategy, the processes and the main process's share of the state."""
        from dora_cli.gather import optimizer_share, weight_share

        acc = self.acc
        model = acc.unwrap_model(self.s.model)
        weights, state = weight_share(model), optimizer_share(model, self.s.optimizer)
        processes = f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''}"
        defaults = getattr(self.s.optimizer, "defaults", {})
        kind = " (fused)" if defaults.get("fused") else ""
        return (f"setup: {acc.distributed_type.name} on {acc.device.type}, {processes}; the main process holds "
                f"{weights:.0%} of the weights and {state:.0%} of the optimizer state; AdamW{kind}"
                + ("; compiled" if self.recipe.train.compile else ""))

    # ---- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> Path:
        t, plan = self.recipe.train, self.s.plan
        self.loop_started = time.perf_counter()
        last_saved = self.step if self.step else -1  # a resumed run's checkpoint
        window, first_loss = Window(), None
        self.eta = Eta(self.step, plan.total_steps)
        self.s.model.train()
        with self._progress() as progress:
            task = progress.add_task("train", total=plan.total_steps, completed=self.step, stats="")
            while self.step < plan.total_steps and self.stop_signal is None:
                lr = self._set_lr()
                stats = self._accumulate()
                if stats is None:  # one process, interrupted mid-step: the step is dropped
                    self.stop_signal = self.signals.received
                    break
                # The step's one read from the device: the non-finite guard needs the loss and the norm, and
                # every process learns whether any was signalled (they stop after the same step).
                loss, tokens, signal_number, grad_norm = torch.cat([stats, self._grad_norm()[None]]).tolist()
                tokens, self.stop_signal = int(tokens), int(signal_number) or None
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    self._skip_nonfinite(loss, grad_norm)
                    continue
                self._optimizer_step(tokens)
                first_loss = loss if first_loss is None else first_loss
                window.loss_sum, window.steps, window.tokens = window.loss_sum + loss, window.steps + 1, window.tokens + tokens
                if self.step % t.log_every == 0 or self.step == plan.total_steps:
                    record = self._log_step(window, lr, grad_norm)
                    progress.update(task, completed=self.step, stats=bar_stats(record))
                    window = Window()
                else:
                    progress.update(task, completed=self.step)
                last_saved = self._after_step(last_saved)

        if self.stop_signal is not None:
            self._stop(last_saved)
        val_loss = self._validate() if self.s.val_set else None
        final = self._save(self.dir.final, trainer_state=False)
        changes = self._adapter_change()
        if self.main:
            warnings = self._magnitude_warning(changes)
            self._write_metrics(first_loss, val_loss, changes, warnings)
            self.log(f"done: {final}")
        return final

    def _adapter_change(self) -> dict:
        """tensor_changes of the adapter from its initial values (collective: sharded tensors are gathered)."""
        from dora_cli.adapters import adapter_tensors
        from dora_cli.adapters.change import tensor_changes
        from dora_cli.gather import gather_all

        if not self.s.start:
            return {}
        return tensor_changes(self.s.start, gather_all(adapter_tensors(self.acc.unwrap_model(self.s.model))))

    def _magnitude_warning(self, changes: dict) -> list[str]:
        """A run that took steps (at optim.lr > 0: the schema's rule) and left a magnitude exactly where it
        started (frozen, or every update rounded away): one warning line, in the log and in metrics.json."""
        from dora_cli.adapters.change import untrained_magnitudes

        idle = untrained_magnitudes(changes)
        lr = self.recipe.optim.lr
        if not idle or self.step == 0:
            return []
        line = (f"the magnitude did not train: the {', '.join(idle)} magnitude{'s are' if len(idle) > 1 else ' is'} "
                f"exactly {'their' if len(idle) > 1 else 'its'} initial value after {self.step} steps at optim.lr {lr:g} "
                "(frozen, or every update rounded away?)")
        self.log(f"warning: {line}")
        return [line]

    def _set_lr(self) -> float:
        r, plan = self.recipe, self.s.plan
        lr = r.optim.lr * lr_factor(self.step, plan.total_steps, plan.warmup, r.schedule.type)
        for group in self.s.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _accumulate(self) -> torch.Tensor | None:
        """Forward and backward over this process's micro-batches of the step: [mean loss, tokens, signal]
        over all processes (signal: the largest number any process received, 0 for none), on the device
        (nothing read back here). One process stops at the next micro-batch when signalled (None); several
        finish the step together, since each one's collectives wait for the others'."""
        acc, s = self.acc, self.s
        chunks = s.plan.micro_batches(self.step, acc.process_index, self.recipe.train.seed)
        losses, tokens = [], 0
        for j, chunk in enumerate(chunks):
            if self.signals.received is not None and acc.num_processes == 1:
                s.optimizer.zero_grad(set_to_none=True)
                return None
            # Dropout masks are a function of (seed, step, micro-batch): the same for any number of
            # processes, and nothing to restore on resume.
            torch.manual_seed(micro_batch_seed(self.recipe.train.seed, self.step, acc.process_index + j * acc.num_processes))
            batch = s.collate([s.train_set[i] for i in chunk])
            tokens += real_tokens(batch)  # counted on the host copy: no device read
            batch, keep = self._on_device(batch)
            with self._sync(j == len(chunks) - 1):
                with acc.autocast():
                    total, count = loss_terms(s.model, batch, keep)
                    loss = total / count
                acc.backward(loss / len(chunks))
            losses.append(loss.detach())
        device = acc.device
        stats = torch.stack([torch.stack(losses).double().mean(), torch.tensor(float(tokens), dtype=torch.float64, device=device)])
        if acc.num_processes > 1:
            stats = acc.reduce(stats, reduction="sum") / torch.tensor([acc.num_processes, 1.0], dtype=torch.float64, device=device)
        return torch.cat([stats, self._agreed_signal()])

    def _agreed_signal(self) -> torch.Tensor:
        """[the largest signal number any process received, 0 for none] on the device; collective when
        several processes run (every one calls it at the same point)."""
        received = torch.tensor([float(self.signals.received or 0)], dtype=torch.float64, device=self.acc.device)
        return self.acc.gather(received).max()[None] if self.acc.num_processes > 1 else received

    def _on_device(self, batch: dict) -> tuple[dict, torch.Tensor | None]:
        """The batch on the device, and the positions whose logits the loss needs (found on the host
        copy: lm_loss.py), or None for all."""
        device = self.acc.device
        keep = trained_positions(batch["labels"]).to(device) if self.s.selective_logits else None
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}, keep

    def _sync(self, last: bool):
        """Gradients are reduced across processes at the last micro-batch of a step only (DDP / FSDP:
        no_sync before it; DeepSpeed: the accumulation boundary, where its engine also steps)."""
        self.acc.sync_gradients = last
        return contextlib.nullcontext() if last else self.acc.no_sync(self.s.model)

    def _grad_norm(self) -> torch.Tensor:
        max_norm = self.recipe.train.max_grad_norm
        norm = self.acc.clip_grad_norm_(self.s.params, max_norm if max_norm else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor
        return torch.as_tensor(norm, dtype=torch.float64).reshape(()).to(self.acc.device)

    def _optimizer_step(self, tokens: int) -> None:
        self.s.optimizer.step()
        self.s.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        """A NaN / inf loss or gradient: skip the step (up to train.skip_nonfinite times), else stop."""
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
        limit = self.recipe.train.skip_nonfinite
        if self.skipped >= limit:
            found = checkpoints(self.dir.path)
            last = f"The last good checkpoint is {found[-1][1]}" if found else "No checkpoint was written"
            raise RunFailure(
                f"step {self.step + 1}: the {what} is {value}; training stopped. {last} (lower optim.lr, or set train.skip_nonfinite)"
            )
        self.skipped += 1
        self.s.optimizer.zero_grad(set_to_none=True)
        self._event({"step": self.step + 1, "skipped": f"non-finite {what} ({value})"})
        self.log(f"step {self.step + 1}: non-finite {what} ({value}); skipped ({self.skipped}/{limit})")
        self.step += 1

    def _after_step(self, last_saved: int) -> int:
        """Validation and checkpoints due at this step; returns the step of the newest checkpoint."""
        t = self.recipe.train
        if t.eval_every and self.step % t.eval_every == 0 and self.s.val_set:
            self._validate()
        if t.save_every and self.step % t.save_every == 0:
            self._save(self.dir.checkpoint(self.step), trainer_state=True)
            if self.main:
                prune(self.dir.path, t.keep_last)
            return self.step
        return last_saved

    def _stop(self, last_saved: int) -> None:
        """After SIGINT / SIGTERM: a checkpoint of the last finished step, then exit 128 + signal."""
        if last_saved != self.step:
            self._save(self.dir.checkpoint(self.step), trainer_state=True)
        self.log(f"interrupted by signal {self.stop_signal}: saved checkpoint-{self.step}; continue with --resume")
        raise SystemExit(stopped_by(self.stop_signal, self.acc.is_local_main_process))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the validation set (each process takes its share)."""
        acc, s = self.acc, self.s
        s.model.eval()
        micro, processes = s.plan.micro, acc.num_processes
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
        # Every process runs as many forward passes (FSDP and ZeRO-3 gather weights in each): one whose
        # share has run out repeats the first batch and does not count it.
        for rnd in range(math.ceil(len(s.val_set) / (micro * processes))):
            start = (rnd * processes + acc.process_index) * micro
            counted = start < len(s.val_set)
            batch = s.eval_collate(s.val_set[start : start + micro] if counted else s.val_set[:micro])
            batch, keep = self._on_device(batch)
            with acc.autocast():
                total, count = loss_terms(s.model, batch, keep)
            if counted:
                totals += torch.stack([total.double(), count.double()])
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        s.model.train()
        return totals[0].item() / max(1.0, totals[1].item())

    # ---- logging ----------------------------------------------------------------------------------------
    def _progress(self):
        """The bar: step, elapsed, remaining and (from the first log step on) loss, lr and tokens/s."""
        from dora_cli.console import progress_bar, stderr_is_terminal

        return progress_bar(self.main and stderr_is_terminal(), fields="{task.fields[stats]}")

    def _validate(self) -> float:
        """The validation loss at this step (computed once per step): metrics.jsonl, trackers, the log."""
        if self.last_val is not None and self.last_val[0] == self.step:
            return self.last_val[1]
        val_loss = self.evaluate()
        self.last_val = (self.step, val_loss)
        self._event({"step": self.step, "val_loss": val_loss})
        self.log(f"step {self.step}/{self.s.plan.total_steps}  val loss {val_loss:.4f}")
        return val_loss

    def _log_step(self, window: Window, lr: float, grad_norm: float) -> dict:
        elapsed = time.perf_counter() - window.started
        record = {
            "step": self.step,
            "epoch": round(self.step / self.s.plan.steps_per_epoch, 4),
            "loss": window.loss_sum / max(1, window.steps),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": window.tokens / elapsed if elapsed > 0 else 0.0,
            "peak_memory_mb": peak_memory_mb(),
        }
        self._event(record)
        remaining = self.eta.remaining(self.step) if self.step < self.s.plan.total_steps else None
        self.log(
            f"step {self.step}/{self.s.plan.total_steps}  {bar_stats(record)}  grad {grad_norm:.3f}"
            + (f"  eta {duration(remaining)}" if remaining is not None else "")
        )
        return record

    def _event(self, record: dict) -> None:
        """One record: metrics.jsonl and the trackers of train.report_to."""
        if self.main:
            self.dir.log_event(record)
        trackers.log(self.acc, record)

    def _write_metrics(self, first_loss: float | None, val_loss: float | None, changes: dict, warnings: list[str]) -> None:
        losses = [e["loss"] for e in self.dir.events() if "loss" in e]
        report = self.s.report
        self.dir.write_metrics({
            "method": self.recipe.adapter.method,
            "train_loss": losses[-1] if losses else None,
            "train_loss_first": losses[0] if losses else first_loss,
            "val_loss": val_loss,
            "steps": self.step,
            "epochs": round(self.step / self.s.plan.steps_per_epoch, 4),
            "tokens": self.tokens_seen,
            "wall_time_s": round(self._trained_seconds(), 3),  # over every invocation of a resumed run
            "trainable_params": report.trainable,
            "total_params": report.total,
            "trainable_percent": report.percent,
            "peak_memory_mb": peak_memory_mb(),
            "processes": self.acc.num_processes,
            "adapter_change": changes,
            "warnings": warnings,
            "expected": self.recipe.expected,
        })

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _trained_seconds(self) -> float:
        """Seconds of training that led here: this invocation's loop, plus the earlier ones' up to the checkpoint
        it resumed from (the steps an interruption lost, redone here, are counted once)."""
        return self.seconds_before + time.perf_counter() - self.loop_started

    def _save(self, target: Path, *, trainer_state: bool) -> Path:
        counters = {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": round(self._trained_seconds(), 3)}
        if self.acc.device.type == "cpu":
            counters["threads"] = torch.get_num_threads()
        counters = counters if trainer_state else None
        return self.state.save(target, counters)

    def _restore(self) -> None:
        found = self.state.restore(say=self.log)
        if found is None:
            self.log(f"{self.dir.path}: no complete checkpoint to resume from; starting from step 0")
            return
        name, counters = found
        self.step, self.tokens_seen = int(counters["step"]), int(counters["tokens_seen"])
        self.seconds_before = float(counters.get("train_seconds", 0.0))  # a checkpoint of an older version has none
        threads = counters.get("threads")  # saved by a run on the CPU
        if self.recipe.train.threads is None and self.acc.device.type == "cpu" and isinstance(threads, int) and threads > 0:
            # Some CPU reductions sum in another order on another number of threads: the resumed run takes
            # the interrupted one's, so it stays bitwise the same run (never more than this machine's cores).
            threads = min(threads, cpu_cores())
            torch.set_num_threads(threads)
            self.threads = f"threads: {threads} (as the run being resumed)"
        if self.main:
            self.dir.truncate_events(self.step)
        self.log(f"resuming from {name} (step {self.step})")


class StopSignals:
    """SIGINT / SIGTERM set `received` (the loop saves and stops at the end of the step) instead of killing
    the process; the caller's handlers come back on exit (a sweep keeps its own Ctrl-C)."""

    def __init__(self, say):
        self.say = say
        self.received: int | None = None
        self.immediate = False  # raise KeyboardInterrupt / Terminated instead (nothing to save yet)
        self._saved: dict = {}

    def __enter__(self) -> StopSignals:
        def handler(signum, _frame):
            if self.immediate:
                raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
            if self.received is None:
                self.received = signum
                self.say(f"signal {signum}: stopping at the end of the current step, with a checkpoint once training runs")

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()


def bar_stats(record: dict) -> str:
    """Loss, lr and tokens/s of a log-step record, as the bar and the log line show them."""
    return f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
