"""The adapter engine: LoRA, DoRA, magnitude-only, VeRA and DVoRA on any linear layer of a model.

Usable without the CLI::

    from dora_cli.adapters import AdapterConfig, apply_adapters, parameter_report, save_adapter

    cfg = AdapterConfig(method="dora", r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    apply_adapters(model, cfg)          # wraps the targets in place, freezes the rest
    print(parameter_report(model))      # trainable params: ... || trainable%: ...
    save_adapter(model, cfg, "out/")    # PEFT layout: peft.PeftModel.from_pretrained reads it

    variants.py   the methods: a direction update (low-rank, VeRA, none) x a magnitude (on / off)
    layers.py     AdaptedLinear: one frozen base layer + one method
    functional.py the precision-aware autograd functions (fp32 low-rank branch, the magnitude rescale)
    dropout.py    inverted dropout, its CPU masks drawn from geometric gaps
    base_ops.py   what a layer needs from its frozen base (GEMM without bias, weights; fp, 4-bit, 8-bit)
    norm.py       the factored row norm
    inject.py     wrap a model's target modules; count trainable parameters
    change.py     how far training moved each adapter tensor (per module kind)
    checkpoint.py save / load in the PEFT layout
    merging.py    merge / unmerge in place, unwrap, merged state dicts
"""

from dora_cli.adapters.checkpoint import (
    adapter_state_dict,
    adapter_tensors,
    fit_adapter_state,
    load_adapter,
    peft_config,
    read_adapter_config,
    read_adapter_weights,
    save_adapter,
)
from dora_cli.adapters.config import AdapterConfig, method_names
from dora_cli.adapters.inject import (
    ParamReport,
    adapted_modules,
    apply_adapters,
    linear_module_names,
    matches,
    parameter_report,
)
from dora_cli.adapters.layers import AdaptedLinear
from dora_cli.adapters.merging import (
    UntiedWeightsWarning,
    merge_adapters,
    merged_state_dict,
    model_dtype,
    unmerge_adapters,
    untie_adapted_weights,
    unwrap,
)
from dora_cli.adapters.variants import METHODS, Method, VeraProjections

__all__ = [
    "METHODS",
    "AdaptedLinear",
    "AdapterConfig",
    "Method",
    "ParamReport",
    "UntiedWeightsWarning",
    "VeraProjections",
    "adapted_modules",
    "adapter_state_dict",
    "adapter_tensors",
    "apply_adapters",
    "fit_adapter_state",
    "linear_module_names",
    "load_adapter",
    "matches",
    "method_names",
    "merge_adapters",
    "merged_state_dict",
    "model_dtype",
    "parameter_report",
    "peft_config",
    "read_adapter_config",
    "read_adapter_weights",
    "save_adapter",
    "unmerge_adapters",
    "untie_adapted_weights",
    "unwrap",
]
