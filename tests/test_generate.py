"""`dora generate` and `dora chat` through the real CLI (in process): the template training used, PEFT adapter
directories against PEFT's own generation, the conversation kept, seeded sampling; `dora --version`; no
`past_key_values` deprecation from any generation of ours."""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TOKENIZER, dora_in_process, requires_peft, tiny_llama

from dora_cli import prompts
from dora_cli.datasets import format_record
from dora_cli.eval import predict
from dora_cli.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTION = 'Please answer the following question with true or false, question: is "red" a colour?'
CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def dora(argv: list[str], monkeypatch, capsys, stdin: str | None = None) -> tuple[int, str, str]:
    return dora_in_process(argv, monkeypatch, capsys, stdin)


@pytest.fixture
def asked(monkeypatch) -> list[tuple[str, str]]:
    """Every (prompt, answer) the model is asked, recorded around the real `answer_turn`."""
    calls: list[tuple[str, str]] = []
    real = predict.answer_turn

    def recording(model, tokenizer, prompt, *args, **kwargs):
        calls.append((prompt, real(model, tokenizer, prompt, *args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(predict, "answer_turn", recording)
    return calls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA (vocab 512) with the project's tiny tokenizer and a ChatML-like chat template."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("generate-model") / "model"
    tiny_llama(seed=3, vocab_size=512).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# The prompt is the one training used


def test_generate_asks_a_checkpoint_through_its_training_template(smoke_run, asked, monkeypatch, capsys):
    code, out, err = dora(["generate", str(smoke_run / "final"), QUESTION, "--max-new-tokens", "6"], monkeypatch, capsys)
    assert code == 0, err
    recipe = load_recipe(smoke_run / "final" / "recipe.yaml")
    _, user_prompt = format_record({"instruction": QUESTION, "input": "", "output": ""}, recipe.data)
    assert [prompt for prompt, _ in asked] == [user_prompt]  # what the loss was masked on, byte for byte
    assert out == asked[0][1] + "\n"
    code, _, err = dora(["generate", str(smoke_run / "final"), QUESTION, "--max-new-tokens", "6", "--template", "alpaca"],
                        monkeypatch, capsys)
    assert code == 0, err
    assert asked[1][0] == prompts.alpaca_prompt(QUESTION)


def test_a_model_with_a_chat_template_is_asked_through_it(model_dir, asked, monkeypatch, capsys):
    from transformers import AutoTokenizer

    code, out, err = dora(["generate", str(model_dir), "Name a fruit.", "--max-new-tokens", "5"], monkeypatch, capsys)
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], tokenize=False,
                                             add_generation_prompt=True)
    assert asked[0][0] == expected and out == asked[0][1] + "\n"


@requires_peft
def test_generate_on_a_peft_adapter_equals_peft_s_own_generation(model_dir, tmp_path, monkeypatch, capsys):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    twin = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False, use_dora=True)).eval()
    twin.save_pretrained(tmp_path / "adapter")
    code, out, err = dora(["generate", str(tmp_path / "adapter"), "Name a fruit.", "--base", str(model_dir),
                           "--max-new-tokens", "8", "--template", "llm_adapters"], monkeypatch, capsys)
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(prompts.eval_prompt("Name a fruit."), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        new = twin.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    reference = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert reference and out == reference + "\n"


# --------------------------------------------------------------------------------------------------
# chat keeps the conversation; sampling is seeded


def test_chat_keeps_the_conversation_and_stops_at_exit(model_dir, asked, monkeypatch, capsys):
    from transformers import AutoTokenizer

    code, out, err = dora(["chat", str(model_dir), "--max-new-tokens", "4"], monkeypatch, capsys,
                          stdin="Name a fruit.\n\nAnother one?\n/exit\nnever asked\n")
    assert code == 0, err
    assert len(asked) == 2 and out == "".join(answer + "\n" for _, answer in asked)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    history = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": asked[0][1]},
               {"role": "user", "content": "Another one?"}]
    assert asked[1][0] == tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)


