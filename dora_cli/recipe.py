"""The recipe: one YAML file that says everything about a run.

Schema (pydantic, extra="forbid", so a typo is an error and never silently ignored):

    base: other.yaml              # optional: inherit and override (paths relative to this file)
    model:     what to fine-tune (hub id / local dir / .gguf file, or a tiny random `config`)
    adapter:   the method (lora / dora / vera / dvora / full) and its options
    data:      training data, prompt template, tokenisation
    optim:     AdamW settings
    schedule:  learning-rate schedule
    train:     steps, batches, precision, logging and checkpoint cadence
    launch:    processes, machines and strategy (ddp / fsdp / deepspeed and their settings) through Accelerate
    eval:      what `dora eval` does with the result by default
    output_dir: where checkpoints and metrics go
    expected:  the paper's numbers for this row, carried into the metric JSON

Loading (`load_recipe`), in this order:

1. The file (a regular file of at most 1 MiB) is read with a `yaml.SafeLoader` whose plain scalars are
   YAML 1.2's (`1e-4` is a float, `no` a string, `010` ten); it must be a mapping.
2. `base: other.yaml` (relative to the file that names it) is loaded first, recursively, and the file
   is deep-merged over it: mappings merge key by key, lists and scalars (null included) replace.
3. `${env:VAR}` in a string value is replaced by the environment variable (`${env:VAR,default}` when
   it may be unset; `$${env:` is a literal `${env:`). The result is a string; the schema types it
   (a free-form `model.config` value stays a string). Inside a YAML flow mapping `{...}` quote it.
4. Dotted overrides `adapter.r=8 adapter.target_modules=[q_proj,v_proj] model.config.hidden_size=32`:
   the value is parsed as YAML (the same safe loader), a mapping value merges into the section.
5. Pydantic validates; the first error (unknown keys first) becomes a one-line `UserError` naming
   the override that set the key, else the file of the base chain that wrote it, the key and what
   was expected.

Paths inside a recipe (data sources, output_dir, model directories, ...) are relative to the current
working directory, not to the recipe file, and are not resolved while loading. Only `base:` is relative
to the file that names it. `absolute_paths(recipe)` makes them absolute (the form a run saves, so that
its checkpoints work from any directory): every field marked `LOCAL_PATH` (output_dir), and every field
marked `LOCAL_OR_HUB` whose value exists on disk (a hub id stays a hub id).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from dora_cli.adapters.config import AdapterConfig, Schema
from dora_cli.errors import UserError, absent, clip, did_you_mean, note_user_paths, one_of, problem_of

MAX_VALUES = 10_000
"""Most values a recipe document may hold once its aliases (`*name`) are expanded: far above any real
recipe, far below a "billion laughs" document (a few hundred bytes of nested aliases that expand to
billions of values)."""


MAX_RECIPE_BYTES = 1 << 20
"""The largest recipe file read (1 MiB: a recipe is a few kB)."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (YAML requires unique keys; PyYAML keeps the last silently)."""


class AliasBombError(yaml.constructor.ConstructorError):
    """The document's aliases expand past MAX_VALUES values."""


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2's plain scalars (its core schema): `1e-4` is a float, only true /
    false are booleans (`mixed_precision: no` stays the string "no"), `010` is ten and `1:30` or
    `2024-01-01` a string. Only resolvers and the number constructors change; no tag constructs anything
    beyond plain data.

    Two refusals on top: a key repeated in one mapping (`<<` merges may still be overridden) and a
    document whose aliases expand past MAX_VALUES values, counted on the node graph before anything
    is built."""

    def construct_document(self, node):
        size = _expanded_size(node, MAX_VALUES)
        if size > MAX_VALUES:
            raise AliasBombError(
                None, None, f"its aliases (*name) expand to more than {MAX_VALUES} values; write the values out",
                node.start_mark,
            )
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable: the constructor itself refuses it
                continue
            if first is not key_node:
                raise DuplicateKeyError(
                    None, None, f"{_show_key(key)}: duplicate key (first at line {first.start_mark.line + 1}); "
                    "a key may appear once in a mapping", key_node.start_mark,
                )


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many nodes the document has with every alias expanded; stops early past `limit`.

    Iterative and memoised on the node graph (an alias is the same node object), so a document
    that would expand to billions of values is measured in microseconds. A recursive alias counts
    once here (the copy in `_copy_tree` refuses it with its depth limit)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _children(node)
        if finished:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[id(node)] > limit:
                return sizes[id(node)]
        elif id(node) not in sizes and id(node) not in on_path:
            on_path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


_YAML11 = {f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float", "timestamp")}
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# YAML 1.2's core schema: `010` is ten (1.1: eight), `1:30` and `2024-01-01` are strings (1.1: 90 and a date).
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


RecipeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
RecipeLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class RecipeDumper(yaml.SafeDumper):
    """Writes what RecipeLoader reads back as written, and any YAML 1.1 reader too: a string that either would
    read as a number, a boolean or a date (`0o17`, `1e5`, `no`, `2024-01-01`) is quoted."""


RecipeDumper.yaml_implicit_resolvers = {
    first: yaml.SafeDumper.yaml_implicit_resolvers.get(first, []) + RecipeLoader.yaml_implicit_resolvers.get(first, [])
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *RecipeLoader.yaml_implicit_resolvers}
}


def safe_load(text: str):
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


# Markers of the fields that hold paths (json_schema_extra), read by `absolute_paths`.
LOCAL_PATH = {"path": "local"}
"""Always a local path (it may not exist yet): made absolute."""
LOCAL_OR_HUB = {"path": "local_or_hub"}
"""A local path or a hub id: made absolute when it exists on disk."""


INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1
Count = Annotated[int, Field(gt=0, le=INT32_MAX)]
"""A positive count (steps, examples, tokens): it reaches torch and the tokenizers, which take 32 / 64-bit ints."""
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
"""A random seed: numpy (through accelerate.set_seed) takes 0 .. 2**32 - 1."""
Beta = Annotated[float, Field(ge=0, lt=1)]
"""An Adam beta: torch.optim.AdamW takes 0 <= beta < 1."""


class QuantizationConfig(Schema):
    mode: Literal["none", "nf4", "fp4", "int8"] = "none"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class ModelConfig(Schema):
    name_or_path: str | None = Field(None, json_schema_extra=LOCAL_OR_HUB)
    """Hub id, local directory, or a .gguf file. When null, `config` builds a tiny random model."""
    tokenizer: str | None = Field(None, json_schema_extra=LOCAL_OR_HUB)
    """Tokenizer location when it differs from `name_or_path` (required with `config`)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    config: dict[str, Any] | None = None
    """Architecture config of a random model (`model_type: llama`, `hidden_size: 64`, ...), no download."""

    @model_validator(mode="after")
    def _needs_a_model(self) -> ModelConfig:
        if self.name_or_path is None and self.config is None:
            raise ValueError("set model.name_or_path (hub id, directory or .gguf file) or model.config")
        return self


