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
  function that was trained): `dora merge --into-original`.
- the output directory: shards (+ `model.safetensors.index.json`), `config.json` without
  `quantization_config`, `generation_config.json`, the tokenizer and `dora_merge.json` (where it came
  from). Written into a temporary sibling and renamed: never half-written; an existing `--out` is
  refused unless `--force`; an `--out` that could not be written is refused before any work; what an
  interrupted merge left beside `--out` is removed by the next one.
- `--verify`: logits of the adapter model and of the merged model on fixed prompts; max |diff|.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from dora_cli.checkpoints import (
    SAFE_INDEX,
    Adapter,
    Base,
    Checkpoint,
    ShardPlan,
    check_fits,
    fold,
    inspect_checkpoint,
    read_adapter,
    read_shapes,
    resolve_base,
)
from dora_cli.console import say
from dora_cli.errors import RunFailure, UserError, did_you_mean, one_of
from dora_cli.files import (
    OutputKind,
    atomic_directory,
    check_output,
    clean_stale,
    json_with,
    register_output_kind,
    write_json,
    write_output_marker,
)
from dora_cli.recipe import ModelConfig, dump_recipe, safe_load

PROVENANCE_NAME = "dora_merge.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "spiece.model", "vocab.txt",
)
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
QUANTIZED_BASE = ("dequantized", "original")

MERGE_OUTPUT = register_output_kind(OutputKind(
    "merge", "dora merge",
    entries=(PROVENANCE_NAME, "config.json", "generation_config.json", "model*.safetensors", SAFE_INDEX,
             *TOKENIZER_FILES, "chat_template.*"),
    legacy=lambda directory: json_with(directory / PROVENANCE_NAME, "checkpoint", "checkpoint_kind", "base") is not None,
))
"""What `dora merge` writes in --out: a model directory and dora_merge.json."""

# The fixed prompts of --verify: token ids drawn from this seed (3 prompts of 16 tokens).
VERIFY_SEED, VERIFY_PROMPTS, VERIFY_TOKENS = 1234, 3, 16


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
    given_base = [Path(base)] if base is not None and Path(base).is_dir() else []  # a local --base, checked at once
    _check_out(out, force, protected=[ckpt.path, *given_base])
    clean_stale(out.parent, out.name)  # what an interrupted merge into the same --out left behind

    ms = resolve_merge(ckpt, base=base, quantized_base=quantized_base)
    adapter, src = ms.adapter, ms.src
    if src.local_dirs:
        _check_out(out, force, protected=[ckpt.path, *src.local_dirs])
    out_dtype = target if target is not None else src.cast  # auto: the dtype the trained forward saw
    record = _provenance(ckpt, adapter, src, out_dtype, quantized_base)

    if ms.streamed:
        fill = lambda tmp: _stream_merge(ms, out_dtype, tmp)  # noqa: E731
    else:
        model, tokenizer = load_merged(ms, out_dtype)  # validates, writes nothing
        fill = lambda tmp: _save_unwrapped(model, tokenizer, tmp)  # noqa: E731

    def write(tmp: Path) -> None:
        fill(tmp)
        if verify:
            record["verify"] = verify_merge(src.model, ckpt.path if adapter is not None else None, tmp)
        record["seconds"] = round(time.time() - started, 3)
        write_json(tmp / PROVENANCE_NAME, record)
        write_output_marker(tmp, MERGE_OUTPUT.name)
        _check_out(out, force, protected=[ckpt.path])  # again: a file may have appeared in --out meanwhile

    atomic_directory(out, write, replace=force or (out.is_dir() and not any(out.iterdir())))
    say(f"merged model written to {out}")
    print(out)
    return out


@dataclasses.dataclass
class MergeSource:
    """What a merge folds, checked before anything is written (`resolve_merge`)."""

    ckpt: Checkpoint
    adapter: Adapter | None  # None: a whole model (a full fine-tuning checkpoint or a model directory)
    src: Base  # where the base weights come from
    plan: ShardPlan | None  # the base's shards when they are streamed; None: merged in memory (`load_merged`)
    tied: str | None = None  # in memory because the adapter changes a tied weight: what `load_merged` says

    @property
    def streamed(self) -> bool:
        return self.plan is not None


