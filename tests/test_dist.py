"""Many processes on the CPU (gloo), against one process: every strategy ends with the same adapter
(DDP, FSDP full / sharded state dict / grad-op / offload, DeepSpeed ZeRO 1-3 with and without offload;
LoRA and DoRA), clipping only when asked, resume across process counts and strategies, a user's own
Accelerate config used as given, several machines (on one host), hybrid sharding and QDoRA under FSDP.

`make test-dist` (marker dist): each run takes 10-30 s. Runs use accumulation (micro-batches of 2), so
the step boundary is exercised too. SIGKILL and resume: tests/test_dist_kill.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_dora
from safetensors.torch import load_file

pytestmark = pytest.mark.dist

SMOKE = "recipes/smoke.yaml"
SHORT = ["train.max_steps=6", "train.micro_batch_size=2", "train.save_every=3", "train.log_every=1", "data.val_set_size=8"]
TOLERANCE = 1e-5
DS, FSDP = "launch.strategy=deepspeed", "launch.strategy=fsdp"

# name: (overrides, distributed type, % of the weights and % of the optimizer state the main process holds)
STRATEGIES = {
    "ddp": ([], "MULTI_CPU", 100, 100),
    "fsdp": ([FSDP], "FSDP", 50, 50),
    "fsdp-sharded-state": ([FSDP, "launch.state_dict=sharded"], "FSDP", 50, 50),
    "fsdp-grad-op": ([FSDP, "launch.sharding=grad-op"], "FSDP", 50, 50),
    "fsdp-offload": ([FSDP, "launch.offload=params"], "FSDP", 50, 50),
    "zero1": ([DS, "launch.zero_stage=1"], "DEEPSPEED", 100, 50),
    "zero2": ([DS, "launch.zero_stage=2"], "DEEPSPEED", 100, 50),
    "zero2-offload": ([DS, "launch.zero_stage=2", "launch.offload=optimizer"], "DEEPSPEED", 100, 50),
    "zero3": ([DS, "launch.zero_stage=3"], "DEEPSPEED", 50, 50),
    "zero3-offload": ([DS, "launch.zero_stage=3", "launch.offload=optimizer"], "DEEPSPEED", 50, 50),
    "zero3-offload-params": ([DS, "launch.zero_stage=3", "launch.offload=params"], "DEEPSPEED", 50, 50),
}
METHODS = {"dora": [], "lora": ["adapter.method=lora"]}


def needs(strategy: str) -> None:
    if strategy.startswith("zero") or DS in strategy:
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'dora_cli[deepspeed]')")


def train(out: Path, *overrides: str, nproc: int | None = None, resume: bool = False, check: bool = True):
    args = ["train", SMOKE, f"output_dir={out}", *SHORT, *overrides]
    args += ["--nproc", str(nproc)] if nproc else []
    return run_dora(*args, *(["--resume"] if resume else []), timeout=1200, check=check)


def adapter(run: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(run / name / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of some overrides (made once per module)."""
    made: dict[tuple, Path] = {}

    def run(*overrides: str) -> Path:
        if overrides not in made:
            out = tmp_path_factory.mktemp("one") / "run"
            train(out, *overrides)
            made[overrides] = out
        return made[overrides]

    return run