class DataSource(Schema):
    path: str = Field(json_schema_extra=LOCAL_OR_HUB)
    """A local .json / .jsonl / .parquet file, a directory of them, a `datasets.save_to_disk` directory, or a
    hub dataset name."""
    split: str = "train"
    weight: float | None = Field(None, gt=0, le=100)
    """Fraction of the mix taken from this source (None: all of it; 2.5: all twice and a half)."""


CONVERSATION_FORMATS = ("messages", "sharegpt")
"""Record layouts that hold whole conversations, rendered by the tokenizer's chat template."""


class DataConfig(Schema):
    format: Literal["commonsense", "alpaca", "orca_math", "messages", "sharegpt"] = "commonsense"
    """Record layout: commonsense (LLM-Adapters: instruction/input/output/answer), alpaca
    (instruction/input/output), orca_math (question/answer), messages (OpenAI-style
    `{"messages": [{"role", "content"}, ...]}`) or sharegpt (`{"conversations": [{"from", "value"}, ...]}`).
    The two conversation formats imply `template: chat`."""
    sources: list[DataSource] = Field(default_factory=list)
    template: Literal["llm_adapters", "alpaca", "chat"] = "llm_adapters"
    cutoff_len: int = Field(256, ge=2, le=INT32_MAX)
    """Tokens per example. At least 2: the loss predicts token i+1 from tokens up to i, so a one-token
    example has nothing to learn (LLM-Adapters uses 256)."""
    train_on_inputs: bool = True
    add_eos_token: bool = True
    val_set_size: int = Field(0, ge=0, le=INT32_MAX)
    max_samples: Count | None = None
    seed: Seed = 42
    packing: bool = False
    """Padding-free training micro-batches: the examples of a micro-batch are concatenated into one row,
    position ids restart per example and attention is isolated between them (block-diagonal mask, or
    flash-attention varlen). Same examples per step and the same loss as unpacked; refused for a model whose
    attention does not isolate packed examples."""
    group_by_length: bool = False
    """Seeded length-grouped batches: each global batch holds examples of similar length (less padding);
    still a pure function of (train.seed, epoch), so resume and multi-process runs see the same batches."""

    @model_validator(mode="after")
    def _conversations_use_the_chat_template(self) -> DataConfig:
        if self.format in CONVERSATION_FORMATS and self.template != "chat":
            if "template" in self.model_fields_set:
                raise ValueError(
                    f"format {self.format} is rendered by the tokenizer's chat template, so template must be "
                    f"chat (or left out), got {self.template}"
                )
            self.template = "chat"
        return self


class OptimConfig(Schema):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    fused: bool | None = None
    """AdamW's fused kernel: one pass over all parameters instead of a loop over them (2-3x faster
    optimizer steps on the CPU, the same update within float rounding). Default: on for one process and
    DDP, off under FSDP and DeepSpeed (they step their own way); true / false forces it."""


class ScheduleConfig(Schema):
    type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int | None = Field(None, ge=0, le=INT32_MAX)
    warmup_ratio: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set schedule.warmup_steps or schedule.warmup_ratio, not both")
        return self


