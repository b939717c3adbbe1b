"""An Ollama Modelfile for an exported GGUF file: FROM, TEMPLATE (the chat template as a Go template), stop tokens.

The tokenizer's chat template is Jinja; Ollama's is Go's text/template. Rather than translate Jinja, the
template is rendered on sentinel conversations and the text around each message is read off:

    [system S, user U1, assistant A1, user U2] + generation prompt  ->  t0 S t1 U1 t2 A1 t3 U2 t4
    [user U1, assistant A1, user U2] + generation prompt           ->  s0 U1 t2 A1 t3 U2 t4

t0 opens a conversation that starts with a system message, s0 one that starts with the user (it holds the
default system prompt a template inserts itself), t1 goes from system to user, t2 from user to assistant,
t3 from assistant to user, t4 closes a user turn and opens the answer. A bos token that t0 / s0 begin with is
left out when the tokenizer adds one itself (the GGUF's add_bos_token): Ollama's llama.cpp puts it in front
of every prompt, and the template's would be a second one. The Go template emits the same text
between the messages of any system? (user assistant)* user conversation, which is every conversation
Ollama sends. A template that renders the second conversation with other separators than the first, or that
refuses a system message, gets no TEMPLATE line (Ollama then falls back on the GGUF's own chat template,
which it matches against the templates it knows).

Stop tokens: the end-of-sequence token and the special tokens that close an assistant turn (those in t3).
"""

from __future__ import annotations

from pathlib import Path

from dora_cli.console import say
from dora_cli.export.vocab import adds_bos_eos

MARK = "# Written by dora export"
SENTINELS = ("dora-sys-7c1e", "dora-user-4b2a", "dora-asst-9d3f", "dora-user-2e8c")


def modelfile(gguf_path: Path, tokenizer) -> str:
    """The Modelfile's text, for a GGUF file at `gguf_path` (FROM names it relative to the Modelfile beside it)."""
    lines = [f"{MARK}: ollama create NAME -f {gguf_path.stem}.Modelfile", f"FROM ./{gguf_path.name}"]
    separators = chat_separators(tokenizer)
    if separators is None:
        say("--ollama: the chat template does not render as system / user / assistant turns; the Modelfile has "
            "no TEMPLATE (Ollama reads the GGUF's chat template)")
    else:
        template = go_template(separators)
        if '"""' in template:
            say('--ollama: the chat template holds """; the Modelfile has no TEMPLATE')
        else:
            lines.append(f'TEMPLATE """{template}"""')
    for token in stop_tokens(tokenizer, separators):
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n"


def chat_separators(tokenizer) -> dict[str, str] | None:
    """The text between messages (keys start_system, start_user, system_user, user_assistant, assistant_user,
    user_end), or None when the template does not render that way."""
    from jinja2.exceptions import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return None
    s, u1, a1, u2 = SENTINELS
    turns = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
    try:
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": s}, *turns], tokenize=False,
                                                    add_generation_prompt=True)
        without = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except TemplateError:  # the template's raise_exception: e.g. no system role
        return None
    first = _split(with_system, [s, u1, a1, u2])
    second = _split(without, [u1, a1, u2])
    if first is None or second is None or second[1:] != first[2:]:
        return None
    keys = ("start_system", "system_user", "user_assistant", "assistant_user", "user_end")
    separators = {**dict(zip(keys, first)), "start_user": second[0]}
    bos = getattr(tokenizer, "bos_token", None)
    if bos and adds_bos_eos(tokenizer, getattr(tokenizer, "bos_token_id", None), None)[0]:
        for key in ("start_system", "start_user"):  # llama.cpp puts it in front of the prompt itself
            separators[key] = separators[key].removeprefix(bos)
    return separators


def _split(text: str, sentinels: list[str]) -> list[str] | None:
    """The text before, between and after the sentinels (each exactly once, in order), or None."""
    parts = []
    for sentinel in sentinels:
        if text.count(sentinel) != 1:
            return None
        head, _, text = text.partition(sentinel)
        parts.append(head)
    return [*parts, text]


def go_template(sep: dict[str, str]) -> str:
    """A Go template emitting `sep`'s text between the messages: no whitespace trimming anywhere, so that every
    character of the separators is kept."""
    lit = _literal
    return (
        '{{ $last := "" }}{{ range .Messages }}'
        '{{ if eq $last "" }}'
        f'{{{{ if eq .Role "system" }}}}{lit(sep["start_system"])}{{{{ else }}}}{lit(sep["start_user"])}{{{{ end }}}}'
        f'{{{{ else if eq .Role "user" }}}}'
        f'{{{{ if eq $last "system" }}}}{lit(sep["system_user"])}{{{{ else }}}}{lit(sep["assistant_user"])}{{{{ end }}}}'
        f'{{{{ else if eq .Role "assistant" }}}}{lit(sep["user_assistant"])}'
        "{{ end }}"
        "{{ .Content }}{{ $last = .Role }}{{ end }}"
        f'{{{{ if ne $last "assistant" }}}}{lit(sep["user_end"])}{{{{ end }}}}'
    )


def _literal(text: str) -> str:
    """Text as Go template source: literal, except `{{`, which is written as an action printing it."""
    return text.replace("{{", '{{ "{{" }}')


def stop_tokens(tokenizer, separators: dict[str, str] | None) -> list[str]:
    """The eos token, then the special tokens that close an assistant turn."""
    stops = []
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos:
        stops.append(eos)
    if separators is not None:
        closing = separators["assistant_user"]
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in closing]
        stops += sorted(specials, key=closing.index)
    return [t for i, t in enumerate(stops) if t not in stops[:i] and '"' not in t]
