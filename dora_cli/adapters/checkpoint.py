"""Save and load adapters in the PEFT layout; merge, unmerge and unwrap.

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
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dora_cli.adapters.base_ops import base_kind, dequantized_weight
from dora_cli.adapters.config import AdapterConfig
from dora_cli.adapters.inject import VERA_ATTR, adapted_modules, apply_adapters
from dora_cli.adapters.layers import LOW_RANK_KINDS, MAGNITUDE_KINDS, VERA_KINDS
from dora_cli.errors import UserError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
OURS_NAME = "dora_cli_adapter.json"
PREFIX = "base_model.model."
EXTENSION_TYPE = "DORA_CLI"
FORMAT_VERSION = 1


# ---- state dicts ------------------------------------------------------------------------------
def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> the live tensor of the model (parameters and VeRA's shared buffers)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapted_modules(model):
        key = PREFIX + name
        if layer.kind in LOW_RANK_KINDS:
            out[f"{key}.lora_A.weight"] = layer.lora_A
            out[f"{key}.lora_B.weight"] = layer.lora_B
        if layer.kind in VERA_KINDS:
            out[f"{key}.vera_lambda_b"] = layer.vera_lambda_b
            out[f"{key}.vera_lambda_d"] = layer.vera_lambda_d
        if layer.kind in MAGNITUDE_KINDS:
            out[f"{key}.lora_magnitude_vector"] = layer.magnitude
    vera = getattr(model, VERA_ATTR, None)
    if vera is not None:
        out["base_model.vera_A"] = vera.A
        out["base_model.vera_B"] = vera.B
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT key names (CPU copies)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _adapter_tensors(model).items()}


# ---- config --------------------------------------------------------------------------------------
_PLAIN = re.compile(r"^[A-Za-z_][\w.]*$")


def our_metadata(model: nn.Module, cfg: AdapterConfig) -> dict:
    """dora_cli_adapter.json: our full config and the kind of every adapted module."""
    kinds = {name: layer.kind for name, layer in adapted_modules(model)}
    return {"format": FORMAT_VERSION, "adapter": cfg.model_dump(), "modules": kinds}


def peft_config(model: nn.Module, cfg: AdapterConfig, base_model: str | None = None) -> dict:
    """adapter_config.json for the adapters on `model`."""
    kinds = {name: layer.kind for name, layer in adapted_modules(model)}
    targets = [n for n, k in kinds.items() if k != "magnitude"]
    extension = cfg.method == "dvora" or any(k == "magnitude" for k in kinds.values())
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
    }
    if cfg.method in ("vera", "dvora"):
        out.update(
            peft_type="VERA", vera_dropout=cfg.dropout, projection_prng_key=cfg.vera_seed,
            save_projection=True, d_initial=cfg.vera_d_init, init_weights=True,
        )
    else:
        out.update(
            peft_type="LORA", lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=cfg.method == "dora",
            use_rslora=cfg.rslora, init_lora_weights=True, rank_pattern={}, alpha_pattern={}, lora_bias=False,
        )
    if extension:
        out["peft_type"] = EXTENSION_TYPE
    return out


def _from_peft(raw: dict, where: str) -> AdapterConfig:
    """Our AdapterConfig for an adapter_config.json written by PEFT."""
    peft_type = raw.get("peft_type")
    unsupported = {
        "bias": raw.get("bias", "none") != "none",
        "modules_to_save": bool(raw.get("modules_to_save")),
        "layers_to_transform": raw.get("layers_to_transform") is not None,
        "rank_pattern": bool(raw.get("rank_pattern")),
        "alpha_pattern": bool(raw.get("alpha_pattern")),
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out")),
        "lora_bias": bool(raw.get("lora_bias")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise UserError(f"{where}: {key}: this PEFT feature is not supported by dora_cli")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise UserError(f"{where}: target_modules: missing")
    if peft_type == "LORA":
        return AdapterConfig(
            method="dora" if raw.get("use_dora") else "lora", r=raw["r"], alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0), rslora=bool(raw.get("use_rslora")), target_modules=targets,
        )
    if peft_type == "VERA":
        return AdapterConfig(
            method="vera", r=raw["r"], dropout=raw.get("vera_dropout", 0.0),
            vera_seed=raw.get("projection_prng_key", 0), vera_d_init=raw.get("d_initial", 0.1),
            target_modules=targets,
        )
    raise UserError(f"{where}: peft_type: {peft_type!r} is not supported (LORA, VERA or dora_cli's own)")


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


def read_adapter_config(directory: str | Path) -> tuple[AdapterConfig, dict[str, str] | None]:
    """(our config, module name -> kind or None) of an adapter directory, ours or PEFT's."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{directory}: no {CONFIG_NAME}: not an adapter directory")
    raw = _read_json(path)
    if (directory / OURS_NAME).is_file():
        ours = _read_json(directory / OURS_NAME)
        try:
            return AdapterConfig(**ours["adapter"]), dict(ours["modules"])
        except (TypeError, ValueError, KeyError) as err:
            raise UserError(f"{directory / OURS_NAME}: invalid ({str(err).splitlines()[0]})") from None
    if raw.get("peft_type") == EXTENSION_TYPE:
        raise UserError(f"{directory}: peft_type DORA_CLI needs {OURS_NAME}, which is missing")
    return _from_peft(raw, str(path)), None


