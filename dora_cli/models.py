"""Load a base model and its tokenizer from the recipe's `model:` section.

`model.name_or_path` is one of

- a local directory in the Hugging Face layout (config.json + safetensors + tokenizer files);
- a `.gguf` file: dequantised once and cached as a Hugging Face directory under
  `$DORA_CACHE/gguf/<stem>-<key>/` (default `~/.cache/dora_cli`), where `<key>` hashes the file's
  absolute path, size and mtime; later loads read the cached directory;
- a Hugging Face Hub id (`owner/name`), loaded with `from_pretrained` (needs the network or the
  local hub cache; `hub.py` decides which: HF_HUB_OFFLINE honoured, an unreachable hub found in seconds);
- null, with `model.config` giving the architecture of a tiny random model (`model_type: llama`,
  `hidden_size: 64`, ...; `seed:` seeds the initialisation) and `model.tokenizer` its tokenizer.

Quantization (`model.quantization.mode`: nf4 / fp4 / int8) goes through transformers'
`BitsAndBytesConfig` on every source, the random model included (saved to a temporary directory and
loaded back through the same `from_pretrained` call). bitsandbytes >= 0.45 runs all three on the CPU.

Also here: gradient checkpointing that works with frozen bases, meta-device models for parameter
counting and the LLaMA configurations of the paper.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import inspect
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from dora_cli import hub
from dora_cli.adapters.base_ops import prepare_base
from dora_cli.console import say
from dora_cli.errors import UserError, absent, clip, did_you_mean, note_user_paths
from dora_cli.files import atomic_directory, looks_local
from dora_cli.recipe import INT32_MAX, SEED_MAX, ModelConfig, QuantizationConfig

CACHE_ENV = "DORA_CACHE"
_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("model_label", default="model.name_or_path")
"""How errors name the model the user gave: the recipe key, or the option / file that named it (`--base`)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

PaddingSide = Literal["left", "right"]


# ----------------------------------------------------------------------------------------------------
# Where a model comes from


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved `name_or_path`: kind is "dir", "gguf", "hub" or "random"."""

    kind: Literal["dir", "gguf", "hub", "random"]
    location: str  # absolute directory / .gguf path, hub id, or "" for a random model


def resolve_source(name_or_path: str | None, *, where: str | None = None) -> ModelSource:
    """Classify `name_or_path` without loading anything; UserError for a missing local path."""
    where = where or _LABEL.get()
    if name_or_path is None:
        return ModelSource("random", "")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir():
            return ModelSource("dir", str(path.resolve()))
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path.resolve()))
        raise UserError(f"{name_or_path!r} is a file; expected a model directory or a .gguf file", where=where)
    if os.path.lexists(path):  # a link to nowhere, a link loop
        raise UserError(f"{name_or_path!r} {absent(path)}", where=where)
    if looks_local(name_or_path, (".gguf",)):
        raise UserError(f"{name_or_path!r} does not exist{_path_suggestion(path)}", where=where)
    if _HUB_ID.match(name_or_path):
        return ModelSource("hub", name_or_path)
    raise UserError(
        f"{name_or_path!r} is neither an existing local path nor a hub id (owner/name){_path_suggestion(path)}",
        where=where,
    )


def _path_suggestion(path: Path) -> str:
    parent = path.parent
    if not parent.is_dir():
        return f" (no directory {str(parent)!r} either)"
    hint = did_you_mean(path.name, [p.name for p in parent.iterdir()])
    if not hint:
        return ""
    close = hint.split('"')[1]
    return f' (did you mean "{parent / close if str(parent) != "." else close}"?)'


def model_source_description(cfg: ModelConfig) -> str:
    """One line saying what `load_model(cfg)` loads, for logs and provenance records."""
    source = resolve_source(cfg.name_or_path)
    if source.kind == "random":
        arch = dict(cfg.config or {})
        seed = arch.pop("seed", 0)
        model_type = arch.pop("model_type", "?")
        shape = ", ".join(f"{k}={v}" for k, v in arch.items())
        text = f"random {model_type} ({shape}; seed {seed}), tokenizer {cfg.tokenizer}"
    elif source.kind == "gguf":
        st = Path(source.location).stat()
        text = f"gguf {source.location} ({st.st_size} bytes), cached at {gguf_cache_dir(source.location)}"
    else:
        text = f"{source.kind} {source.location}"
    text += f", dtype {cfg.dtype}"
    q = cfg.quantization
    if q.mode != "none":
        text += f", {q.mode}" + (" double-quant" if q.double_quant and q.mode != "int8" else "")
        text += f" compute {q.compute_dtype}" if q.mode != "int8" else ""
    if cfg.trust_remote_code:
        text += ", trust_remote_code"
    return text


# ----------------------------------------------------------------------------------------------------
# GGUF: convert once, cache as a Hugging Face directory


def cache_root() -> Path:
    """$DORA_CACHE, default ~/.cache/dora_cli."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dora_cli").expanduser()


