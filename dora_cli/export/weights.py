"""A Hugging Face causal LM's config and tensors in llama.cpp's GGUF layout.

- architectures: `model_type` llama (SmolLM2, LLaMA 1-3 without llama3 RoPE scaling), mistral (written as
  llama.cpp's `llama`, as its own converter does: llama.cpp has no sliding window there, so contexts
  beyond `sliding_window` tokens attend further than the model did), qwen2 and qwen3.
- hyperparameters under `<arch>.*`: context length, widths, layer and head counts, RoPE base and linear
  scaling, RMSNorm epsilon, the vocabulary size, the rotary width, and key / value widths when a head is not
  hidden_size / heads wide.
- tensor names: the gguf package's own map (`gguf.get_tensor_name_map`), `blk.<i>.attn_q.weight` and so on;
  a tensor it has no name for is refused. `lm_head.weight` is left out of a model with tied embeddings
  (llama.cpp then reads the output projection from `token_embd`).
- LLaMA / Mistral q and k rows (weights and biases) are permuted: llama.cpp's `llama` rotates interleaved
  pairs of a head (GPT-J style), transformers rotates its two halves, so each head's rows go from
  [half 1; half 2] to interleaved pairs. transformers' GGUF reader permutes them back. Qwen rotates halves
  in llama.cpp too: nothing to permute.
- types (`--type`): f32; f16 and bf16 (2-D tensors; 1-D norms and biases stay f32, as llama.cpp's converter
  keeps them); q8_0 (2-D tensors in blocks of 32 values, an int8 each and one f16 scale, with rows whose
  length is not a multiple of 32 in f16). bf16 and q8_0 are encoded by the gguf package's ports of ggml's
  own rounding (`gguf.quants`), f16 by torch's round-to-nearest-even.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from dora_cli.errors import UserError, one_of


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool  # llama.cpp rotates interleaved pairs: q / k rows permuted


ARCHS = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2", permute_qk=False),
    "qwen3": Arch("qwen3", permute_qk=False),
}
ROPE_TYPES = ("default", "linear")
TYPES = ("f32", "f16", "bf16", "q8_0")
SKIPPED = ("rotary_emb.inv_freq",)  # buffers of old checkpoints, recomputed by every reader


def architecture(config, *, where: str) -> Arch:
    """The GGUF architecture of a transformers config; UserError for one dora export does not write."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHS.get(model_type)
    if arch is None:
        raise UserError(f"{where}: model_type {model_type!r}: dora export writes {one_of(ARCHS)} models to GGUF "
                        "(for another architecture: dora merge, then llama.cpp's own converter)")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise UserError(f"{where}: RoPE scaling {rope.get('rope_type')!r}: dora export writes "
                        f"{one_of(ROPE_TYPES)} RoPE only")
    if getattr(config, "use_sliding_window", False):
        raise UserError(f"{where}: use_sliding_window is on; llama.cpp's {arch.name} attends over the whole context")
    return arch


def rope_parameters(config) -> dict:
    """rope_type, rope_theta (and factor): transformers 5's `rope_parameters`, or the older separate keys."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer, config, vocab_rows: int) -> None:
    """The `<arch>.*` keys llama.cpp reads for these architectures."""
    import gguf

    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_rows)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


# ---- tensors ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    key: str  # the transformers name
    name: str  # the GGUF name
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType

    def add_info(self, writer) -> None:
        """Announce the tensor to a gguf.GGUFWriter (its data follows, in the same order, by `encode`)."""
        import gguf

        q = gguf.GGMLQuantizationType
        if self.qtype in (q.F32, q.F16):
            dtype = np.dtype(np.float32 if self.qtype == q.F32 else np.float16)
            writer.add_tensor_info(self.name, self.shape, dtype, int(np.prod(self.shape)) * dtype.itemsize)
        else:  # bf16, q8_0: announced by their bytes, as gguf.quants encodes them
            stored = gguf.quant_shape_to_byte_shape(self.shape, self.qtype)
            writer.add_tensor_info(self.name, stored, np.dtype(np.uint8), int(np.prod(stored)), raw_dtype=self.qtype)


def plan(shapes: Iterable[tuple[str, tuple[int, ...]]], config, arch: Arch, type_: str, *, where: str) -> list[Entry]:
    """The GGUF tensors, in the order of `shapes` (transformers name -> shape); UserError for a tensor that
    has no GGUF name."""
    import gguf

    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.name)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    entries = []
    for key, shape in shapes:
        if key.endswith(SKIPPED) or (tied and key == "lm_head.weight"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{where}: tensor {key} has no name in llama.cpp's {arch.name} layout")
        entries.append(Entry(key, name, tuple(shape), _qtype(name, tuple(shape), type_)))
    return entries


def _qtype(name: str, shape: tuple[int, ...], type_: str):
    import gguf

    q = gguf.GGMLQuantizationType
    if type_ == "f32" or len(shape) < 2:
        return q.F32
    if type_ == "q8_0":
        return q.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0 else q.F16
    return {"f16": q.F16, "bf16": q.BF16}[type_]


def file_type(type_: str):
    import gguf

    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[type_]


def encode(entry: Entry, tensor: torch.Tensor, config, arch: Arch) -> np.ndarray:
    """The bytes of one tensor as the GGUF file stores them: permuted for llama.cpp, then encoded."""
    import gguf

    t = tensor.detach().to(torch.float32)
    if arch.permute_qk and entry.name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = config.num_attention_heads
        if entry.name.split(".")[-2] == "attn_k":
            heads = getattr(config, "num_key_value_heads", None) or heads
        t = interleave_rope_rows(t, heads)
    if entry.qtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).numpy()
    return gguf.quants.quantize(t.numpy(), entry.qtype)


def interleave_rope_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [out, ...] of q or k: each head's [first half; second half] -> interleaved pairs (llama.cpp's order)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()