def resolve_merge(ckpt: Checkpoint, *, base: str | None = None, quantized_base: str = "dequantized") -> MergeSource:
    """The adapter, the base and how they are merged (streamed or in memory); UserError when the adapter
    does not fit the base (streamed bases are checked here, in-memory ones when `load_merged` loads them)."""
    adapter, src = _sources(ckpt, base, quantized_base)
    src, tied = _in_memory_if_tied(adapter, src)
    plan = None
    if src.directory is not None:
        plan = read_shapes(src.directory)
        if adapter is not None:
            check_fits(adapter, plan.shapes, base=str(src.directory))
        what = f"converting {ckpt.path} (nothing to fold)" if adapter is None else f"merging {ckpt.path} into {src.description}"
        say(f"{what}: {len(plan.shards)} shard(s), streamed")
    return MergeSource(ckpt, adapter, src, plan, tied)


def _sources(ckpt: Checkpoint, base: str | None, quantized_base: str) -> tuple[Adapter | None, Base]:
    """(the adapter, or None for a full fine-tuning checkpoint; where the base weights come from)."""
    if ckpt.kind == "adapter":
        return read_adapter(ckpt.path), resolve_base(ckpt, base, quantized_base=quantized_base)
    if base is not None:
        raise UserError(f"{ckpt.path}: a full fine-tuning checkpoint is already a whole model; --base does not apply")
    model = ModelConfig(name_or_path=str(ckpt.path), dtype=ckpt.recipe.model.dtype if ckpt.recipe else "float32")
    return None, Base(model=model, description=f"full fine-tuning checkpoint {ckpt.path}", directory=ckpt.path,
                      cast=None, tokenizer_dir=ckpt.path)


def _in_memory_if_tied(adapter: Adapter | None, src: Base) -> tuple[Base, str | None]:
    """(`src` without its shards to stream when the adapter changes a weight the base stores only once, tied
    to another (lm_head with tied embeddings): the in-memory merge unties them; what to say about it)."""
    if adapter is None or src.directory is None:
        return src, None
    shapes = read_shapes(src.directory).shapes
    missing = [n for n in adapter.modules if n not in shapes]
    if not missing:
        return src, None
    from dora_cli.models import meta_model

    shared: dict[int, list[str]] = {}
    for name, p in meta_model(src.model).named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    tied = sorted(n for n in missing if any(f"{n}.weight" in names for names in shared.values() if len(names) > 1))
    if not tied:
        return src, None  # not a tie: check_fits refuses the adapter
    note = f"{', '.join(tied)}: tied to another weight in {src.directory}, which stores it once: merging in memory to untie it"
    return dataclasses.replace(src, directory=None), note


