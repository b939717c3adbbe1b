"""`dora merge CKPT`: fold a checkpoint's adapters into the base weights -> a plain Hugging Face model.

Features, top to bottom:
- input: one of our checkpoints (`output_dir/checkpoint-<step>`, `output_dir/final`), a PEFT adapter
  directory (`adapter_config.json` + `adapter_model.safetensors`), or a `method: full` checkpoint (a
  whole model: converted to the requested dtype, nothing to fold)
- every adapter kind: LoRA, DoRA (with its magnitude), magnitude-only, VeRA, DVoRA. Each module is
  folded by `AdaptedLinear`'s own merge (`fold`), the code the training forward was checked against:

      W' = diag(m / ‖W0 + ΔW‖) · (W0 + ΔW)     (DoRA kinds; LoRA / VeRA: W0 + ΔW), bias unchanged

- the base: `--base`, else the checkpoint's `recipe.yaml` (`model:` section, tiny random models rebuilt
  from `model.config` and its seed), else `adapter_config.json`'s `base_model_name_or_path`
- streaming: a base that is a local directory of safetensors (a `.gguf` base: its cached conversion)
  is read and written one shard at a time, with the same shard names and index; peak memory is about
  one shard plus the adapter, and no transformers model is built. Other bases (random, hub, quantized)
  go through `load_model` + `load_adapter` + `unwrap` + `save_pretrained`.
- a 4-bit / 8-bit recipe: by default the adapters are folded into the *dequantized* base weights,
  the weights the training forward saw, so the merged model reproduces the trained adapter model
  exactly (up to float rounding). `quantized_base="original"` folds them into the full-precision
  weights of `model.name_or_path` instead (what QLoRA users usually ship: better base, but not the
  function that was trained); the CLI does not expose it yet.
- the output directory: shards (+ `model.safetensors.index.json`), `config.json` without
  `quantization_config`, `generation_config.json`, the tokenizer and `dora_merge.json` (where it came
  from). Written into a temporary sibling and renamed: never half-written; an existing `--out` is
  refused unless `--force`.
- `--verify`: logits of the adapter model and of the merged model on fixed prompts; max |diff|.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dora_cli.adapters.checkpoint import (
    CONFIG_NAME,
    OURS_NAME,
    PREFIX,
    _read_json,
    _read_weights,
    read_adapter_config,
)
from dora_cli.adapters.config import AdapterConfig
from dora_cli.adapters.inject import matches
from dora_cli.adapters.layers import VERA_KINDS, AdaptedLinear, VeraProjections
from dora_cli.errors import RunFailure, UserError, did_you_mean, one_of
from dora_cli.recipe import ModelConfig, Recipe

RECIPE_NAME = "recipe.yaml"
PROVENANCE_NAME = "dora_merge.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "spiece.model", "vocab.txt",
)
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
QUANTIZED_BASE = ("dequantized", "original")

# PEFT key suffix -> AdaptedLinear attribute; the tensors each kind carries (as checkpoint._adapter_tensors)
SUFFIXES = {
    "lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "vera_lambda_b": "vera_lambda_b",
    "vera_lambda_d": "vera_lambda_d", "lora_magnitude_vector": "magnitude",
}
KIND_TENSORS = {
    "lora": {"lora_A", "lora_B"},
    "dora": {"lora_A", "lora_B", "magnitude"},
    "vera": {"vera_lambda_b", "vera_lambda_d"},
    "dvora": {"vera_lambda_b", "vera_lambda_d", "magnitude"},
    "magnitude": {"magnitude"},
}
VERA_KEYS = ("base_model.vera_A", "base_model.vera_B")
# The fixed prompts of --verify: token ids drawn from this seed (3 prompts of 16 tokens).
VERIFY_SEED, VERIFY_PROMPTS, VERIFY_TOKENS = 1234, 3, 16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ==================================================================================================
# Entry point
# ==================================================================================================
def run_merge(
    checkpoint: str | Path,
    *,
    out: str | Path | None = None,
    dtype: str = "auto",
    base: str | None = None,
    verify: bool = False,
    force: bool = False,
    quantized_base: str = "dequantized",
) -> Path:
    """Merge `checkpoint` into a Hugging Face model directory `out` (default: CHECKPOINT-merged); returns it.

    dtype: fp16 / bf16 / fp32, or auto (the dtype the trained model computed in: the recipe's
    `model.dtype`, else the base's stored dtype). quantized_base: for a checkpoint trained on a 4-bit /
    8-bit base, fold into the "dequantized" weights (default: reproduces the trained model) or the
    "original" full-precision ones.
    """
    started = time.time()
    ckpt = inspect_checkpoint(checkpoint)
    target = parse_dtype(dtype)
    if quantized_base not in QUANTIZED_BASE:
        raise UserError(f"quantized_base: expected {one_of(QUANTIZED_BASE)}, got {quantized_base!r}")
    if out is None:
        resolved = ckpt.path.resolve()
        out = resolved.with_name(resolved.name + "-merged")
    out = Path(out)
    _check_out(out, force, protected=[ckpt.path])

    if ckpt.kind == "full":
        if base is not None:
            raise UserError(f"{ckpt.path}: a full fine-tuning checkpoint is already a whole model; --base does not apply")
        adapter = None
        src = Base(
            model=ModelConfig(name_or_path=str(ckpt.path), dtype=ckpt.recipe.model.dtype if ckpt.recipe else "float32"),
            description=f"full fine-tuning checkpoint {ckpt.path}", directory=ckpt.path,
            cast=None, tokenizer_dir=ckpt.path,
        )
    else:
        adapter = read_adapter(ckpt.path)
        src = resolve_base(ckpt, adapter.base_model, base, quantized_base=quantized_base)
    if src.directory is not None:
        _check_out(out, force, protected=[ckpt.path, src.directory])
    out_dtype = target if target is not None else src.auto_dtype()

    record = {
        "checkpoint": str(ckpt.path.resolve()),
        "checkpoint_kind": ckpt.kind,
        "base": src.description,
        "base_model": src.model.model_dump(mode="json"),
        "quantized_base": quantized_base if _trained_quantized(ckpt) else None,
        "dtype": _dtype_name(out_dtype) if out_dtype is not None else "as stored",
        "streamed": src.directory is not None,
        "adapter": None if adapter is None else {
            "config": adapter.config.model_dump(mode="json"),
            "modules": len(adapter.modules),
            "kinds": sorted(set(adapter.modules.values())),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dora_cli": _version(),
    }

    if src.directory is not None:
        plan = plan_stream(src.directory, adapter)  # validates the adapter against the base: nothing written yet
        what = f"converting {ckpt.path} (nothing to fold)" if adapter is None else f"merging {ckpt.path} into {src.description}"
        log(f"{what}: {len(plan.shards)} shard(s), streamed")
        fill = lambda tmp: _stream_merge(plan, adapter, src, out_dtype, tmp)  # noqa: E731
    else:
        model, tokenizer = _load_adapted(src, ckpt.path if adapter is not None else None)  # validates, writes nothing
        log(f"merging {ckpt.path} into {src.description} (loaded in memory)")
        fill = lambda tmp: _save_unwrapped(model, tokenizer, out_dtype, tmp)  # noqa: E731

    def write(tmp: Path) -> None:
        fill(tmp)
        if verify:
            record["verify"] = verify_merge(src.model, ckpt.path if adapter is not None else None, tmp)
        record["seconds"] = round(time.time() - started, 3)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n")

    _atomic_output(out, write, force=force)
    log(f"merged model written to {out}")
    print(out)
    return out


def _trained_quantized(ckpt: Checkpoint) -> bool:
    return ckpt.recipe is not None and ckpt.recipe.model.quantization.mode != "none"


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """--dtype: fp16 / bf16 / fp32 (or their torch names) -> torch dtype; auto / None -> None."""
    if dtype is None or dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected fp16, bf16, fp32 or auto, got {dtype!r}{did_you_mean(dtype, [*DTYPES, 'auto'])}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dora_cli")
    except Exception:  # not installed as a distribution: provenance only
        return "unknown"


# ==================================================================================================
# What the checkpoint is
# ==================================================================================================
@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: str  # "adapter" (ours or PEFT's) or "full" (a whole model: method full)
    recipe: Recipe | None


def inspect_checkpoint(path: str | Path) -> Checkpoint:
    """Classify a checkpoint directory; UserError for anything that holds neither an adapter nor a model."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: does not exist")
    if not path.is_dir():
        raise UserError(f"{path}: expected a checkpoint directory, got a file")
    recipe = read_recipe(path)
    if (path / CONFIG_NAME).is_file():
        return Checkpoint(path, "adapter", recipe)
    if (path / "config.json").is_file() and ((path / SAFE_SINGLE).is_file() or (path / SAFE_INDEX).is_file()):
        return Checkpoint(path, "full", recipe)
    if (path / "config.json").is_file() and any(path.glob("pytorch_model*.bin")):
        raise UserError(f"{path}: only safetensors weights are read; this model has pytorch_model*.bin (pickle)")
    hint = ""
    if (path / "final").is_dir() or any(path.glob("checkpoint-*")):
        hint = f" (a run directory: pass {path / 'final'} or one of its checkpoint-<step> directories)"
    raise UserError(
        f"{path}: no {CONFIG_NAME} (adapter) and no config.json + safetensors (full fine-tuning checkpoint){hint}"
    )


