"""Wrap a model's target modules with adapters; count trainable parameters (the paper's "# Params (%)")."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dora_cli.adapters.base_ops import base_kind, prepare_base
from dora_cli.adapters.config import AdapterConfig
from dora_cli.adapters.layers import AdaptedLinear
from dora_cli.adapters.variants import METHODS, Vera, VeraProjections
from dora_cli.errors import UserError, did_you_mean

VERA_ATTR = "vera_projections"  # where a model keeps VeRA's shared projections


def matches(name: str, pattern: str) -> bool:
    """PEFT's rule: `pattern` is the module name or a dotted suffix of it, or a regex matching it whole."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every layer an adapter can wrap (nn.Linear, bitsandbytes 4-bit / 8-bit)."""
    return [name for name, module in model.named_modules() if name and base_kind(module) is not None]


def _short_names(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def _select(model: nn.Module, patterns: list[str], key: str) -> list[str]:
    """Module names matched by `patterns`, refusing a pattern that matches nothing or a non-linear layer."""
    modules = dict(model.named_modules())
    linear = linear_module_names(model)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [name for name in modules if name and matches(name, pattern)]
        if not hits:
            short = _short_names(linear)
            raise UserError(
                f"adapter.{key}: {pattern!r} matches no module{did_you_mean(pattern, short)}; "
                f"linear modules of this model: {', '.join(short)}"
            )
        for name in hits:
            if base_kind(modules[name]) is None:
                raise UserError(
                    f"adapter.{key}: {name!r} is a {type(modules[name]).__name__}; only linear layers "
                    "(nn.Linear, bitsandbytes Linear4bit / Linear8bitLt) can be adapted"
                )
            if name not in chosen:
                chosen.append(name)
    return chosen


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Wrap the target modules of `model` in place and freeze everything else.

    Returns the names of the wrapped modules. `method: full` wraps nothing and trains every
    parameter. Errors a user can fix (a pattern matching nothing, a module in both lists, a layer
    that cannot be adapted) raise UserError.
    """
    if any(True for _ in adapted_modules(model)):
        raise UserError("the model already has adapters")
    if cfg.method == "full":
        if cfg.magnitude_only_modules:
            raise UserError("adapter.magnitude_only_modules: not used by method full (every weight trains)")
        if any(base_kind(m) in ("4bit", "8bit") for m in model.modules()):
            raise UserError("adapter.method: full fine-tuning cannot train a quantized base; use lora or dora")
        for p in model.parameters():
            p.requires_grad_(True)
        return []

    targets = _select(model, cfg.target_modules, "target_modules")
    magnitude_only = _select(model, cfg.magnitude_only_modules, "magnitude_only_modules")
    both = sorted(set(targets) & set(magnitude_only))
    if both:
        raise UserError(
            f"adapter: {both[0]!r} is matched by both target_modules and magnitude_only_modules; "
            "a module gets one adapter"
        )

    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for module in modules.values():
        prepare_base(module)  # every 4-bit layer, adapted or not: gradients flow through all of them
    vera = None
    if METHODS[cfg.method].direction is Vera:
        vera = VeraProjections(
            cfg.r,
            in_max=max(modules[n].in_features for n in targets),
            out_max=max(modules[n].out_features for n in targets),
            seed=cfg.vera_seed,
            device=modules[targets[0]].weight.device,
        )
        model.add_module(VERA_ATTR, vera)

    options = dict(detach_norm=cfg.detach_norm, dropout_mode=cfg.dropout_mode)
    for name in targets:
        layer = AdaptedLinear(
            modules[name], cfg.method, r=cfg.r, scaling=cfg.scaling, dropout=cfg.dropout,
            vera=vera, d_init=cfg.vera_d_init, **options,
        )
        replace_module(model, name, layer)
    for name in magnitude_only:
        replace_module(model, name, AdaptedLinear(modules[name], "magnitude", **options))
    return targets + magnitude_only


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `name` was, in the same train / eval mode (eval keeps dropout off)."""
    new.train(model.get_submodule(name).training)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def _numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)  # a packed 4-bit weight counts its unpacked elements
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def parameter_report(model: nn.Module) -> ParamReport:
    """Trainable / (base + adapter) parameters, the convention of PEFT's print_trainable_parameters."""
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return ParamReport(trainable, total)
