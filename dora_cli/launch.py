"""Many processes: `dora train` again under Accelerate's launcher, Accelerate's setup from the recipe,
and a record of what ran.

    processes = process_count(recipe, nproc)      # WORLD_SIZE inside a launch, else --nproc / launch.*
    check_launch(recipe, processes)               # before anything is written: DeepSpeed installed, ...
    if needs_launch(recipe, processes) and not inside_launch():
        relaunch(recipe, processes, flags)          # returns when every process has ended
    acc = make_accelerator(recipe)                  # in each process
    with whole_model_loading(acc): load the model   # ZeRO-3 partitions it at prepare, not while loading
    set_wrap(acc, model)                            # FSDP: the layer classes that become units
    acc.prepare(...); effective_config(acc, recipe) # -> output_dir/accelerate.yaml (+ deepspeed.json)

Inside a launch (`DORA_LAUNCHED=1`, or `LOCAL_RANK` set by torchrun / accelerate launch / srun) the
command trains as one of the processes. The strategy and its settings come from the recipe's `launch:`
section, whatever started the processes, so `dora train` runs unchanged under an external launcher;
only an Accelerate config file (launch.config_file, or the one an external `accelerate launch` was
given) replaces them, used as given. Nothing else is set: DeepSpeed's gradient clipping is
train.max_grad_norm (0: none), and dora accumulates micro-batches itself (DeepSpeed's
gradient_accumulation_steps is 1; the step boundary is set on each micro-batch).

On a machine without CUDA the processes talk over gloo. Accelerate itself runs FSDP and DeepSpeed on
GPUs only (on a CPU it silently falls back to DDP): here the Accelerator is built for gloo and then
switched to the requested strategy, so Accelerate's own FSDP / DeepSpeed preparation runs, and a setup
that still differs from the request is an error, never a fallback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

from dora_cli.console import say
from dora_cli.errors import RunFailure, Terminated, UserError, clip, did_you_mean, one_of
from dora_cli.recipe import Recipe, check_batch, dump_recipe
from dora_cli.rundir import DEEPSPEED_NAME

ACCELERATE_TYPES = {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}
ASKED_PROCESSES, ASKED_STRATEGY, REFUSAL_FILE = "DORA_ASKED_PROCESSES", "DORA_ASKED_STRATEGY", "DORA_REFUSAL_FILE"
"""What the command that launched the processes asked for (check_started compares it with what started)."""
MULTI_MACHINE_PORT = 29500


# ---- who launches ----------------------------------------------------------------------------------
def inside_launch() -> bool:
    """This process is one of a launched group (ours, torchrun's, accelerate's or srun's)."""
    return os.environ.get("DORA_LAUNCHED") == "1" or "LOCAL_RANK" in os.environ


def checks_output_dir(recipe: Recipe) -> bool:
    """This process checks output_dir before any work: a command not launched by us (ours re-runs only
    after the check), and under an external launcher only global rank 0, on machine 0."""
    if os.environ.get("DORA_LAUNCHED") == "1" or recipe.launch.machine_rank != 0:
        return False
    return int(os.environ.get("RANK", "0")) == 0


def process_count(recipe: Recipe, nproc: int | None) -> int:
    """How many processes train: WORLD_SIZE inside a launch, else launch.config_file's num_processes,
    else --nproc, else launch.num_processes."""
    if inside_launch():
        return int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.launch.config_file is not None:
        given = int(user_config(recipe).get("num_processes", 1))
        if nproc is not None and nproc != given:
            raise UserError(f"--nproc {nproc}: launch.config_file {recipe.launch.config_file} runs {given} processes; drop --nproc")
        return given
    return nproc if nproc is not None else recipe.launch.num_processes


def needs_launch(recipe: Recipe, processes: int) -> bool:
    """The run goes through the launcher: several processes or machines, FSDP / DeepSpeed (one process
    too, e.g. ZeRO-Offload on one GPU), or the user's own Accelerate config."""
    launch = recipe.launch
    return processes > 1 or launch.num_machines > 1 or launch.strategy != "ddp" or launch.config_file is not None


def user_config(recipe: Recipe) -> dict:
    """launch.config_file, read (a YAML mapping as `accelerate config` writes it)."""
    path = Path(recipe.launch.config_file)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UserError(f"launch.config_file: cannot read {path} ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise UserError(f"launch.config_file: {path} is not YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"launch.config_file: {path} is not an Accelerate config (expected a mapping)")
    _check_user_config(data, path)
    return data


_CONFIG_COUNTS = {"num_processes": 1, "num_machines": 1, "machine_rank": 0, "main_process_port": 1}
"""Numbers of an Accelerate config that dora reads or Accelerate parses before any work, with their least value."""


def _check_user_config(data: dict, path: Path) -> None:
    from accelerate.utils import DistributedType

    kinds = [t.value for t in DistributedType]
    kind = data.get("distributed_type")
    if kind not in kinds:  # Accelerate requires it, spelt exactly
        got = "nothing" if kind is None else clip(repr(kind), 60)
        raise UserError(f"launch.config_file: {path}: distributed_type: expected one of {one_of(kinds)}, got "
                        f"{got}{did_you_mean(str(kind).upper(), kinds) if kind is not None else ''}")
    for key, least in _CONFIG_COUNTS.items():
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise UserError(f"launch.config_file: {path}: {key}: expected an integer >= {least}, got {clip(repr(value), 60)}")


def requested_strategy(recipe: Recipe) -> str:
    """ddp, fsdp or deepspeed: the recipe's, or that of its launch.config_file."""
    if recipe.launch.config_file is not None:
        return ACCELERATE_TYPES.get(str(user_config(recipe).get("distributed_type", "")).upper(), "ddp")
    return recipe.launch.strategy


def check_launch(recipe: Recipe, processes: int) -> None:
    """Refuse, before anything is written, a launch that cannot start."""
    check_batch(recipe, processes)
    strategy = requested_strategy(recipe)
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("launch.strategy deepspeed: DeepSpeed is not installed (pip install 'dora_cli[deepspeed]')")
    if strategy == "deepspeed" and recipe.train.skip_nonfinite:
        raise UserError(
            "train.skip_nonfinite: DeepSpeed applies the optimizer step inside the last backward, before the loss "
            "can be checked, so a non-finite step cannot be skipped; set it to 0 (a non-finite loss then stops the run)"
        )
    if recipe.launch.wrap:  # the architecture alone (no weights) tells the layer classes
        from dora_cli.models import meta_model

        wrap_classes(recipe.launch.wrap, meta_model(recipe.model))


# ---- the relaunch ----------------------------------------------------------------------------------
def launcher_config(recipe: Recipe, processes: int) -> dict:
    """The config file `accelerate launch` gets from us: processes and machines only (the strategy is set
    up inside each process, from the recipe)."""
    launch = recipe.launch
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",  # on a machine without CUDA too: torchrun starts the processes
        "num_processes": processes,
        "num_machines": launch.num_machines,
        "machine_rank": launch.machine_rank,
        "main_process_ip": launch.main_process_ip,
        "main_process_port": launch.main_process_port or main_port(launch.num_machines),
        "mixed_precision": recipe.train.mixed_precision,
        "use_cpu": False,  # the device is chosen in each process (make_accelerator)
        "rdzv_backend": "static",
        "same_network": True,
        "dynamo_config": {},
        "main_training_function": "main",
    }


