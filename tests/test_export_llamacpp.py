"""llama.cpp itself reads what `dora export` writes (`make test-llamacpp`: llama-cpp-python, an optional extra
that compiles llama.cpp; skipped where it is not installed).

- the tokenizer: llama.cpp encodes a mixed-script text to the ids of the Hugging Face tokenizer, for every
  kind of tokenizer written (byte-level BPE split as GPT-2, SmolLM, LLaMA-3, Qwen2; SentencePiece BPE);
- the model: 32 tokens of greedy continuation by llama.cpp from the f32 and the f16 export of SmolLM2-135M-Instruct
  with a DoRA adapter equal, token for token, those of the unmerged adapter model in torch; the same on tiny
  random LLaMA and Qwen2 models in f32.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_qwen2
from test_export import MIXED, byte_level_tokenizer, save_model, sentencepiece_tokenizer, smollm2_dora  # noqa: F401
from test_merge import make_adapter

from dora_cli.adapters import AdapterConfig
from dora_cli.export import run_export

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

NEW_TOKENS = 32


def open_llama(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, **kwargs)


def llama_cpp_greedy(path, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    llm = open_llama(path, logits_all=True)
    try:
        llm.eval(prompt)
        out = []
        for _ in range(n):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            out.append(token)
            llm.eval([token])
        return out
    finally:
        llm.close()


@torch.no_grad()
def torch_greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


TOKENIZERS = {
    "gpt-2": lambda: byte_level_tokenizer("gpt-2"),
    "smollm": lambda: byte_level_tokenizer("smollm"),
    "qwen2": lambda: byte_level_tokenizer("qwen2"),
    "llama-bpe": lambda: byte_level_tokenizer("llama-bpe"),
    "sentencepiece": sentencepiece_tokenizer,
}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_llama_cpp_encodes_as_the_tokenizer(kind, tmp_path):
    tokenizer = TOKENIZERS[kind]()
    base = save_model(tmp_path / "base", tiny_llama(vocab_size=640), tokenizer)
    llm = open_llama(run_export(base, tmp_path / "m.gguf", type_="f32"), vocab_only=True)
    try:
        for text in (MIXED, "  leading spaces, trailing  ", "x\n\n\ny"):
            want = tokenizer(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=want[:1] == [tokenizer.bos_token_id], special=False) == want, text
    finally:
        llm.close()


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_llama_cpp_continues_a_tiny_model_as_torch_does(build, tmp_path):
    base = save_model(tmp_path / "base", build(vocab_size=512), byte_level_tokenizer())
    ckpt = tmp_path / "ckpt"
    model = make_adapter(base, ckpt, AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    prompt = byte_level_tokenizer()("the correct answer is")["input_ids"]
    assert llama_cpp_greedy(run_export(ckpt, tmp_path / "m.gguf", type_="f32"), prompt) == torch_greedy(model, prompt)


@pytest.mark.parametrize("type_", ["f32", "f16"])
def test_llama_cpp_continues_smollm2_with_dora_as_torch_does(type_, smollm2_dora, tmp_path):  # noqa: F811
    from conftest import SMOLLM2_DIR
    from transformers import AutoTokenizer

    ckpt, model = smollm2_dora
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three fruits and say why they are healthy."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    path = run_export(ckpt, tmp_path / "m.gguf", type_=type_)
    assert llama_cpp_greedy(path, prompt) == torch_greedy(model, prompt)
