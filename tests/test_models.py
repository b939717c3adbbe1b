"""dora_cli.models: local directories, .gguf caching, hub errors, tiny random models, 4/8-bit, meta models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT, minimal_gguf, tiny_llama

from dora_cli import models
from dora_cli.errors import UserError
from dora_cli.models import (
    build_meta_model,
    enable_gradient_checkpointing,
    llama2_7b_config,
    llama3_8b_config,
    llama_7b_config,
    llama_13b_config,
    load_model,
    load_tokenizer,
    model_source_description,
    resolve_source,
)
from dora_cli.recipe import ModelConfig

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A throwaway word-level tokenizer with bos / eos / unk but no pad token."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "the quick brown fox jumps over the lazy dog answer question true false".split()
    tok.train_from_iterator([" ".join(words)] * 3, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


def _random_cfg(tok_dir: Path, **overrides) -> ModelConfig:
    spec = dict(TINY)
    spec.update(overrides.pop("config", {}))
    return ModelConfig(config=spec, tokenizer=str(tok_dir), **overrides)


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer(["the quick brown fox", "lazy dog answer"], return_tensors="pt", padding=True)["input_ids"]


# --- local directory ----------------------------------------------------------------------------------


def test_local_directory_roundtrip(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    reference = tiny_llama(seed=3, vocab_size=32)
    reference.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp_path)

    model, tokenizer = load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert model.training and tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "</s>"  # no pad token: eos is used
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    model, tokenizer = load_model(ModelConfig(name_or_path=str(tmp_path)), for_training=False)
    assert not model.training and tokenizer.padding_side == "left"
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model_source_description(ModelConfig(name_or_path=str(tmp_path))).startswith(f"dir {tmp_path}")


def test_bfloat16_dtype(tmp_path, tok_dir):
    model, _ = load_model(_random_cfg(tok_dir, dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_directory_without_config_and_file_errors(tmp_path, tok_dir):
    with pytest.raises(UserError, match="directory without config.json"):
        load_model(ModelConfig(name_or_path=str(tok_dir)))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="is a file; expected a model directory or a .gguf file"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "weights.bin")))


# --- missing paths and the hub ------------------------------------------------------------------------


def test_missing_local_path_suggests_sibling(tmp_path):
    (tmp_path / "SmolLM2-135M").mkdir()
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name_or_path=str(tmp_path / "SmolLM2-135")))
    msg = str(err.value)
    assert msg.startswith("model.name_or_path: ") and "does not exist" in msg
    assert f'did you mean "{tmp_path / "SmolLM2-135M"}"' in msg
    with pytest.raises(UserError, match=r"model.gguf' does not exist"):
        resolve_source(str(tmp_path / "model.gguf"))
    with pytest.raises(UserError, match="no directory"):
        resolve_source("./no/such/dir")


def test_relative_path_under_existing_dir_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").mkdir()
    with pytest.raises(UserError, match='did you mean "models/tiny"'):
        resolve_source("models/tin")
    assert resolve_source("someone/some-model") == models.ModelSource("hub", "someone/some-model")


def test_hub_id_unreachable_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name_or_path="nobody-here/no-such-model-xyz"))
    msg = str(err.value)
    assert msg.startswith(
        "model.name_or_path: 'nobody-here/no-such-model-xyz' is not a local path and could not be loaded "
        "from the Hugging Face Hub: "
    )
    assert "\n" not in msg


# --- tiny random models -------------------------------------------------------------------------------


def test_random_model_is_seeded_and_sized_by_tokenizer(tok_dir):
    before = torch.random.get_rng_state()
    a, tokenizer = load_model(_random_cfg(tok_dir, config={"seed": 7}))
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    b, _ = load_model(_random_cfg(tok_dir, config={"seed": 7}))
    c, _ = load_model(_random_cfg(tok_dir))  # seed 0
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert a.config.vocab_size == len(tokenizer) == 15
    assert a.config.eos_token_id == tokenizer.eos_token_id and a.config.pad_token_id == tokenizer.pad_token_id
    assert a.config.hidden_size == 64 and a.config.num_hidden_layers == 2
    assert "random llama" in model_source_description(_random_cfg(tok_dir, config={"seed": 7}))


def test_unknown_config_key_suggests_the_right_one(tok_dir):
    with pytest.raises(UserError, match=r'model.config: hiden_size: not a LlamaConfig setting \(did you mean "hidden_size"\?\)'):
        load_model(_random_cfg(tok_dir, config={"hiden_size": 32}))


def test_legacy_rope_theta_is_accepted(tok_dir):
    model, _ = load_model(_random_cfg(tok_dir, config={"rope_theta": 500000.0}))
    assert model.config.rope_parameters["rope_theta"] == 500000.0


def test_unknown_model_type_lists_close_names(tok_dir):
    spec = dict(TINY, model_type="lama")
    with pytest.raises(UserError, match=r"model_type: 'lama' is not a causal-LM model type.*llama"):
        load_model(ModelConfig(config=spec, tokenizer=str(tok_dir)))
    with pytest.raises(UserError, match="model_type is required"):
        load_model(ModelConfig(config={"hidden_size": 64}, tokenizer=str(tok_dir)))


def test_invalid_config_values_are_user_errors(tok_dir):
    with pytest.raises(UserError, match="not a multiple of the number of attention heads"):
        load_model(_random_cfg(tok_dir, config={"num_attention_heads": 5}))
    with pytest.raises(UserError, match="vocab_size: 8 is smaller than the tokenizer's 15 tokens"):
        load_model(_random_cfg(tok_dir, config={"vocab_size": 8}))
    with pytest.raises(UserError, match=r'hidden_act: unknown activation .*did you mean "silu"'):
        load_model(_random_cfg(tok_dir, config={"hidden_act": "slu"}))
    with pytest.raises(UserError, match="model.tokenizer: required with model.config"):
        load_model(ModelConfig(config=TINY))


def test_project_tiny_tokenizer():
    tok_path = ROOT / "data" / "tiny_tokenizer"
    if not (tok_path / "tokenizer.json").is_file():
        pytest.skip("data/tiny_tokenizer is absent (data/make_tiny_tokenizer.py)")
    tokenizer = load_tokenizer(ModelConfig(config=TINY, tokenizer=str(tok_path)), padding_side="left")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    model, _ = load_model(ModelConfig(config=TINY, tokenizer=str(tok_path)), for_training=False)
    assert model.config.vocab_size == len(tokenizer)


# --- quantization on the CPU --------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "double_quant"), [("nf4", True), ("fp4", False)])
def test_4bit_random_model_loads_and_runs_on_cpu(tok_dir, mode, double_quant):
    import bitsandbytes as bnb

    quant = {"mode": mode, "double_quant": double_quant, "compute_dtype": "float32"}
    model, tokenizer = load_model(_random_cfg(tok_dir, quantization=quant), for_training=False)
    reference, _ = load_model(_random_cfg(tok_dir), for_training=False)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q k v o gate up down per layer; lm_head stays full precision
    for layer in linears:
        assert layer.weight.quant_type == mode
        assert layer.weight.quant_state.nested is double_quant
        assert layer.compute_dtype == torch.float32
    ids = _ids(tokenizer)
    with torch.no_grad():
        logits, ref = model(ids).logits, reference(ids).logits
    assert torch.isfinite(logits).all()
    # same seed, same weights up to 4-bit rounding (measured: 0.09 nf4, 0.12 fp4; unrelated weights: ~1.4)
    assert (logits - ref).norm() / ref.norm() < 0.3
    description = model_source_description(_random_cfg(tok_dir, quantization=quant))
    assert f", {mode}" in description and ("double-quant" in description) == double_quant


def test_8bit_random_model_loads_and_runs_on_cpu(tok_dir):
    import bitsandbytes as bnb

    model, tokenizer = load_model(_random_cfg(tok_dir, quantization={"mode": "int8"}), for_training=False)
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 14
    with torch.no_grad():
        assert torch.isfinite(model(_ids(tokenizer)).logits).all()


# --- gradient checkpointing ---------------------------------------------------------------------------


def _grad_of_one_trainable(model, ids) -> torch.Tensor:
    model.requires_grad_(False)  # frozen base, embeddings included, as under adapters
    weight = model.model.layers[0].self_attn.q_proj.weight
    weight.requires_grad_(True)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert weight.grad is not None
    return weight.grad


def test_gradient_checkpointing_with_frozen_base(tok_dir):
    cfg = _random_cfg(tok_dir, gradient_checkpointing=True)
    model, tokenizer = load_model(cfg)
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    plain, _ = load_model(_random_cfg(tok_dir))
    ids = _ids(tokenizer)
    torch.testing.assert_close(_grad_of_one_trainable(model, ids), _grad_of_one_trainable(plain, ids))


def test_gradient_checkpointing_through_a_4bit_base(tok_dir):
    cfg = _random_cfg(tok_dir, gradient_checkpointing=True,
                      quantization={"mode": "nf4", "compute_dtype": "float32"})
    model, tokenizer = load_model(cfg)
    model.requires_grad_(False)
    norm = model.model.layers[0].input_layernorm.weight  # upstream of every 4-bit linear
    norm.requires_grad_(True)
    ids = _ids(tokenizer)
    model(ids, labels=ids).loss.backward()
    assert norm.grad is not None and torch.isfinite(norm.grad).all() and norm.grad.abs().sum() > 0


def test_trust_remote_code_is_passed_through_and_logged(tmp_path, tok_dir, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_llama(vocab_size=32).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp_path)
    seen, original = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: seen.append(k) or original(*a, **k))
    load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert seen[-1]["trust_remote_code"] is False and "trust_remote_code" not in capsys.readouterr().err
    load_model(ModelConfig(name_or_path=str(tmp_path), trust_remote_code=True))
    assert seen[-1]["trust_remote_code"] is True
    assert "trust_remote_code" in capsys.readouterr().err


def test_gradient_checkpointing_on_a_plain_model():
    model = tiny_llama()
    enable_gradient_checkpointing(model)
    ids = torch.randint(0, 256, (2, 8))
    assert _grad_of_one_trainable(model, ids).abs().sum() > 0


# --- meta models and the paper's shapes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "total"),
    [
        (llama_7b_config, 6_738_415_616),
        (llama2_7b_config, 6_738_415_616),
        (llama_13b_config, 13_015_864_320),
        (llama3_8b_config, 8_030_261_248),
    ],
)
def test_meta_model_parameter_counts(factory, total):
    model = build_meta_model(factory())
    assert sum(p.numel() for p in model.parameters()) == total
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_meta_model_from_dict_validates():
    model = build_meta_model(dict(TINY, vocab_size=100))
    assert model.config.hidden_size == 64
    with pytest.raises(UserError, match="did you mean"):
        build_meta_model(dict(TINY, num_hiden_layers=2))


# --- .gguf cache (conversion replaced by a fake: the real one is the slow test) ------------------------


def test_gguf_cache_converts_once_and_rekeys_on_change(tmp_path, tok_dir, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("DORA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    minimal_gguf(gguf)
    calls = []

    def fake_convert(path, out_dir, **_):
        calls.append(Path(path))
        out_dir = Path(out_dir)
        tiny_llama(vocab_size=32).save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out_dir)
        return out_dir

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    model, tokenizer = load_model(ModelConfig(name_or_path=str(gguf)))
    cached = models.gguf_cache_dir(gguf)
    assert cached.parent == tmp_path / "cache" / "gguf" and cached.name.startswith("tiny-")
    assert (cached / "dora_source.json").is_file()
    assert model.config._name_or_path == str(gguf.resolve())
    assert tokenizer.pad_token == "</s>"
    load_model(ModelConfig(name_or_path=str(gguf)))
    assert len(calls) == 1  # the second load read the cache

    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    assert models.gguf_cache_dir(gguf) != cached  # a changed file is converted again
    load_model(ModelConfig(name_or_path=str(gguf)))
    assert len(calls) == 2
    assert not list(cached.parent.glob("*.lock"))  # the conversion lock is removed once released


# --- the real model (slow) ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_directory_generates(smollm2_dir):
    model, tokenizer = load_model(ModelConfig(name_or_path=str(smollm2_dir)), for_training=False)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_and_cached(smollm2_dir, tmp_path, monkeypatch):
    gguf = smollm2_dir.parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is absent (data/fetch_smollm2.py --keep-gguf {gguf})")
    monkeypatch.setenv("DORA_CACHE", str(tmp_path / "cache"))
    real_convert, calls = models.convert_gguf, []
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: calls.append(a) or real_convert(*a, **k))

    first, tokenizer = load_model(ModelConfig(name_or_path=str(gguf)), for_training=False)
    second, _ = load_model(ModelConfig(name_or_path=str(gguf)), for_training=False)
    assert len(calls) == 1
    reference, ref_tok = load_model(ModelConfig(name_or_path=str(smollm2_dir)), for_training=False)
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref_tok(["The capital of France is"], return_tensors="pt")["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(second(ids).logits, reference(ids).logits)
        torch.testing.assert_close(first(ids).logits, reference(ids).logits)
