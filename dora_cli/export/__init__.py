"""`dora export TARGET --gguf OUT.gguf`: one GGUF file for llama.cpp / Ollama (weights, hyperparameters, tokenizer).

Features, top to bottom:
- TARGET: a checkpoint (ours or a PEFT adapter directory), merged on the fly by `dora merge`'s own machinery
  (`merge.resolve_merge`): a base of safetensors is streamed one tensor at a time with each adapted module
  folded, other bases (random, hub, 4-bit / 8-bit: folded into the dequantized weights) are merged in
  memory; a full fine-tuning checkpoint, a merged model directory or any model directory of safetensors is
  converted as it is.
- what is written (weights.py, vocab.py): llama.cpp's layout for LLaMA (SmolLM2 included), Mistral, Qwen2
  and Qwen3: hyperparameters, tensors under gguf's names (q / k permuted for llama.cpp's RoPE), in f32, f16
  (the default), bf16 or q8_0; the tokenizer (vocabulary, merges or scores, token types, special tokens,
  chat template); general.* (name, file type) and `dora_cli.export`, a JSON record of where the file came
  from, which also marks the file as ours.
- `--ollama`: OUT's stem + `.Modelfile` beside it (ollama.py): FROM, the chat template in Go-template
  form, stop tokens. `ollama create NAME -f OUT.Modelfile`.
- refusals, one line each, before anything is written: an architecture, RoPE scaling or tokenizer that is
  not written; a model directory of quantized weights; OUT a directory, inside the checkpoint or its base,
  or existing without --overwrite; --overwrite over a file that is not a GGUF (or Modelfile) that dora
  export wrote.
- atomic: each file is written to a temporary sibling and renamed (files.atomic_file); a killed export
  leaves the old file or none, and its temporary is removed by the next export to the same path.

Memory: the streamed route holds one tensor (in fp32, plus its encoding) at a time beside the process
itself; the in-memory route holds the merged model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import dora_cli
from dora_cli.console import progress_bar, say, stderr_is_terminal
from dora_cli.errors import UserError, did_you_mean
from dora_cli.export import ollama, vocab, weights
from dora_cli.files import atomic_file, check_output_file_place, clean_stale, write_text

MARKER_KEY = "dora_cli.export"
MARKER_POSITION = 1  # its index among the file's keys (general.architecture comes first)
GGUF_STRING = 8  # gguf.GGUFValueType.STRING
TYPES = weights.TYPES


def run_export(
    target: str | Path,
    gguf_out: str | Path,
    *,
    type_: str = "f16",
    ollama_modelfile: bool = False,
    overwrite: bool = False,
    base: str | None = None,
) -> Path:
    """Write TARGET as the GGUF file `gguf_out` (and its Modelfile with `ollama_modelfile`); returns its path."""
    from dora_cli.checkpoints import inspect_checkpoint
    from dora_cli.merge import resolve_merge

    started = time.time()
    if type_ not in TYPES:
        raise UserError(f"--type: expected one of {', '.join(TYPES)}, got {type_!r}{did_you_mean(type_, TYPES)}")
    out = Path(gguf_out)
    if out.suffix.lower() != ".gguf":  # what `dora eval` / `generate`, llama.cpp and Ollama take a GGUF file by
        stem = out.stem if out.stem.lower() not in ("", ".gguf") else "model"  # `.gguf` alone: a hidden file, no suffix
        raise UserError(f"--gguf {out}: expected a file name ending in .gguf, such as {stem}.gguf")
    modelfile = out.with_name(out.stem + ".Modelfile") if ollama_modelfile else None
    ckpt = inspect_checkpoint(target)
    check_outputs(out, modelfile, overwrite=overwrite, protected=[ckpt.path])
    ms = resolve_merge(ckpt, base=base)
    if ms.src.local_dirs:
        check_outputs(out, modelfile, overwrite=overwrite, protected=[ckpt.path, *ms.src.local_dirs])
    where = str(ckpt.path)

    if ms.streamed:
        config, tokenizer = _streamed_config_and_tokenizer(ms, where)
        model, shapes = None, ms.plan.tensors.items()
    else:
        from dora_cli.merge import load_merged
        from dora_cli.models import model_config

        weights.architecture(model_config(ms.src.model), where=where)  # before the weights are loaded
        model, tokenizer = load_merged(ms)
        config = model.config  # an adapted tied lm_head has been untied
        shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    arch = weights.architecture(config, where=where)
    entries = weights.plan(shapes, config, arch, type_, where=where)
    rows = next(e.shape[0] for e in entries if e.name == "token_embd.weight")
    description = vocab.describe(tokenizer, rows, where=where)
    if getattr(config, "model_type", None) == "mistral" and getattr(config, "sliding_window", None):
        say(f"note: llama.cpp has no sliding window for Mistral: beyond {config.sliding_window} tokens it "
            "attends further back than the model did")

    record = {
        "target": str(ckpt.path.resolve()), "kind": ckpt.kind, "base": ms.src.description,
        "adapter": None if ms.adapter is None else ms.adapter.config.method, "type": type_,
        "streamed": ms.streamed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dora_cli": dora_cli.__version__,
    }
    tensors = _tensors(ms, model)
    modelfile_text = ollama.modelfile(out, tokenizer) if modelfile is not None else None

    def write(tmp: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_string(MARKER_KEY, json.dumps(record))  # the second key, after general.architecture
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(_model_name(ckpt.path))
        writer.add_file_type(weights.file_type(type_))
        if type_ == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        weights.write_hparams(writer, config, rows)
        description.write(writer)
        for entry in entries:
            entry.add_info(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        by_key = {e.key: e for e in entries}
        written = 0
        with progress_bar(stderr_is_terminal()) as bar:
            task = bar.add_task(f"writing {out.name} ({type_})", total=len(entries))
            for key, tensor in tensors:
                entry = by_key.get(key)
                if entry is not None:
                    assert entry is entries[written], f"{key} comes out of the order the header announced"
                    writer.write_tensor_data(weights.encode(entry, tensor, config, arch))
                    written += 1
                    bar.advance(task)
        assert written == len(entries), f"{len(entries) - written} announced tensors never came"
        writer.close()

    clean_stale(out.parent, out.name)
    atomic_file(out, write)
    if modelfile is not None:
        clean_stale(modelfile.parent, modelfile.name)
        write_text(modelfile, modelfile_text)
        say(f"Ollama: ollama create {out.stem} -f {modelfile}")
    say(f"GGUF written to {out} ({out.stat().st_size / 2**20:.1f} MiB, {type_}, {time.time() - started:.1f} s)")
    print(out)
    return out


# ---- the output paths --------------------------------------------------------------------------------------
def check_outputs(out: Path, modelfile: Path | None, *, overwrite: bool, protected: list[Path]) -> None:
    """Refuse, before any work, output files this export may not write: a directory in their place, inside
    a directory the export reads, an existing file without `overwrite`, or (with it) a file dora export did not
    write. The one place for the output rule of this command."""
    for path, label, ours in ((out, "--gguf", is_our_gguf), (modelfile, "--ollama", is_our_modelfile)):
        if path is None:
            continue
        for p in protected:
            if path.resolve().is_relative_to(p.resolve()):
                raise UserError(f"{label} {path}: inside {p}, which the export reads; choose another place")
        if path.is_dir():
            raise UserError(f"{label} {path}: is a directory; expected a file name")
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise UserError(f"{label} {path}: already exists; pass --overwrite to replace it")
            if path.is_symlink() or not ours(path):
                raise UserError(f"{label} {path}: exists and was not written by dora export; --overwrite "
                                "replaces only files dora export wrote")
        check_output_file_place(path, label=f"{label} {path}")


def is_our_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file whose first keys hold dora export's record (written second, after
    general.architecture): read from the header alone, without parsing the rest of the file."""
    import struct

    with open(path, "rb") as fh:
        head = fh.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            return False
        count = struct.unpack("<Q", head[16:24])[0]
        for _ in range(min(count, MARKER_POSITION + 1)):
            key = _gguf_string(fh)
            kind = fh.read(4)
            if key is None or len(kind) < 4:
                return False
            if key == MARKER_KEY:
                return True
            if struct.unpack("<I", kind)[0] != GGUF_STRING or _gguf_string(fh) is None:
                return False  # the keys before ours are strings (general.architecture)
    return False