GGUF_CONVERSION = 2
"""The version of `convert_gguf`'s output, in the cache key (2: no token the file lacks)."""


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """The cache directory of a .gguf file, keyed by its absolute path, size and mtime (and the conversion's
    version)."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{GGUF_CONVERSION}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, max_shard_size: str = "5GB") -> Path:
    """Dequantise a .gguf file to an fp32 Hugging Face directory `out_dir` (model + tokenizer), atomically.

    Written to a temporary sibling and renamed, so `out_dir` is either absent or complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    kwargs = dict(gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    # The weights are plain dequantised tensors by now, but the GGUF "quantizer" left on the model
    # refuses save_pretrained ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        _drop_tokens_beyond(tmp, gguf_token_count(gguf_path))

    atomic_directory(out_dir, fill, replace=False)
    return out_dir


def gguf_token_count(gguf_path: Path) -> int | None:
    """How many tokens the file's vocabulary lists (tokenizer.ggml.tokens), None without one."""
    import gguf

    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.tokens")
    return None if field is None else len(field.data)


def _drop_tokens_beyond(directory: Path, count: int | None) -> None:
    """Remove from a saved tokenizer the added tokens whose ids the GGUF file does not have: transformers' reader
    builds a byte-level vocabulary with GPT-2's tokenizer class, which adds its default <|endoftext|> when the file
    has none (Llama 3's files, ours), one token past the embedding's rows."""
    path = directory / "tokenizer.json"
    if count is None or not path.is_file():
        return
    spec = json.loads(path.read_text(encoding="utf-8"))
    dropped = {t["content"] for t in spec.get("added_tokens") or [] if t["id"] >= count}
    if not dropped:
        return
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < count]
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key, value in list(config.items()):
            if key.endswith("_token") and value in dropped:  # a special token the file does not have
                config[key] = None
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < count}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cached_gguf_dir(gguf_path: str | os.PathLike) -> Path:
    """The Hugging Face directory of a .gguf file: converted on the first call, read from the cache after.

    A file lock makes concurrent processes (torchrun) convert once and share the result.
    """
    out = gguf_cache_dir(gguf_path)
    if (out / "config.json").is_file():
        return out
    check_gguf_header(gguf_path)
    note_user_paths(cache_root())  # a cache the user cannot write to is theirs to fix
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.with_name(out.name + ".lock")):
        if not (out / "config.json").is_file():
            say(f"converting {gguf_path} to a Hugging Face directory (once) at {out}")
            with loading(f"{gguf_path}: the .gguf file cannot be converted", where=_LABEL.get()):
                convert_gguf(gguf_path, out)
            meta = {"gguf": str(Path(gguf_path).resolve()), "size": Path(gguf_path).stat().st_size,
                    "mtime_ns": Path(gguf_path).stat().st_mtime_ns}
            (out / "dora_source.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


def check_gguf_header(gguf_path: str | os.PathLike) -> None:
    """Refuse a file that does not start like a GGUF file, before converting (and before saying so).

    The header is the magic bytes, the version (2 or 3), then the tensor and metadata counts, which must
    fit the file (a tensor's description takes at least 32 bytes, a metadata entry 13).
    """
    where = _LABEL.get()
    with open(gguf_path, "rb") as fh:
        head = fh.read(24)
        size = os.fstat(fh.fileno()).st_size
    if head[:4] != GGUF_MAGIC:
        raise UserError(f"{gguf_path}: not a GGUF file (it does not start with the bytes GGUF)", where=where)
    version = int.from_bytes(head[4:8], "little") if len(head) >= 8 else None
    if version not in GGUF_VERSIONS:
        raise UserError(f"{gguf_path}: GGUF version {version}; versions 2 and 3 can be read", where=where)
    tensors, entries = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
    if len(head) < 24 or 24 + 32 * tensors + 13 * entries > size:
        raise UserError(f"{gguf_path}: damaged GGUF header ({tensors} tensors and {entries} metadata entries "
                        f"announced in {size} bytes)", where=where)
    from gguf import GGUFReader

    with loading(f"{gguf_path}: the .gguf file cannot be read", where=where):
        reader = GGUFReader(gguf_path)
    if "general.architecture" not in reader.fields or not reader.tensors:
        raise UserError(f"{gguf_path}: a GGUF file without a model (no general.architecture, or no tensors)", where=where)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock file, removed when released.

    Removing it is safe because a waiter re-checks, once it holds the lock, that the path still names
    the file it locked (else the holder has removed it and the waiter starts over on a new file)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still keeps the cache consistent
        yield
        return
    while True:
        fh = open(path, "a")
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fh.close()  # closing releases the lock


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(cfg: ModelConfig, *, padding_side: PaddingSide = "right"):
    """The tokenizer of `cfg` (`cfg.tokenizer`, else `cfg.name_or_path`), with a pad token.

    Training pads on the right; batched generation wants `padding_side="left"`.
    Without a pad token the eos token (else unk) is used as pad.
    """
    if cfg.tokenizer is not None:
        where, name = "model.tokenizer", cfg.tokenizer
    elif cfg.name_or_path is not None:
        where, name = _LABEL.get(), cfg.name_or_path
    else:
        raise UserError("required with model.config (a tokenizer directory or hub id)", where="model.tokenizer")
    source = resolve_source(name, where=where)
    tokenizer = _load_tokenizer_from(source, name, where=where, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"the tokenizer of {name!r} has no pad, eos or unk token to pad with", where=where)
        tokenizer.pad_token = fallback
    tokenizer.padding_side = padding_side
    return tokenizer


def _load_tokenizer_from(source: ModelSource, name: str, *, where: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if source.kind == "gguf":
        location = str(cached_gguf_dir(source.location))
        with loading(f"{location}: the tokenizer converted from the .gguf file cannot be loaded", where=where):
            return AutoTokenizer.from_pretrained(location)
    if source.kind == "dir":
        if not any((Path(source.location) / f).is_file() for f in _TOKENIZER_FILES):
            raise UserError(f"{name!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})", where=where)
        with loading(f"{source.location}: the tokenizer files cannot be loaded", where=where):
            return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    access = hub.access()
    with hub.loading(name, where, access):
        return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code,
                                             **access.from_pretrained_kwargs())


def _loader_errors() -> tuple[type[BaseException], ...]:
    """What loading a model, tokenizer or config from the user's files raises when the files are bad.

    OSError (unreadable, transformers' "not a valid JSON file"), ValueError (decode errors, gguf),
    KeyError / IndexError / TypeError / AttributeError (a JSON file of the wrong shape: the library looks
    up what is not there), RecursionError (JSON nested too deeply), EOFError, RuntimeError (weights whose
    shapes disagree with config.json), safetensors' SafetensorError and huggingface_hub's strict config
    validation. The tokenizers library raises a bare `Exception`, matched by exact type in `loading`.
    """
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError, EOFError,
            RuntimeError, SafetensorError, *_config_validation_errors())


