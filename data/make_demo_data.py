"""Write the demo data set for `make demo`: 1000 train / 200 test self-written true/false questions.

    data/demo/train.json   1000 records
    data/demo/test.json     200 records (no review also appears in train.json)

Records are in the LLM-Adapters commonsense format, worded like its BoolQ files (a two-way choice,
answer format true/false):

    {"instruction": "Please answer the following question with true or false, question: is this review "
                    "positive? \\"The coffee was delicious.\\"\\n\\nAnswer format: true/false",
     "input": "", "output": "the correct answer is true", "answer": "true"}

The question: is a one-sentence review (a template, a noun, an adjective) positive? It is chosen so
that SmolLM2-135M-Instruct gains clearly from a few minutes of DoRA training on two CPU cores:

- format: the base model answers in words, almost never with a bare lower-case `true` / `false`, so
  generate-and-extract accuracy starts near zero;
- substance: the base model's log-likelihood of `the correct answer is true` against `... false` is
  near chance (50%); it rises only if training teaches the model to read the review's polarity;
- generalisation: ten of the adjectives (five of each polarity) never occur in the training split, so
  the held-out split also asks about words the adapter never saw in training;
- balance: exactly half of each split is positive, so a model that always says `true` scores 50%.

Deterministic (fixed seed): running the script again rewrites the same bytes.

    python data/make_demo_data.py [--out data/demo]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240214
N_TRAIN = 1000
N_TEST = 200
HELD_OUT_PER_POLARITY = 5

POSITIVE = (
    "wonderful excellent delicious friendly lovely great amazing perfect pleasant superb fantastic "
    "charming delightful brilliant cheerful beautiful comfortable helpful generous fresh"
).split()
NEGATIVE = (
    "terrible awful disgusting rude horrible dreadful poor nasty unpleasant boring dirty broken "
    "noisy cold stale slow ugly painful useless miserable"
).split()
NOUNS = (
    "food service room staff movie book hotel meal coffee trip concert show game teacher class car "
    "phone seat view music bread garden lesson bus shop"
).split()
TEMPLATES = (
    "The {noun} was {adj}.",
    "I found the {noun} {adj}.",
    "What a {adj} {noun}!",
    "Honestly, the {noun} was {adj}.",
    "Our {noun} was really {adj}.",
    "The {noun} here is {adj}.",
    "We thought the {noun} was {adj}.",
)
QUESTION = 'Please answer the following question with true or false, question: is this review positive? "{review}"'


def record(review: str, positive: bool) -> dict:
    answer = "true" if positive else "false"
    return {
        "instruction": f"{QUESTION.format(review=review)}\n\nAnswer format: true/false",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def make_split(rng: random.Random, n: int, adjectives: dict[bool, list[str]], seen: set[str]) -> list[dict]:
    """n records, half positive (in random order), each review new (not in `seen`, which grows)."""
    polarities = [True, False] * (n // 2)
    rng.shuffle(polarities)
    out = []
    for positive in polarities:
        while True:
            review = rng.choice(TEMPLATES).format(noun=rng.choice(NOUNS), adj=rng.choice(adjectives[positive]))
            review = review[0].upper() + review[1:]
            if review not in seen:
                break
        seen.add(review)
        out.append(record(review, positive))
    return out


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    held_out = set(rng.sample(POSITIVE, HELD_OUT_PER_POLARITY) + rng.sample(NEGATIVE, HELD_OUT_PER_POLARITY))
    seen: set[str] = set()
    train_adjs = {True: [a for a in POSITIVE if a not in held_out], False: [a for a in NEGATIVE if a not in held_out]}
    train = make_split(rng, N_TRAIN, train_adjs, seen)
    test = make_split(rng, N_TEST, {True: POSITIVE, False: NEGATIVE}, seen)
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo")
    args = parser.parse_args()
    train, test = build()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train.json", train), ("test.json", test)):
        path = args.out / name
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{path}: {len(records)} records")


if __name__ == "__main__":
    main()