def read_recipe(directory: Path) -> Recipe | None:
    """The resolved recipe a checkpoint was trained with (recipe.yaml), or None."""
    if not (directory / RECIPE_NAME).is_file():
        return None
    from dora_cli.recipe import load_recipe

    return load_recipe(directory / RECIPE_NAME)


# ==================================================================================================
# The adapter: tensors per module, and the fold of one module
# ==================================================================================================
@dataclass
class Adapter:
    directory: Path
    config: AdapterConfig
    modules: dict[str, str]  # module name -> kind
    tensors: dict[str, dict[str, torch.Tensor]]  # module name -> AdaptedLinear attribute -> tensor
    vera_a: torch.Tensor | None = None
    vera_b: torch.Tensor | None = None
    declared: bool = True  # module kinds from dora_cli_adapter.json (else derived from a PEFT config)
    base_model: str | None = None  # adapter_config.json's base_model_name_or_path
    _vera: VeraProjections | None = field(default=None, repr=False)

    def vera(self, shapes: dict[str, tuple[int, int]]) -> VeraProjections | None:
        """VeRA's shared projections: the saved ones, else regenerated from the seed (PEFT's save_projection=False)."""
        if self._vera is not None or not any(k in VERA_KINDS for k in self.modules.values()):
            return self._vera
        r = self.config.r
        if self.vera_a is not None:
            proj = VeraProjections(r, self.vera_a.shape[1], self.vera_b.shape[0], self.config.vera_seed, device="meta")
            proj.A, proj.B = self.vera_a, self.vera_b
        else:
            names = [n for n, k in self.modules.items() if k in VERA_KINDS]
            proj = VeraProjections(
                r, in_max=max(shapes[n][1] for n in names), out_max=max(shapes[n][0] for n in names),
                seed=self.config.vera_seed,
            )
        self._vera = proj
        return proj