# ---- every strategy ends where one process ends ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_end_with_the_adapter_of_one(strategy, method, one_process, tmp_path, figures):
    needs(strategy)
    overrides, kind, weights, state = STRATEGIES[strategy]
    ref = one_process(*METHODS[method])
    out = tmp_path / "run"
    proc = train(out, *METHODS[method], *overrides, nproc=2)
    difference = max_difference(adapter(out), adapter(ref))
    figures[f"{strategy} {method}"] = difference
    assert difference <= TOLERANCE
    assert f"setup: {kind} on cpu, 2 processes; the main process holds {weights}% of the weights and {state}% of the optimizer state" in proc.stderr
    # the same files as one process writes: eval, merge and PEFT read them unchanged
    for name in ("adapter_config.json", "dora_cli_adapter.json"):
        assert (out / "final" / name).read_text() == (ref / "final" / name).read_text()
    assert max_difference(adapter(out, "checkpoint-3"), adapter(ref, "checkpoint-3")) <= TOLERANCE
    optimizer = torch.load(out / "checkpoint-3" / "trainer_state" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(adapter(out)) and all(isinstance(name, str) for name in optimizer["state"])
    accelerate = yaml.safe_load((out / "accelerate.yaml").read_text())
    assert (accelerate["distributed_type"], accelerate["num_processes"]) == (kind, 2)
    if kind == "DEEPSPEED":
        deepspeed = json.loads((out / "deepspeed.json").read_text())
        zero = deepspeed["zero_optimization"]
        assert zero["stage"] == int(strategy[4]) and deepspeed["gradient_clipping"] == 0.0
        assert ("offload_optimizer" in zero) == ("offload" in strategy) and ("offload_param" in zero) == strategy.endswith("params")
    else:
        assert not (out / "deepspeed.json").exists()


# ---- clipping: only when the recipe asks ------------------------------------------------------------------------
STEEP = ["adapter.alpha=1024"]  # gradient norms of 1.2-17 on this model: clipping at 1.0 would change every step


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_no_clipping_when_max_grad_norm_is_unset(strategy, one_process, tmp_path, figures):
    needs(strategy)
    unclipped, clipped = one_process(*STEEP), one_process(*STEEP, "train.max_grad_norm=1.0")
    assert max_difference(adapter(unclipped), adapter(clipped)) > 1e-3  # clipping would show
    out = tmp_path / "run"
    train(out, *STEEP, *STRATEGIES[strategy][0], nproc=2)
    norms = [e["grad_norm"] for e in events(out) if "grad_norm" in e]
    ref_norms = [e["grad_norm"] for e in events(unclipped) if "grad_norm" in e]
    assert len(norms) == 6 and min(norms) > 1.0
    assert norms == pytest.approx(ref_norms, rel=1e-4)
    figures[f"no clipping {strategy}"] = max_difference(adapter(out), adapter(unclipped))
    assert max_difference(adapter(out), adapter(unclipped)) <= TOLERANCE


@pytest.mark.parametrize("strategy", ["fsdp", "zero2", "zero3"])
def test_clipping_when_asked_is_the_same_everywhere(strategy, one_process, tmp_path):
    needs(strategy)
    out = tmp_path / "run"
    train(out, *STEEP, "train.max_grad_norm=1.0", *STRATEGIES[strategy][0], nproc=2)
    assert max_difference(adapter(out), adapter(one_process(*STEEP, "train.max_grad_norm=1.0"))) <= TOLERANCE


# ---- resume across process counts and strategies ------------------------------------------------------------------
def interrupt_after_step_3(out: Path) -> None:
    """The run as a crash after checkpoint-3 leaves it: later checkpoints and the end removed."""
    for name in ("checkpoint-6", "final"):
        shutil.rmtree(out / name)
    (out / "metrics.json").unlink()


RESUMES = {
    "2 -> 1 (ddp)": (([], 2), ([], None)),
    "1 -> 2 (ddp)": (([], None), ([], 2)),
    "fsdp 2 -> 1": (([FSDP], 2), ([FSDP], 1)),
    "1 -> fsdp 2": (([], None), ([FSDP], 2)),
    "zero2 2 -> 2": (([DS], 2), ([DS], 2)),
    "zero3 2 -> 2": (([DS, "launch.zero_stage=3"], 2), ([DS, "launch.zero_stage=3"], 2)),
    "zero3-offload 2 -> 1": (([DS, "launch.zero_stage=3", "launch.offload=optimizer"], 2), ([], None)),
    "zero2 2 -> fsdp 2": (([DS], 2), ([FSDP], 2)),
}


@pytest.mark.parametrize("case", RESUMES)
def test_resume_on_another_number_of_processes(case, one_process, tmp_path, figures):
    (first, first_n), (then, then_n) = RESUMES[case]
    needs(" ".join(first + then))
    out = tmp_path / "run"
    train(out, *first, nproc=first_n)
    interrupt_after_step_3(out)
    proc = train(out, *then, nproc=then_n, resume=True)
    assert "resuming from checkpoint-3 (step 3)" in proc.stderr
    difference = max_difference(adapter(out), adapter(one_process()))
    figures[f"resume {case}"] = difference
    assert difference <= TOLERANCE


# ---- a user's own Accelerate config, used as given -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_user_fsdp_config_is_used_as_given(one_process, tmp_path):
    config = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_processes": 2,
        "main_process_port": free_port(), "mixed_precision": "no",
        "fsdp_config": {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "fsdp_reshard_after_forward": False, "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": False,
        },
    }
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    proc = train(out, f"launch.config_file={path}")
    assert "launching 2 processes (fsdp)" in proc.stderr
    saved = yaml.safe_load((out / "accelerate.yaml").read_text())
    assert (saved["distributed_type"], saved["num_processes"]) == ("FSDP", 2)
    assert saved["fsdp_config"]["fsdp_reshard_after_forward"] is False  # the user's values
    assert saved["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert max_difference(adapter(out), adapter(one_process())) <= TOLERANCE


def test_a_user_deepspeed_config_is_used_as_given(one_process, tmp_path):
    needs("deepspeed")
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "wall_clock_breakdown": False}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_processes": 2,
              "main_process_port": free_port(),
              "deepspeed_config": {"deepspeed_config_file": str(tmp_path / "ds.json"), "zero3_init_flag": False}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    train(out, f"launch.config_file={path}")
    saved = json.loads((out / "deepspeed.json").read_text())
    assert saved["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}  # as given
    assert saved["wall_clock_breakdown"] is False
    assert saved["gradient_clipping"] == 0.0  # "auto" from the recipe (no clipping), not Accelerate's 1.0
    assert max_difference(adapter(out), adapter(one_process())) <= TOLERANCE


def test_accelerate_launch_from_outside_takes_the_recipes_strategy(one_process, tmp_path):
    needs("deepspeed")
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                                      "num_processes": 2, "main_process_port": free_port(), "use_cpu": False}))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "dora_cli.cli", "train",
           SMOKE, f"output_dir={out}", *SHORT, DS, "launch.zero_stage=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching" not in proc.stderr and "setup: DEEPSPEED on cpu, 2 processes" in proc.stderr
    assert max_difference(adapter(out), adapter(one_process())) <= TOLERANCE


