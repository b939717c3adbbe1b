"""Fold adapters into their layers: merge / unmerge in place, unwrap into a plain model, merged state dicts.

    W_merged = diag(m / n) · (W0 + ΔW)     (with a magnitude; n = ‖W0 + ΔW‖ per row),  W0 + ΔW otherwise

Each layer folds itself (`AdaptedLinear.merge`, the code the training forward is tested against); this
module applies that to a whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from dora_cli.adapters.base_ops import base_kind, dense_linear, dequantized_weight
from dora_cli.adapters.inject import VERA_ATTR, adapted_modules, replace_module


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its layer in place (undo with unmerge_adapters)."""
    for _, layer in adapted_modules(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapted_modules(model):
        layer.unmerge()


@torch.no_grad()
def unwrap(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn `model` into a plain model of its base architecture, in place.

    Every AdaptedLinear becomes an nn.Linear with the merged weight; every remaining quantized
    layer is dequantized. `dtype`: the dtype of the new dense layers (default: the base dtype, or
    the compute dtype of a quantized base).
    """
    for name, layer in list(adapted_modules(model)):
        layer.unmerge()
        base = layer.base_layer
        target = dtype or (base.weight.dtype if base_kind(base) == "linear" else (base.compute_dtype or torch.float32))
        replace_module(model, name, dense_linear(base, layer.merged_weight(), target))
    for name, module in list(model.named_modules()):
        if base_kind(module) in ("4bit", "8bit"):
            replace_module(model, name, dense_linear(module, dequantized_weight(module, torch.float32), dtype or module.compute_dtype or torch.float32))
    if hasattr(model, VERA_ATTR):
        delattr(model, VERA_ATTR)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the base architecture with every adapter folded in (the model is left as it is)."""
    sd: dict[str, torch.Tensor] = {}
    adapted = dict(adapted_modules(model))
    for key, value in model.state_dict().items():
        owner = next((n for n in adapted if key.startswith(n + ".")), None)
        if owner is None:
            sd[key] = value
            continue
        layer, rest = adapted[owner], key[len(owner) + 1 :]
        if rest == "base_layer.weight":
            sd[f"{owner}.weight"] = layer.merged_weight().to(value.dtype if value.is_floating_point() else torch.float32)
        elif rest == "base_layer.bias":
            sd[f"{owner}.bias"] = value
    return sd