def main_port(machines: int) -> int:
    """A free local port on one machine; Accelerate's usual port across machines (all must agree)."""
    if machines > 1:
        return MULTI_MACHINE_PORT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(recipe_file: Path, config_file: Path, flags: list[str]) -> list[str]:
    """argv of the relaunch: a list, never a shell string."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        "-m", "dora_cli.cli", "train", str(recipe_file), *flags,
    ]


def relaunch(recipe: Recipe, processes: int, flags: list[str]) -> None:
    """Train `recipe` (resolved, written to a temporary recipe file) in `processes` processes; exits with
    their status when they fail."""
    with tempfile.TemporaryDirectory(prefix="dora-launch-") as tmp:
        recipe_file = Path(tmp) / "train.yaml"
        recipe_file.write_text(dump_recipe(recipe))
        if recipe.launch.config_file is not None:
            config_file = Path(recipe.launch.config_file)
        else:
            config_file = Path(tmp) / "accelerate.yaml"
            config_file.write_text(yaml.safe_dump(launcher_config(recipe, processes)))
        stop_file, refusal_file = Path(tmp) / "stopped", Path(tmp) / "refused"
        env = dict(os.environ, DORA_LAUNCHED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   DORA_STOP_FILE=str(stop_file), **{ASKED_PROCESSES: str(processes), REFUSAL_FILE: str(refusal_file),
                                                    ASKED_STRATEGY: requested_strategy(recipe)})
        machines = f" on machine {recipe.launch.machine_rank} of {recipe.launch.num_machines}" if recipe.launch.num_machines > 1 else ""
        say(f"launching {processes} processes ({requested_strategy(recipe)}){machines}")
        launcher = subprocess.Popen(launch_command(recipe_file, config_file, flags), env=env, start_new_session=True)
        forwarded: list[int] = []
        code = _wait_forwarding_signals(launcher, forwarded)
        stopped = stop_file.read_text().strip() if stop_file.is_file() else ""
        refused = refusal_file.read_text().strip() if refusal_file.is_file() else ""
    if refused:
        raise UserError(refused)
    signum = int(stopped) if stopped.isdigit() else forwarded[0] if forwarded and code != 0 else None
    if signum is not None:  # as if the signal had stopped this process: Ctrl-C 130, SIGTERM 143
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
    if code != 0:
        raise SystemExit(code)


def _wait_forwarding_signals(launcher: subprocess.Popen, forwarded: list[int]) -> int:
    """Wait for the launcher, handing SIGINT / SIGTERM (noted in `forwarded`) on to the training processes
    themselves: they finish the step together, save a checkpoint, and a main one leaves the signal in
    DORA_STOP_FILE (see stopped_by). The launcher runs in its own session and is not signalled: torch's
    would stop the processes on its own terms and end in a traceback. (A scheduler that signals every
    process of the job, as Slurm does, reaches the launcher too: then torch's launcher stops them.)"""
    if threading.current_thread() is not threading.main_thread():  # no signal handlers off the main thread
        return launcher.wait()

    def forward(signum, _frame):
        forwarded.append(signum)
        for pid in _children(launcher.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not _children(launcher.pid):
            launcher.send_signal(signum)  # no-op once the launcher has been reaped

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return launcher.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _children(pid: int) -> list[int]:
    """The direct children of a process (Linux /proc; [] elsewhere)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def stopped_by(signum: int, local_main: bool) -> int:
    """The exit status of a training process stopped by `signum`: 128 + signum; 0 inside our own launch
    (torch's launcher reports any other status as a crash), where the main process of each machine leaves
    the signal for that machine's command."""
    stop_file = os.environ.get("DORA_STOP_FILE") if os.environ.get("DORA_LAUNCHED") == "1" else None
    if stop_file is None:
        return 128 + signum
    if local_main:
        Path(stop_file).write_text(str(signum))
    return 0


# ---- the Accelerator, in each process ----------------------------------------------------------------
def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def launcher_strategy() -> str | None:
    """The strategy an Accelerate config file chose for this process (through `accelerate launch`'s
    environment), None when none did."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return None


def strategy_here(recipe: Recipe) -> tuple[str, bool]:
    """(strategy, from the launcher's config file) of this process."""
    chosen = launcher_strategy()
    if chosen is None:
        return ("ddp", True) if recipe.launch.config_file is not None else (recipe.launch.strategy, False)
    if recipe.launch.strategy != "ddp":
        raise UserError(
            f"launch.strategy: {recipe.launch.strategy}, but the launcher's Accelerate config already sets up {chosen}: "
            "leave launch.strategy and its settings unset, or launch without that config"
        )
    return chosen, True


def make_accelerator(recipe: Recipe, **options):
    """The Accelerator of this process, set up for the recipe's strategy (or the launcher's config);
    `options`: further Accelerator arguments (the trackers')."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    # Accelerate keeps one mixed precision per process and refuses another; a process that trains again
    # (the library API, sweep-rank's trials) starts from the recipe's. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    strategy, from_file = strategy_here(recipe)
    cuda = torch.cuda.is_available()
    kwargs: dict = {"mixed_precision": recipe.train.mixed_precision, **options}
    plugin = None
    if strategy == "deepspeed":
        plugin = deepspeed_plugin(recipe, from_file)
        kwargs["deepspeed_plugin"] = plugin
        if not cuda:  # DeepSpeed's CPU accelerator over gloo
            os.environ.pop("ACCELERATE_USE_CPU", None)
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif strategy == "fsdp":
        plugin = fsdp_plugin(recipe, from_file)
        kwargs.update({"fsdp_plugin": plugin, "parallelism_config": hybrid_mesh(recipe)} if cuda else {"cpu": True})
    else:
        kwargs["cpu"] = not cuda
    acc = Accelerator(**kwargs)
    if strategy == "fsdp" and not cuda:
        _fsdp_over_gloo(acc, plugin, recipe)
    expected = {"fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}.get(strategy)
    if expected is not None and acc.distributed_type != expected:
        raise RunFailure(f"launch.strategy {strategy}: Accelerate set up {acc.distributed_type.name} instead; stopping rather than training differently")
    return acc


def check_started(acc, recipe: Recipe) -> None:
    """In each process, before anything is set up: the processes and the strategy that started are those that
    were asked for (by the launching command: --nproc, launch.*, launch.config_file; under an external
    launcher, its WORLD_SIZE), for DDP as for FSDP / DeepSpeed. A launcher that quietly ran one process
    (an Accelerate config whose distributed_type it does not start here) is refused, in one line."""
    asked = int(os.environ.get(ASKED_PROCESSES) or os.environ.get("WORLD_SIZE") or 1)
    strategy = os.environ.get(ASKED_STRATEGY) or strategy_here(recipe)[0]
    kind = acc.distributed_type.name
    started = ACCELERATE_TYPES.get(kind, "ddp")
    if acc.num_processes == asked and started == strategy:
        return
    source = f"launch.config_file {recipe.launch.config_file}" if recipe.launch.config_file else "the recipe's launch section"
    message = (
        f"launch: {asked} process{'es' if asked != 1 else ''} with {strategy} were asked for ({source}), but "
        f"{acc.num_processes} started with {started} (Accelerate set up {kind}); nothing was trained"
        + ("; Accelerate starts several CPU processes for distributed_type MULTI_GPU (through torchrun), not for "
           "MULTI_CPU without MPI" if kind == "NO" and recipe.launch.config_file else "")
    )
    refusal = os.environ.get(REFUSAL_FILE) if os.environ.get("DORA_LAUNCHED") == "1" else None
    if refusal is not None:  # every process agrees: all end quietly, the launching command says why (one line)
        if acc.is_main_process:
            Path(refusal).write_text(message)
        raise SystemExit(0)
    if not acc.is_main_process:
        raise SystemExit(2)  # the main process says why, once
    raise UserError(message)


def _fsdp_over_gloo(acc, plugin, recipe: Recipe) -> None:
    """Accelerate runs FSDP on accelerators only; on a CPU its state (MULTI_CPU, gloo initialised) is
    switched to FSDP, and `prepare` then shards the model as it does on GPUs."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if acc.num_processes == 1 and not torch.distributed.is_initialized():
        raise RunFailure("launch.strategy fsdp: no process group was set up (run through the launcher)")
    if recipe.train.mixed_precision != "no":
        plugin.set_mixed_precision(recipe.train.mixed_precision)
    mesh = hybrid_mesh(recipe)
    if mesh is not None:
        acc.state.parallelism_config = mesh
        acc.state.device_mesh = mesh.get_device_mesh("cpu")
    PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState copies it back from here
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin


def hybrid_mesh(recipe: Recipe):
    """FSDP hybrid sharding: shard within a machine, replicate across machines (None otherwise)."""
    launch = recipe.launch
    if launch.sharding != "hybrid":
        return None
    from accelerate.parallelism_config import ParallelismConfig

    processes = int(os.environ.get("WORLD_SIZE", launch.num_processes))
    return ParallelismConfig(dp_replicate_size=launch.num_machines, dp_shard_size=processes // launch.num_machines)


def fsdp_plugin(recipe: Recipe, from_file: bool):
    """Accelerate's FSDP2 plugin: from the recipe, or (from_file) from the launcher's config."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    if from_file:
        plugin = FullyShardedDataParallelPlugin()
        if plugin.cpu_ram_efficient_loading:
            raise UserError(
                "launch.config_file: fsdp_cpu_ram_efficient_loading true loads the weights on the main process only, "
                "but the adapters start from every process's base weights: set it to false"
            )
        return plugin
    launch = recipe.launch
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=launch.sharding != "grad-op",
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=launch.wrap,  # None: the model's own, set by set_wrap
        state_dict_type="SHARDED_STATE_DICT" if launch.state_dict == "sharded" else "FULL_STATE_DICT",
        cpu_offload=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if launch.offload == "params" else False,
        cpu_ram_efficient_loading=False,  # each process loads the model: the adapters start from the base weights
        activation_checkpointing=False,  # model.gradient_checkpointing is the model's own
    )


def deepspeed_config(recipe: Recipe) -> dict:
    """DeepSpeed's config from the recipe: every value is the recipe's, or DeepSpeed's default."""
    launch, train = recipe.launch, recipe.train
    zero: dict = {"stage": launch.zero_stage or 2}
    if launch.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if launch.offload == "params":
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_optimization": zero,
    }


def deepspeed_plugin(recipe: Recipe, from_file: bool):
    """Accelerate's DeepSpeed plugin: ours from the recipe, or the launcher's config with its "auto"
    values filled from the recipe (never with Accelerate's defaults, such as clipping at 1.0)."""
    from accelerate import DeepSpeedPlugin

    plugin = DeepSpeedPlugin() if from_file else DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe))
    fill_deepspeed(plugin.deepspeed_config, recipe)
    return plugin


def fill_deepspeed(config: dict, recipe: Recipe) -> None:
    """Fill a DeepSpeed config's "auto" values from the recipe; refuse values dora cannot honour."""
    train = recipe.train
    wanted = {
        "gradient_clipping": train.max_grad_norm or 0.0,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": 1,
    }
    for key, value in wanted.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config[key] != wanted[key]:
            raise UserError(
                f"launch.config_file: DeepSpeed {key} is {config[key]}, dora needs {wanted[key]} "
                "(it runs train.micro_batch_size examples per forward and accumulates micro-batches itself): set it to auto"
            )
    if config.get("train_batch_size") == "auto":
        del config["train_batch_size"]  # DeepSpeed derives it: micro-batch x processes


@contextlib.contextmanager
def whole_model_loading(acc):
    """Load the model whole on each process: under ZeRO-3, transformers would otherwise build it already
    partitioned, and the adapters start from the base weights (DoRA's magnitude is their row norm)."""
    plugin = acc.state.deepspeed_plugin if acc.distributed_type.name == "DEEPSPEED" else None
    if plugin is None:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def set_wrap(acc, model) -> None:
    """FSDP: check launch.wrap against the model's layer classes, or take the model's own (`_no_split_modules`)."""
    plugin = acc.state.fsdp_plugin if acc.distributed_type.name == "FSDP" else None
    if plugin is not None:
        names = plugin.transformer_cls_names_to_wrap or list(getattr(model, "_no_split_modules", None) or [])
        plugin.transformer_cls_names_to_wrap = wrap_classes(names, model)


def wrap_classes(names: list[str], model) -> list[str]:
    """`names`, checked against the model's layer classes."""
    classes = {type(m).__name__ for m in model.modules()}
    for name in names:
        if name not in classes:
            raise UserError(f"launch.wrap: {name!r} is no layer class of this model{did_you_mean(name, sorted(classes))}")
    if not names:
        raise UserError(f"launch.wrap: the model names no layer class to wrap ({type(model).__name__}); set launch.wrap")
    return list(names)


# ---- what ran --------------------------------------------------------------------------------------------
def effective_config(acc, recipe: Recipe) -> tuple[dict, dict | None]:
    """(Accelerate config, DeepSpeed config or None) of this run as it was set up, after `prepare`: in
    Accelerate's config-file format, so `accelerate launch --config_file` can run it again."""
    world = acc.num_processes
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    config: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": acc.distributed_type.name,
        "num_processes": world,
        "num_machines": max(1, world // per_machine),
        "machine_rank": int(os.environ.get("GROUP_RANK", "0")),
        "main_process_ip": os.environ.get("MASTER_ADDR"),
        "main_process_port": int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None,
        "mixed_precision": recipe.train.mixed_precision,
        "use_cpu": acc.device.type == "cpu",
    }
    if acc.distributed_type.name == "FSDP":
        config["fsdp_config"] = _fsdp_section(acc.state.fsdp_plugin)
    mesh = getattr(acc.state, "parallelism_config", None)
    if mesh is not None:
        config["parallelism_config"] = {
            "parallelism_config_dp_replicate_size": mesh.dp_replicate_size,
            "parallelism_config_dp_shard_size": mesh.dp_shard_size,
        }
    deepspeed = None
    if acc.distributed_type.name == "DEEPSPEED":
        deepspeed = acc.state.deepspeed_plugin.deepspeed_config
        config["deepspeed_config"] = {"deepspeed_config_file": DEEPSPEED_NAME, "zero3_init_flag": False}
    return config, deepspeed


def _fsdp_section(plugin) -> dict:
    return {
        "fsdp_version": plugin.fsdp_version,
        "fsdp_reshard_after_forward": plugin.reshard_after_forward,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": ",".join(plugin.transformer_cls_names_to_wrap or []),
        "fsdp_state_dict_type": plugin.state_dict_type.name,
        "fsdp_offload_params": type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy",
        "fsdp_cpu_ram_efficient_loading": bool(plugin.cpu_ram_efficient_loading),
        "fsdp_activation_checkpointing": bool(plugin.activation_checkpointing),
    }


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores() -> float:
    """Cores other jobs keep busy: the smaller of the 1-minute load average and the median count of runnable
    threads over a fifth of a second (/proc/loadavg), each less this process. The average alone lags: just
    after a job ends it still says busy; the count alone is a moment's glimpse. Both must agree."""
    average = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    counts = []
    try:
        for _ in range(9):
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
            time.sleep(0.025)
    except (OSError, ValueError, IndexError):
        return max(0.0, average - 1.0)
    return max(0.0, min(average, sorted(counts)[len(counts) // 2]) - 1.0)


def set_threads(requested: int | None, device: str) -> str:
    """Set this process's CPU threads: `train.threads`, else torch's default, cut to the cores the rest of
    the machine leaves free (OpenMP threads that wait for a core another job holds stall every parallel
    region: on a loaded 2-core machine, 2 threads ran a step 5-10x slower than 1). Returns the log line."""
    default = torch.get_num_threads()
    if requested is not None:
        torch.set_num_threads(requested)
        return f"threads: {requested} (train.threads)"
    if device != "cpu":
        return f"threads: {default}"
    cores = cpu_cores()
    others = busy_cores()
    threads = max(1, min(default, math.floor(cores - others + 0.5)))
    if threads == default:
        return f"threads: {default}"
    torch.set_num_threads(threads)
    return (f"threads: {threads} of {default}: the machine is busy (other jobs hold about {others:.1f} of "
            f"{cores} cores); train.threads sets them")
