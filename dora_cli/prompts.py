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

Conversations
-------------
`conversation(tokenizer, messages)` renders a whole multi-turn conversation (the `messages` / `sharegpt`
data formats) through the chat template, and finds the text of every assistant turn by rendering
prefixes of the conversation and taking differences, which works for any template that renders
incrementally (the rendering of the first k messages is a prefix of the rendering of all of them):

    before  = render(messages[:i], add_generation_prompt=True)    # ... up to "<|im_start|>assistant\n"
    through = render(messages[:i + 1])                            # ... up to "reply<|im_end|>\n"
    trained = through[len(before):], cut after its last special token when only whitespace follows,
              from where the message's content starts (what the template writes before it is framing)

so the trained text of a turn is its content and the end-of-turn token(s) as the template writes them
("reply<|im_end|>"; a newline after the end-of-turn token is the next turn's framing, and so is a role
header a template without an add_generation_prompt branch writes inside the turn), as templates that mark
`{% generation %}` have it. A template that does not render incrementally, or that does not end a turn with
the content as given, is refused with the reason. A template that marks `{% generation %}` blocks gets
transformers' own assistant mask (`assistant_mask`: `apply_chat_template(..., return_assistant_tokens_mask=True)`).

`dialogue_prompt(template, tokenizer, questions, answers)` is the prompt for the next answer of a
conversation in any template (`dora chat`, MT-Bench): the chat template with the earlier turns, or the
Alpaca / LLM-Adapters text with earlier turns as "### Instruction:" / "### Response:" blocks.
"""

from __future__ import annotations

import os
import re
from typing import Any

from dora_cli.errors import UserError, did_you_mean, one_of

RESPONSE_MARKER = "### Response:"
"""Everything after the last occurrence of this marker in a decoded generation is the answer."""
INSTRUCTION_MARKER = "### Instruction:"
"""Where a user turn starts in the Alpaca / LLM-Adapters text (a model that writes one has ended its answer)."""

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


def require_chat_template(tokenizer: Any, where: str = "data.template: chat") -> None:
    """UserError unless the tokenizer has a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        other = "--template llm_adapters or alpaca" if where.startswith("--template") else "data.template: llm_adapters"
        raise UserError(f"the tokenizer {name!r} has no chat template (for a base model use {other})", where=where)


def chat_prompt(tokenizer: Any, instruction: str, input: str = "", output: str | None = None) -> str:
    """One user turn rendered by the tokenizer's chat template, ready for the assistant; then `output`.

    The text already holds whatever special tokens the template writes (a BOS, turn markers): tokenise it
    with `add_special_tokens=False`.
    """
    require_chat_template(tokenizer)
    content = f"{instruction}\n\n{input}" if input else instruction
    prompt = _render(tokenizer, [{"role": "user", "content": content}], True, "data.template: chat")
    return prompt + (output or "")


def render_conversation(tokenizer: Any, messages: list[dict], where: str = "data") -> str:
    """The whole conversation rendered by the chat template. `where` names the record in errors."""
    require_chat_template(tokenizer)
    return _render(tokenizer, messages, False, where)


def conversation(tokenizer: Any, messages: list[dict], where: str = "data") -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the conversation rendered by the chat template and the [start, end) character spans of
    its assistant turns' trained text (see the module docstring). `where` names the record in errors."""
    text = render_conversation(tokenizer, messages, where)
    specials = special_tokens(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where)
        through = _render(tokenizer, messages[: i + 1], False, where)
        if not (text.startswith(before) and through.startswith(before)):
            raise UserError(
                f"the tokenizer's chat template does not render this conversation turn by turn (the text up to "
                f"message {i} is not a prefix of the whole), so its assistant turns cannot be found; "
                "set data.train_on_inputs: true to train on the whole text",
                where=where,
            )
        # The turn ends where the text goes on with the next turn: what the template writes only after the
        # last message of a conversation (an end-of-text token) is not the turn's.
        after = text if i + 1 < len(messages) else _continued(tokenizer, messages[: i + 1], through)
        limit = len(os.path.commonprefix([through, after]))
        start, stop = _content_span(through, len(before), message["content"], specials, i, where)
        if limit < stop:
            raise UserError(
                f"the tokenizer's chat template does not render this conversation turn by turn (assistant message "
                f"{i} is written otherwise once more messages follow), so its assistant turns cannot be found; "
                "set data.train_on_inputs: true to train on the whole text", where=where,
            )
        spans.append((start, _end_of_turn(through, stop, limit, specials)))
    return text, spans


