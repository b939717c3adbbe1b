"""The launch section and what launch.py builds from it: combinations refused in one line, DeepSpeed's
config holding only what the recipe asked for, the launcher's config, a missing DeepSpeed refused before
anything is written, optimizer states keyed by name; and `dora train` under an external torchrun
(2 processes, gloo, FSDP) ending where one process ends. The big matrix is tests/test_dist.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ROOT, dora_in_process, requires_cuda, tiny_llama
from safetensors.torch import load_file

from dora_cli import launch
from dora_cli.errors import UserError
from dora_cli.gather import by_name, load_optimizer_state, optimizer_state
from dora_cli.recipe import load_recipe

SMOKE = ROOT / "recipes" / "smoke.yaml"


def recipe(*overrides):
    return load_recipe(SMOKE, list(overrides))


# ---- the schema ------------------------------------------------------------------------------------
DS, FSDP, TWO_MACHINES = "launch.strategy=deepspeed", "launch.strategy=fsdp", ["launch.num_machines=2", "launch.num_processes=2"]
REFUSED = {
    "zero_stage without deepspeed": ([FSDP, "launch.zero_stage=3"], "zero_stage: only with strategy deepspeed (strategy is fsdp)"),
    "sharding without fsdp": (["launch.sharding=grad-op"], "sharding: only with strategy fsdp (strategy is ddp)"),
    "state_dict without fsdp": ([DS, "launch.state_dict=sharded"], "state_dict: only with strategy fsdp (strategy is deepspeed)"),
    "wrap without fsdp": (["launch.wrap=LlamaDecoderLayer"], "wrap: only with strategy fsdp"),
    "offload under ddp": (["launch.offload=optimizer"], "offload: needs strategy fsdp or deepspeed"),
    "fsdp optimizer offload": ([FSDP, "launch.offload=optimizer"], "use offload: params"),
    "param offload below ZeRO-3": ([DS, "launch.zero_stage=2", "launch.offload=params"], "offload: params needs zero_stage: 3"),
    "param offload, default stage": ([DS, "launch.offload=params"], "offload: params needs zero_stage: 3"),
    "hybrid on one machine": ([FSDP, "launch.sharding=hybrid"], "it needs num_machines > 1"),
    "machine rank out of range": ([*TWO_MACHINES, "launch.main_process_ip=10.0.0.1", "launch.machine_rank=2"],
                                  "machine_rank: expected a value < num_machines (2), got 2"),
    "no address of machine 0": (TWO_MACHINES, "main_process_ip: needed with num_machines > 1"),
    "processes over machines": (["launch.num_machines=2", "launch.main_process_ip=h", "launch.num_processes=3"], "do not split evenly"),
    "config_file and a strategy": (["launch.config_file=a.yaml", FSDP], "strategy: config_file decides it"),
    "config_file and processes": (["launch.config_file=a.yaml", "launch.num_processes=4"], "num_processes: config_file decides it"),
    "unknown strategy": (["launch.strategy=zero"], "strategy: expected one of"),
    "ZeRO stage 4": ([DS, "launch.zero_stage=4"], "zero_stage: expected one of"),
    "no layer class": ([FSDP, "launch.wrap=[]"], "wrap: expected at least one layer class name"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_impossible_launch_combinations_are_refused_in_one_line(case):
    overrides, expected = REFUSED[case]
    with pytest.raises(UserError) as err:
        recipe(*overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    [DS, "launch.zero_stage=3", "launch.offload=params"],
    [DS, "launch.zero_stage=1", "launch.offload=optimizer"],
    [FSDP, "launch.sharding=grad-op", "launch.state_dict=sharded", "launch.offload=params", "launch.wrap=LlamaDecoderLayer"],
    [FSDP, "launch.sharding=hybrid", *TWO_MACHINES, "launch.main_process_ip=10.0.0.1", "launch.machine_rank=1"],
    ["launch.config_file=a.yaml"],
])
def test_possible_combinations_load(overrides):
    assert recipe(*overrides).launch


def test_wrap_takes_a_name_or_a_list():
    assert recipe(FSDP, "launch.wrap=LlamaDecoderLayer,LlamaMLP").launch.wrap == ["LlamaDecoderLayer", "LlamaMLP"]
    assert recipe(FSDP, "launch.wrap=[LlamaDecoderLayer]").launch.wrap == ["LlamaDecoderLayer"]


# ---- DeepSpeed's config: the recipe's values, nothing else ------------------------------------------------------
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("stage, offload", [(None, "none"), (1, "optimizer"), (2, "none"), (3, "optimizer"), (3, "params")])
def test_deepspeed_config_holds_only_what_the_recipe_asks(clip, stage, offload):
    overrides = [DS, f"launch.offload={offload}", f"train.max_grad_norm={'null' if clip is None else clip}"]
    r = recipe(*overrides, *([f"launch.zero_stage={stage}"] if stage else []))
    config = launch.deepspeed_config(r)
    assert set(config) == {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "zero_optimization"}
    assert config["gradient_clipping"] == (clip or 0.0)  # DeepSpeed clips when > 0: unset means no clipping
    assert config["train_micro_batch_size_per_gpu"] == r.train.micro_batch_size
    assert config["gradient_accumulation_steps"] == 1  # dora accumulates micro-batches itself
    zero = config["zero_optimization"]
    assert zero["stage"] == (stage or 2)
    assert ("offload_optimizer" in zero) == (offload != "none") and ("offload_param" in zero) == (offload == "params")
    assert "auto" not in json.dumps(config)


def test_a_user_deepspeed_config_gets_the_recipes_values_for_auto():
    user = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}
    launch.fill_deepspeed(user, recipe())
    assert user == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                    "zero_optimization": {"stage": 3}}  # not Accelerate's default clipping at 1.0
    own = {"gradient_clipping": 0.3, "zero_optimization": {"stage": 2}}
    launch.fill_deepspeed(own, recipe("train.max_grad_norm=2.0"))
    assert own["gradient_clipping"] == 0.3  # the user's file, as given
    with pytest.raises(UserError, match="gradient_accumulation_steps is 4, dora needs 1"):
        launch.fill_deepspeed({"gradient_accumulation_steps": 4, "zero_optimization": {}}, recipe())


def test_the_launcher_only_starts_processes():
    config = launch.launcher_config(recipe(FSDP, "launch.sharding=grad-op"), 2)
    assert not {"fsdp_config", "deepspeed_config"} & set(config)  # each process sets the strategy up itself
    assert (config["num_processes"], config["num_machines"], config["use_cpu"]) == (2, 1, False)
    machines = launch.launcher_config(recipe(*TWO_MACHINES, "launch.main_process_ip=10.1.2.3", "launch.machine_rank=1"), 2)
    assert (machines["main_process_ip"], machines["main_process_port"], machines["machine_rank"]) == ("10.1.2.3", 29500, 1)


def test_a_config_file_decides_the_processes(tmp_path):
    path = tmp_path / "acc.yaml"
    path.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_processes": 3}))
    r = recipe(f"launch.config_file={path}")
    assert launch.process_count(r, None) == 3 and launch.requested_strategy(r) == "deepspeed"
    with pytest.raises(UserError, match="runs 3 processes; drop --nproc"):
        launch.process_count(r, 2)
    assert launch.needs_launch(r, 1) and not launch.needs_launch(recipe(), 1) and launch.needs_launch(recipe(FSDP), 1)
    with pytest.raises(UserError, match="cannot read"):
        launch.process_count(recipe(f"launch.config_file={tmp_path / 'none.yaml'}"), None)


@pytest.mark.parametrize(("content", "expected"), [
    ({"distributed_type": "BOGUS", "num_processes": 1}, "distributed_type: expected one of"),
    ({"distributed_type": "fsdpp"}, 'did you mean "FSDP"'),
    ({"distributed_type": "fsdp"}, 'got \'fsdp\' (did you mean "FSDP"?)'),
    ({"num_processes": 1}, "distributed_type: expected one of"),
    ({"distributed_type": "NO", "num_processes": "abc"}, "num_processes: expected an integer >= 1, got 'abc'"),
    ({"distributed_type": "NO", "num_processes": 0}, "num_processes: expected an integer >= 1, got 0"),
    ({"distributed_type": "NO", "num_machines": True}, "num_machines: expected an integer >= 1, got True"),
    ({"distributed_type": "NO", "machine_rank": -1}, "machine_rank: expected an integer >= 0, got -1"),
    ({"distributed_type": "NO", "main_process_port": "x" * 500}, "main_process_port: expected an integer >= 1"),
])
def test_a_user_config_with_values_accelerate_refuses_is_one_line(tmp_path, monkeypatch, capsys, content, expected):
    path = tmp_path / "acc.yaml"
    path.write_text(yaml.safe_dump(content))
    out = tmp_path / "never"
    code, err = run_cli(monkeypatch, capsys, "train", SMOKE, f"output_dir={out}", f"launch.config_file={path}")
    assert code == 2 and err.strip().count("\n") == 0 and expected in err and len(err) < 400, err
    assert "launching" not in err and not out.exists()


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    code, _, err = dora_in_process(args, monkeypatch, capsys)
    return code, err


def test_missing_deepspeed_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    out = tmp_path / "never"
    code, err = run_cli(monkeypatch, capsys, "train", SMOKE, f"output_dir={out}", DS, "--nproc", "2")
    assert code == 2 and err.strip().count("\n") == 0
    assert "DeepSpeed is not installed (pip install 'dora_cli[deepspeed]')" in err and "Traceback" not in err
    assert not out.exists()


def test_skip_nonfinite_under_deepspeed_is_refused_before_the_launch(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    out = tmp_path / "never"
    code, err = run_cli(monkeypatch, capsys, "train", SMOKE, f"output_dir={out}", DS, "train.skip_nonfinite=2", "--nproc", "2")
    assert code == 2 and err.strip().count("\n") == 0 and "train.skip_nonfinite: DeepSpeed applies the optimizer step" in err
    assert "launching" not in err and not out.exists()


@pytest.mark.parametrize(("env", "machine_rank", "checks"), [
    ({}, 0, True),                                                    # a plain dora train: it checks, then launches
    ({"DORA_LAUNCHED": "1", "LOCAL_RANK": "0", "RANK": "0"}, 0, False),  # our own launch: the parent checked
    ({"LOCAL_RANK": "0", "RANK": "0"}, 0, True),                      # torchrun / accelerate launch: rank 0
    ({"LOCAL_RANK": "1", "RANK": "1"}, 0, False),                     # ... the others do not
    ({"LOCAL_RANK": "0", "RANK": "8"}, 0, False),                     # rank 0 of another node
    ({}, 1, False),                                                   # machine 1 of a multi-machine run
])
def test_output_dir_is_checked_once_under_any_launcher(monkeypatch, env, machine_rank, checks):
    for key in ("DORA_LAUNCHED", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    two = ["launch.num_machines=2", "launch.num_processes=2", "launch.main_process_ip=10.0.0.1"]
    r = recipe(*two, f"launch.machine_rank={machine_rank}") if machine_rank else recipe()
    assert launch.checks_output_dir(r) is checks


def test_the_wrapped_layer_class_comes_from_the_model_or_is_checked():
    model = tiny_llama()
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=None)
    acc = SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"), state=SimpleNamespace(fsdp_plugin=plugin))
    launch.set_wrap(acc, model)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]  # the model's _no_split_modules
    plugin.transformer_cls_names_to_wrap = ["LlamaDecoderLyer"]
    with pytest.raises(UserError, match='did you mean "LlamaDecoderLayer"'):
        launch.set_wrap(acc, model)


def test_a_wrong_layer_class_is_refused_before_the_launch(tmp_path, monkeypatch, capsys):
    out = tmp_path / "never"
    code, err = run_cli(monkeypatch, capsys, "train", SMOKE, f"output_dir={out}", FSDP, "launch.wrap=LlamaLayer", "--nproc", "2")
    assert code == 2 and "launch.wrap: 'LlamaLayer' is no layer class of this model (did you mean" in err
    assert "launching" not in err and not out.exists()


# ---- optimizer states by name --------------------------------------------------------------------------------
def _step(model, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randint(0, 256, (2, 12)).to(next(model.parameters()).device)
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
@pytest.mark.parametrize("saved_as", ["by name", "by index (older checkpoints)"])
def test_an_optimizer_state_resumes_exactly_by_name(saved_as, fused, device):
    from dora_cli.adapters import AdapterConfig, apply_adapters

    def fresh():
        model = tiny_llama().to(device)
        apply_adapters(model, AdapterConfig(method="dora", r=4, target_modules=["q_proj", "v_proj"]))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused or None)
        return model, optimizer, SimpleNamespace(optimizer=optimizer)  # as Accelerate wraps it

    model, optimizer, prepared = fresh()
    for seed in range(2):
        _step(model, optimizer, seed)
    saved = optimizer_state(model, prepared) if saved_as == "by name" else optimizer.state_dict()
    assert all(isinstance(name, str) for name in by_name(saved, model)["state"])
    twin, twin_optimizer, twin_prepared = fresh()
    twin.load_state_dict(model.state_dict())
    load_optimizer_state(twin, twin_prepared, by_name(saved, twin), "checkpoint")
    steps = [state["step"] for state in twin_optimizer.state.values()]
    assert steps and all(s.device.type == (device if fused else "cpu") for s in steps)  # where torch puts it
    _step(model, optimizer, 7)
    _step(twin, twin_optimizer, 7)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_an_optimizer_state_of_another_model_is_refused():
    model = tiny_llama()
    with pytest.raises(UserError, match="no trainable parameter"):
        load_optimizer_state(model, SimpleNamespace(optimizer=None), {"state": {"nowhere.weight": {}}}, "checkpoint-3")


# ---- under an external torchrun: 2 processes, gloo, FSDP ---------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dora_train_runs_unchanged_under_torchrun(smoke_run, tmp_path):
    out = tmp_path / "torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([*torchrun, "-m", "dora_cli.cli", "train", "recipes/smoke.yaml", f"output_dir={out}", FSDP],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching" not in proc.stderr  # it trained as the launcher's processes, no relaunch
    assert "setup: FSDP on cpu, 2 processes; the main process holds 50% of the weights" in proc.stderr
    ours, ref = (load_file(str(run / "final" / "adapter_model.safetensors")) for run in (out, smoke_run))
    assert ours.keys() == ref.keys()
    for key in ref:
        assert (ours[key] - ref[key]).abs().max().item() <= 1e-5, key
    assert yaml.safe_load((out / "accelerate.yaml").read_text())["distributed_type"] == "FSDP"


# ---- launch honesty: what started is what was asked (issue 23) --------------------------------------------
def started(kind: str, processes: int, main: bool = True):
    """An Accelerator as check_started sees it: its distributed type, its processes, whether it is the main one."""
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), num_processes=processes, is_main_process=main)


HONESTY = [  # (asked processes, asked strategy, started type, started processes, refused?)
    (2, "ddp", "MULTI_CPU", 2, False), (2, "ddp", "MULTI_GPU", 2, False), (1, "ddp", "NO", 1, False),
    (2, "fsdp", "FSDP", 2, False), (2, "deepspeed", "DEEPSPEED", 2, False), (1, "deepspeed", "DEEPSPEED", 1, False),
    (2, "ddp", "NO", 1, True), (4, "ddp", "MULTI_CPU", 2, True), (2, "fsdp", "MULTI_CPU", 2, True),
    (2, "deepspeed", "MULTI_GPU", 2, True), (2, "ddp", "FSDP", 2, True), (2, "fsdp", "NO", 1, True),
]


@pytest.mark.parametrize("asked,strategy,kind,count,refused", HONESTY)
def test_the_processes_and_strategy_that_started_are_those_asked_for(asked, strategy, kind, count, refused, monkeypatch):
    monkeypatch.setenv(launch.ASKED_PROCESSES, str(asked))
    monkeypatch.setenv(launch.ASKED_STRATEGY, strategy)
    monkeypatch.delenv("DORA_LAUNCHED", raising=False)
    if not refused:
        launch.check_started(started(kind, count), recipe())
        return
    with pytest.raises(UserError, match=f"launch: {asked} process(es)? with {strategy} were asked for .* but {count} started"):
        launch.check_started(started(kind, count), recipe())
    with pytest.raises(SystemExit) as other:  # another process ends quietly: the main one says why, once
        launch.check_started(started(kind, count, main=False), recipe())
    assert other.value.code == 2


def test_under_our_launch_every_process_ends_quietly_and_the_command_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv(launch.ASKED_PROCESSES, "2")
    monkeypatch.setenv(launch.ASKED_STRATEGY, "ddp")
    monkeypatch.setenv("DORA_LAUNCHED", "1")
    monkeypatch.setenv(launch.REFUSAL_FILE, str(tmp_path / "refused"))
    with pytest.raises(SystemExit) as end:  # torch's launcher reports any other status as a crash
        launch.check_started(started("NO", 1), recipe())
    assert end.value.code == 0 and "1 started with ddp" in (tmp_path / "refused").read_text()


def test_a_config_file_whose_processes_do_not_start_is_refused_before_training(tmp_path, monkeypatch, capfd):
    """The issue's case: distributed_type MULTI_CPU with 2 processes, which accelerate launch runs as one process."""
    config = tmp_path / "acc.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
                      "mixed_precision: 'no'\n")
    out = tmp_path / "out"
    code, _, err = dora_in_process(["train", SMOKE, f"output_dir={out}", f"launch.config_file={config}",
                                    "train.max_steps=2"], monkeypatch, capfd)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "launch: 2 processes with ddp were asked for (launch.config_file" in errors[0]
    assert "but 1 started with ddp (Accelerate set up NO)" in errors[0]
    assert not out.exists()