@contextlib.contextmanager
def loading(what: str, *, where: str):
    """Turn a loader's failure on the user's files into one line, `<where>: <what> (<the error>)`, where
    `what` names the files ("DIR: the tokenizer files cannot be loaded"); a UserError passes through.

    Only the library call that opens the user's files goes inside: a bug of ours elsewhere keeps its traceback.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - narrowed just below
        if not (isinstance(err, _loader_errors()) or type(err) is Exception):
            raise
        raise UserError(f"{what} ({type(err).__name__}: {clip(str(err), 160)})", where=where) from err


# ----------------------------------------------------------------------------------------------------
# Model


def load_model(cfg: ModelConfig, *, for_training: bool = True, padding_side: PaddingSide | None = None,
               label: str | None = None):
    """(model, tokenizer) for the recipe's `model:` section.

    for_training: train mode, plus gradient checkpointing (and no KV cache) when `cfg.gradient_checkpointing`;
    otherwise eval mode with every parameter frozen. The tokenizer pads on the right for training and
    on the left for generation unless `padding_side` says otherwise. `label`: how errors name the model
    (default model.name_or_path; `--base` when the user gave it so).
    """
    token = _LABEL.set(label or _LABEL.get())
    try:
        return _load_model(cfg, for_training=for_training, padding_side=padding_side)
    finally:
        _LABEL.reset(token)


def _check_dir_source(cfg: ModelConfig, source: ModelSource) -> None:
    if source.kind == "dir" and not (Path(source.location) / "config.json").is_file():
        raise UserError(f"{cfg.name_or_path!r} is a directory without config.json", where=_LABEL.get())


def _source_config(cfg: ModelConfig, source: ModelSource):
    """(config, location, hub access) of a pretrained source, its failures one line each (the real load's and the
    dry run's alike)."""
    location = str(cached_gguf_dir(source.location)) if source.kind == "gguf" else source.location
    access = hub.access() if source.kind == "hub" else None
    with _source_errors(source, cfg, f"{location}: config.json cannot be loaded", access):
        config = _pretrained_config(location, trust_remote_code=cfg.trust_remote_code,
                                    **(access.from_pretrained_kwargs() if access else {}))
    return config, location, access


def _load_model(cfg: ModelConfig, *, for_training: bool, padding_side: PaddingSide | None):
    source = resolve_source(cfg.name_or_path)
    _check_dir_source(cfg, source)
    if cfg.trust_remote_code:
        say(f"model.trust_remote_code is on: the model's own Python code from {cfg.name_or_path or cfg.tokenizer} will run")
    tokenizer = load_tokenizer(cfg, padding_side=padding_side or ("right" if for_training else "left"))
    dtype = getattr(torch, cfg.dtype)
    quant = bnb_config(cfg.quantization)

    if source.kind == "random":
        config, seed = build_config(cfg.config, tokenizer=tokenizer)
        check_fits_memory(config, dtype)
        with loading("a model of this architecture cannot be built", where="model.config"):
            model = _random_model(config, seed=seed, dtype=dtype, quant=quant)
    else:
        config, location, access = _source_config(cfg, source)
        check_vocabulary(tokenizer, config, cfg)
        with _source_errors(source, cfg, f"{location}: the model weights cannot be loaded", access):
            model = _from_pretrained(location, dtype=dtype, quant=quant, trust_remote_code=cfg.trust_remote_code,
                                     config=config, **(access.from_pretrained_kwargs(model=True) if access else {}))
        if source.kind == "gguf":
            model.config._name_or_path = source.location

    _align_special_tokens(model, tokenizer)
    if quant is not None:
        for module in model.modules():
            prepare_base(module)  # one differentiable 4-bit path in train and eval (see prepare_base)
    if for_training:
        model.train()
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
    else:
        model.eval()
        model.requires_grad_(False)
    return model, tokenizer


def bnb_config(q: QuantizationConfig):
    """transformers' BitsAndBytesConfig for nf4 / fp4 / int8, None for mode "none"."""
    if q.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = getattr(torch, q.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.mode,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
        # The packed 4-bit weights stored under the compute dtype (the same bytes): FSDP shards and
        # gathers them with the model's other weights, and mixed precision never casts them.
        bnb_4bit_quant_storage=dtype,
    )


def _from_pretrained(location: str, *, dtype: torch.dtype, quant, trust_remote_code: bool, config=None, **extra):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if config is not None:
        kwargs["config"] = config
    return AutoModelForCausalLM.from_pretrained(location, **kwargs)


def _source_errors(source: ModelSource, cfg: ModelConfig, what: str, access: hub.Access | None):
    """The error wrapper of a model source: the hub's (unreachable, not found) or the local files' (`loading`)."""
    if source.kind == "hub":
        return hub.loading(cfg.name_or_path, _LABEL.get(), access)
    return loading(what, where=_LABEL.get())


def _pretrained_config(location: str, *, trust_remote_code: bool, **extra):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)