def read_adapter(directory: str | Path) -> Adapter:
    """Read an adapter directory (ours or PEFT's) without a model: its config and tensors per module."""
    directory = Path(directory)
    cfg, kinds = read_adapter_config(directory)
    state = _read_weights(directory)
    where = f"{directory}: adapter_model.safetensors"
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    vera = {k: state.pop(k) for k in VERA_KEYS if k in state}
    for key, tensor in state.items():
        module, attr = _split_key(key)
        if module is None:
            raise UserError(f"{where}: unexpected tensor {key!r} (not a LoRA / DoRA / VeRA key of the PEFT layout)")
        tensors.setdefault(module, {})[attr] = tensor
    if not tensors:
        raise UserError(f"{where}: holds no adapter tensors")

    declared = kinds is not None
    if kinds is None:  # PEFT's own adapter: every module carries the config's method
        if cfg.method == "full":
            raise UserError(f"{directory}: method full has no adapter to merge")
        kinds = {name: cfg.method for name in tensors}
    for name in sorted(set(kinds) | set(tensors)):
        have = set(tensors.get(name, {}))
        kind = kinds.get(name)
        if kind is None:
            raise UserError(f"{where}: tensors for {name!r}, which {OURS_NAME} does not list")
        if kind not in KIND_TENSORS:
            raise UserError(f"{directory / OURS_NAME}: {name}: unknown adapter kind {kind!r}")
        want = KIND_TENSORS[kind]
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            what = f"{', '.join(missing)} missing" if missing else f"unexpected {', '.join(extra)}"
            raise UserError(f"{where}: {name} is a {kind} module but its tensors do not match ({what})")
    if any(k in VERA_KINDS for k in kinds.values()) and len(vera) == 1:
        raise UserError(f"{where}: holds only one of {' and '.join(VERA_KEYS)}")
    return Adapter(
        directory=directory, config=cfg, modules=dict(kinds), tensors=tensors,
        vera_a=vera.get(VERA_KEYS[0]), vera_b=vera.get(VERA_KEYS[1]), declared=declared,
        base_model=adapter_base_model(directory),
    )


