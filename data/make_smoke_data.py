"""Write the smoke data set: tiny, self-written, in the LLM-Adapters commonsense format.

    data/smoke/train.json                      150 records (100 answer1..answer4, 50 true/false)
    data/smoke/commonsense/boolq/test.json     16 records, answer format true/false
    data/smoke/commonsense/ARC-Easy/test.json  16 records, answer format answer1..answer4

Every record is {"instruction", "input": "", "output": "the correct answer is X", "answer": X},
with the instruction wording of the LLM-Adapters boolq / ARC files. The questions are simple templated
facts (which word is an animal, which number is the largest, is 7 greater than 3) written for this
project. Deterministic: a fixed seed, so running the script again rewrites the same bytes.

    python data/make_smoke_data.py [--out data/smoke]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234

CATEGORIES = {
    "an animal": ["dog", "cat", "horse", "rabbit", "lion", "sheep", "mouse", "tiger"],
    "a fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"],
    "a colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "a vehicle": ["car", "bus", "train", "bicycle", "truck", "boat", "plane", "tractor"],
    "a tool": ["hammer", "saw", "wrench", "drill", "shovel", "chisel", "rake", "pliers"],
    "a piece of clothing": ["shirt", "coat", "sock", "scarf", "glove", "skirt", "jacket", "boot"],
}

MC_FORMAT = "answer1/answer2/answer3/answer4"


def mc_record(question: str, options: list[str], correct: int) -> dict:
    choices = " ".join(f"Answer{i + 1}: {opt}" for i, opt in enumerate(options))
    answer = f"answer{correct + 1}"
    return {
        "instruction": f"Please choose the correct answer to the question: {question}\n\n{choices}\n\nAnswer format: {MC_FORMAT}",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def tf_record(question: str, truth: bool) -> dict:
    answer = "true" if truth else "false"
    return {
        "instruction": f"Please answer the following question with true or false, question: {question}?\n\nAnswer format: true/false",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def category_question(rng: random.Random) -> dict:
    target, other_cats = _pick_categories(rng)
    correct_word = rng.choice(CATEGORIES[target])
    distractors = [rng.choice(CATEGORIES[c]) for c in other_cats]
    pos = rng.randrange(4)
    options = distractors[:pos] + [correct_word] + distractors[pos:]
    return mc_record(f"Which of these is {target}?", options, pos)


def _pick_categories(rng: random.Random) -> tuple[str, list[str]]:
    names = sorted(CATEGORIES)
    chosen = rng.sample(names, 4)
    return chosen[0], chosen[1:]


def number_question(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 100), 4)
    if rng.random() < 0.5:
        return mc_record(
            "Which of these numbers is the largest?", [str(n) for n in numbers], numbers.index(max(numbers))
        )
    return mc_record(
        "Which of these numbers is the smallest?", [str(n) for n in numbers], numbers.index(min(numbers))
    )


def tf_question(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.sample(range(1, 20), 2)
        return tf_record(f"is {a} greater than {b}", a > b)
    if kind == 1:
        cat = rng.choice(sorted(CATEGORIES))
        truth = rng.random() < 0.5
        pool = CATEGORIES[cat] if truth else [w for c, ws in CATEGORIES.items() if c != cat for w in ws]
        return tf_record(f'is "{rng.choice(pool)}" {cat}', truth)
    a, b = rng.randrange(1, 10), rng.randrange(1, 10)
    shown = a + b if rng.random() < 0.5 else a + b + rng.choice([-2, -1, 1, 2])
    return tf_record(f"is {a} plus {b} equal to {shown}", shown == a + b)


def mc_question(rng: random.Random) -> dict:
    return category_question(rng) if rng.random() < 0.5 else number_question(rng)


def build(rng: random.Random) -> dict[str, list[dict]]:
    train = [mc_question(rng) for _ in range(100)] + [tf_question(rng) for _ in range(50)]
    rng.shuffle(train)
    return {
        "train.json": train,
        "commonsense/boolq/test.json": [tf_question(rng) for _ in range(16)],
        "commonsense/ARC-Easy/test.json": [mc_question(rng) for _ in range(16)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "smoke")
    args = parser.parse_args()
    for rel, records in build(random.Random(SEED)).items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{path}: {len(records)} records")


if __name__ == "__main__":
    main()