def check_vocabulary(tokenizer, config, cfg: ModelConfig) -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows (its high ids cannot be embedded)."""
    rows = getattr(config, "vocab_size", None)
    if not isinstance(rows, int) or len(tokenizer) <= rows:
        return
    where = "model.tokenizer" if cfg.tokenizer else _LABEL.get()
    raise UserError(
        f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows (vocab_size in "
        f"config.json): token ids from {rows} up cannot be embedded; use the tokenizer the model was trained with",
        where=where,
    )


def check_fits_memory(config, dtype: torch.dtype) -> None:
    """Refuse a random model whose parameters alone exceed this machine's memory (counted on the meta device)."""
    with loading("a model of this architecture cannot be built", where="model.config"):
        params = sum(p.numel() for p in build_meta_model(config).parameters())
    need = params * torch.finfo(dtype).bits // 8
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: let the allocator decide
        return
    if need > have:
        raise UserError(
            f"this architecture has {params:,} parameters ({need / 2**30:.1f} GiB in {dtype}), more than the "
            f"{have / 2**30:.1f} GiB of memory of this machine", where="model.config",
        )


def _random_model(config, *, seed: int, dtype: torch.dtype, quant):
    """A randomly initialised model; quantized ones go through save + from_pretrained like any other."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if quant else dtype)
    if quant is None:
        return model
    with tempfile.TemporaryDirectory(prefix="dora-random-") as tmp:
        _save_whole(model, Path(tmp))
        del model
        model = _from_pretrained(tmp, dtype=dtype, quant=quant, trust_remote_code=False)
    model.config._name_or_path = ""
    return model


def _save_whole(model, directory: Path) -> None:
    """config.json + model.safetensors, written by this process whatever its rank (save_pretrained writes
    on rank 0 only, and every process of a launch builds its own random model); tied tensors once."""
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _align_special_tokens(model, tokenizer) -> None:
    """Give the model a pad id when it has none (generation warns and guesses otherwise)."""
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = model.config.pad_token_id


# ----------------------------------------------------------------------------------------------------
# Tiny random models: the architecture from a dict


def build_config(spec: dict[str, Any], *, tokenizer=None, where: str = "model.config"):
    """(PretrainedConfig, seed) from `{"model_type": "llama", "hidden_size": 64, ..., "seed": 0}`.

    Unknown keys and model types are UserErrors (transformers would accept unknown keys silently).
    With a tokenizer, vocab_size defaults to len(tokenizer) and bos / eos / pad ids to the tokenizer's.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kwargs = dict(spec)
    seed = kwargs.pop("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"seed: expected an integer from 0 to 2**32 - 1, got {clip(repr(seed), 40)}", where=where)
    for key, value in kwargs.items():
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT32_MAX:
            raise UserError(f"{key}: {clip(str(value), 40)} is out of range (at most 2**31 - 1)", where=where)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise UserError("model_type is required (for example llama)", where=where)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        import difflib

        close = difflib.get_close_matches(str(model_type), list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=5, cutoff=0.6)
        hint = f" (closest: {', '.join(close)})" if close else " (for example llama, mistral, qwen2, gpt2)"
        raise UserError(f"model_type: {model_type!r} is not a causal-LM model type of transformers{hint}",
                        where=where)
    config_class = AutoConfig.for_model(model_type).__class__
    known = config_keys(config_class)
    for key in kwargs:
        if key not in known:
            raise UserError(f"{key}: not a {config_class.__name__} setting{did_you_mean(key, known)}", where=where)
    if "hidden_act" in kwargs:
        from transformers.activations import ACT2FN

        if kwargs["hidden_act"] not in ACT2FN:
            raise UserError(f"hidden_act: unknown activation {kwargs['hidden_act']!r}"
                            f"{did_you_mean(kwargs['hidden_act'], ACT2FN)}", where=where)

    if tokenizer is not None:
        n_tokens = len(tokenizer)
        vocab_key = "vocab_size"
        if vocab_key in kwargs and (not isinstance(kwargs[vocab_key], int) or isinstance(kwargs[vocab_key], bool)):
            raise UserError(f"vocab_size: expected an integer, got {clip(repr(kwargs[vocab_key]), 40)}", where=where)
        if vocab_key in kwargs and kwargs[vocab_key] < n_tokens:
            raise UserError(f"vocab_size: {kwargs[vocab_key]} is smaller than the tokenizer's {n_tokens} tokens",
                            where=where)
        kwargs.setdefault(vocab_key, n_tokens)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, name, None)
            if name in known and name not in kwargs and token_id is not None:
                kwargs[name] = token_id
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (*_config_validation_errors(), ValueError, TypeError) as e:  # transformers' checks of the values
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(clip(reason, 300), where=where) from e
    return config, seed


