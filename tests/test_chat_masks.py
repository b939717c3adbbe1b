"""The assistant mask of conversation data is transformers' (issue 23), over the chat templates of six model
families, written here as fixtures in each family's format (no hub).

Each family's template comes twice: as the family ships it (no markers) and with `{% generation %}` around
what the assistant writes (its content and end-of-turn token). transformers computes the mask of the marked
template (`apply_chat_template(..., return_assistant_tokens_mask=True)`), the oracle; ours must equal it on
both versions: on the marked one it is transformers' own mask, on the unmarked one the turn-by-turn rendering
(prompts.conversation). A template where the turns cannot be found that way is refused with the reason.
"""

from __future__ import annotations

import pytest
from conftest import TINY_TOKENIZER
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dora_cli.datasets import IGNORE_INDEX, tokenize_conversations
from dora_cli.errors import UserError
from dora_cli.recipe import DataConfig

G, E = "{% generation %}", "{% endgeneration %}"


def chatml(marked: bool, prompt_branch: bool = True) -> str:
    g, e = (G, E) if marked else ("", "")
    return ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}" + g
            + "{{ m['content'] }}<|im_end|>" + e + "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
            + ("{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}" if prompt_branch else ""))


def llama3(marked: bool) -> str:
    g, e = (G, E) if marked else ("", "")
    return ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{% if m['role'] == 'assistant' %}" + g + "{{ m['content'] | trim }}<|eot_id|>" + e
            + "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def mistral(marked: bool) -> str:
    g, e = (G, E) if marked else ("", "")
    return ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'assistant' %} " + g + "{{ m['content'] }}{{ eos_token }}" + e + "{% endif %}{% endfor %}")


def gemma(marked: bool) -> str:
    g, e = (G, E) if marked else ("", "")
    return ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
            "<start_of_turn>{{ role }}\n{% if m['role'] == 'assistant' %}" + g + "{{ m['content'] | trim }}<end_of_turn>"
            + e + "{% else %}{{ m['content'] | trim }}<end_of_turn>{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def zephyr(marked: bool) -> str:
    g, e = (G, E) if marked else ("", "")
    return ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}" + g
            + "{{ m['content'] }}{{ eos_token }}" + e + "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def phi3(marked: bool) -> str:
    """Phi-3 ends a conversation rendered without the generation prompt with the end-of-text token, which
    belongs to no turn (the turn ends where the next one would start)."""
    g, e = (G, E) if marked else ("", "")
    return ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}" + g
            + "{{ m['content'] }}<|end|>" + e + "{% else %}{{ m['content'] }}<|end|>{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")


