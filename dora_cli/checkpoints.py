"""Reading what training wrote: checkpoints, their adapters, and the base model they belong to.

Every command that reads a checkpoint goes through here (eval, merge, analyze, sweep, demo):

    ckpt = inspect_checkpoint(path)      # what it is: an adapter (ours or PEFT's) or a whole model;
                                         # its recipe.yaml; its manifest verified when it has one
    adapter = read_adapter(path)         # the adapter's config and tensors per module, no model
    src = resolve_base(ckpt, ...)        # which base: --base, else the recipe, else adapter_config.json
    check_fits(adapter, shapes, ...)     # every module exists in the base with shapes that fit
    w = fold(w0, name, adapter, vera)    # the effective weight of one module, by AdaptedLinear's merge

Base weights that are a local directory of safetensors are read without building a model: `shard_map`,
`read_shapes` (headers only) and `read_tensors` (just the named tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dora_cli import rundir
from dora_cli.adapters import AdaptedLinear, AdapterConfig, matches, read_adapter_config, read_adapter_weights
from dora_cli.adapters.checkpoint import CONFIG_NAME, OURS_NAME, PREFIX
from dora_cli.adapters.variants import METHODS, Vera, VeraProjections, tensor_suffixes
from dora_cli.errors import UserError, absent, did_you_mean
from dora_cli.files import read_json_object, safetensors_header
from dora_cli.recipe import ModelConfig, Recipe

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
VERA_KEYS = tuple(Vera.shared_tensors)


# ==================================================================================================
# What a checkpoint directory is
# ==================================================================================================
@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: str  # "adapter" (ours or PEFT's) or "full" (a whole model: method full)
    recipe: Recipe | None


UNUSED_IN_EVAL = ("data.sources", "optim", "schedule", "train", "launch", "output_dir", "eval.mt_bench")
"""The parts of a checkpoint's recipe that `dora eval` does not use (MT-Bench's only outside MT-Bench): a
`${env:...}` there may be unset."""
UNUSED_BY_CHECKPOINT_READERS = (*UNUSED_IN_EVAL, "eval", "expected")
"""The parts that merge, analyze and generate do not use."""


def inspect_checkpoint(path: str | Path, overrides: Sequence[str] = (),
                       optional: Sequence[str] = UNUSED_BY_CHECKPOINT_READERS) -> Checkpoint:
    """Classify a checkpoint directory; UserError for anything that holds neither an adapter nor a
    model, and for one of ours whose files no longer match its manifest. `overrides`: the command's dotted
    overrides of its recipe (a value they replace is not looked up in the environment); `optional`: the keys
    of the recipe the command does not use (a `${env:...}` there may be unset)."""
    path = Path(path)
    problem = absent(path)
    if problem is not None:
        raise UserError(f"{path}: {problem}")
    if not path.is_dir():
        raise UserError(f"{path}: expected a checkpoint directory, got a file")
    if (path / rundir.MANIFEST_NAME).is_file():
        problem = rundir.verify(path)
        if problem is not None:
            raise UserError(f"{path}: the checkpoint is damaged ({problem}); it was changed after training wrote it")
    recipe = read_recipe(path, overrides, optional)
    if (path / CONFIG_NAME).is_file():
        return Checkpoint(path, "adapter", recipe)
    if (path / "config.json").is_file() and has_safetensors(path):
        return Checkpoint(path, "full", recipe)
    if (path / "config.json").is_file() and any(path.glob("pytorch_model*.bin")):
        raise UserError(f"{path}: only safetensors weights are read; this model has pytorch_model*.bin (pickle)")
    hint = ""
    if rundir.run_checkpoints(path):
        hint = f" (a run directory: pass {path / rundir.FINAL_NAME} or one of its checkpoint-<step> directories)"
    raise UserError(
        f"{path}: no {CONFIG_NAME} (adapter) and no config.json + safetensors (full fine-tuning checkpoint){hint}"
    )


def read_recipe(directory: Path, overrides: Sequence[str] = (),
                optional: Sequence[str] = UNUSED_BY_CHECKPOINT_READERS) -> Recipe | None:
    """The resolved recipe a checkpoint was trained with (recipe.yaml, with `overrides`), or None."""
    path = Path(directory) / rundir.RECIPE_NAME
    if not path.is_file():
        return None
    from dora_cli.recipe import load_recipe

    return load_recipe(path, overrides, optional=optional)


def has_safetensors(directory: Path) -> bool:
    return (directory / SAFE_SINGLE).is_file() or (directory / SAFE_INDEX).is_file()


# ==================================================================================================
# The adapter: tensors per module, and the fold of one module
# ==================================================================================================
@dataclass
class Adapter:
    directory: Path
    config: AdapterConfig
    modules: dict[str, str]  # module name -> method name (its kind)
    tensors: dict[str, dict[str, torch.Tensor]]  # module name -> AdaptedLinear attribute -> tensor
    vera_a: torch.Tensor | None = None
    vera_b: torch.Tensor | None = None
    declared: bool = True  # module kinds from dora_cli_adapter.json (else derived from a PEFT config)
    base_model: str | None = None  # adapter_config.json's base_model_name_or_path
    _vera: VeraProjections | None = field(default=None, repr=False)

    def vera_modules(self) -> list[str]:
        return [n for n, k in self.modules.items() if METHODS[k].direction is Vera]

    def vera(self, shapes: dict[str, tuple[int, ...]]) -> VeraProjections | None:
        """VeRA's shared projections: the saved ones, else regenerated from the seed (PEFT's save_projection=False)."""
        names = self.vera_modules()
        if self._vera is not None or not names:
            return self._vera
        r = self.config.r
        if self.vera_a is not None:
            proj = VeraProjections(r, self.vera_a.shape[1], self.vera_b.shape[0], self.config.vera_seed, device="meta")
            proj.A, proj.B = self.vera_a, self.vera_b
        else:
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
    state = read_adapter_weights(directory)
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
        kinds = {name: cfg.method for name in tensors}
    for name in sorted(set(kinds) | set(tensors)):
        have = set(tensors.get(name, {}))
        kind = kinds.get(name)
        if kind is None:
            raise UserError(f"{where}: tensors for {name!r}, which {OURS_NAME} does not list")
        if kind not in METHODS:
            raise UserError(f"{directory / OURS_NAME}: {name}: unknown adapter kind {kind!r}")
        want = set(METHODS[kind].tensors.values())
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            what = f"{', '.join(missing)} missing" if missing else f"unexpected {', '.join(extra)}"
            raise UserError(f"{where}: {name} is a {kind} module but its tensors do not match ({what})")
    if any(METHODS[k].direction is Vera for k in kinds.values()) and len(vera) == 1:
        raise UserError(f"{where}: holds only one of {' and '.join(VERA_KEYS)}")
    return Adapter(
        directory=directory, config=cfg, modules=dict(kinds), tensors=tensors,
        vera_a=vera.get(VERA_KEYS[0]), vera_b=vera.get(VERA_KEYS[1]), declared=declared,
        base_model=adapter_base_model(directory),
    )


def adapter_base_model(directory: Path) -> str | None:
    """adapter_config.json's base_model_name_or_path (None when absent or not a string)."""
    name = read_json_object(Path(directory) / CONFIG_NAME).get("base_model_name_or_path")
    return name if isinstance(name, str) and name else None


