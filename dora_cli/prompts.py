"""Prompt templates: LLM-Adapters training / evaluation, Alpaca, and a model's own chat template.

Where each text comes from
--------------------------
LLM-Adapters (AGI-Edgerunners/LLM-Adapters), whose code the DoRA authors reuse unchanged for the
commonsense experiments (NVlabs/DoRA commonsense_reasoning/finetune.py and commonsense_evaluate.py carry
the same `generate_prompt` functions, byte for byte):

- training, `finetune.py::generate_prompt(data_point)`;
- evaluation, `commonsense_evaluate.py::generate_prompt(instruction, input=None)` (upstream spells the file
  `commomsense_evaluate.py`).

Both are f-strings written as indented triple-quoted literals, so their bytes are not what they look like:

    training, no input   "...completes the request.  \\n\\n" then every following line starts with 16
                         spaces, and the blank lines between sections are 16 spaces too:
                         "                ### Instruction:\\n                {instruction}\\n                \\n
                                          ### Response:\\n                {output}"
    training, input      the same, with "... paired with an input that provides further context. ..." and
                         ONE space after "request."; an "### Input:" section between the two
    evaluation, no input "...completes the request. \\n\\n" (one space), 16-space indents, EMPTY blank lines,
                         ending "### Response:\\n" + 16 spaces
    evaluation, input    like the line above, no space after "request."

(An older finetune.py even had "  # noqa: E501" inside the no-input string.) The indentation is an
accident of formatting ("sorry about the formatting disaster" says the upstream comment), and the two
upstream files do not agree with each other, so a model trained with one and evaluated with the other
sees a slightly different prompt.

What we use, and why
--------------------
One text, the Alpaca layout without the accidental indentation, the same at training and evaluation time:

    Below is an instruction that describes a task. Write a response that appropriately completes the request. \\n\\n
    ### Instruction:\\n{instruction}\\n\\n### Response:\\n{output}

- the evaluation prompt is exactly the one specified for this project (one space after "request.",
  no indentation): `eval_prompt(instruction)`;
- the training prompt is that same prompt followed by the output, so `training_prompt(i, "", o) ==
  eval_prompt(i) + o` and `training_prompt(i, "") == eval_prompt(i)`: the tokens the model is trained to
  continue are exactly the tokens it is asked to continue at evaluation. Upstream's training string has
  two spaces after "request." (and 16-space indents); ours has one, as its evaluation string;
- with an input, the header is "... paired with an input that provides further context. ... request. "
  (one space, as upstream training; upstream evaluation has none) and an "### Input:\\n{input}\\n\\n" section;
  evaluation with an input uses the same text (commonsense data never has an input).

`ALPACA` is the original Stanford Alpaca / alpaca-lora text (tatsu-lab/stanford_alpaca PROMPT_DICT,
tloen/alpaca-lora templates/alpaca.json): identical to ours except that there is no space after "request.".
Stanford Alpaca's own PROMPT_DICT ends at "### Response:" and glues the output on without a newline;
alpaca-lora adds the "\\n" that we keep, so the response marker is always followed by a newline.

`chat` renders the instruction (and input) as one user turn through the tokenizer's own
`apply_chat_template(..., add_generation_prompt=True)`; the training text is that prompt plus the output
(the end-of-sequence token is added at tokenisation, `datasets.tokenize_record`), so again the training
prompt is byte for byte the evaluation prompt.
"""

from __future__ import annotations

from typing import Any

from dora_cli.errors import UserError, did_you_mean, one_of

RESPONSE_MARKER = "### Response:"
"""Everything after the last occurrence of this marker in a decoded generation is the answer."""

_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# (no input, with input); `{instruction}`, `{input}` are filled by plain concatenation, never str.format,
# so braces in the data are kept as they are.
LLM_ADAPTERS = (
    _HEADER + " \n\n### Instruction:\n{instruction}\n\n" + RESPONSE_MARKER + "\n",
    _HEADER_INPUT
    + " \n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    + RESPONSE_MARKER
    + "\n",
)
ALPACA = (
    _HEADER + "\n\n### Instruction:\n{instruction}\n\n" + RESPONSE_MARKER + "\n",
    _HEADER_INPUT + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n" + RESPONSE_MARKER + "\n",
)
TEXT_TEMPLATES = {"llm_adapters": LLM_ADAPTERS, "alpaca": ALPACA}
TEMPLATES = (*TEXT_TEMPLATES, "chat")


def _fill(pair: tuple[str, str], instruction: str, input: str) -> str:
    text = pair[1] if input else pair[0]
    head, rest = text.split("{instruction}")
    if not input:
        return head + instruction + rest
    mid, tail = rest.split("{input}")
    return head + instruction + mid + input + tail


def training_prompt(instruction: str, input: str = "", output: str | None = None) -> str:
    """The LLM-Adapters training text; without `output`, the user prompt (what the loss may mask)."""
    return _fill(LLM_ADAPTERS, instruction, input) + (output or "")


def eval_prompt(instruction: str, input: str = "") -> str:
    """The LLM-Adapters evaluation prompt; the model continues after "### Response:\\n"."""
    return _fill(LLM_ADAPTERS, instruction, input)


def alpaca_prompt(instruction: str, input: str = "", output: str | None = None) -> str:
    """The Stanford Alpaca / alpaca-lora text (no space after "request.")."""
    return _fill(ALPACA, instruction, input) + (output or "")


def chat_prompt(tokenizer: Any, instruction: str, input: str = "", output: str | None = None) -> str:
    """One user turn rendered by the tokenizer's chat template, ready for the assistant; then `output`.

    The text already holds whatever special tokens the template writes (a BOS, turn markers): tokenise it
    with `add_special_tokens=False`.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"the tokenizer {name!r} has no chat template (expected llm_adapters for a base model)",
            where="data.template: chat",
        )
    content = f"{instruction}\n\n{input}" if input else instruction
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return prompt + (output or "")


def render(
    template: str, instruction: str, input: str = "", output: str | None = None, tokenizer: Any = None
) -> str:
    """The prompt of `template` ("llm_adapters", "alpaca" or "chat"); without output, the user prompt."""
    if template == "chat":
        return chat_prompt(tokenizer, instruction, input, output)
    if template not in TEXT_TEMPLATES:
        raise UserError(
            f"unknown template {template!r}, expected {one_of(TEMPLATES)}{did_you_mean(template, TEMPLATES)}",
            where="data.template",
        )
    return _fill(TEXT_TEMPLATES[template], instruction, input) + (output or "")


def response_of(generated: str) -> str:
    """The answer part of a decoded generation: the text after the last response marker, stripped."""
    return generated.split(RESPONSE_MARKER)[-1].strip()
