"""Fold adapters into their layers: merge / unmerge in place, unwrap into a plain model, merged state dicts.

    W_merged = diag(m / n) · (W0 + ΔW)     (with a magnitude; n = ‖W0 + ΔW‖ per row),  W0 + ΔW otherwise

Each layer folds itself (`AdaptedLinear.merge`, the code the training forward is tested against); this
module applies that to a whole model, on every base (nn.Linear, bitsandbytes 4-bit and 8-bit), and
gives back a model whose layers all have the model's dtype (`model_dtype`) unless asked otherwise.

A base weight the model shares with another module (tied input / output embeddings with `lm_head`
adapted) cannot hold the merged weight without changing the other module: merging unties it first
(the adapted layer gets its own copy, `config.tie_word_embeddings` becomes false) and warns, so that
the merged model computes what the adapter model did. `untie_adapted_weights` does it explicitly and
returns what it did (the `dora merge` command reports that on the console).
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn

from dora_cli.adapters.base_ops import base_kind, dense_linear, dequantized_weight
from dora_cli.adapters.inject import VERA_ATTR, adapted_modules, replace_module
from dora_cli.adapters.layers import AdaptedLinear


class UntiedWeightsWarning(UserWarning):
    """A merge gave an adapted layer its own copy of a weight it shared with other modules."""


# ---- dtypes ----------------------------------------------------------------------------------------------
def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of most of the model's own weights (adapter tensors and quantized weights aside)."""
    adapter = {id(t) for _, layer in adapted_modules(model) for t in layer.adapter_tensors().values()}
    counts: Counter = Counter()
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in adapter:
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def _layer_dtype(layer: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a merged dense copy of `layer` gets: an nn.Linear keeps its own, a quantized layer the model's."""
    return layer.weight.dtype if base_kind(layer) == "linear" else default


# ---- tied weights -----------------------------------------------------------------------------------------
def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """Adapted module -> the other parameter names its base weight is also registered under."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = {}
    for name, layer in adapted_modules(model):
        others = [n for n in names.get(id(layer.base_layer.weight), []) if not n.startswith(name + ".")]
        if others:
            out[name] = others
    return out


@torch.no_grad()
def untie_adapted_weights(model: nn.Module) -> list[str]:
    """Give every adapted layer whose base weight is shared its own copy; one sentence per untied layer."""
    notes = []
    for name, others in shared_weights(model).items():
        base = dict(adapted_modules(model))[name].base_layer
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        notes.append(
            f"{name}.weight was tied to {', '.join(others)}; merging unties them (+{base.weight.numel():,} parameters, "
            f"tie_word_embeddings false): the adapter changes {name} only, {', '.join(others)} keeps the base weight"
        )
    config = getattr(model, "config", None)
    if notes and config is not None:
        for cfg in {id(c): c for c in (config, _text_config(config))}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
    return notes


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _untie_and_warn(model: nn.Module) -> None:
    for note in untie_adapted_weights(model):
        warnings.warn(note, UntiedWeightsWarning, stacklevel=3)


# ---- merge / unmerge / unwrap ------------------------------------------------------------------------------
def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its layer in place (undo with unmerge_adapters); unties shared weights first."""
    _untie_and_warn(model)
    dtype = model_dtype(model)
    for _, layer in adapted_modules(model):
        layer.merge(_layer_dtype(layer.base_layer, dtype))


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapted_modules(model):
        layer.unmerge()


@torch.no_grad()
def unwrap(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn `model` into a plain model of its base architecture, in place (and return it).

    Every AdaptedLinear becomes an nn.Linear holding its merged weight; every remaining quantized
    layer is dequantized; a transformers model forgets that it was loaded quantized. The new layers
    have the model's dtype (`model_dtype`; an nn.Linear base keeps its own); `dtype` converts the
    whole model afterwards.
    """
    _untie_and_warn(model)
    target = model_dtype(model)
    for name, layer in list(adapted_modules(model)):
        layer.unmerge()
        base = layer.base_layer
        replace_module(model, name, dense_linear(base, layer.merged_weight(), _layer_dtype(base, target)))
    for name, module in list(model.named_modules()):
        if base_kind(module) in ("4bit", "8bit"):
            replace_module(model, name, dense_linear(module, dequantized_weight(module, torch.float32), target))
    if hasattr(model, VERA_ATTR):
        delattr(model, VERA_ATTR)
    _forget_quantization(model)
    if dtype is not None:
        model.to(dtype)
    return model


def _forget_quantization(model: nn.Module) -> None:
    """After unwrap no quantized layer is left: a transformers model forgets it was loaded quantized."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(model):
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config


# ---- merged state dicts --------------------------------------------------------------------------------------
@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the plain base architecture with every adapter folded in (the model is left as it is).

    Loads with `load_state_dict(strict=True)` into a plain model of the base architecture: adapted
    layers give `<name>.weight` / `.bias`, quantized layers (adapted or not) their dequantized weight
    in the model's dtype and no quantization state. `dtype`: every floating tensor in this dtype instead.
    A shared (tied) adapted weight is written untied, with a warning: load it into a model built with
    tied weights off.
    """
    for name, others in shared_weights(model).items():
        warnings.warn(
            f"{name}.weight is tied to {', '.join(others)}: the merged state dict holds both, untied; "
            "load it into a model with tie_word_embeddings=False",
            UntiedWeightsWarning,
            stacklevel=2,
        )
    default = dtype or model_dtype(model)
    owners: dict[str, nn.Module] = dict(adapted_modules(model))
    owners.update(
        (name, m) for name, m in model.named_modules()
        if base_kind(m) in ("4bit", "8bit") and not any(name.startswith(a + ".") for a in owners)
    )
    sd: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = next((n for n in owners if key.startswith(n + ".")), None)
        if owner is None:
            sd[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
            continue
        module, rest = owners[owner], key[len(owner) + 1 :]
        base = module.base_layer if isinstance(module, AdaptedLinear) else module
        prefix = "base_layer." if isinstance(module, AdaptedLinear) else ""
        out_dtype = dtype or _layer_dtype(base, default)
        if rest == prefix + "weight":
            w = module.merged_weight() if isinstance(module, AdaptedLinear) else dequantized_weight(module, torch.float32)
            sd[f"{owner}.weight"] = w.to(out_dtype)
        elif rest == prefix + "bias":
            sd[f"{owner}.bias"] = value.to(out_dtype)
    return sd