# family -> (template builder, special tokens, eos, bos, whether the system role is rendered)
FAMILIES = {
    "chatml (Qwen2, SmolLM2)": (chatml, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", None, True),
    "llama-3": (llama3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>", "<|begin_of_text|>", True),
    "mistral / llama-2 [INST]": (mistral, [], "</s>", "<s>", False),
    "gemma": (gemma, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", "<bos>", False),
    "zephyr": (zephyr, [], "</s>", "<s>", True),
    "phi-3": (phi3, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<|endoftext|>", None, True),
    "chatml without a generation-prompt branch (the issue's case)": (
        lambda marked: chatml(marked, prompt_branch=False), ["<|im_start|>", "<|im_end|>"], "<|im_end|>", None, True),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A plum."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "A plum."}, {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "An apple, of course."}],
    [{"role": "user", "content": "  spaced question  "}, {"role": "assistant", "content": " assistant \n"},
     {"role": "user", "content": "Ünïcode ✓?"}, {"role": "assistant", "content": "Oui: ça va — 42."}],
]


def tokenizer_for(family: str, marked: bool):
    from transformers import AutoTokenizer

    build, specials, eos, bos, _ = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    extra = {"additional_special_tokens": specials, "eos_token": eos}
    if bos is not None:
        extra["bos_token"] = bos
    tok.add_special_tokens(extra)
    tok.chat_template = build(marked)
    return tok


def conversations_of(family: str) -> list[list[dict]]:
    system = FAMILIES[family][4]
    return [[m for m in c if system or m["role"] != "system"] for c in CONVERSATIONS]


def transformers_labels(tok, messages: list[dict], cutoff: int) -> tuple[list[int], list[int]]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  truncation=True, max_length=cutoff)
    ids = list(out["input_ids"])
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"], strict=True)]


def ours(tok, messages: list[dict], cutoff: int) -> tuple[list[int], list[int]]:
    cfg = DataConfig(format="messages", train_on_inputs=False, cutoff_len=cutoff)
    example = tokenize_conversations([{"messages": messages}], tok, cfg)[0]
    return example["input_ids"], example["labels"]


@pytest.mark.parametrize("cutoff", [4096, 24])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_assistant_mask_is_transformers_for_every_family(family, cutoff):
    oracle = tokenizer_for(family, marked=True)
    plain = tokenizer_for(family, marked=False)
    for messages in conversations_of(family):
        want_ids, want = transformers_labels(oracle, messages, cutoff)
        assert sum(label != IGNORE_INDEX for label in want) > 0 or cutoff < 100  # the oracle trains something
        assert ours(oracle, messages, cutoff) == (want_ids, want), (family, messages)
        ids, labels = ours(plain, messages, cutoff)
        assert ids == want_ids and labels == want, (family, messages, plain.decode(
            [t for t in labels if t != IGNORE_INDEX]), oracle.decode([t for t in want if t != IGNORE_INDEX]))


def test_the_issue_s_template_trains_no_header_token():
    """{% generation %} without an add_generation_prompt branch: the header is framing, never trained."""
    family = "chatml without a generation-prompt branch (the issue's case)"
    messages = CONVERSATIONS[1]
    for marked in (True, False):
        tok = tokenizer_for(family, marked)
        _, labels = ours(tok, messages, 4096)
        trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained == "A plum.<|im_end|>An apple, of course.<|im_end|>", trained


def test_a_template_that_does_not_render_turn_by_turn_is_refused_with_the_reason():
    tok = tokenizer_for("chatml (Qwen2, SmolLM2)", marked=False)  # earlier turns rewritten once a later one comes
    tok.chat_template = tok.chat_template.replace("{{ m['content'] }}<|im_end|>{% else %}",
                                                  "{{ m['content'] if loop.last else '...' }}<|im_end|>{% else %}")
    with pytest.raises(UserError, match="does not render this conversation turn by turn"):
        ours(tok, CONVERSATIONS[1], 4096)


def test_a_template_that_rewrites_the_content_is_refused_with_the_reason():
    tok = tokenizer_for("chatml (Qwen2, SmolLM2)", marked=False)
    tok.chat_template = tok.chat_template.replace("{{ m['content'] }}<|im_end|>{% else %}",
                                                  "{{ m['content'] | upper }}<|im_end|>{% else %}")
    with pytest.raises(UserError, match="does not write assistant message 1 as given.*generation"):
        ours(tok, CONVERSATIONS[0], 4096)


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=24)


@settings(max_examples=60, deadline=None)
@given(family=st.sampled_from(list(FAMILIES)), turns=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3),
       cutoff=st.integers(min_value=2, max_value=160))
def test_any_conversation_of_any_family_is_masked_as_transformers_masks_it(family, turns, cutoff):
    oracle, plain = TOKENIZERS[family]
    specials = [*FAMILIES[family][1], FAMILIES[family][2], FAMILIES[family][3] or ""]
    assume(not any(t and t in text for t in specials for pair in turns for text in pair))
    assume(all(a.strip() for _, a in turns))  # an empty answer: no text of the assistant's own to find
    messages = [m for user, answer in turns for m in ({"role": "user", "content": user},
                                                      {"role": "assistant", "content": answer})]
    want = transformers_labels(oracle, messages, cutoff)
    assert ours(oracle, messages, cutoff) == want
    assert ours(plain, messages, cutoff) == want, (family, messages)


TOKENIZERS = {family: (tokenizer_for(family, True), tokenizer_for(family, False)) for family in FAMILIES}