def config_keys(config_class) -> set[str]:
    """The keyword arguments a config class understands (fields, aliases, legacy rope keys)."""
    keys: set[str] = set(getattr(config_class, "attribute_map", {}) or {})
    if dataclasses.is_dataclass(config_class):
        keys |= {f.name for f in dataclasses.fields(config_class)}
    keys |= {p for p in inspect.signature(config_class.__init__).parameters if p not in ("self", "kwargs")}
    keys |= set(config_class().to_dict())
    keys |= {"output_attentions", "torch_dtype"}
    if any(c.__name__ == "RotaryEmbeddingConfigMixin" for c in config_class.__mro__):
        keys |= {"rope_theta", "rope_scaling"}  # legacy names, folded into rope_parameters
    return {k for k in keys if not k.startswith("_")}


def _config_validation_errors() -> tuple[type[Exception], ...]:
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: configs are not strict dataclasses
        return ()
    return (StrictDataclassError,)


# ----------------------------------------------------------------------------------------------------
# Training helpers


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing that works with a frozen base and adapters.

    Inputs to the checkpointed blocks require grad (so even reentrant checkpointing would see a
    graph when embeddings are frozen) and the KV cache is off (it conflicts with recomputation).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


# ----------------------------------------------------------------------------------------------------
# Meta-device models and the paper's LLaMA shapes