def _split_key(key: str) -> tuple[str | None, str | None]:
    """`base_model.model.<module>.<suffix>` -> (module, layer attribute), or (None, None)."""
    if not key.startswith(PREFIX):
        return None, None
    rest = key[len(PREFIX):]
    for suffix, attr in tensor_suffixes().items():
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
        want = METHODS[kind].tensor_shapes(d_out, d_in, r)
        for attr, tensor in adapter.tensors[name].items():
            if tuple(tensor.shape) != want[attr]:
                raise UserError(
                    f"{prefix}: {name} {attr} has shape {tuple(tensor.shape)}; with r={r} the base layer "
                    f"{tuple(linear[name])} needs {want[attr]}"
                )
    if adapter.vera_a is not None:
        names = adapter.vera_modules()
        a, b = adapter.vera_a.shape, adapter.vera_b.shape
        in_max = max(linear[n][1] for n in names)
        out_max = max(linear[n][0] for n in names)
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
    label: str = "model.name_or_path"  # how errors name it: --base, the recipe's key, adapter_config.json's

    @property
    def local_dirs(self) -> list[Path]:
        """The local directories read from (weights, tokenizer): never a place to write an output."""
        return [d for d in (self.directory, self.tokenizer_dir) if d is not None]


def resolve_base(ckpt: Checkpoint, base: str | None = None, *, quantized_base: str = "dequantized",
                 recipe: Recipe | None = None) -> Base:
    """Where the base weights come from: --base, else recipe.yaml's model section, else the adapter's config.
    `recipe`: the recipe of the command (the checkpoint's with overrides, or the defaults), when it has one."""
    from dora_cli.models import cached_gguf_dir, resolve_source

    recipe = recipe or ckpt.recipe
    if recipe is not None:
        cfg = recipe.model
        if base is not None:
            cfg = cfg.model_copy(update={"name_or_path": base, "config": None})
        cast: torch.dtype | None = getattr(torch, cfg.dtype)
    else:
        name = base or (adapter_base_model(ckpt.path) if ckpt.kind == "adapter" else None)
        if not name:
            raise UserError(
                f"{ckpt.path}: no recipe.yaml and no base_model_name_or_path in {CONFIG_NAME}: pass --base MODEL"
            )
        cfg, cast = ModelConfig(name_or_path=name), None
    original = cfg.quantization.mode != "none" and quantized_base == "original"
    if original:
        cfg = cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"mode": "none"})})
    where = "--base" if base is not None else (
        f"{ckpt.path / rundir.RECIPE_NAME}: model.name_or_path" if ckpt.recipe is not None
        else f"{ckpt.path / CONFIG_NAME}: base_model_name_or_path"
    )
    source = resolve_source(cfg.name_or_path, where=where)
    directory = None
    if cfg.quantization.mode == "none":
        if source.kind == "dir" and has_safetensors(Path(source.location)):
            directory = Path(source.location)
        elif source.kind == "gguf":
            directory = cached_gguf_dir(source.location)
    if source.kind == "dir" and not (Path(source.location) / "config.json").is_file():
        raise UserError(f"{cfg.name_or_path!r} is a directory without config.json", where=where)
    description = "a random model from model.config" if source.kind == "random" else source.location
    if cfg.quantization.mode != "none":
        description += f" ({cfg.quantization.mode}, dequantized)"
    elif original:
        description += " (its original weights; the adapter was trained on a quantized copy)"
    return Base(model=cfg, description=description, directory=directory, cast=cast,
                tokenizer_dir=_tokenizer_dir(cfg, directory), label=where)