def _gguf_string(fh) -> str | None:
    import struct

    raw = fh.read(8)
    if len(raw) < 8:
        return None
    size = struct.unpack("<Q", raw)[0]
    data = fh.read(min(size, 1 << 20))
    return data.decode("utf-8", errors="replace") if len(data) == size else None


def is_our_modelfile(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.readline().startswith(ollama.MARK)


# ---- the source -------------------------------------------------------------------------------------------
def _streamed_config_and_tokenizer(ms, where: str):
    """The streamed base's transformers config and tokenizer, without loading its weights; UserError for a
    directory of quantized weights."""
    from transformers import AutoConfig, AutoTokenizer

    from dora_cli.models import load_tokenizer, loading

    with loading(f"{ms.plan.directory}: config.json cannot be read", where=where):
        config = AutoConfig.from_pretrained(ms.plan.directory)
    quantized = getattr(config, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else getattr(quantized, "quant_method", "?")
        raise UserError(f"{where}: {ms.plan.directory} holds quantized weights ({method}); a GGUF is written "
                        "from full-precision weights: export an adapter trained on it (folded into its "
                        "dequantized weights) or a full-precision model")
    tokenizer_dir = ms.src.tokenizer_dir
    if tokenizer_dir is None or not any((tokenizer_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return config, load_tokenizer(ms.src.model)
    with loading(f"{tokenizer_dir}: the tokenizer cannot be loaded", where=where):
        return config, AutoTokenizer.from_pretrained(tokenizer_dir)


def _tensors(ms, model):
    """(transformers name, tensor) in the order of the plan: streamed from the shards (fp32, adapters folded)
    or from the merged model in memory."""
    from dora_cli.merge import stream_tensors

    if model is None:
        return ((key, t) for _, key, t in stream_tensors(ms, torch.float32))
    return iter(model.state_dict().items())


def _model_name(path: Path) -> str:
    """general.name: the checkpoint's directory, with its run's name for final / checkpoint-<step>."""
    path = path.resolve()
    if path.name == "final" or path.name.startswith("checkpoint-"):
        return f"{path.parent.name}-{path.name}"
    return path.name

