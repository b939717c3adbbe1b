"""`dora export`: GGUF files read back by an independent reader (transformers' own GGUF loader), every type
within what its format allows, the tokenizer kinds, the Ollama Modelfile, and every refusal (one line, exit 2,
nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOLLM2_DIR, TINY_TOKENIZER, dora_in_process, requires_peft, tiny_llama, tiny_qwen2
from test_merge import make_adapter, recipe_checkpoint

from dora_cli.adapters import AdapterConfig
from dora_cli.errors import UserError
from dora_cli.export import MARKER_KEY, is_our_gguf, run_export
from dora_cli.export import ollama as ollama_mod
from dora_cli.export.vocab import LLAMA3_SPLIT, QWEN2_SPLIT
from dora_cli.files import write_output_marker
from dora_cli.merge import run_merge

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = "Hello, world! Grüße aus Köln — 東京 2024年 🙂 Привет, мир;\n\tx = 3.14159 ... ok  done"
IDS = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
DORA = AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])


# ---- models and tokenizers built here ---------------------------------------------------------------------
def _byte_level_spec(pre: str) -> dict:
    """The tiny byte-level tokenizer (data/tiny_tokenizer) with the pre-tokenizer of another family."""
    spec = json.loads((TINY_TOKENIZER / "tokenizer.json").read_text())
    bytelevel = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    split = lambda regex: {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}  # noqa: E731
    spec["pre_tokenizer"] = {
        "gpt-2": bytelevel,
        "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, bytelevel]},
        "qwen2": {"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), {**bytelevel, "use_regex": False}]},
        "llama-bpe": {"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), {**bytelevel, "use_regex": False}]},
        "whitespace": {"type": "Whitespace"},
    }[pre]
    if pre == "qwen2":
        spec["normalizer"] = {"type": "NFC"}
    return spec


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_tokenizer(pre: str = "gpt-2", chat_template: str | None = CHATML):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(json.dumps(_byte_level_spec(pre)))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=chat_template)


def sentencepiece_tokenizer():
    """A LLaMA-2-style tokenizer trained here: BPE over ▁-spaced text with byte fallback, <s> added in front."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["instruction"] + " " + r["output"] for r in json.loads((ROOT / "data" / "smoke" / "train.json").read_text())]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)]]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=CHATML)


def tiny_mistral(seed: int = 0, **overrides):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, sliding_window=64)
    return MistralForCausalLM(MistralConfig(**{**kwargs, **overrides})).eval()


def tiny_qwen3(seed: int = 0, **overrides):
    """Qwen3 with 128-wide heads: transformers' GGUF reader takes Qwen3's head width from its default (128)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=128, max_position_embeddings=256, tie_word_embeddings=False)
    return Qwen3ForCausalLM(Qwen3Config(**{**kwargs, **overrides})).eval()


ARCHS = {  # model -> (builder, tokenizer pre-tokenizer)
    "llama": (lambda **kw: tiny_llama(vocab_size=520, **kw), "gpt-2"),  # 8 embedding rows past the tokenizer
    "qwen2": (lambda **kw: tiny_qwen2(vocab_size=512, **kw), "qwen2"),
    "mistral": (tiny_mistral, "llama-bpe"),
    "qwen3": (tiny_qwen3, "smollm"),
}


def save_model(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def read_back(path: Path):
    """transformers' own GGUF loader: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def merged_model(ckpt: Path, tmp: Path):
    from transformers import AutoModelForCausalLM

    out = run_merge(ckpt, out=tmp / "merged", dtype="fp32")
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """arch -> a DoRA checkpoint (ours, no recipe) on a tiny base of that architecture, base beside it."""
    out = {}
    for arch, (build, pre) in ARCHS.items():
        root = tmp_path_factory.mktemp(arch)
        base = save_model(root / "base", build(), byte_level_tokenizer(pre))
        make_adapter(base, root / "ckpt", DORA)
        out[arch] = root / "ckpt"
    return out