# ---- several machines (two launchers on this host) ---------------------------------------------------------------
def on_machines(out: Path, machines: int, processes: int, *overrides: str) -> None:
    """`dora train` once per machine, all on this host, as a cluster would start it."""
    port = free_port()
    shared = [f"launch.num_machines={machines}", f"launch.num_processes={processes}", "launch.main_process_ip=127.0.0.1",
              f"launch.main_process_port={port}", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    logs = [out.parent / f"machine-{rank}.log" for rank in range(machines)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "dora_cli.cli", "train", SMOKE, f"output_dir={out}", *SHORT, *shared,
                          f"launch.machine_rank={rank}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        for rank, log in enumerate(logs)
    ]
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=1200) == 0, log.read_text()[-3000:]


def test_two_machines(one_process, tmp_path):
    out = tmp_path / "run"
    on_machines(out, 2, 2)
    saved = yaml.safe_load((out / "accelerate.yaml").read_text())
    assert (saved["num_machines"], saved["num_processes"]) == (2, 2)
    assert max_difference(adapter(out), adapter(one_process())) <= TOLERANCE


def test_hybrid_sharding_over_two_machines(one_process, tmp_path, figures):
    out = tmp_path / "run"
    on_machines(out, 2, 4, FSDP, "launch.sharding=hybrid")  # 2 replicas of 2 shards
    log = (out / "train.log").read_text()
    assert "setup: FSDP on cpu, 4 processes; the main process holds 50% of the weights" in log
    saved = yaml.safe_load((out / "accelerate.yaml").read_text())
    assert saved["parallelism_config"] == {"parallelism_config_dp_replicate_size": 2, "parallelism_config_dp_shard_size": 2}
    figures["fsdp hybrid 2x2"] = max_difference(adapter(out), adapter(one_process()))
    assert figures["fsdp hybrid 2x2"] <= TOLERANCE


# ---- QDoRA under FSDP: the 4-bit base is sharded ------------------------------------------------------------------
QDORA = ["model.quantization.mode=nf4", "model.quantization.compute_dtype=float32"]


def test_qdora_under_fsdp_shards_the_4bit_base(one_process, tmp_path, figures):
    out = tmp_path / "run"
    proc = train(out, *QDORA, FSDP, nproc=2)
    assert "the main process holds 50% of the weights" in proc.stderr  # the packed 4-bit weights included
    figures["qdora fsdp"] = max_difference(adapter(out), adapter(one_process(*QDORA)))
    assert figures["qdora fsdp"] <= TOLERANCE


# ---- the figures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def figures():
    """Largest |difference| to one process of each run; written to $DORA_DIST_REPORT when set."""
    found: dict[str, float] = {}
    yield found
    report = os.environ.get("DORA_DIST_REPORT")
    if report and found:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(Path(report).read_text()) if Path(report).is_file() else {}
        Path(report).write_text(json.dumps({**previous, **found}, indent=1, sort_keys=True) + "\n")