def _provenance(ckpt: Checkpoint, adapter: Adapter | None, src: Base, dtype: torch.dtype | None, quantized_base: str) -> dict:
    """dora_merge.json: where the merged model came from."""
    return {
        "checkpoint": str(ckpt.path.resolve()),
        "checkpoint_kind": ckpt.kind,
        "base": src.description,
        "base_model": _saved_model_section(ckpt, src),
        "quantized_base": quantized_base if _trained_quantized(ckpt) else None,
        "dtype": _dtype_name(dtype) if dtype is not None else "as stored",
        "streamed": src.directory is not None,
        "adapter": None if adapter is None else {
            "config": adapter.config.model_dump(mode="json"),
            "modules": len(adapter.modules),
            "kinds": sorted(set(adapter.modules.values())),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dora_cli": _version(),
    }


def _saved_model_section(ckpt: Checkpoint, src: Base) -> dict:
    """The base's model section as the checkpoint's recipe saves it (`${env:...}` references as written)."""
    if ckpt.recipe is not None and src.model == ckpt.recipe.model:
        return safe_load(dump_recipe(ckpt.recipe))["model"]
    return src.model.model_dump(mode="json")


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
# Streaming: one shard at a time
# ==================================================================================================
def stream_tensors(ms: MergeSource, dtype: torch.dtype | None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(shard file, tensor name, tensor) of the streamed base, the adapted modules folded, one tensor in memory
    at a time, in the shards' order; `dtype` converts every floating tensor (None: as stored)."""
    from safetensors import safe_open

    plan, adapter, src = ms.plan, ms.adapter, ms.src
    vera = adapter.vera(plan.shapes) if adapter is not None else None
    for name, keys in plan.shards.items():
        for key in keys:
            # the shard is opened (mapped) for one tensor at a time: the pages read stay resident only while
            # mapped, so a shard held open would end up whole in the process's memory
            with safe_open(str(plan.directory / name), framework="pt") as f:
                t = f.get_tensor(key)
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if adapter is not None and module in adapter.modules:
                w0 = t.to(src.cast) if src.cast is not None else t
                t = fold(w0, module, adapter, vera).to(dtype or w0.dtype)
            elif dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield name, key, t.contiguous()


def _stream_merge(ms: MergeSource, dtype: torch.dtype | None, tmp: Path) -> None:
    """Write every shard of the base into `tmp`, with the adapted modules folded, one shard in memory at a time."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for name, items in itertools.groupby(stream_tensors(ms, dtype), key=lambda item: item[0]):
        tensors = {key: t for _, key, t in items}
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        say(f"  {name}: {len(tensors)} tensors")
        del tensors
    if ms.plan.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _write_config(ms.plan.directory, tmp, dtype)
    _copy_tokenizer(ms.src, tmp)


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
        say(f"warning: no tokenizer written ({err})")
        return
    tokenizer.save_pretrained(tmp)


# ==================================================================================================
# In memory: load_model + load_adapter + unwrap + save_pretrained
# ==================================================================================================
def load_merged(ms: MergeSource, dtype: torch.dtype | None = None):
    """(model, tokenizer): the merged model in memory, a plain model of the base architecture (base + adapter
    loaded, a tied adapted weight untied and said so, every adapter and quantized layer unwrapped); `dtype`
    converts it. UserError if the adapter does not fit."""
    from dora_cli.adapters import load_adapter, untie_adapted_weights, unwrap
    from dora_cli.models import load_model

    model, tokenizer = load_model(ms.src.model, for_training=False, label=ms.src.label)
    if ms.adapter is not None:
        load_adapter(model, ms.ckpt.path)
    for note in filter(None, (ms.tied, f"merging {ms.ckpt.path} into {ms.src.description} (loaded in memory)")):
        say(note)  # after the checks of loading
    for note in untie_adapted_weights(model):  # a tied lm_head adapted: said here, not left to a warning
        say(note)
    unwrap(model, dtype=dtype)  # a plain model: no quantized layer, no quantization markers
    if dtype is not None:
        model.config.dtype = dtype
    return model, tokenizer


def _save_unwrapped(model, tokenizer, tmp: Path) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    if config.pop("quantization_config", None) is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ==================================================================================================
# The output directory: a temporary sibling, renamed into place
# ==================================================================================================
def _inside(path: Path, other: Path) -> bool:
    """True if `path` is `other` or contains it."""
    path, other = path.resolve(), other.resolve()
    return path == other or path in other.parents


def _check_out(out: Path, force: bool, protected: list[Path]) -> None:
    # replace: the merged model replaces --out whole (files.atomic_directory), an empty one too: never a link
    check_output(out, MERGE_OUTPUT.name, label=f"--out {out}", replace=True)
    for p in protected:
        if _inside(out, p):
            raise UserError(f"--out {out}: is (or contains) {p}, which the merge reads; choose another directory")
        if _inside(p, out):
            raise UserError(f"--out {out}: lies inside {p}, which the merge reads; choose a directory outside it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: already holds a merged model; pass --force to replace it")


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
    say(f"verify: max |logit difference| {diff:.3g} (logits up to {scale:.3g}) on {VERIFY_PROMPTS} prompts")
    if tolerance is not None and not diff <= tolerance:
        raise RunFailure(f"--verify: the merged model differs from the adapter model by {diff:.3g} (> {tolerance:.3g}); nothing written")
    return result
