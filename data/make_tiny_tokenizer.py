"""Train the tiny tokenizer for tests: byte-level BPE, 512 tokens, saved as a transformers tokenizer.

    python data/make_tiny_tokenizer.py [--out data/tiny_tokenizer]

- corpus: the prompt templates of dora_cli.prompts (LLM-Adapters, Alpaca, with and without input), the
  smoke data (data/smoke/**/*.json) and the demo data (data/demo/*.json): instruction, input, output;
- special tokens, LLaMA's ids: `<unk>` 0, `<s>` 1 (bos), `</s>` 2 (eos), `<pad>` 3;
- like a LLaMA tokenizer it adds `<s>` in front of every text (`add_special_tokens=True`), never `</s>`;
- byte-level, so any text encodes (nothing maps to `<unk>`) and decoding gives the text back;
- deterministic: the same corpus gives the same tokenizer.json, byte for byte.

The result loads offline with `AutoTokenizer.from_pretrained("data/tiny_tokenizer")`
(a PreTrainedTokenizerFast). A tiny random model built for it needs `vocab_size >= 512`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent
ROOT = DATA.parent
VOCAB_SIZE = 512
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def corpus() -> list[str]:
    """Template texts first, then every record's fields, in sorted file order."""
    sys.path.insert(0, str(ROOT))
    from dora_cli import prompts

    texts = [
        prompts.training_prompt("instruction", "", "output"),
        prompts.training_prompt("instruction", "input", "output"),
        prompts.alpaca_prompt("instruction", "", "output"),
        prompts.alpaca_prompt("instruction", "input", "output"),
    ]
    files = sorted((DATA / "smoke").rglob("*.json")) + sorted((DATA / "demo").glob("*.json"))
    if not files:
        raise SystemExit("no smoke / demo data: run data/make_smoke_data.py and data/make_demo_data.py first")
    for path in files:
        for rec in json.loads(path.read_text(encoding="utf-8")):
            # each record once as the full training text, as the trainer sees it
            texts.append(prompts.training_prompt(rec["instruction"], rec.get("input", ""), rec["output"]))
    return texts


def train(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos)]
    )
    return tok


def save(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    # Written by hand so that it reads the same under transformers 4 and 5 (5 would name its own
    # `TokenizersBackend` class, which 4 does not have). The `<s> $A` post-processor in tokenizer.json adds
    # the BOS; both versions ignore `add_bos_token` when a tokenizer.json is present, so it is not written.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 2048,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for extra in ("special_tokens_map.json",):
        (out / extra).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA / "tiny_tokenizer")
    args = parser.parse_args()
    tok = train(corpus())
    save(tok, args.out)
    print(f"{args.out}: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
