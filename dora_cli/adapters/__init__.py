"""The adapter engine: LoRA, DoRA, magnitude-only, VeRA and DVoRA on any linear layer of a model.

Usable without the CLI::

    from dora_cli.adapters import AdapterConfig, apply_adapters, parameter_report, save_adapter

    cfg = AdapterConfig(method="dora", r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    apply_adapters(model, cfg)          # wraps the targets in place, freezes the rest
    print(parameter_report(model))      # trainable params: ... || trainable%: ...
    save_adapter(model, cfg, "out/")    # PEFT layout: peft.PeftModel.from_pretrained reads it
"""

from dora_cli.adapters.checkpoint import (
    adapter_state_dict,
    load_adapter,
    merge_adapters,
    merged_state_dict,
    peft_config,
    read_adapter_config,
    save_adapter,
    unmerge_adapters,
    unwrap,
)
from dora_cli.adapters.config import AdapterConfig
from dora_cli.adapters.inject import (
    ParamReport,
    adapted_modules,
    apply_adapters,
    linear_module_names,
    matches,
    parameter_report,
)
from dora_cli.adapters.layers import AdaptedLinear, VeraProjections

__all__ = [
    "AdaptedLinear",
    "AdapterConfig",
    "ParamReport",
    "VeraProjections",
    "adapted_modules",
    "adapter_state_dict",
    "apply_adapters",
    "linear_module_names",
    "load_adapter",
    "matches",
    "merge_adapters",
    "merged_state_dict",
    "parameter_report",
    "peft_config",
    "read_adapter_config",
    "save_adapter",
    "unmerge_adapters",
    "unwrap",
]
