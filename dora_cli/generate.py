"""`dora generate TARGET "prompt"` and `dora chat TARGET`: ask a checkpoint, a merged model or a base model.

    run_generate("runs/x/final", "Name a fruit.", Sampling(max_new_tokens=64))   # prints the answer
    run_chat("runs/x/final", Sampling(temperature=0.7), stdin=sys.stdin)         # one answer per line read

TARGET is what `dora eval` takes, loaded the same way (`evaluate.find_target`, `target_recipe`,
`load_for_eval`): a checkpoint (ours, or a PEFT adapter directory; `--base` when neither its recipe nor its
adapter_config.json names the base), a merged or fully fine-tuned model directory, a model directory, a
.gguf file or a hub id.

The prompt goes through the template training used, so the model is asked as it was taught: the target's
recipe `data.template` (llm_adapters / alpaca text, or the tokenizer's chat template); without a recipe, the
chat template when the tokenizer has one, else llm_adapters; `--template` chooses. `chat` keeps the
conversation (`prompts.dialogue_prompt`: earlier turns in the chat template, or as "### Instruction:" /
"### Response:" blocks) and reads one user turn per line from stdin until `/exit` or end of input;
`/reset` forgets the conversation. Answers go to stdout, one per turn; a prompt marker goes to stderr
when stdin is a terminal.

Decoding: greedy at temperature 0 (the default), else sampling at the temperature, with torch seeded
once from `--seed` before the first answer (a session is reproducible); up to `--max-new-tokens` new
tokens, stopping at the end-of-sequence token (`eval.predict.answer_turn`).
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dora_cli.errors import UserError, did_you_mean, one_of, problem_of, unicode_text
from dora_cli.recipe import SEED_MAX

EXIT = "/exit"
RESET = "/reset"


@dataclass(frozen=True)
class Sampling:
    """How answers are decoded: greedy at temperature 0, else sampled; torch seeded with `seed` first."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0

    def check(self) -> Sampling:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature: expected a finite number >= 0 (0: greedy), got {self.temperature}")
        if not 1 <= self.max_new_tokens <= 2**31 - 1:
            raise UserError(f"--max-new-tokens: expected 1 to 2**31 - 1, got {self.max_new_tokens}")
        if not 0 <= self.seed <= SEED_MAX:
            raise UserError(f"--seed: expected 0 to 2**32 - 1, got {self.seed}")
        return self


class Talker:
    """A loaded model and the template its prompts go through; `answer(questions, answers)` the next turn."""

    def __init__(self, target: str | Path, sampling: Sampling, *, template: str | None = None, base: str | None = None):
        import torch

        from dora_cli.checkpoints import UNUSED_BY_CHECKPOINT_READERS
        from dora_cli.evaluate import find_target, load_for_eval, target_recipe
        from dora_cli.prompts import TEMPLATES, require_chat_template

        self.sampling = sampling.check()
        if template is not None and template not in TEMPLATES:
            raise UserError(f"--template: expected one of {one_of(TEMPLATES)}, got {template!r}"
                            f"{did_you_mean(template, TEMPLATES)}")
        found = find_target(target, optional=UNUSED_BY_CHECKPOINT_READERS)
        recipe = target_recipe(found, [], base, UNUSED_BY_CHECKPOINT_READERS)  # --template: this command's, not data.template
        has_recipe = found.checkpoint is not None and found.checkpoint.recipe is not None
        self.model, self.tokenizer = load_for_eval(found, recipe, base)
        context = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(context, int) and self.sampling.max_new_tokens > context:  # it would generate until killed
            raise UserError(f"--max-new-tokens: {self.sampling.max_new_tokens} is more than the model's context of "
                            f"{context} tokens (max_position_embeddings in its config.json)")
        if template or has_recipe:
            self.template = template or recipe.data.template
        else:
            self.template = "chat" if getattr(self.tokenizer, "chat_template", None) else "llm_adapters"
        if self.template == "chat":
            require_chat_template(self.tokenizer, where="--template chat" if template else "data.template: chat")
        torch.manual_seed(self.sampling.seed)

    def answer(self, questions: list[str], answers: list[str]) -> str:
        """The answer to the last of `questions`, after the earlier questions and their `answers`."""
        from dora_cli.eval.predict import answer_turn
        from dora_cli.prompts import dialogue_prompt

        prompt, special = dialogue_prompt(self.template, self.tokenizer, questions, answers)
        s = self.sampling
        return answer_turn(self.model, self.tokenizer, prompt, special, temperature=s.temperature,
                           max_new_tokens=s.max_new_tokens)


def run_generate(target: str | Path, prompt: str, sampling: Sampling, *, template: str | None = None,
                 base: str | None = None) -> str:
    """`dora generate`: print (and return) the answer to one prompt."""
    if not unicode_text(prompt, "PROMPT").strip():
        raise UserError("PROMPT: empty (expected the text to answer)")
    answer = Talker(target, sampling, template=template, base=base).answer([prompt], [])
    print(answer)
    return answer


def run_chat(target: str | Path, sampling: Sampling, *, template: str | None = None, base: str | None = None,
             stdin: TextIO | None = None) -> list[tuple[str, str]]:
    """`dora chat`: answer each line of stdin in one conversation until /exit or the end; the (question,
    answer) turns of the last conversation."""
    stdin = stdin if stdin is not None else sys.stdin
    if stdin is None or stdin.closed:
        raise UserError("stdin is closed: dora chat reads one user turn per line of stdin "
                        "(run it in a terminal, or pipe the turns in)")
    talker = Talker(target, sampling, template=template, base=base)
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {target} (template {talker.template}); {EXIT} or Ctrl-D ends, {RESET} starts over",
              file=sys.stderr)
    questions: list[str] = []
    answers: list[str] = []
    for number in itertools.count(1):
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = unicode_text(stdin.readline(), f"stdin line {number}")
        except UnicodeDecodeError as err:
            raise UserError(f"stdin line {number}: not valid UTF-8 ({err.reason})") from None
        except (OSError, ValueError) as err:  # a stream closed or broken under us
            raise UserError(f"stdin line {number}: cannot be read ({problem_of(err)})") from None
        text = line.strip()
        if not line or text == EXIT:
            break
        if text == RESET:
            questions, answers = [], []
            continue
        if not text:
            continue
        questions.append(text)
        answers.append(talker.answer(questions, answers))
        print(answers[-1], flush=True)
    return list(zip(questions, answers))