# ---- f32: the merged model, exactly -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_f32_export_reads_back_as_the_merged_model(arch, checkpoints, tmp_path):
    ckpt = checkpoints[arch]
    gguf_path = run_export(ckpt, tmp_path / "m.gguf", type_="f32")
    model, tokenizer = read_back(gguf_path)
    merged = merged_model(ckpt, tmp_path)
    with torch.no_grad():
        assert max_diff(model(IDS).logits, merged(IDS).logits) <= 1e-5
    assert type(model).__name__ == {"mistral": "LlamaForCausalLM"}.get(arch, type(merged).__name__)

    original = byte_level_tokenizer(ARCHS[arch][1])
    if ARCHS[arch][1] != "smollm":  # transformers' reader does not know SmolLM's digit split (llama.cpp does)
        assert tokenizer(MIXED)["input_ids"] == original(MIXED)["input_ids"]
    assert tokenizer.decode(original(MIXED)["input_ids"], skip_special_tokens=True) == MIXED


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_exported_gguf_is_a_base_dora_loads(arch, checkpoints, tmp_path, monkeypatch):
    """`dora eval X.gguf` / a recipe's model.name_or_path: the file converted by our loader is the merged model with
    the original tokenizer, no token more (transformers' reader adds GPT-2's default <|endoftext|> to a byte-level
    vocabulary without one, which the embedding has no row for)."""
    from dora_cli.models import ModelConfig, load_model

    monkeypatch.setenv("DORA_CACHE", str(tmp_path / "cache"))
    ckpt = checkpoints[arch]
    path = run_export(ckpt, tmp_path / "m.gguf", type_="f32")
    model, tokenizer = load_model(ModelConfig(name_or_path=str(path)), for_training=False)
    original = byte_level_tokenizer(ARCHS[arch][1])
    assert len(tokenizer) == model.config.vocab_size  # the file's tokens (and its [PAD<i>] placeholders)
    assert tokenizer(MIXED)["input_ids"] == original(MIXED)["input_ids"]
    assert "<|endoftext|>" not in tokenizer.get_vocab()
    with torch.no_grad():
        assert max_diff(model(IDS).logits, merged_model(ckpt, tmp_path)(IDS).logits) <= 1e-5


