"""The recipe: one YAML file that says everything about a run.

Schema (pydantic, extra="forbid", so a typo is an error and never silently ignored):

    base: other.yaml              # optional: inherit and override (paths relative to this file)
    model:     what to fine-tune (hub id / local dir / .gguf file, or a tiny random `config`)
    adapter:   the method (lora / dora / vera / dvora / full) and its options
    data:      training data, prompt template, tokenisation
    optim:     AdamW settings
    schedule:  learning-rate schedule
    train:     steps, batches, precision, logging and checkpoint cadence
    launch:    processes and strategy (ddp / fsdp / deepspeed) through Accelerate
    eval:      what `dora eval` does with the result by default
    output_dir: where checkpoints and metrics go
    expected:  the paper's numbers for this row, carried into the metric JSON
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dora_cli.adapters.config import AdapterConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizationConfig(_Section):
    mode: Literal["none", "nf4", "fp4", "int8"] = "none"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class ModelConfig(_Section):
    name_or_path: str | None = None
    """Hub id, local directory, or a .gguf file. When null, `config` builds a tiny random model."""
    tokenizer: str | None = None
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


class DataSource(_Section):
    path: str
    """A local .json / .jsonl file, a directory of them, or a hub dataset name."""
    split: str = "train"
    weight: float | None = None
    """Fraction of the mix taken from this source (None: all of it)."""


class DataConfig(_Section):
    format: Literal["commonsense", "alpaca"] = "commonsense"
    sources: list[DataSource] = Field(default_factory=list)
    template: Literal["llm_adapters", "chat"] = "llm_adapters"
    cutoff_len: int = Field(256, gt=0)
    train_on_inputs: bool = True
    add_eos_token: bool = True
    val_set_size: int = Field(0, ge=0)
    max_samples: int | None = Field(None, gt=0)
    seed: int = 42


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)


class ScheduleConfig(_Section):
    type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set schedule.warmup_steps or schedule.warmup_ratio, not both")
        return self


class TrainConfig(_Section):
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    """Global batch: examples per optimizer step, over all processes."""
    micro_batch_size: int = Field(4, gt=0)
    """Examples per forward pass on one process; accumulation = batch / (micro * processes)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_grad_norm: float | None = Field(None, gt=0)
    seed: int = 42
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int | None = Field(None, gt=0)
    skip_nonfinite: int = Field(0, ge=0)
    """How many steps with a NaN / inf loss or gradient may be skipped before training stops."""

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self


class LaunchConfig(_Section):
    num_processes: int = Field(1, gt=0)
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"


class MTBenchConfig(_Section):
    questions: str | None = None
    """question.jsonl of MT-Bench (FastChat layout)."""
    reference_answers: str | None = None
    judge_prompts: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the judge's API key (never the key itself)."""
    max_new_tokens: int = Field(1024, gt=0)


class EvalConfig(_Section):
    suite: Literal["commonsense", "mt_bench", "math"] = "commonsense"
    tasks: list[str] = Field(
        default_factory=lambda: [
            "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
        ]
    )
    data_dir: str | None = None
    """Root of the LLM-Adapters layout (`<root>/<task>/test.json`); None: the hub."""
    mode: Literal["generate", "loglik"] = "generate"
    batch_size: int = Field(8, gt=0)
    limit: int | None = Field(None, gt=0)
    num_beams: int = Field(4, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    mt_bench: MTBenchConfig = Field(default_factory=MTBenchConfig)


class Recipe(_Section):
    base: str | None = None
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = "runs/default"
    expected: dict[str, float] = Field(default_factory=dict)
    """The paper's numbers for this row (task name or `avg` -> value), carried into metric JSON."""
