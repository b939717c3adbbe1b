"""Save and load adapters in the PEFT layout; refuse, by name, PEFT features dora_cli does not implement.

Layout: `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names:

    base_model.model.<module>.lora_A.weight          [r, in]
    base_model.model.<module>.lora_B.weight          [out, r]
    base_model.model.<module>.lora_magnitude_vector  [out]      (DoRA)
    base_model.model.<module>.vera_lambda_b          [out]      (VeRA)
    base_model.model.<module>.vera_lambda_d          [r]
    base_model.vera_A, base_model.vera_B                        (VeRA's shared projections)

LoRA, DoRA (`peft_type: LORA`, `use_dora`) and VeRA (`peft_type: VERA`) checkpoints load in
`peft.PeftModel.from_pretrained`. DVoRA and magnitude-only modules, which PEFT lacks, use the same
keys (DVoRA = VeRA keys + `lora_magnitude_vector`; a magnitude-only module has only
`lora_magnitude_vector`) with `peft_type: DORA_CLI`, which PEFT refuses (KeyError 'DORA_CLI')
instead of loading it wrongly. Beside them we write `dora_cli_adapter.json`: our full adapter config
and the kind of every adapted module, which our loader reads (PEFT ignores the file). VeRA's
projections are always saved; a PEFT checkpoint without them is restored from its seed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dora_cli.adapters.config import AdapterConfig
from dora_cli.adapters.inject import VERA_ATTR, adapted_modules, apply_adapters
from dora_cli.adapters.variants import METHODS, PEFT_DIRECTIONS, Vera, compose
from dora_cli.errors import UserError
from dora_cli.files import atomic_file, read_json_object, safetensors_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
OURS_NAME = "dora_cli_adapter.json"
PREFIX = "base_model.model."
EXTENSION_TYPE = "DORA_CLI"
FORMAT_VERSION = 1


# ---- state dicts ------------------------------------------------------------------------------
def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> the live tensor of the model (parameters and VeRA's shared buffers)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapted_modules(model):
        for suffix, tensor in layer.adapter_tensors().items():
            out[f"{PREFIX}{name}.{suffix}"] = tensor
    vera = getattr(model, VERA_ATTR, None)
    if vera is not None:
        out.update({key: getattr(vera, attr) for key, attr in Vera.shared_tensors.items()})
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT key names (CPU copies)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in adapter_tensors(model).items()}


# ---- config --------------------------------------------------------------------------------------
_PLAIN = re.compile(r"^[A-Za-z_][\w.]*$")


def our_metadata(model: nn.Module, cfg: AdapterConfig) -> dict:
    """dora_cli_adapter.json: our full config and the kind of every adapted module."""
    kinds = {name: layer.kind for name, layer in adapted_modules(model)}
    return {"format": FORMAT_VERSION, "adapter": cfg.model_dump(), "modules": kinds}


def peft_config(model: nn.Module, cfg: AdapterConfig, base_model: str | None = None) -> dict:
    """adapter_config.json for the adapters on `model`: PEFT's fields, the direction's fragment, and
    peft_type DORA_CLI when a module's method is one PEFT lacks (so that PEFT refuses it)."""
    kinds = {name: layer.kind for name, layer in adapted_modules(model)}
    method = METHODS[cfg.method]
    targets = [n for n, k in kinds.items() if METHODS[k].ranked]
    plain = all(_PLAIN.match(p) for p in cfg.target_modules)
    out: dict = {
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
        "r": cfg.r,
        "target_modules": list(cfg.target_modules) if plain else sorted(targets),
        "peft_type": method.direction.peft_type,
        **method.direction.peft_fields(cfg),
    }
    if method.direction.peft_type == "LORA":
        out["use_dora"] = method.magnitude
    if not all(METHODS[k].peft_native for k in kinds.values()):
        out["peft_type"] = EXTENSION_TYPE
    return out


_PEFT_INERT = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "runtime_config", "megatron_core", "qalora_group_size", "layers_pattern", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config",
})
"""Fields that record provenance, runtime options, or settings that act only through another field."""
_PEFT_OFF = (None, False, "none", {}, [])
"""The values of a PEFT feature that is switched off."""


def _from_peft(raw: dict, where: str) -> AdapterConfig:
    """Our AdapterConfig for an adapter_config.json written by PEFT.

    Every field that is not inert, not read by the direction and not switched off names a PEFT feature
    dora_cli does not implement (exclude_modules, modules_to_save, rank_pattern, layer_replication,
    target_parameters, QA-LoRA, ...): refused by name rather than loaded into a different function.
    """
    peft_type = raw.get("peft_type")
    direction = PEFT_DIRECTIONS.get(peft_type)
    if direction is None:
        raise UserError(f"{where}: peft_type: {peft_type!r} is not supported (LORA, VERA or dora_cli's own)")
    for key, value in raw.items():
        if key in _PEFT_INERT or key in direction.peft_keys or any(value is off or value == off for off in _PEFT_OFF):
            continue
        raise UserError(f"{where}: {key}: this PEFT feature is not supported by dora_cli (it is set to {_short(value)})")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise UserError(f"{where}: target_modules: missing")
    try:
        fields = direction.from_peft(raw)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
    method = compose(direction, magnitude=bool(raw.get("use_dora")))
    return _adapter_config(where, dict(method=method.name, target_modules=targets, **fields))