def adapter_base_model(directory: Path) -> str | None:
    """adapter_config.json's base_model_name_or_path (None when absent or not a string)."""
    name = _read_json(Path(directory) / CONFIG_NAME).get("base_model_name_or_path")
    return name if isinstance(name, str) and name else None


def _split_key(key: str) -> tuple[str | None, str | None]:
    if not key.startswith(PREFIX):
        return None, None
    rest = key[len(PREFIX):]
    for suffix, attr in SUFFIXES.items():
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], attr
    return None, None


def check_fits(adapter: Adapter, shapes: dict[str, tuple[int, ...]], *, base: str) -> None:
    """UserError unless every adapted module exists in the base with shapes that fit (nothing loaded).

    shapes: module name -> weight shape, for every module of the base that has a `.weight`.
    For a PEFT adapter, every linear module its target_modules match must carry tensors.
    """
    prefix = f"{adapter.directory}: the adapter does not fit {base}"
    linear = {n: s for n, s in shapes.items() if len(s) == 2}
    for name in sorted(adapter.modules):
        if name not in linear:
            hint = did_you_mean(name, list(linear))
            raise UserError(f"{prefix}: {name} is not a linear module of the base{hint}")
    if not adapter.declared:
        patterns = adapter.config.target_modules
        wanted = sorted(n for n in linear if any(matches(n, p) for p in patterns))
        missing = [n for n in wanted if n not in adapter.modules]
        if missing:
            raise UserError(f"{prefix}: target_modules match {missing[0]}, which has no tensors in the adapter")
    r = adapter.config.r
    for name, kind in sorted(adapter.modules.items()):
        d_out, d_in = linear[name]
        want = {"magnitude": (d_out,), "vera_lambda_b": (d_out,), "vera_lambda_d": (r,)}
        if kind in ("lora", "dora"):
            rank = adapter.tensors[name]["lora_A"].shape[0]
            want.update(lora_A=(rank, d_in), lora_B=(d_out, rank))
            if rank != r:
                raise UserError(f"{prefix}: {name}.lora_A has rank {rank}, the adapter config says r={r}")
        for attr, tensor in adapter.tensors[name].items():
            if tuple(tensor.shape) != want[attr]:
                raise UserError(
                    f"{prefix}: {name} {attr} has shape {tuple(tensor.shape)}, the base layer {tuple(linear[name])} needs {want[attr]}"
                )
    if adapter.vera_a is not None:
        vera_names = [n for n, k in adapter.modules.items() if k in VERA_KINDS]
        a, b = adapter.vera_a.shape, adapter.vera_b.shape
        in_max = max(linear[n][1] for n in vera_names)
        out_max = max(linear[n][0] for n in vera_names)
        if a[0] < r or a[1] < in_max or b[0] < out_max or b[1] < r:
            raise UserError(
                f"{prefix}: VeRA projections A {tuple(a)} / B {tuple(b)} are smaller than r={r}, "
                f"in {in_max}, out {out_max}"
            )