def _tokenizer_dir(cfg: ModelConfig, directory: Path | None) -> Path | None:
    """A local directory holding the tokenizer of `cfg`, or None (hub tokenizers are loaded instead)."""
    if cfg.tokenizer is None:
        return directory
    path = Path(cfg.tokenizer).expanduser()
    return path if path.is_dir() else None


# ==================================================================================================
# Safetensors model directories, read without a model
# ==================================================================================================
def shard_map(directory: Path) -> tuple[dict[str, list[str]], bool]:
    """(shard file -> tensor names, sharded?) of a safetensors model directory."""
    index = directory / SAFE_INDEX
    if index.is_file():
        raw = read_json_object(index)
        weight_map = raw.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: not a safetensors index (no weight_map of tensor -> file)")
        shards: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            shards.setdefault(name, []).append(key)
        for name in shards:
            if not (directory / name).is_file():
                raise UserError(f"{index}: names {name}, which is missing")
        return shards, True
    return {SAFE_SINGLE: []}, False


@dataclass
class ShardPlan:
    directory: Path
    shards: dict[str, list[str]]  # shard file -> tensor names, in file order
    sharded: bool  # an index file (else the single model.safetensors)
    shapes: dict[str, tuple[int, ...]]  # module name -> weight shape
    tensors: dict[str, tuple[int, ...]]  # tensor name -> shape, every tensor


def read_shapes(directory: Path) -> ShardPlan:
    """The shards of a safetensors model directory, the shape of every tensor and the weight shape of every
    module (headers only); UserError for a shard that is not a readable safetensors file."""
    from safetensors import safe_open

    shards, sharded = shard_map(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    tensors: dict[str, tuple[int, ...]] = {}
    for name in list(shards):
        safetensors_header(directory / name)
        with safe_open(str(directory / name), framework="pt") as f:
            keys = list(f.keys())
            if sharded and set(shards[name]) - set(keys):
                missing = sorted(set(shards[name]) - set(keys))[0]
                raise UserError(f"{directory / SAFE_INDEX}: maps {missing} to {name}, which does not hold it")
            shards[name] = [k for k in keys if k in set(shards[name])] if sharded else keys
            for key in shards[name]:
                tensors[key] = tuple(f.get_slice(key).get_shape())
                if key.endswith(".weight"):
                    shapes[key[: -len(".weight")]] = tensors[key]
    return ShardPlan(directory, shards, sharded, shapes, tensors)


def read_tensors(directory: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Just these tensors of a safetensors model directory (single file or sharded)."""
    from safetensors import safe_open

    shards, sharded = shard_map(directory)
    where = {k: name for name, names in shards.items() for k in names}
    by_file: dict[str, list[str]] = {}
    for key in keys:
        name = where.get(key, SAFE_SINGLE if not sharded else None)
        if name is None:
            raise UserError(f"{directory}: holds no tensor {key}")
        by_file.setdefault(name, []).append(key)
    out: dict[str, torch.Tensor] = {}
    for name, wanted in by_file.items():
        safetensors_header(directory / name)
        with safe_open(str(directory / name), framework="pt") as f:
            present = set(f.keys())
            for key in wanted:
                if key not in present:
                    raise UserError(f"{directory}: holds no tensor {key} (is it a full fine-tuning checkpoint of this base?)")
                out[key] = f.get_tensor(key)
    return out