def test_chat_ends_at_the_end_of_input_and_reset_forgets(smoke_run, asked, monkeypatch, capsys):
    code, out, err = dora(["chat", str(smoke_run / "final"), "--max-new-tokens", "3"], monkeypatch, capsys,
                          stdin="first\nsecond\n/reset\nthird")
    assert code == 0, err
    assert [prompt for prompt, _ in asked] == [
        prompts.dialogue_prompt("llm_adapters", None, ["first"], [])[0],
        prompts.dialogue_prompt("llm_adapters", None, ["first", "second"], [asked[0][1]])[0],
        prompts.eval_prompt("third"),
    ]
    assert out.count("\n") == 3


def test_sampling_is_seeded(model_dir, monkeypatch, capsys):
    def sample(seed: int) -> str:
        code, out, err = dora(["generate", str(model_dir), "Name a fruit.", "--temperature", "1.5", "--seed", str(seed),
                               "--max-new-tokens", "12"], monkeypatch, capsys)
        assert code == 0, err
        return out

    first = sample(1)
    assert sample(1) == first
    assert any(sample(seed) != first for seed in (2, 3))
    code, greedy, err = dora(["generate", str(model_dir), "Name a fruit.", "--max-new-tokens", "12"], monkeypatch, capsys)
    assert code == 0 and greedy != first  # greedy is not this sample


# --------------------------------------------------------------------------------------------------
# --version; the current transformers API


def test_version_names_the_package_and_its_libraries(monkeypatch, capsys):
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    code, out, _ = dora(["--version"], monkeypatch, capsys)
    assert code == 0 and out.startswith(f"dora_cli {version} (torch ") and "transformers " in out


def test_no_generation_of_ours_uses_the_deprecated_cache_name(tok, monkeypatch):
    """transformers deprecates `past_key_values` (a FutureWarning and a once-only log line): every generation and
    scoring path runs with that warning as an error and the log line captured."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # the log line is emitted once per process
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger("transformers").addHandler(handler)
    model = tiny_llama(vocab_size=512)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*past_key_values.*")
            predict.generate_batch(model, tok, ["a question", "another, longer question"], num_beams=4, max_new_tokens=3)
            predict.generate_batch(model, tok, ["a question"], num_beams=1, max_new_tokens=3)
            predict.loglik_batch(model, tok, ["a question"], [("true", "false")])
            predict.answer_turn(model, tok, "a question", True, temperature=0.7, max_new_tokens=3)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert not [r.getMessage() for r in records if "past_key_values" in r.getMessage()]


@pytest.mark.slow
def test_smollm2_answers_a_question(smollm2_dir, monkeypatch, capsys):
    code, out, err = dora(["generate", str(smollm2_dir), "What is the capital of France? Answer in one word.",
                           "--max-new-tokens", "10"], monkeypatch, capsys)
    assert code == 0, err
    assert "Paris" in out


def test_chat_template_recipe_checkpoints_remember_it(tmp_path):
    """A recipe trained on conversations saves template chat, which generate then uses (no flag needed)."""
    from dora_cli.recipe import dump_recipe, recipe_from_dict

    recipe = recipe_from_dict({"model": {"name_or_path": "a/b"}, "data": {"format": "messages"}}, "r")
    (tmp_path / "recipe.yaml").write_text(dump_recipe(recipe))
    assert load_recipe(tmp_path / "recipe.yaml").data.template == "chat"


@pytest.mark.parametrize("line", ["caf\udce9\n", None], ids=["surrogate-escaped bytes", "strict decoding"])
def test_chat_refuses_a_line_that_is_not_utf8_in_one_line(smoke_run, line, monkeypatch):

    from dora_cli.errors import UserError
    from dora_cli.generate import Sampling, run_chat

    class Undecodable(io.StringIO):
        def readline(self, *args):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    stdin = io.StringIO("hello\n" + line) if line else Undecodable()
    monkeypatch.setattr("dora_cli.generate.Talker.answer", lambda self, q, a: "ok")
    with pytest.raises(UserError, match=r"stdin line (2: not valid Unicode text|1: not valid UTF-8)"):
        run_chat(smoke_run / "final", Sampling(max_new_tokens=2), stdin=stdin)
