"""Prompt templates: exact bytes, the train / eval agreement, Alpaca, chat rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from dora_cli import prompts
from dora_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def test_eval_prompt_bytes():
    got = prompts.eval_prompt("Is the sky blue?")
    assert got == EVAL_NO_INPUT.replace("{instruction}", "Is the sky blue?")
    assert got.encode() == (
        b"Below is an instruction that describes a task. Write a response that appropriately completes the "
        b"request. \n\n### Instruction:\nIs the sky blue?\n\n### Response:\n"
    )


def test_training_prompt_without_input():
    assert prompts.training_prompt("Q?", "", "the correct answer is true") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        "\n\n### Instruction:\nQ?\n\n### Response:\nthe correct answer is true"
    )


def test_training_prompt_with_input():
    assert prompts.training_prompt("Summarise.", "Some text.", "Short.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. "
        "\n\n### Instruction:\nSummarise.\n\n### Input:\nSome text.\n\n### Response:\nShort."
    )


@pytest.mark.parametrize("inp", ["", "ctx"])
def test_training_prompt_is_eval_prompt_plus_output(inp):
    assert prompts.training_prompt("Do it.", inp, "done") == prompts.eval_prompt("Do it.", inp) + "done"
    assert prompts.training_prompt("Do it.", inp) == prompts.eval_prompt("Do it.", inp)
    assert prompts.training_prompt("Do it.", inp, None) == prompts.training_prompt("Do it.", inp, "")


def test_ours_is_upstream_finetune_text_without_its_indentation():
    # LLM-Adapters finetune.py generate_prompt, no input: an indented f-string with two spaces after
    # "request." and 16-space blank lines (see the prompts module docstring).
    pad = " " * 16
    upstream = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
        f"{pad}### Instruction:\n{pad}Q\n{pad}\n{pad}### Response:\n{pad}A"
    )
    dedented = "\n".join(line.strip(" ") if i else line for i, line in enumerate(upstream.split("\n")))
    assert dedented.replace("request.  \n", "request. \n") == prompts.training_prompt("Q", "", "A")


def test_braces_in_data_are_kept():
    text = prompts.training_prompt("use {input} and {instruction}", "{0}", "{output}")
    assert (
        "use {input} and {instruction}" in text and "### Input:\n{0}\n" in text and text.endswith("{output}")
    )


def test_response_marker_splits_generation():
    generated = prompts.eval_prompt("Q") + "the correct answer is answer2\n"
    assert prompts.RESPONSE_MARKER == "### Response:"
    assert prompts.response_of(generated) == "the correct answer is answer2"


def test_alpaca_template_bytes():
    assert prompts.alpaca_prompt("Q") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nQ\n\n### Response:\n"
    )
    assert prompts.alpaca_prompt("Q", "I", "O") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nQ\n\n### Input:\nI"
        "\n\n### Response:\nO"
    )


def test_render_dispatches_and_rejects_unknown_template():
    assert prompts.render("llm_adapters", "Q", "", "A") == prompts.training_prompt("Q", "", "A")
    assert prompts.render("alpaca", "Q", "I") == prompts.alpaca_prompt("Q", "I")
    with pytest.raises(UserError, match=r'data.template: unknown template .*did you mean "alpaca"'):
        prompts.render("alpacca", "Q")


CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tiny_tokenizer(chat_template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "data" / "tiny_tokenizer"))
    tok.chat_template = chat_template
    return tok


def test_chat_prompt_uses_the_tokenizer_template():
    tok = _tiny_tokenizer(CHATML)
    assert prompts.chat_prompt(tok, "Q", "I") == "<|user|>\nQ\n\nI</s>\n<|assistant|>\n"
    assert prompts.render("chat", "Q", "", "A", tokenizer=tok) == "<|user|>\nQ</s>\n<|assistant|>\nA"


def test_chat_without_template_is_a_user_error():
    with pytest.raises(UserError, match="data.template: chat: .*has no chat template"):
        prompts.chat_prompt(_tiny_tokenizer(None), "Q")