# ---- save / load ---------------------------------------------------------------------------------
def save_adapter(model: nn.Module, cfg: AdapterConfig, directory: str | Path, base_model: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `directory` (created if needed).

    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(adapter_state_dict(model), p, metadata={"format": "pt"}))
    for name, content in ((OURS_NAME, our_metadata(model, cfg)), (CONFIG_NAME, peft_config(model, cfg, base_model))):
        text = json.dumps(content, indent=2, sort_keys=True) + "\n"
        _atomic_write(directory / name, lambda p, text=text: Path(p).write_text(text))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_adapter(model: nn.Module, directory: str | Path) -> AdapterConfig:
    """Apply the adapter saved in `directory` (ours or PEFT's) to a plain base model and load its weights."""
    directory = Path(directory)
    cfg, kinds = read_adapter_config(directory)
    state = _read_weights(directory)

    if kinds:  # our own checkpoint: the exact modules, whatever the patterns
        exact = cfg.model_copy(
            update={
                "target_modules": [re.escape(n) for n, k in kinds.items() if k != "magnitude"],
                "magnitude_only_modules": [re.escape(n) for n, k in kinds.items() if k == "magnitude"],
            }
        )
        apply_adapters(model, exact)
    else:
        apply_adapters(model, cfg)
    _load_tensors(model, state, directory)
    return cfg


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Load saved adapter tensors into a model that already carries the same adapters (resume)."""
    directory = Path(directory)
    _load_tensors(model, _read_weights(directory), directory)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise UserError(f"{directory}: only safetensors are loaded; adapter_model.bin (pickle) is refused")
        raise UserError(f"{directory}: no {WEIGHTS_NAME}")
    try:
        return load_file(str(weights))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise UserError(f"{weights}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


@torch.no_grad()
def _load_tensors(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    live = _adapter_tensors(model)
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
        if saved.shape != tensor.shape:
            raise UserError(
                f"{where}: the adapter does not fit this base model: {key} has shape "
                f"{tuple(saved.shape)} in the checkpoint, {tuple(tensor.shape)} in the model"
            )
        tensor.copy_(saved.to(tensor.dtype))


# ---- merge -----------------------------------------------------------------------------------------
def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its layer in place (undo with unmerge_adapters)."""
    for _, layer in adapted_modules(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapted_modules(model):
        layer.unmerge()


def _dense_linear(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype)
    dense.weight.data.copy_(weight)
    if layer.bias is not None:
        dense.bias.data.copy_(layer.bias.data)
    return dense.requires_grad_(False)


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
        _set(model, name, _dense_linear(base, layer.merged_weight(), target))
    for name, module in list(model.named_modules()):
        if base_kind(module) in ("4bit", "8bit"):
            _set(model, name, _dense_linear(module, dequantized_weight(module, torch.float32), dtype or module.compute_dtype or torch.float32))
    if hasattr(model, VERA_ATTR):
        delattr(model, VERA_ATTR)
    return model


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


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