class TrainConfig(Schema):
    epochs: float | None = Field(None, gt=0, le=1e6)
    max_steps: Count | None = None
    """Optimizer steps; wins over `epochs` when both are set."""
    batch_size: Count = 16
    """Global batch: examples per optimizer step, over all processes."""
    micro_batch_size: Count = 4
    """Examples per forward pass on one process; accumulation = batch / (micro * processes)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_grad_norm: float | None = Field(None, gt=0)
    seed: Seed = 42
    log_every: Count = 10
    eval_every: Count | None = None
    save_every: Count | None = None
    keep_last: Count | None = None
    skip_nonfinite: int = Field(0, ge=0, le=INT32_MAX)
    """How many steps with a NaN / inf loss or gradient may be skipped before training stops."""
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    """Experiment trackers (through Accelerate) that get the records of metrics.jsonl."""
    compile: bool = False
    """torch.compile the model for training (the adapters trace without graph breaks; the first steps
    compile, each new sequence length may too). Pays off on GPUs more than on CPUs."""
    threads: int | None = Field(None, ge=1, le=4096)
    """CPU threads of each process. Default: torch's, fewer when the machine is already busy (threads
    waiting for a core that another job holds slow a step down many times)."""

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self


class LaunchConfig(Schema):
    """How many processes train and how the model is spread over them (launch.py builds Accelerate's
    setup from it). Strategy settings left unset keep their defaults; nothing else is set."""

    num_processes: int = Field(1, gt=0, le=4096)
    """Processes in all, over every machine."""
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    config_file: str | None = None
    """Your own Accelerate config file, used as given: it decides the strategy, its settings and the
    processes (the keys below stay unset)."""
    zero_stage: Literal[1, 2, 3] | None = None
    """DeepSpeed ZeRO stage (default 2)."""
    offload: Literal["none", "optimizer", "params"] = "none"
    """To the CPU: optimizer (DeepSpeed: the optimizer state and step) or params (parameters too; FSDP's
    CPU offload, DeepSpeed ZeRO-3's parameter and optimizer offload)."""
    sharding: Literal["full", "hybrid", "grad-op"] | None = None
    """FSDP: full (default), grad-op (parameters stay gathered between forward and backward) or hybrid
    (sharded within a machine, replicated across machines)."""
    state_dict: Literal["full", "sharded"] | None = None
    """FSDP state-dict type given to Accelerate (default full); dora's checkpoints are gathered either way."""
    wrap: list[str] | None = None
    """FSDP: the transformer layer class(es) wrapped as units, a name or a list (default: the model's
    `_no_split_modules`, e.g. LlamaDecoderLayer)."""
    num_machines: int = Field(1, gt=0)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None
    """Address of machine 0 (needed with num_machines > 1)."""
    main_process_port: int | None = Field(None, gt=0, lt=65536)
    """Port on machine 0 (default: a free port on one machine, 29500 across machines)."""

    @field_validator("wrap", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [part.strip() for part in value.split(",")] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> LaunchConfig:
        for problem in launch_problems(self):
            raise ValueError(problem)
        return self


_STRATEGY_KEYS = {"zero_stage": "deepspeed", "sharding": "fsdp", "state_dict": "fsdp", "wrap": "fsdp"}


def launch_problems(launch: LaunchConfig) -> list[str]:
    """Every combination of launch keys that cannot run, one line each (the first one is raised)."""
    lc, problems = launch, []
    if lc.config_file is not None:
        given = [key for key in ("zero_stage", "sharding", "state_dict", "wrap", "main_process_ip", "main_process_port")
                 if getattr(lc, key) is not None]
        given += [key for key, default in (("strategy", "ddp"), ("offload", "none"), ("num_processes", 1),
                                           ("num_machines", 1), ("machine_rank", 0)) if getattr(lc, key) != default]
        problems += [f"{key}: config_file decides it (the file is used as given); remove one of them" for key in given]
    for key, strategy in _STRATEGY_KEYS.items():
        if getattr(lc, key) is not None and lc.strategy != strategy:
            problems.append(f"{key}: only with strategy {strategy} (strategy is {lc.strategy})")
    if lc.offload != "none" and lc.strategy == "ddp":
        problems.append("offload: needs strategy fsdp or deepspeed (ddp keeps everything on the device)")
    if lc.offload == "optimizer" and lc.strategy == "fsdp":
        problems.append("offload: optimizer: FSDP offloads the parameters, and the optimizer with them: use offload: params")
    if lc.offload == "params" and lc.strategy == "deepspeed" and (lc.zero_stage or 2) < 3:
        problems.append("offload: params needs zero_stage: 3 (DeepSpeed offloads parameters only in ZeRO-3)")
    if lc.sharding == "hybrid" and lc.num_machines < 2:
        problems.append("sharding: hybrid shards within a machine and replicates across machines: "
                        "it needs num_machines > 1 (on one machine use full)")
    if lc.machine_rank >= lc.num_machines:
        problems.append(f"machine_rank: expected a value < num_machines ({lc.num_machines}), got {lc.machine_rank}")
    if lc.num_machines > 1 and lc.main_process_ip is None:
        problems.append("main_process_ip: needed with num_machines > 1 (the address of machine 0)")
    if lc.num_processes % lc.num_machines:
        problems.append(f"num_processes: {lc.num_processes} processes do not split evenly over num_machines={lc.num_machines}")
    if lc.wrap is not None and not lc.wrap:
        problems.append("wrap: expected at least one layer class name (or leave it unset for the model's own)")
    return problems


class MTBenchConfig(Schema):
    questions: str | None = Field(None, json_schema_extra=LOCAL_OR_HUB)
    """question.jsonl of MT-Bench (FastChat layout)."""
    reference_answers: str | None = Field(None, json_schema_extra=LOCAL_OR_HUB)
    judge_prompts: str | None = Field(None, json_schema_extra=LOCAL_OR_HUB)
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable that holds the judge's API key (never the key itself); null: the judge
    takes no key. Unset or empty, only a judge on this machine (localhost) is called without one."""
    judge_timeout: float = Field(120.0, gt=0, le=3600)
    """Seconds to wait for one answer of the judge."""
    judge_max_retries: int = Field(8, ge=0, le=100)
    """Retries of a request that failed for a reason that may pass (a timeout, a 429 or a 5xx), with backoff."""
    max_new_tokens: Count = 1024


class LMEvalConfig(Schema):
    """The lm_eval suite (EleutherAI's lm-evaluation-harness, `pip install 'dora_cli[lm_eval]'`)."""

    tasks_dir: str | None = Field(None, json_schema_extra=LOCAL_PATH)
    """A directory of lm-eval task YAMLs (local-file tasks), added to lm-eval's task list."""
    num_fewshot: int | None = Field(None, ge=0, le=1024)
    """Few-shot examples per prompt; null: each task's own (0 when it names none)."""
    samples: bool = False
    """Also write every example's requests and answers (samples/<task>.jsonl)."""


class EvalConfig(Schema):
    suite: Literal["commonsense", "mt_bench", "math", "lm_eval"] = "commonsense"
    tasks: list[str] = Field(
        default_factory=lambda: [
            "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
        ]
    )
    data_dir: str | None = Field(None, json_schema_extra=LOCAL_OR_HUB)
    """Root of the LLM-Adapters layout (`<root>/<task>/test.json`) or a hub dataset `hf://owner/name`;
    for the math suite, the records file."""
    mode: Literal["generate", "loglik"] = "generate"
    batch_size: Count = 8
    limit: Count | None = None
    num_beams: int | None = Field(None, gt=0, le=1024)
    """Beams of generate mode; null: the suite's default (commonsense 4, math 1)."""
    max_new_tokens: Count | None = None
    """New tokens of generate mode; null: the suite's default (commonsense 32, math 1024)."""
    mt_bench: MTBenchConfig = Field(default_factory=MTBenchConfig)
    lm_eval: LMEvalConfig = Field(default_factory=LMEvalConfig)


class Recipe(Schema):
    base: str | None = None
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = Field("runs/default", json_schema_extra=LOCAL_PATH)
    expected: dict[str, float] = Field(default_factory=dict)
    """The paper's numbers for this row (task name or `avg` -> value), carried into metric JSON."""
    _written: dict[tuple, tuple[str, Any]] = PrivateAttr(default_factory=dict)
    """(location -> (the text as written, with its `${env:...}`, the value it gave)) of every value a
    recipe file took from the environment: what `dump_recipe` saves instead of the value."""


# --------------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *, optional: Sequence[str] = ()) -> Recipe:
    """Read a recipe file, resolve `base:` and `${env:...}`, apply dotted overrides, validate.

    `optional`: dotted keys the command has no use for (`eval.mt_bench`); a `${env:VAR}` under them whose
    variable is not set stays as written (a saved recipe read without, say, the judge's key).
    Every problem the user can fix raises a one-line `UserError`.
    """
    path = Path(path)
    layers = _read_layers(path, chain=())
    data: dict[str, Any] = {}
    for _, layer in layers:
        data = _deep_merge(data, layer)
    replaced = [_parse_override(text) for text in overrides]  # a value an override replaces is never looked up
    written: dict[tuple, str] = {}
    data = _resolve_env(data, (), written, lambda loc: any(_replaces(parts, value, loc) for parts, value in replaced),
                        lambda loc: any(_format_loc(loc).startswith(key) for key in optional))
    return _validate(data, str(path), overrides, layers, written)


def _replaces(parts: tuple, value: Any, loc: tuple) -> bool:
    """Whether an override of `parts` with `value` replaces the value at `loc` (a mapping merges: only its keys)."""
    if loc[: len(parts)] != parts:
        return False
    for key in loc[len(parts):]:
        if not isinstance(value, dict):
            return True
        if key not in value:
            return False
        value = value[key]
    return True


def recipe_from_dict(data: dict[str, Any], source: str, overrides: Sequence[str] = ()) -> Recipe:
    """Apply dotted overrides to an already-resolved mapping and validate it into a Recipe.

    `source` names where the mapping came from in error messages (a file name). The mapping is not
    modified. A validation error becomes a one-line `UserError`.
    """
    return _validate(data, source, overrides, layers=[])


def _validate(
    data: dict[str, Any], source: str, overrides: Sequence[str], layers: list[tuple[str, dict[str, Any]]],
    written: dict[tuple, str] | None = None,
) -> Recipe:
    """Overrides, then pydantic; `layers` (file name, mapping) tell which file wrote a bad key; `written`:
    the text of the values taken from the environment (dropped where an override replaces them)."""
    if not isinstance(data, dict):
        raise UserError(f"expected a mapping of sections, got {_show(data)}", where=source)
    applied: list[tuple[tuple[str, ...], str]] = []
    for text in overrides:
        parts, value = _parse_override(text)
        data = _set_key(data, parts, value, _override_label(text))
        applied.append((parts, text))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _friendly(err, source, applied, layers) from None
    note_user_paths(*recipe_paths(recipe))
    dumped = recipe.model_dump(mode="python")
    parsed = [_parse_override(text) for _, text in applied]
    for loc, text in (written or {}).items():
        if any(_replaces(parts, value, loc) for parts, value in parsed):
            continue  # an override replaced it
        found, value = value_at(dumped, loc)
        if found:
            recipe._written[loc] = (text, value)
    return recipe


def value_at(tree: Any, loc: tuple) -> tuple[bool, Any]:
    """(whether `loc` exists in a recipe document or model dump, its value)."""
    for part in loc:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, (list, tuple)) and isinstance(part, int) and 0 <= part < len(tree):
            tree = tree[part]
        else:
            return False, None
    return True, tree


def _set_at(tree: Any, loc: tuple, value: Any) -> None:
    for part in loc[:-1]:
        tree = tree[part]
    tree[loc[-1]] = value


def recipe_paths(recipe: Recipe) -> list[str]:
    """The file and directory names a recipe gives (model, tokenizer, data, output, eval inputs)."""
    bench = recipe.eval.mt_bench
    return [
        p for p in (
            recipe.model.name_or_path, recipe.model.tokenizer, recipe.output_dir, recipe.eval.data_dir,
            bench.questions, bench.reference_answers, bench.judge_prompts, recipe.eval.lm_eval.tasks_dir,
            *(s.path for s in recipe.data.sources),
        ) if p
    ]


def dump_recipe(recipe: Recipe, *, resolved: bool = False) -> str:
    """The recipe as YAML (no `base:`), keys in schema order; `load_recipe` reads it back.

    Every value taken from the environment is written as it was written, `${env:...}` and all (the value
    is used, never saved), unless `resolved` (the run's identity compares values). A path made absolute
    (`absolute_paths`) keeps its reference behind the directory it was relative to, so the saved recipe
    names the same file from any directory."""
    raw = recipe.model_dump(mode="python", exclude={"base"})
    data = _plain(raw)
    if not resolved:
        for loc, (text, value) in recipe._written.items():
            found, current = value_at(raw, loc)
            if not found:
                continue
            if current == value:
                _set_at(data, loc, text)
            elif _made_absolute(loc, value, current):
                _set_at(data, loc, os.path.join(os.getcwd(), text))
    return yaml.dump(data, Dumper=RecipeDumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _made_absolute(loc: tuple, value: Any, current: Any) -> bool:
    """Whether `current` is `value`, a relative path of a path field, made absolute from this directory."""
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model is not None and isinstance(loc[-1], str) else None
    marked = field is not None and isinstance(field.json_schema_extra, dict) and "path" in field.json_schema_extra
    return (marked and isinstance(value, str) and not value.startswith(("/", "~"))
            and current == os.path.abspath(value))


@dataclass(frozen=True)
class EnvReference:
    """A value a recipe took from the environment."""

    loc: tuple  # where: ("eval", "mt_bench", "judge_url")
    key: str  # the same, dotted: eval.mt_bench.judge_url
    text: str  # as written: http://user:${env:KEY}@host/v1
    value: Any  # what it gave (validated)


def env_references(recipe: Recipe) -> list[EnvReference]:
    return [EnvReference(loc, _format_loc(loc), text, value) for loc, (text, value) in recipe._written.items()]



def absolute_paths(section: BaseModel) -> BaseModel:
    """A copy of a recipe (or of one of its sections) with its path fields absolute (see LOCAL_PATH,
    LOCAL_OR_HUB); relative paths are taken from the current directory. Idempotent."""
    update: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        value, extra = getattr(section, name), field.json_schema_extra
        kind = extra.get("path") if isinstance(extra, dict) else None
        if kind is not None and isinstance(value, str) and value:
            update[name] = _absolute(value, kind)
        elif isinstance(value, BaseModel):
            update[name] = absolute_paths(value)
        elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
            update[name] = [absolute_paths(v) if isinstance(v, BaseModel) else v for v in value]
    return section.model_copy(update=update)


def _absolute(value: str, kind: str) -> str:
    path = Path(value).expanduser()
    return os.path.abspath(path) if kind == "local" or path.exists() else value


def check_batch(recipe: Recipe, num_processes: int) -> int:
    """Gradient accumulation steps: train.batch_size / (train.micro_batch_size * num_processes)."""
    if num_processes < 1:
        raise UserError(f"the number of processes must be at least 1, got {num_processes}")
    batch, micro = recipe.train.batch_size, recipe.train.micro_batch_size
    per_step = micro * num_processes
    if batch % per_step:
        nearest = max(per_step, round(batch / per_step) * per_step)
        raise UserError(
            f"train.batch_size={batch} is not divisible by train.micro_batch_size={micro} x "
            f"{num_processes} process{'es' if num_processes != 1 else ''} (= {per_step}); "
            f"use a multiple of {per_step} such as train.batch_size={nearest}"
        )
    return batch // per_step


# --------------------------------------------------------------------------------------------------
# Files and `base:` inheritance

_MAX_DEPTH = 100


def _read_layers(path: Path, chain: tuple[tuple[str, Path], ...]) -> list[tuple[str, dict[str, Any]]]:
    """(file name, mapping) of the file and its bases, base first; `chain`: the files that led here."""
    data = _read_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return [(str(path), data)]
    if not isinstance(base, (str, _EnvText)):
        raise UserError(f"base: expected a file name, got {_show(base)}", where=str(path))
    if isinstance(base, _EnvText):
        base = _interpolate(base, ("base",))
    base_path = Path(os.path.normpath(path.parent / base))
    problem = absent(base_path)
    if problem is not None:
        raise UserError(f"base: no such file {base_path}" if problem == "does not exist" else f"base: {base_path} {problem}",
                        where=str(path))
    chain = (*chain, (str(path), path.resolve()))
    seen = [resolved for _, resolved in chain]
    if base_path.resolve() in seen:
        cycle = [name for name, _ in chain[seen.index(base_path.resolve()):]] + [str(base_path)]
        raise UserError(f"base: cycle {' -> '.join(cycle)}", where=str(path))
    if not base_path.is_file():
        kind = "a directory" if base_path.is_dir() else "not a regular file (a device, a pipe or a socket)"
        raise UserError(f"base: {base_path} is {kind}, not a recipe file", where=str(path))
    return [*_read_layers(base_path, chain), (str(path), data)]


def _read_mapping(path: Path) -> dict[str, Any]:
    """One YAML file as a fresh mapping, strings with `${env:` wrapped for later interpolation."""
    where = str(path)
    problem = absent(path)
    if problem is not None:
        raise UserError("no such file" if problem == "does not exist" else problem, where=where)
    if path.is_dir():
        raise UserError("is a directory, not a recipe file", where=where)
    if not path.is_file():  # /dev/zero would be read until memory runs out, a named pipe until a writer comes
        raise UserError("is not a regular file (a device, a pipe or a socket), not a recipe file", where=where)
    try:
        with path.open("rb") as f:  # at most one byte past the limit, whatever the size says (/proc's say 0)
            data = f.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise UserError(f"is over {MAX_RECIPE_BYTES:,} bytes, the most a recipe file may have", where=where)
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("not a UTF-8 text file", where=where) from None
    except OSError as err:
        raise UserError(f"cannot read ({err.strerror})", where=where) from None
    data = _parse_yaml(text, where)
    if data is None:
        raise UserError("empty recipe (a minimal one is `model: {name_or_path: some/model}`)", where=where)
    if not isinstance(data, dict):
        raise UserError(f"expected a mapping of sections (model:, adapter:, ...), got {_show(data)}", where=where)
    return _copy_tree(data, where, (), _mark_env(where))


def _parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with errors as `file:line: malformed YAML: reason`."""
    try:
        return safe_load(text)
    except (DuplicateKeyError, AliasBombError) as err:
        raise UserError(err.problem, where=f"{where}:{err.problem_mark.line + 1}") from None
    except yaml.MarkedYAMLError as err:
        line = f":{err.problem_mark.line + 1}" if err.problem_mark else ""
        reason = err.problem or err.context or "cannot parse"
        raise UserError(f"malformed YAML: {_oneline(reason)}", where=f"{where}{line}") from None
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        raise UserError(f"malformed YAML: {_oneline(err.reason)}", where=f"{where}:{line}") from None
    except yaml.YAMLError as err:
        raise UserError(f"malformed YAML: {_oneline(str(err))}", where=where) from None
    except ValueError as err:  # an integer literal over Python's digit limit
        raise UserError(f"malformed YAML: {problem_of(err)}", where=where) from None
    except RecursionError:
        raise UserError("malformed YAML: nested too deeply", where=where) from None


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`: mappings merge recursively, everything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------------------
# ${env:VAR} interpolation

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_REF = re.compile(r"\$\$\{env:|\$\{env:([^}]*)(\}?)")


@dataclass(frozen=True)
class _EnvText:
    """A string value with `${env:` in it, remembered with its file until the merge is done."""

    text: str
    source: str


def _copy_tree(node: Any, where: str, key: tuple, leaf: Callable[[Any], Any] = lambda x: x) -> Any:
    """A copy of a YAML tree (no shared or recursive aliases left), `leaf` applied to every scalar."""
    if len(key) > _MAX_DEPTH:
        raise UserError(f"{_format_loc(key[:3])}...: nested more than {_MAX_DEPTH} levels", where=where)
    if isinstance(node, dict):
        return {k: _copy_tree(v, where, (*key, k), leaf) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy_tree(v, where, (*key, i), leaf) for i, v in enumerate(node)]
    return leaf(node)


def _mark_env(source: str) -> Callable[[Any], Any]:
    """A leaf function that wraps strings containing `${env:` in `_EnvText`."""
    return lambda value: _EnvText(value, source) if isinstance(value, str) and "${env:" in value else value


def _resolve_env(node: Any, key: tuple, written: dict[tuple, str], replaced: Callable[[tuple], bool],
                 unused: Callable[[tuple], bool]) -> Any:
    """The merged tree with every `_EnvText` interpolated (but where an override will replace it: `replaced`;
    where the command has no use for it, `unused`, an unset variable leaves the text as written); `written`
    gets its text, by location."""
    if isinstance(node, dict):
        return {k: _resolve_env(v, (*key, k), written, replaced, unused) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_env(v, (*key, i), written, replaced, unused) for i, v in enumerate(node)]
    if isinstance(node, _EnvText):
        if replaced(key):
            return node.text
        written[key] = node.text
        try:
            return _interpolate(node, key)
        except UserError:
            if unused(key):
                return node.text
            raise
    return node


def _interpolate(value: _EnvText, key: tuple) -> str:
    """Replace `${env:VAR}` / `${env:VAR,default}` in one string; `$${env:` stays a literal `${env:`."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$${env:":
            return "${env:"
        where = f"{value.source}: {_format_loc(key)}"
        if not match.group(2):
            raise UserError(f"unterminated ${{env:...}} in {_show(value.text)}", where=where)
        name, comma, default = match.group(1).partition(",")
        if not _ENV_NAME.fullmatch(name):
            raise UserError(f"bad environment variable name {_show(name)} in ${{env:...}}", where=where)
        if name in os.environ:
            return os.environ[name]
        if comma:
            return default
        raise UserError(f"environment variable {name} is not set (default: ${{env:{name},value}})", where=where)

    return _ENV_REF.sub(replace, value.text)


# --------------------------------------------------------------------------------------------------
# Dotted overrides


def _parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`a.b=value` -> (("a", "b"), value parsed as YAML), with the key checked against the schema."""
    label = _override_label(text)
    key, eq, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not eq or not all(parts):
        raise UserError("expected key=value with a dotted key, e.g. train.max_steps=10", where=label)
    _check_key(parts, label)
    try:
        value = safe_load(raw)
    except (DuplicateKeyError, AliasBombError) as err:
        raise UserError(err.problem, where=label) from None
    except (yaml.YAMLError, RecursionError) as err:
        reason = getattr(err, "problem", None) or str(err) or type(err).__name__
        raise UserError(f"malformed YAML value: {_oneline(reason)}", where=label) from None
    except ValueError as err:
        raise UserError(f"malformed YAML value: {problem_of(err)}", where=label) from None
    return parts, _copy_tree(value, label, parts)


def refuse_set_twice(overrides: Sequence[str], options: dict[str, str]) -> None:
    """A key set twice on the command line is a UserError: by an option of the command and an override, or by
    two overrides (itself, or in a mapping value of a section above it). `options`: dotted key -> what the
    message says after it (`set by both --limit and this override; give one`)."""
    seen = [(tuple(key.split(".")), says) for key, says in options.items()]
    for text in overrides:
        leaves = override_keys(text)
        for leaf in leaves:
            for earlier, says in seen:
                if leaf[:len(earlier)] == earlier or earlier[:len(leaf)] == leaf:
                    key = max(leaf, earlier, key=len)
                    raise UserError(f"{'.'.join(key)}: {says}", where=_override_label(text))
        seen += [(leaf, f"also set by the override {clip(text, 60)}; give it once") for leaf in leaves]


def override_keys(text: str) -> list[tuple[str, ...]]:
    """The keys the override `text` sets (checked against the schema): its own, or those of its mapping value."""
    return _leaves(*_parse_override(text))


def _leaves(parts: tuple[str, ...], value: Any) -> list[tuple[str, ...]]:
    """The keys an override sets: its own, or those of its mapping value (which merges into the section)."""
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves((*parts, str(key)), item)]
    return [parts]


def set_by_both(option: str) -> str:
    """What `refuse_set_twice` says of a key that `option` sets."""
    return f"set by both {option} and this override; give one"


def _override_label(text: str) -> str:
    """`override key=value` for error messages, a long value cut after a whole word."""
    return f"override {clip(text, 120)}"


def _check_key(parts: tuple[str, ...], label: str) -> None:
    """Raise unless `parts` names a field of the schema (or a key inside a free-form mapping)."""
    model: type[BaseModel] | None = Recipe
    for i, part in enumerate(parts):
        if model is None:  # inside a free-form mapping: any key goes
            return
        dotted = _format_loc(parts[: i + 1])
        if part == "base" and model is Recipe:
            raise UserError("base: cannot be overridden (overrides apply after inheritance)", where=label)
        fields = [name for name in model.model_fields if not (model is Recipe and name == "base")]
        if part not in fields:
            raise UserError(f"{dotted}: {_unknown_key(part, fields)}", where=label)
        annotation = model.model_fields[part].annotation
        model = _section_model(annotation, through_lists=False)
        if model is None and i + 1 < len(parts) and not _is_mapping(annotation):
            raise UserError(f"{dotted}: not a section; set {dotted}=<value> as a whole", where=label)


def _set_key(data: dict[str, Any], parts: tuple[str, ...], value: Any, label: str, done: tuple = ()) -> dict:
    """A copy of `data` with `value` at `parts`; a mapping value merges into an existing mapping."""
    data = dict(data)
    head, rest = parts[0], parts[1:]
    current = data.get(head)
    if not rest:
        both = isinstance(current, dict) and isinstance(value, dict)
        data[head] = _deep_merge(current, value) if both else value
        return data
    if current is None:
        current = {}
    if not isinstance(current, dict):
        raise UserError(f"{_format_loc((*done, head))}: is {_show(current)}, not a mapping", where=label)
    data[head] = _set_key(current, rest, value, label, (*done, head))
    return data


def _section_model(annotation: Any, through_lists: bool = True) -> type[BaseModel] | None:
    """The pydantic model a field holds (directly, in Optional or, with through_lists, in a list)."""
    if not through_lists and get_origin(annotation) is list:
        return None
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_mapping(annotation: Any) -> bool:
    """Whether a field is a free-form mapping (`dict[...]`, possibly Optional)."""
    return any(candidate is dict or get_origin(candidate) is dict for candidate in (annotation, *get_args(annotation)))


# --------------------------------------------------------------------------------------------------
# Validation errors as one line

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "tuple": "a list",
    "dict": "a mapping",
    "model": "a mapping",
}


def _friendly(
    err: ValidationError,
    source: str,
    applied: list[tuple[tuple[str, ...], str]],
    layers: list[tuple[str, dict[str, Any]]],
) -> UserError:
    """The first (unknown keys first) pydantic error as `where: key: what was expected`.

    `where` is the override that set the key, else the file (of the base chain) that wrote it.
    """
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = tuple(first["loc"])
    where = _file_of(loc, layers) or source
    for parts, text in applied:
        n = min(len(parts), len(loc))
        if parts[:n] == loc[:n]:
            where = _override_label(text)
    message = _explain(first, loc)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return UserError(f"{message}{more}", where=where)


def _explain(error: dict[str, Any], loc: tuple) -> str:
    """`key: what was expected, got what` for one pydantic error."""
    kind, value = error["type"], error.get("input")
    if "[key]" in loc:
        loc = loc[: loc.index("[key]") - 1]
        return f"{_format_loc(loc)}: keys must be strings, got {_show(error['loc'][len(loc)])}"
    key = _format_loc(loc)
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        fields = list(model.model_fields) if model else []
        return f"{key}: {_unknown_key(loc[-1], fields)}"
    if kind == "missing":
        return f"{key}: missing item" if isinstance(loc[-1], int) else f"{key}: required, not set"
    if kind == "literal_error":
        expected = error["ctx"]["expected"]  # "'a', 'b' or 'c'", or "1, 2 or 3" for numbers
        choices = re.findall(r"'([^']*)'", expected) or [c.strip() for c in re.split(r",| or ", expected) if c.strip()]
        return f"{key}: expected one of {one_of(choices)}, got {_show(value)}{did_you_mean(value, choices)}"
    if kind == "value_error":
        return f"{key}: {_oneline(error['msg'].removeprefix('Value error, '))}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(error["ctx"].values()))
        return f"{key}: expected a value {bounds[kind]} {limit}, got {_show(value)}"
    if kind == "too_short":
        return f"{key}: expected at least {error['ctx']['min_length']} item(s), got {error['ctx']['actual_length']}"
    if kind == "finite_number":
        return f"{key}: expected a finite number, got {_show(value)}"
    word = _TYPE_WORDS.get(kind.split("_")[0])
    if word and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"{key}: expected {word}, got {_show(value)}"
    message = _oneline(error["msg"])
    return f"{key}: {message[:1].lower()}{message[1:]}, got {_show(value)}"


def _unknown_key(key: Any, fields: list[str]) -> str:
    """'unknown key (did you mean "x"?)', or with no close name the section's valid keys."""
    hint = did_you_mean(key, fields)
    if hint or not fields:
        return f"unknown key{hint}"
    return f"unknown key (valid keys here: {', '.join(sorted(fields))})"


def _file_of(loc: tuple, layers: list[tuple[str, dict[str, Any]]]) -> str | None:
    """The last file of the chain that wrote the longest part of `loc`, or None."""
    best, best_depth = None, 0
    for name, node in layers:
        depth = 0
        for part in loc:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                break
            depth += 1
        if depth and depth >= best_depth:
            best, best_depth = name, depth
    return best


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The section model at a location such as ("data", "sources", 0), or None."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _section_model(model.model_fields[part].annotation)
    return model


def _format_loc(loc: tuple) -> str:
    """("data", "sources", 0, "path") -> "data.sources[0].path"."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _show_key(part)
    return out or "(top level)"


def _show_key(key: Any) -> str:
    """A key as written, quoted only when it is not a plain word."""
    if isinstance(key, str) and re.fullmatch(r"[\w\-]+", key):
        return key
    return _show(key)


def _show(value: Any, limit: int = 40) -> str:
    """A short one-line rendering of a user value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, _EnvText):
        value = value.text
    return clip(repr(value), limit)


def _oneline(text: str) -> str:
    """Collapse whitespace so that a message stays on one line."""
    return " ".join(str(text).split())


def _plain(node: Any) -> Any:
    """Model dump -> YAML-safe tree: tuples become lists, `${env:` in strings is escaped."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    if isinstance(node, str):
        return node.replace("${env:", "$${env:")
    return node