def build_meta_model(config):
    """A causal LM on the `meta` device (shapes only, no memory) for parameter counting."""
    from transformers import AutoModelForCausalLM

    if isinstance(config, dict):
        config, _ = build_config(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_config(cfg: ModelConfig):
    """The architecture config of the recipe's model, without loading weights (refused as the real load refuses it)."""
    source = resolve_source(cfg.name_or_path)
    if source.kind == "random":
        return build_config(cfg.config, tokenizer=load_tokenizer(cfg))[0]
    _check_dir_source(cfg, source)
    return _source_config(cfg, source)[0]


def meta_model(cfg: ModelConfig):
    """The recipe's model on the `meta` device: right shapes, no memory (for dry runs and counting).

    For the paper's models, an unreachable hub falls back to the architecture in PAPER_CONFIGS."""
    try:
        return build_meta_model(model_config(cfg))
    except UserError:
        known = PAPER_HUB_IDS.get(cfg.name_or_path or "")
        if known is None:
            raise
        say(f"{cfg.name_or_path}: the hub is unreachable; using the known {known} architecture")
        return build_meta_model(PAPER_CONFIGS[known]())


def _llama(**kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(**kwargs)


def llama_7b_config():
    """LLaMA-7B (Touvron et al. 2023): 6,738,415,616 parameters."""
    return _llama(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)


def llama_13b_config():
    """LLaMA-13B: 13,015,864,320 parameters."""
    return _llama(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)


def llama2_7b_config():
    """LLaMA-2-7B: the LLaMA-7B shapes, 4096 positions."""
    return _llama(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def llama3_8b_config():
    """Meta-Llama-3-8B: grouped-query attention (8 kv heads), vocab 128256; 8,030,261,248 parameters."""
    return _llama(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                  bos_token_id=128000, eos_token_id=128001)


PAPER_CONFIGS = {
    "llama-7b": llama_7b_config,
    "llama-13b": llama_13b_config,
    "llama-2-7b": llama2_7b_config,
    "llama-3-8b": llama3_8b_config,
}
"""Name -> config factory, for recipe tests and parameter-count tables."""

PAPER_HUB_IDS = {
    "yahma/llama-7b-hf": "llama-7b",
    "yahma/llama-13b-hf": "llama-13b",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
}
"""The hub ids the paper's recipes name -> their PAPER_CONFIGS entry."""