@torch.no_grad()
def fold(w0: torch.Tensor, name: str, adapter: Adapter, vera: VeraProjections | None = None) -> torch.Tensor:
    """The effective weight of module `name` as an fp32 [out, in] tensor: `w0` with its adapter folded in.

    Uses AdaptedLinear's own merge on a throw-away nn.Linear that holds just `w0` (in the dtype the
    trained forward saw it), so the formula is the one the training forward was tested against.
    """
    kind, cfg = adapter.modules[name], adapter.config
    d_out, d_in = w0.shape
    with torch.device("meta"):
        linear = nn.Linear(d_in, d_out, bias=False)
    linear.weight = nn.Parameter(w0.detach(), requires_grad=False)
    layer = AdaptedLinear(linear, kind, r=cfg.r, scaling=cfg.scaling, vera=vera, d_init=cfg.vera_d_init)
    for attr, tensor in adapter.tensors[name].items():
        getattr(layer, attr).copy_(tensor)
    return layer.merged_weight()


# ==================================================================================================
# The base model
# ==================================================================================================
@dataclass
class Base:
    model: ModelConfig  # what load_model builds: the model the adapter was trained on
    description: str
    directory: Path | None  # a local Hugging Face directory of safetensors to stream from, else None
    cast: torch.dtype | None  # the dtype the trained forward saw W0 in (None: as stored)
    tokenizer_dir: Path | None = None  # a local directory to copy the tokenizer files from

    def auto_dtype(self) -> torch.dtype | None:
        """--dtype auto: the recipe's model.dtype when known, else each tensor as stored (None)."""
        return self.cast


def resolve_base(ckpt: Checkpoint, adapter_base: str | None, base: str | None, *, quantized_base: str = "dequantized") -> Base:
    """Where the base weights come from: --base, else recipe.yaml's model section, else the adapter's config."""
    from dora_cli.models import resolve_source

    recipe = ckpt.recipe
    if recipe is not None:
        cfg = recipe.model
        if base is not None:
            cfg = cfg.model_copy(update={"name_or_path": base, "config": None})
        cast: torch.dtype | None = getattr(torch, cfg.dtype)
    else:
        name = base or adapter_base
        if not name:
            raise UserError(
                f"{ckpt.path}: no recipe.yaml and no base_model_name_or_path in {CONFIG_NAME}: pass --base MODEL"
            )
        cfg, cast = ModelConfig(name_or_path=name), None
    original = cfg.quantization.mode != "none" and quantized_base == "original"
    if original:
        cfg = cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"mode": "none"})})
    where = "--base" if base is not None else (f"{ckpt.path / RECIPE_NAME}: model.name_or_path" if recipe else f"{ckpt.path / CONFIG_NAME}: base_model_name_or_path")
    source = resolve_source(cfg.name_or_path, where=where)
    directory = None
    if cfg.quantization.mode == "none":
        if source.kind == "dir" and _has_safetensors(Path(source.location)):
            directory = Path(source.location)
        elif source.kind == "gguf":
            from dora_cli.models import cached_gguf_dir

            directory = cached_gguf_dir(source.location)
    if source.kind == "dir" and not (Path(source.location) / "config.json").is_file():
        raise UserError(f"{cfg.name_or_path!r} is a directory without config.json", where=where)
    description = {"random": "a random model from model.config", "dir": source.location, "gguf": source.location, "hub": source.location}[source.kind]
    if cfg.quantization.mode != "none":
        description += f" ({cfg.quantization.mode}, dequantized)"
    elif original:
        description += " (its original weights; the adapter was trained on a quantized copy)"
    return Base(model=cfg, description=description, directory=directory, cast=cast, tokenizer_dir=_tokenizer_dir(cfg, directory))


def _has_safetensors(directory: Path) -> bool:
    return (directory / SAFE_SINGLE).is_file() or (directory / SAFE_INDEX).is_file()


