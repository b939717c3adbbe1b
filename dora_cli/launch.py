"""Many processes: `dora train` again, under Accelerate's launcher, with a config made from the recipe.

    processes = process_count(recipe, nproc)      # WORLD_SIZE inside a launch, else --nproc / launch.num_processes
    if processes > 1 and not inside_launch():
        relaunch(recipe, processes, flags)          # returns when every process has ended

Inside a launch (`DORA_LAUNCHED=1`, or `LOCAL_RANK` set by torchrun / accelerate launch / srun) the
command trains as one of the processes; Accelerate picks the distributed setup from the environment.
On a machine without CUDA, Accelerate's MULTI_GPU type runs torchrun over gloo: the multi-process path
is testable on a CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from dora_cli.console import say
from dora_cli.recipe import Recipe, check_batch, dump_recipe


def inside_launch() -> bool:
    """This process is one of a launched group (ours, torchrun's, accelerate's or srun's)."""
    return os.environ.get("DORA_LAUNCHED") == "1" or "LOCAL_RANK" in os.environ


def process_count(recipe: Recipe, nproc: int | None) -> int:
    """How many processes train: WORLD_SIZE inside a launch, else --nproc, else launch.num_processes."""
    if inside_launch():
        return int(os.environ.get("WORLD_SIZE", "1"))
    return nproc if nproc is not None else recipe.launch.num_processes


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


def launch_command(recipe_file: Path, processes: int, config_file: Path, flags: list[str]) -> list[str]:
    """argv of the relaunch: a list, never a shell string."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file), "--num_processes", str(processes), "--main_process_port", str(port),
        "-m", "dora_cli.cli", "train", str(recipe_file), *flags,
    ]


def relaunch(recipe: Recipe, processes: int, flags: list[str]) -> None:
    """Train `recipe` (resolved, written to a temporary recipe file) in `processes` processes; exits with
    their status when they fail."""
    with tempfile.TemporaryDirectory(prefix="dora-launch-") as tmp:
        recipe_file, config_file = Path(tmp) / "train.yaml", Path(tmp) / "accelerate.yaml"
        recipe_file.write_text(dump_recipe(recipe))
        config_file.write_text(yaml.safe_dump(accelerate_config(recipe, processes)))
        cmd = launch_command(recipe_file, processes, config_file, flags)
        env = dict(os.environ, DORA_LAUNCHED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        say(f"launching {processes} processes ({recipe.launch.strategy})")
        code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise SystemExit(code)
