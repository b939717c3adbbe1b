"""A Hugging Face tokenizer as the `tokenizer.*` keys of a GGUF file, in llama.cpp's terms.

Two kinds of tokenizer are written, read from the fast tokenizer's own description (tokenizer.json):

- byte-level BPE (GPT-2, SmolLM2, LLaMA-3, Qwen2): `tokenizer.ggml.model = "gpt2"`, the tokens as spelled in
  the vocabulary (bytes mapped to printable characters), the merges, and `tokenizer.ggml.pre`, the name under
  which llama.cpp knows the pre-tokenizer's split regex. Only splits llama.cpp has a name for are written:
  GPT-2's own regex ("gpt-2"), digits first then GPT-2's ("smollm"), LLaMA-3's ("llama-bpe") and Qwen2's
  ("qwen2"); any other is refused, since llama.cpp would split the text otherwise than the model was trained.
- SentencePiece-style BPE with byte fallback (LLaMA 1/2, Mistral): `tokenizer.ggml.model = "llama"`, the
  pieces, their scores (llama.cpp merges the pair whose result scores highest: a piece made by the merge of
  rank k scores -k, so pieces merge in the order of the tokenizer's merges; a piece no merge makes scores
  lowest) and the merges as well (transformers' reader takes them), `<0xXX>` pieces typed BYTE, and whether a space is put in front of the text.

Token types: added special tokens CONTROL, other added tokens USER_DEFINED, the unknown token of a
SentencePiece vocabulary UNKNOWN, the rest NORMAL. Rows of the embedding beyond the tokenizer (vocabularies
padded to a multiple of 64 or 128) get placeholder tokens `[PAD<id>]` typed UNUSED, as llama.cpp's converter
writes them, since llama.cpp wants one token per embedding row. Also written: the bos / eos / unk / pad ids,
whether bos and eos are added when encoding, and the chat template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from dora_cli.errors import UserError

# The pre-tokenizers llama.cpp names, as tokenizer.json spells them: (step, setting) pairs.
GPT2_REGEX_BYTELEVEL = (("ByteLevel", True),)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    GPT2_REGEX_BYTELEVEL: "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}
NORMALIZERS_OF_BYTE_LEVEL = (None, "NFC")  # Qwen2 composes to NFC first; llama.cpp does not, which changes
# only text in decomposed form

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPECIALS = ("bos", "eos", "unk", "pad")


@dataclass
class GgufVocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str  # llama.cpp's name of the pre-tokenizer ("default" for SentencePiece)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | None

    def write(self, writer) -> None:
        """Add the tokenizer keys to a gguf.GGUFWriter."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def describe(tokenizer, rows: int, *, where: str) -> GgufVocab:
    """The GGUF description of `tokenizer` for a model with `rows` embedding rows; UserError for a tokenizer
    llama.cpp cannot reproduce (not a fast tokenizer, not BPE, a pre-tokenizer it has no name for, more
    tokens than the model has rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{where}: the tokenizer has no tokenizer.json (a slow tokenizer); a GGUF file needs its "
                        "vocabulary and merges, which dora export reads from tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{where}: a {model.get('type')} tokenizer; dora export writes BPE tokenizers "
                        "(byte-level, or SentencePiece-style with byte fallback)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    size = max([*vocab.values(), *added, -1]) + 1
    if size > rows:
        raise UserError(f"{where}: the tokenizer has {size} tokens but the model's embedding only {rows} rows")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    if _is_sentencepiece(spec):
        kind, pre, space_prefix = "llama", "default", _space_prefix(spec)
    else:
        kind, pre, space_prefix = "gpt2", _byte_level_pre(spec, where), None

    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [UNUSED] * rows
    for text, i in vocab.items():
        tokens[i], types[i] = text, NORMAL
    unk = model.get("unk_token")
    for i, t in added.items():
        tokens[i], types[i] = t["content"], CONTROL if t.get("special") else USER_DEFINED
    scores = None
    if kind == "llama":
        rank = {}
        for k, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", "", 1), k)
        scores = [-float(rank.get(text, len(merges))) for text in tokens]  # no merge makes it: merged last
        for i, text in enumerate(tokens):
            if _BYTE_PIECE.fullmatch(text) and text in vocab:
                types[i] = BYTE
            elif text == unk:
                types[i] = UNKNOWN

    special_ids = {}
    for kind_ in SPECIALS:
        token_id = getattr(tokenizer, f"{kind_}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < rows:
            special_ids[kind_] = token_id
    add_bos, add_eos = adds_bos_eos(tokenizer, special_ids.get("bos"), special_ids.get("eos"))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return GgufVocab(kind, pre, tokens, types, scores, merges, special_ids, add_bos, add_eos, space_prefix,
                     template if isinstance(template, str) else None)


def adds_bos_eos(tokenizer, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether encoding a text puts the token `bos` before it, and `eos` after it (llama.cpp's add_bos_token /
    add_eos_token: it then does the same to every prompt)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return (bos is not None and with_special[:1] == [bos] and plain[:1] != [bos],
            eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos])


def _steps(component: dict | None) -> list[dict]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [s for c in component.get("pretokenizers") or component.get("normalizers") or [] for s in _steps(c)]
    return [component]


def _is_sentencepiece(spec: dict) -> bool:
    """BPE with byte fallback whose spaces are ▁ (a normalizer or a Metaspace pre-tokenizer): LLaMA's kind."""
    if not spec["model"].get("byte_fallback"):
        return False
    kinds = {s.get("type") for s in _steps(spec.get("normalizer")) + _steps(spec.get("pre_tokenizer"))}
    return "Metaspace" in kinds or "Replace" in kinds


def _space_prefix(spec: dict) -> bool:
    """Does the tokenizer put ▁ in front of the text (a Prepend normalizer or a prepending Metaspace)?"""
    for step in _steps(spec.get("normalizer")):
        if step.get("type") == "Prepend":
            return True
    for step in _steps(spec.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _byte_level_pre(spec: dict, where: str) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer; UserError when it has none."""
    signature = []
    for step in _steps(spec.get("pre_tokenizer")):
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                signature.append(("ByteLevel add_prefix_space", True))
            signature.append((kind, step.get("use_regex", True)))
        elif kind == "Digits":
            signature.append((kind, step.get("individual_digits", False)))
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            signature.append((kind, pattern.get("Regex", pattern.get("String"))))
        else:
            signature.append((kind, None))
    name = PRE_TOKENIZERS.get(tuple(signature))
    normalizer = (spec.get("normalizer") or {}).get("type")
    if name is None or normalizer not in NORMALIZERS_OF_BYTE_LEVEL:
        shown = " + ".join(k for k, _ in signature) or "none"
        raise UserError(
            f"{where}: the tokenizer's pre-tokenizer ({shown}{', normalizer ' + normalizer if normalizer else ''}) "
            "is not one llama.cpp knows by name; dora export writes byte-level BPE split as GPT-2, SmolLM, "
            "LLaMA-3 or Qwen2 do, and SentencePiece-style BPE"
        )
    return name