def _adapter_config(where: str, fields: dict) -> AdapterConfig:
    """AdapterConfig of `fields`; a value it refuses (`lora_alpha: 0`, `r: true`) is a UserError naming `where`."""
    try:
        return AdapterConfig.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        said = (first["msg"].removeprefix("Value error, ") if first["type"] == "value_error"
                else f"{first['msg']}, got {_short(first.get('input'))}")
        raise UserError(f"{where}: adapter {'.'.join(map(str, first['loc']))}: {said}") from None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def read_adapter_config(directory: str | Path) -> tuple[AdapterConfig, dict[str, str] | None]:
    """(our config, module name -> kind or None) of an adapter directory, ours or PEFT's."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{directory}: no {CONFIG_NAME}: not an adapter directory")
    raw = read_json_object(path)
    if (directory / OURS_NAME).is_file():
        ours = read_json_object(directory / OURS_NAME)
        try:
            fields, modules = dict(ours["adapter"]), dict(ours["modules"])
        except (TypeError, ValueError, KeyError) as err:
            raise UserError(f"{directory / OURS_NAME}: invalid ({str(err).splitlines()[0]})") from None
        return _adapter_config(str(directory / OURS_NAME), fields), modules
    if raw.get("peft_type") == EXTENSION_TYPE:
        raise UserError(f"{directory}: peft_type DORA_CLI needs {OURS_NAME}, which is missing")
    return _from_peft(raw, str(path)), None


# ---- save / load ---------------------------------------------------------------------------------
def save_adapter(
    model: nn.Module, cfg: AdapterConfig, directory: str | Path, base_model: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `directory` (created if needed).
    `state`: the adapter's tensors under PEFT keys when the model's own are sharded over processes (a
    trainer gathers them); by default they are read from `model`.

    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model) if state is None else state
    atomic_file(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    for name, content in ((OURS_NAME, our_metadata(model, cfg)), (CONFIG_NAME, peft_config(model, cfg, base_model))):
        text = json.dumps(content, indent=2, sort_keys=True) + "\n"
        atomic_file(directory / name, lambda p, text=text: p.write_text(text))


def load_adapter(model: nn.Module, directory: str | Path) -> AdapterConfig:
    """Apply the adapter saved in `directory` (ours or PEFT's) to a plain base model and load its weights."""
    directory = Path(directory)
    cfg, kinds = read_adapter_config(directory)
    state = read_adapter_weights(directory)

    if kinds:  # our own checkpoint: the exact modules, whatever the patterns
        exact = cfg.model_copy(
            update={
                "target_modules": [re.escape(n) for n, k in kinds.items() if METHODS[k].ranked],
                "magnitude_only_modules": [re.escape(n) for n, k in kinds.items() if not METHODS[k].ranked],
            }
        )
        apply_adapters(model, exact)
    else:
        apply_adapters(model, cfg)
    _load_tensors(model, state, directory)
    return cfg


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise UserError(f"{directory}: only safetensors are loaded; adapter_model.bin (pickle) is refused")
        raise UserError(f"{directory}: no {WEIGHTS_NAME}")
    safetensors_header(weights)
    try:
        return load_file(str(weights))
    except SafetensorError as err:  # a header that passed the check but that safetensors refuses
        raise UserError(f"{weights}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


@torch.no_grad()
def _load_tensors(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    for live, saved in fit_adapter_state(model, state, where).values():
        live.copy_(saved.to(live.dtype))


def fit_adapter_state(
    model: nn.Module, state: dict[str, torch.Tensor], where, shape=lambda tensor: tensor.shape
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT key -> (live tensor, saved tensor) for loading `state` into `model`'s adapters; a UserError
    when they do not fit. `shape(live)`: the whole shape of a live tensor (sharded ones keep a part)."""
    live = adapter_tensors(model)
    if "base_model.vera_A" not in state:  # PEFT's save_projection=False: regenerated from the seed
        live.pop("base_model.vera_A", None)
        live.pop("base_model.vera_B", None)
    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        what = "missing from the checkpoint" if missing else "in the checkpoint but not in the model"
        raise UserError(
            f"{where}: the adapter does not fit this base model: {first} is {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, tensor in live.items():
        saved = state[key]
        if saved.shape != shape(tensor):
            raise UserError(
                f"{where}: the adapter does not fit this base model: {key} has shape "
                f"{tuple(saved.shape)} in the checkpoint, {tuple(shape(tensor))} in the model"
            )
    return {key: (tensor, state[key]) for key, tensor in live.items()}