def _continued(tokenizer: Any, messages: list[dict], through: str) -> str:
    """The conversation rendered with one more user turn (where its last turn's own text ends); `through`
    itself when the template refuses that."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template([*messages, {"role": "user", "content": "."}], tokenize=False)
    except TemplateError:
        return through


def _content_span(text: str, start: int, content: str, specials: list[str], index: int, where: str) -> tuple[int, int]:
    """[start, end) of an assistant message's content in its turn `text[start:]`: what the template writes
    before it (a role header a template without an add_generation_prompt branch writes inside the turn) is
    framing, as `{% generation %}` blocks leave it out. The content, as given or trimmed (templates often
    trim it), must be followed only by special tokens and whitespace."""
    bare = _bare_end(text, start, len(text), specials)  # the turn without its closing specials and whitespace
    for wanted in dict.fromkeys((content, content.strip())):
        core = wanted.rstrip()  # the content's own trailing whitespace went with the turn's
        found = bare - len(core)
        if found >= start and text.startswith(wanted, found):
            return found, found + len(wanted)
    raise UserError(
        f"the tokenizer's chat template does not write assistant message {index} as given (its content, then "
        "end-of-turn tokens), so its trained tokens cannot be told from the template's own; mark them with "
        "{% generation %} in the template, or set data.train_on_inputs: true", where=where,
    )


def _bare_end(text: str, start: int, stop: int, specials: list[str]) -> int:
    """`stop` moved back over the whitespace and special tokens that end `text[start:stop]`."""
    while True:
        end = start + len(text[start:stop].rstrip())
        token = next((t for t in specials if text.endswith(t, start, end)), None)
        end -= len(token) if token else 0
        if end == stop:
            return end
        stop = end


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def marks_generation(tokenizer: Any) -> bool:
    """Whether the chat template marks the assistant's text with `{% generation %}` blocks (then transformers'
    own assistant mask is the mask)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and GENERATION_BLOCK.search(template) is not None


def assistant_mask(tokenizer: Any, messages: list[dict], max_length: int, where: str = "data") -> tuple[list[int], list[int]]:
    """(input ids, mask) of a conversation, exactly as transformers computes them for a template with
    `{% generation %}` blocks (`apply_chat_template(..., return_assistant_tokens_mask=True)`), cut to
    `max_length` tokens."""
    from jinja2 import TemplateError

    require_chat_template(tokenizer)
    try:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, truncation=True,
            max_length=max_length,
        )
    except TemplateError as err:
        raise UserError(f"the tokenizer's chat template refuses this conversation: {err}", where=where) from None
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def special_tokens(tokenizer: Any) -> list[str]:
    """The text of every special token of the tokenizer (its named ones and added tokens marked special)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted((t for t in found if t), key=len, reverse=True)


def _end_of_turn(text: str, start: int, limit: int, specials: list[str]) -> int:
    """Where a turn's trained text ends, the turn being `text[start:limit]`: after its last special token
    when only whitespace, or the start of the next turn's special token, follows it."""
    end = max((text.rfind(t, start, limit) + len(t) for t in specials if text.rfind(t, start, limit) >= 0), default=-1)
    rest = text[end:limit].lstrip() if end >= 0 else None
    if rest is not None and (not rest or any(t.startswith(rest) for t in specials)):
        return end
    return limit


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, where: str) -> str:
    """The chat template's text; a template that refuses the messages (jinja's raise_exception) is a UserError."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise UserError(f"the tokenizer's chat template refuses this conversation: {err}", where=where) from None


def dialogue_prompt(template: str, tokenizer: Any, questions: list[str], answers: list[str]) -> tuple[str, bool]:
    """The prompt for the answer to the last of `questions`, after the earlier questions and their `answers`.

    Returns (text, add_special_tokens): chat-template text already holds its special tokens.
    """
    if template == "chat":
        require_chat_template(tokenizer)
        messages = []
        for i, question in enumerate(questions):
            messages.append({"role": "user", "content": question})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        return _render(tokenizer, messages, True, "data.template: chat"), False
    text = render(template, questions[0])
    for answer, question in zip(answers, questions[1:]):
        text += f"{answer}\n\n{INSTRUCTION_MARKER}\n{question}\n\n{RESPONSE_MARKER}\n"
    return text, True


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
