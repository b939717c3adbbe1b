"""How far training moved the adapter: per module kind (q_proj, v_proj, ...) and per tensor (the magnitude,
lora_A, lora_B, VeRA's λ), the change ‖x − x0‖ and its size relative to the start, ‖x − x0‖ / ‖x0‖.

    start = layer_tensors(model)                      # right after apply_adapters: the initial values
    ...train...
    changes = tensor_changes(start, gathered_final)   # {"q_proj": {"magnitude": {...}, "lora_A": {...}}}
    idle = untrained_magnitudes(changes)              # ["v_proj"]: kinds whose magnitude never moved

The norms are over every layer of a kind together (the kind's tensors as one vector). A tensor that starts
at zero (lora_B, VeRA's λ_b) has no relative change (None); its change is its norm.
"""

from __future__ import annotations

import math

import torch

from dora_cli.adapters.checkpoint import PREFIX, adapter_tensors
from dora_cli.adapters.variants import Magnitude, tensor_suffixes


def _kind_and_tensor(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    """("q_proj", "lora_A") for base_model.model.<...>.q_proj.lora_A.weight; None for a shared tensor."""
    if not key.startswith(PREFIX):
        return None
    for suffix, attribute in suffixes.items():
        if key.endswith("." + suffix):
            module = key[len(PREFIX) : -len(suffix) - 1]
            return module.rsplit(".", 1)[-1], attribute
    return None


def layer_tensors(model) -> dict[str, torch.Tensor]:
    """CPU copies of every adapted layer's own tensors (PEFT keys; VeRA's shared projections left out)."""
    return {k: t.detach().to("cpu", copy=True) for k, t in adapter_tensors(model).items() if k.startswith(PREFIX)}


def tensor_changes(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> dict[str, dict[str, dict]]:
    """kind -> tensor -> {"change": ‖x − x0‖, "initial": ‖x0‖, "relative": change / initial (None when x0 = 0)},
    over the keys (PEFT names) both hold."""
    suffixes = tensor_suffixes()
    sums: dict[tuple[str, str], list[float]] = {}
    for key, x0 in start.items():
        where = _kind_and_tensor(key, suffixes)
        if where is None or key not in end:
            continue
        x0, x = x0.double(), end[key].to(x0.device).double()
        acc = sums.setdefault(where, [0.0, 0.0])
        acc[0] += float((x - x0).square().sum())
        acc[1] += float(x0.square().sum())
    out: dict[str, dict[str, dict]] = {}
    for (kind, tensor), (change_sq, initial_sq) in sorted(sums.items()):
        change, initial = math.sqrt(change_sq), math.sqrt(initial_sq)
        out.setdefault(kind, {})[tensor] = {
            "change": change, "initial": initial, "relative": change / initial if initial > 0 else None,
        }
    return out


MAGNITUDE = next(iter(Magnitude.tensors.values()))  # the layer attribute of m


def untrained_magnitudes(changes: dict[str, dict[str, dict]]) -> list[str]:
    """The module kinds whose magnitude is exactly its initial value."""
    return [kind for kind, tensors in changes.items() if MAGNITUDE in tensors and tensors[MAGNITUDE]["change"] == 0.0]