def test_the_gguf_holds_llama_cpp_keys_and_our_record(checkpoints, tmp_path):
    import gguf

    path = run_export(checkpoints["llama"], tmp_path / "m.gguf", type_="f16")
    reader = gguf.GGUFReader(path)
    value = lambda key: reader.fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama" and value("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert value("llama.block_count") == 2 and value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.dimension_count") == 16 and value("llama.vocab_size") == 520
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert len(tokens) == 520 and tokens[512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert types[1] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL and types[515] == gguf.TokenType.UNUSED
    assert value("tokenizer.ggml.bos_token_id") == 1 and value("tokenizer.ggml.add_bos_token") is True
    assert value("tokenizer.chat_template") == CHATML
    record = json.loads(value(MARKER_KEY))
    assert record["adapter"] == "dora" and record["streamed"] and record["type"] == "f16"
    dtypes = {t.name: t.tensor_type for t in reader.tensors}
    assert dtypes["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert dtypes["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay f32


def test_q_and_k_rows_are_interleaved_per_head_for_llama_cpp(checkpoints, tmp_path):
    """llama.cpp's rope rotates pairs (2i, 2i+1), transformers' rotates (i, i + d/2): row i + d/2 of a head is
    stored right after row i. Checked on the file's bytes against the merged weight."""
    import gguf

    path = run_export(checkpoints["llama"], tmp_path / "m.gguf", type_="f32")
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(path).tensors}
    merged = merged_model(checkpoints["llama"], tmp_path)
    for name, module, heads in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
        w = getattr(merged.model.layers[1].self_attn, module).weight
        d = w.shape[0] // heads
        expected = torch.stack([w.view(heads, 2, d // 2, -1)[:, 0], w.view(heads, 2, d // 2, -1)[:, 1]], dim=2)
        assert torch.equal(stored[f"blk.1.{name}.weight"], expected.reshape(w.shape))
    # Qwen2 rotates halves in llama.cpp too: nothing permuted
    path = run_export(checkpoints["qwen2"], tmp_path / "q.gguf", type_="f32")
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(path).tensors}
    merged = merged_model(checkpoints["qwen2"], tmp_path / "q")
    assert torch.equal(stored["blk.0.attn_q.weight"], merged.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(stored["blk.0.attn_q.bias"], merged.model.layers[0].self_attn.q_proj.bias)


# ---- 16-bit and q8_0: within what the format allows ------------------------------------------------------------
def q8_0_reference(w: torch.Tensor) -> torch.Tensor:
    """ggml's block_q8_0, from its definition: per 32 values d = max|x| / 127 (stored as f16), q = x / d rounded
    half away from zero (int8); the value read back is q · f16(d)."""
    blocks = w.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)
    return (q * d.half().float()).reshape(w.shape)


ROUNDINGS = {
    "f16": lambda w: w.half().float(),  # round to nearest even: |error| <= 2^-11 |w|, or 2^-25 below 2^-14
    "bf16": lambda w: w.bfloat16().float(),  # |error| <= 2^-8 |w|
    "q8_0": q8_0_reference,  # |error| <= d/2 + 127 |d - f16(d)| <= (0.5 + 127 * 2^-11) d, d = block max / 127
}
BOUNDS = {"f16": (2.0**-11, 2.0**-25), "bf16": (2.0**-8, 0.0)}  # (relative, absolute: f16's subnormals)


@pytest.mark.parametrize("type_", list(ROUNDINGS))
def test_quantized_types_are_the_merged_weights_rounded_as_the_format_says(type_, checkpoints, tmp_path):
    """Every 2-D weight read back is the merged weight rounded by the format's own rule (computed here, not by
    the writer), within the format's error bound; 1-D tensors are exact. The logits are then those of the merged
    model with its weights so rounded (<= 1e-5), and within a few % of the exact ones."""
    ckpt = checkpoints["llama"]
    model, _ = read_back(run_export(ckpt, tmp_path / "m.gguf", type_=type_))
    merged = merged_model(ckpt, tmp_path)
    rounded = merged_model(ckpt, tmp_path / "r")
    got, want = model.state_dict(), merged.state_dict()
    with torch.no_grad():
        for key, w in want.items():
            if w.dim() < 2:
                assert torch.equal(got[key], w), key
                continue
            expected = ROUNDINGS[type_](w)
            assert torch.equal(got[key], expected), key
            if type_ in BOUNDS:
                relative, absolute = BOUNDS[type_]
                assert ((got[key] - w).abs() <= torch.clamp(relative * w.abs(), min=absolute)).all(), key
            else:
                d = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
                assert ((got[key] - w).reshape(-1, 32).abs() <= (0.5 + 127 * 2.0**-11) * d + 1e-12).all(), key
            rounded.get_parameter(key).copy_(expected)
        logits, exact = model(IDS).logits, merged(IDS).logits
        assert max_diff(logits, rounded(IDS).logits) <= 1e-5
        assert max_diff(logits, exact) <= 0.05 * exact.abs().max().item()


# ---- routes and tokenizers ---------------------------------------------------------------------------------
def test_sentencepiece_tokenizer_is_written_as_llama_with_scores_and_bytes(tmp_path):
    import gguf

    tokenizer = sentencepiece_tokenizer()
    base = save_model(tmp_path / "base", tiny_llama(vocab_size=640), tokenizer)
    path = run_export(base, tmp_path / "m.gguf", type_="f32")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    vocab = tokenizer.get_vocab()
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE and types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    first, later = "".join(merges[0]), "".join(merges[-1])
    assert scores[vocab[first]] == 0 and scores[vocab[later]] == -(len(merges) - 1)
    model, read = read_back(path)
    assert read(MIXED)["input_ids"] == tokenizer(MIXED)["input_ids"]
    with torch.no_grad():
        assert max_diff(model(IDS).logits, tiny_llama(vocab_size=640)(IDS).logits) <= 1e-5


def test_a_tied_adapted_lm_head_is_merged_in_memory_and_written_as_output(tmp_path, capsys):
    base = save_model(tmp_path / "base", tiny_llama(vocab_size=512, tie_word_embeddings=True), byte_level_tokenizer())
    make_adapter(base, tmp_path / "ckpt", AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "lm_head"]))
    path = run_export(tmp_path / "ckpt", tmp_path / "m.gguf", type_="f32")
    assert "merging unties them" in capsys.readouterr().err
    import gguf

    assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    model, _ = read_back(path)
    with torch.no_grad():
        assert max_diff(model(IDS).logits, merged_model(tmp_path / "ckpt", tmp_path)(IDS).logits) <= 1e-5


def test_a_tied_base_leaves_output_out(checkpoints, tmp_path):
    import gguf

    base = save_model(tmp_path / "base", tiny_llama(vocab_size=512, tie_word_embeddings=True), byte_level_tokenizer())
    names = {t.name for t in gguf.GGUFReader(run_export(base, tmp_path / "m.gguf")).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


def test_a_4bit_recipe_is_exported_from_its_dequantized_merge(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(ROOT)
    recipe_checkpoint(tmp_path / "ckpt", ["model.quantization.mode=nf4", "adapter.target_modules=[q_proj]"])
    model, _ = read_back(run_export(tmp_path / "ckpt", tmp_path / "m.gguf", type_="f32"))
    with torch.no_grad():
        assert max_diff(model(IDS).logits, merged_model(tmp_path / "ckpt", tmp_path)(IDS).logits) <= 1e-5


@requires_peft
def test_a_peft_adapter_directory(checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = checkpoints["qwen2"].parent / "base"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    model, _ = read_back(run_export(tmp_path / "peft", tmp_path / "m.gguf", type_="f32"))
    with torch.no_grad():
        assert max_diff(model(IDS).logits, peft_model.eval()(IDS).logits) <= 1e-5


# ---- the Ollama Modelfile -------------------------------------------------------------------------------------
def render_go(template: str, messages: list[dict]) -> str:
    """Go's text/template on the constructs the Modelfile's template uses (text, if / else if / else / end with
    eq / ne, range .Messages, $variables declared and assigned, .Role / .Content, string literals)."""
    import re

    tokens = re.split(r"(\{\{.*?\}\})", template)
    pos = 0
    scope: dict[str, str] = {}

    def value(expr: str, msg):
        expr = expr.strip()
        if expr.startswith('"'):
            return json.loads(expr)
        if expr.startswith("$"):
            return scope[expr]
        return msg[expr[1:].lower()]

    def condition(expr: str, msg) -> bool:
        op, a, b = re.fullmatch(r'(eq|ne) (\S+) (".*?"|\S+)', expr.strip()).groups()
        return (value(a, msg) == value(b, msg)) == (op == "eq")

    def block(msg, emit: bool) -> tuple[str, str]:
        """Render until an unmatched else / end; returns (text, the action that stopped it)."""
        nonlocal pos
        out = []
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if not tok.startswith("{{"):
                out.append(tok if emit else "")
                continue
            action = tok[2:-2].strip()
            if action == "end" or action.startswith("else"):
                return "".join(out), action
            if action.startswith("if "):
                taken = emit and condition(action[3:], msg)
                done = taken
                text, stop = block(msg, taken)
                out.append(text)
                while stop.startswith("else"):
                    rest = stop[4:].strip()
                    now = emit and not done and (not rest or condition(rest[3:], msg))
                    done = done or now
                    text, stop = block(msg, now)
                    out.append(text)
            elif action == "range .Messages":
                start = pos
                for m in messages if emit else [None]:
                    pos = start
                    text, _ = block(m, emit and m is not None)
                    out.append(text)
                if not messages or not emit:
                    pos = start
                    block(None, False)
            elif ":=" in action or " = " in action:
                name, _, expr = re.split(r"\s*(:?=)\s*", action)
                if emit:
                    scope[name] = value(expr, msg)
            elif emit:
                out.append(str(value(action, msg)))
        return "".join(out), ""

    return block(None, True)[0]


def ollama_prompt(go: str, conversation: list[dict], tokenizer) -> str:
    """What the model reads from Ollama, as text: the template rendered, after the bos token that llama.cpp puts in
    front of every prompt of a GGUF whose tokenizer.ggml.add_bos_token is true (this tokenizer's own rule)."""
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return (tokenizer.bos_token if adds_bos else "") + render_go(go, conversation)


def test_the_bos_token_of_a_template_is_left_to_llama_cpp_when_it_adds_one(tmp_path):
    """A template that writes {{ bos_token }} (LLaMA 2 / 3, Mistral) for a tokenizer that adds it itself: Ollama's
    llama.cpp adds one before the rendered prompt (add_bos_token), so the TEMPLATE must not write a second one;
    a tokenizer that adds none keeps the template's."""
    template = ("{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    for adds in (True, False):
        tokenizer = sentencepiece_tokenizer() if adds else byte_level_tokenizer(chat_template=template)
        tokenizer.chat_template = template
        if not adds:
            tokenizer._tokenizer.post_processor = None
        assert (tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]) == adds
        go = ollama_mod.modelfile(tmp_path / "m.gguf", tokenizer).split('TEMPLATE """', 1)[1].split('"""', 1)[0]
        assert go.count(tokenizer.bos_token) == (0 if adds else 2)  # (its two first turns: system, user)
        for conversation in CONVERSATIONS:
            want = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            assert want.startswith(tokenizer.bos_token)
            assert ollama_prompt(go, conversation, tokenizer) == want


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a fruit."}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]
TEMPLATES = {
    "chatml": CHATML,
    "smollm2 (a default system prompt)": (ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct" / "chat_template.jinja"),
    "llama-3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
                " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "zephyr {{ in text": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n{{' + m['content'] + '}}' + eos_token + '\n' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_modelfile_template_renders_what_the_chat_template_does(name, tmp_path):
    template = TEMPLATES[name]
    if isinstance(template, Path):
        if not template.is_file():
            pytest.skip("SmolLM2-135M-Instruct not fetched")
        template = template.read_text()
    tokenizer = byte_level_tokenizer(chat_template=template)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|eot_id|>"]})
    if "bos_token" not in template:  # as these families' tokenizers, which add no bos token either
        tokenizer._tokenizer.post_processor = None
    text = ollama_mod.modelfile(tmp_path / "m.gguf", tokenizer)
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for conversation in CONVERSATIONS:
        want = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(go, conversation, tokenizer) == want
    stops = [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert stops[0] == '"</s>"'
    if name in ("chatml", "smollm2 (a default system prompt)"):
        assert '"<|im_end|>"' in stops
    if name == "llama-3":
        assert '"<|eot_id|>"' in stops


def test_a_template_without_a_system_role_gets_no_template_line(tmp_path, capsys):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                "{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}{% endfor %}")
    text = ollama_mod.modelfile(tmp_path / "m.gguf", byte_level_tokenizer(chat_template=template))
    assert "TEMPLATE" not in text and text.splitlines()[1] == "FROM ./m.gguf"
    assert "no TEMPLATE" in capsys.readouterr().err


def test_ollama_flag_writes_the_modelfile_beside_the_gguf(checkpoints, tmp_path, monkeypatch, capsys):
    code, out, err = dora_in_process(["export", checkpoints["llama"], "--gguf", tmp_path / "x.gguf", "--type", "q8_0",
                                      "--ollama"], monkeypatch, capsys)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "x.gguf")
    modelfile = (tmp_path / "x.Modelfile").read_text()
    assert modelfile.startswith(ollama_mod.MARK) and "FROM ./x.gguf" in modelfile and 'TEMPLATE """' in modelfile
    # --overwrite replaces both, since both are ours
    code, _, err = dora_in_process(["export", checkpoints["llama"], "--gguf", tmp_path / "x.gguf", "--ollama",
                                    "--overwrite"], monkeypatch, capsys)
    assert code == 0, err


# ---- refusals: one line, exit 2, nothing written --------------------------------------------------------------
def _gguf_not_ours(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def _refusal_cases(tmp: Path, checkpoints: dict[str, Path]) -> dict[str, tuple[list, str]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt = checkpoints["llama"]
    save_model(tmp / "gpt2", GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512)),
               byte_level_tokenizer())
    save_model(tmp / "llama3-rope", tiny_llama(vocab_size=512, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), byte_level_tokenizer())
    save_model(tmp / "whitespace", tiny_llama(vocab_size=512), byte_level_tokenizer("whitespace"))
    quantized = shutil.copytree(checkpoints["llama"].parent / "base", tmp / "nf4")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    damaged = shutil.copytree(checkpoints["llama"].parent / "base", tmp / "damaged")
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:1000])
    (tmp / "exists.gguf").write_text("keep me")
    (tmp / "a-dir.gguf").mkdir()
    _gguf_not_ours(tmp / "theirs.gguf")
    (tmp / "x.Modelfile").write_text("FROM their.gguf\n")
    (tmp / "run" / "checkpoint-5").mkdir(parents=True)  # another run's checkpoint (its manifest)
    (tmp / "run" / "checkpoint-5" / "manifest.json").write_text("{}")
    (tmp / "merged").mkdir()
    write_output_marker(tmp / "merged", "merge")  # an output of dora merge
    return {
        "gpt2 architecture": ([tmp / "gpt2", "--gguf", tmp / "o.gguf"], "model_type 'gpt2'"),
        "llama3 rope": ([tmp / "llama3-rope", "--gguf", tmp / "o.gguf"], "RoPE scaling 'llama3'"),
        "unknown pre-tokenizer": ([tmp / "whitespace", "--gguf", tmp / "o.gguf"], "pre-tokenizer (Whitespace)"),
        "quantized model directory": ([tmp / "nf4", "--gguf", tmp / "o.gguf"], "holds quantized weights (bitsandbytes)"),
        "damaged weights": ([tmp / "damaged", "--gguf", tmp / "o.gguf"],
                            str(tmp / "damaged" / "model.safetensors") + ": not a complete safetensors file"),
        "existing without --overwrite": ([ckpt, "--gguf", tmp / "exists.gguf"], "already exists; pass --overwrite"),
        "--overwrite over a text file": ([ckpt, "--gguf", tmp / "exists.gguf", "--overwrite"], "not written by dora export"),
        "--overwrite over another GGUF": ([ckpt, "--gguf", tmp / "theirs.gguf", "--overwrite"], "not written by dora export"),
        "--overwrite over another Modelfile": ([ckpt, "--gguf", tmp / "x.gguf", "--ollama", "--overwrite"],
                                               "--ollama " + str(tmp / "x.Modelfile") + ": exists and was not written"),
        "a directory": ([ckpt, "--gguf", tmp / "a-dir.gguf"], "is a directory"),
        "inside the checkpoint": ([ckpt, "--gguf", ckpt / "m.gguf"], "inside"),
        "inside the base": ([ckpt, "--gguf", ckpt.parent / "base" / "m.gguf"], "inside"),
        "inside another checkpoint": ([ckpt, "--gguf", tmp / "run" / "checkpoint-5" / "m.gguf"], "inside the checkpoint"),
        "inside an output of ours": ([ckpt, "--gguf", tmp / "merged" / "sub" / "m.gguf"], "an output of dora merge"),
        "unknown type": ([ckpt, "--gguf", tmp / "o.gguf", "--type", "q8"], "--type: expected one of f32, f16, bf16, q8_0, got 'q8' (did you mean \"q8_0\"?)"),
        "missing target": ([tmp / "nothing", "--gguf", tmp / "o.gguf"], "does not exist"),
        "no --gguf": ([ckpt], "missing option '--gguf'"),
        "--gguf named as its own Modelfile": ([ckpt, "--gguf", tmp / "m.Modelfile", "--ollama"],
                                             "expected a file name ending in .gguf, such as m.gguf"),
        "--gguf not a .gguf": ([ckpt, "--gguf", tmp / "o.txt"], "--gguf " + str(tmp / "o.txt") + ": expected a file name ending in .gguf"),
        "--gguf without a suffix": ([ckpt, "--gguf", tmp / "weights"], "such as weights.gguf"),
        "--gguf a hidden .gguf": ([ckpt, "--gguf", tmp / ".gguf"], "such as model.gguf"),
    }


def test_every_refusal_is_one_line_exit_2_and_writes_nothing(checkpoints, tmp_path, monkeypatch, capsys):
    cases = _refusal_cases(tmp_path, checkpoints)
    for case, (argv, expected) in cases.items():
        before = listing(tmp_path), listing(checkpoints["llama"].parent)
        code, out, err = dora_in_process(["export", *argv], monkeypatch, capsys)
        assert code == 2, (case, err)
        last = err.strip().splitlines()[-1]  # (a line saying what is being read may come before)
        assert last.startswith("error: ") and err.count("error") == 1 and "Traceback" not in err, (case, err)
        assert expected in last, (case, err)
        assert (listing(tmp_path), listing(checkpoints["llama"].parent)) == before, case
    assert (tmp_path / "exists.gguf").read_text() == "keep me"


def test_overwrite_replaces_our_own_gguf(checkpoints, tmp_path):
    path = run_export(checkpoints["llama"], tmp_path / "m.gguf", type_="f32")
    assert is_our_gguf(path)
    size = path.stat().st_size
    run_export(checkpoints["llama"], path, type_="q8_0", overwrite=True)
    assert path.stat().st_size < size / 2
    import gguf

    assert json.loads(gguf.GGUFReader(path).fields[MARKER_KEY].contents())["type"] == "q8_0"


def test_a_failed_export_leaves_nothing_and_a_killed_ones_temporary_is_cleaned(checkpoints, tmp_path, monkeypatch):
    from dora_cli.export import weights

    calls = []

    def failing(entry, tensor, config, arch):
        calls.append(entry.key)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(entry, tensor, config, arch)

    real = weights.encode
    monkeypatch.setattr(weights, "encode", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_export(checkpoints["llama"], tmp_path / "m.gguf")
    assert listing(tmp_path) == []
    monkeypatch.setattr(weights, "encode", real)
    stale = tmp_path / ".tmp-m.gguf-999999999.abc123"  # what a killed export (a pid that is gone) left
    stale.write_bytes(b"GGUF half")
    run_export(checkpoints["llama"], tmp_path / "m.gguf")
    assert listing(tmp_path) == ["m.gguf"]


def test_user_error_names_the_target_for_a_tokenizer_with_too_many_tokens(tmp_path):
    base = save_model(tmp_path / "base", tiny_llama(vocab_size=256), byte_level_tokenizer())
    with pytest.raises(UserError, match="512 tokens but the model's embedding only 256 rows"):
        run_export(base, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---- SmolLM2-135M-Instruct (make test-slow) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_dora(tmp_path_factory):
    """A DoRA checkpoint on SmolLM2-135M-Instruct (r16 on q/k/v/up/down), B and m moved off their
    initialisation a little, and the adapter model it is."""
    from transformers import AutoModelForCausalLM

    from dora_cli.adapters import adapted_modules, apply_adapters, save_adapter

    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip("SmolLM2-135M-Instruct not fetched (make fetch-model)")
    cfg = AdapterConfig(method="dora", r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32)
    apply_adapters(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            layer.lora_B.copy_(0.002 * torch.randn(layer.lora_B.shape, generator=g))
            layer.magnitude.mul_(1 + 0.02 * torch.randn(layer.magnitude.shape, generator=g))
    ckpt = tmp_path_factory.mktemp("smollm2") / "ckpt"
    save_adapter(model, cfg, ckpt, base_model=str(SMOLLM2_DIR))
    return ckpt, model.eval()



@pytest.mark.slow
def test_smollm2_with_dora_reads_back_as_the_merged_model(smollm2_dora, tmp_path):
    from transformers import AutoTokenizer

    ckpt, _ = smollm2_dora
    original = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    ids = torch.tensor([original("The capital of France is Paris. The capital of Japan is")["input_ids"]])
    merged = merged_model(ckpt, tmp_path)
    model, tokenizer = read_back(run_export(ckpt, tmp_path / "m.gguf", type_="f32"))
    with torch.no_grad():
        assert max_diff(model(ids).logits, merged(ids).logits) <= 1e-5
    assert tokenizer(MIXED)["input_ids"] == original(MIXED)["input_ids"]
    del model
    model, _ = read_back(run_export(ckpt, tmp_path / "h.gguf", type_="f16"))
    got = model.state_dict()
    with torch.no_grad():
        for key, w in merged.state_dict().items():
            assert torch.equal(got[key], w.half().float() if w.dim() == 2 else w), key