def _tokenizer_dir(cfg: ModelConfig, directory: Path | None) -> Path | None:
    """A local directory holding the tokenizer of `cfg`, or None (hub tokenizers are loaded instead)."""
    if cfg.tokenizer is None:
        return directory
    path = Path(cfg.tokenizer).expanduser()
    return path if path.is_dir() else None


# ==================================================================================================
# Streaming: one shard at a time
# ==================================================================================================
@dataclass
class StreamPlan:
    directory: Path
    shards: dict[str, list[str]]  # shard file -> tensor names, in file order
    sharded: bool  # an index file (else the single model.safetensors)
    shapes: dict[str, tuple[int, ...]]  # module name -> weight shape


def shard_map(directory: Path) -> tuple[dict[str, list[str]], bool]:
    """(shard file -> tensor names, sharded?) of a safetensors model directory."""
    index = directory / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{index}: not a safetensors index ({err})") from None
        shards: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            shards.setdefault(name, []).append(key)
        for name in shards:
            if not (directory / name).is_file():
                raise UserError(f"{index}: names {name}, which is missing")
        return shards, True
    return {SAFE_SINGLE: []}, False


def plan_stream(directory: Path, adapter: Adapter | None) -> StreamPlan:
    """Read the shard headers (no weights) and check that the adapter fits."""
    from safetensors import safe_open

    shards, sharded = shard_map(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in list(shards):
        with safe_open(str(directory / name), framework="pt") as f:
            keys = list(f.keys())
            if sharded and set(shards[name]) - set(keys):
                missing = sorted(set(shards[name]) - set(keys))[0]
                raise UserError(f"{directory / SAFE_INDEX}: maps {missing} to {name}, which does not hold it")
            shards[name] = [k for k in keys if k in set(shards[name])] if sharded else keys
            for key in shards[name]:
                if key.endswith(".weight"):
                    shapes[key[: -len(".weight")]] = tuple(f.get_slice(key).get_shape())
    if adapter is not None:
        check_fits(adapter, shapes, base=str(directory))
    return StreamPlan(directory, shards, sharded, shapes)


def _stream_merge(plan: StreamPlan, adapter: Adapter | None, src: Base, dtype: torch.dtype | None, tmp: Path) -> None:
    """Write every shard of the base into `tmp`, with the adapted modules folded, one shard in memory at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    vera = adapter.vera(plan.shapes) if adapter is not None else None
    weight_map: dict[str, str] = {}
    total = 0
    for name, keys in plan.shards.items():
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(plan.directory / name), framework="pt") as f:
            for key in keys:
                t = f.get_tensor(key)
                module = key[: -len(".weight")] if key.endswith(".weight") else None
                if adapter is not None and module in adapter.modules:
                    w0 = t.to(src.cast) if src.cast is not None else t
                    t = fold(w0, module, adapter, vera).to(dtype or w0.dtype)
                elif dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                tensors[key] = t.contiguous()
                weight_map[key] = name
                total += t.numel() * t.element_size()
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        del tensors
        log(f"  {name}: {len(keys)} tensors")
    if plan.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _write_config(plan.directory, tmp, dtype)
    _copy_tokenizer(src, tmp)


def _write_config(base_dir: Path, tmp: Path, dtype: torch.dtype | None) -> None:
    """config.json (no quantization_config, the output dtype) and generation_config.json of the base."""
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if dtype is not None:
        if "torch_dtype" in config:
            config["torch_dtype"] = _dtype_name(dtype)
        config["dtype"] = _dtype_name(dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = base_dir / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, tmp / "generation_config.json")
    else:
        gen = {"_from_model_config": True}
        gen.update({k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _copy_tokenizer(src: Base, tmp: Path) -> None:
    if src.tokenizer_dir is not None:
        copied = [n for n in TOKENIZER_FILES if (src.tokenizer_dir / n).is_file()]
        for name in copied:
            shutil.copyfile(src.tokenizer_dir / name, tmp / name)
        if copied:
            return
    from dora_cli.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(src.model)
    except UserError as err:
        log(f"warning: no tokenizer written ({err})")
        return
    tokenizer.save_pretrained(tmp)


# ==================================================================================================
# In memory: load_model + load_adapter + unwrap + save_pretrained
# ==================================================================================================
def _load_adapted(src: Base, adapter_dir: Path | None):
    """The trained model (base + adapter) in memory; UserError if the adapter does not fit."""
    from dora_cli.adapters import load_adapter
    from dora_cli.models import load_model

    model, tokenizer = load_model(src.model, for_training=False)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model, tokenizer


def _save_unwrapped(model, tokenizer, dtype: torch.dtype | None, tmp: Path) -> None:
    from dora_cli.adapters import unwrap

    unwrap(model, dtype=dtype)
    _drop_quantization(model)
    if dtype is not None:
        model.to(dtype)
        model.config.dtype = dtype
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    if config.pop("quantization_config", None) is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _drop_quantization(model) -> None:
    """After unwrap no quantized layer is left: forget that the model was loaded quantized."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# ==================================================================================================
# The output directory: a temporary sibling, renamed into place
# ==================================================================================================
def _inside(path: Path, other: Path) -> bool:
    """True if `path` is `other` or contains it."""
    path, other = path.resolve(), other.resolve()
    return path == other or path in other.parents


def _check_out(out: Path, force: bool, protected: list[Path]) -> None:
    for p in protected:
        if _inside(out, p):
            raise UserError(f"--out {out}: is (or contains) {p}, which the merge reads; choose another directory")
    if out.exists() and not force:
        raise UserError(f"--out {out}: already exists; pass --force to replace it")


def _atomic_output(out: Path, fill, *, force: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700: the result is an ordinary directory
    old = None
    try:
        fill(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out.exists() or out.is_symlink():
            if not force:  # appeared while we worked
                raise UserError(f"--out {out}: already exists; pass --force to replace it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


# ==================================================================================================
# --verify: the adapter model and the merged model on the same prompts
# ==================================================================================================
@torch.no_grad()
def verify_merge(model_cfg: ModelConfig, adapter_dir: Path | None, merged_dir: Path) -> dict:
    """Max |logit difference| between the adapter model (base + adapter) and the merged model.

    Fixed prompts: VERIFY_PROMPTS x VERIFY_TOKENS token ids from VERIFY_SEED. In fp32 the two agree to
    float rounding (a few 1e-6); a difference beyond 1e-3 x max(1, max |logit|) there is a failure
    (RunFailure, nothing written). In 16-bit or against a quantized base it is reported only.
    """
    from transformers import AutoModelForCausalLM

    from dora_cli.adapters import load_adapter
    from dora_cli.models import load_model

    adapted, _ = load_model(model_cfg, for_training=False)
    if adapter_dir is not None:
        load_adapter(adapted, adapter_dir)
    adapted.eval()  # the new AdaptedLinear modules start in train mode: dropout would be on
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto").eval()
    vocab = min(adapted.config.vocab_size, merged.config.vocab_size)
    gen = torch.Generator().manual_seed(VERIFY_SEED)
    ids = torch.randint(0, vocab, (VERIFY_PROMPTS, VERIFY_TOKENS), generator=gen)
    a = adapted(input_ids=ids).logits.float()
    b = merged(input_ids=ids).logits.float()
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    exact = model_cfg.dtype == "float32" and model_cfg.quantization.mode == "none" and merged.dtype == torch.float32
    tolerance = 1e-3 * max(1.0, scale) if exact else None
    result = {
        "prompts": VERIFY_PROMPTS, "tokens": VERIFY_TOKENS, "seed": VERIFY_SEED,
        "max_abs_logit_diff": diff, "max_abs_logit": scale, "tolerance": tolerance,
    }
    log(f"verify: max |logit difference| {diff:.3g} (logits up to {scale:.3g}) on {VERIFY_PROMPTS} prompts")
    if tolerance is not None and not diff <= tolerance:
        raise RunFailure(f"--verify: the merged model differs from the adapter model by {diff:.3g} (> {tolerance:.3g}); nothing written")
    return result
