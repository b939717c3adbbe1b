"""Write the demo data set for `make demo`: 1000 train / 200 test self-written multiple-choice questions.

    data/demo/train.json   1000 records
    data/demo/test.json     200 records (no instruction also appears in train.json)

Records are in the LLM-Adapters commonsense format, worded like its ARC files:

    {"instruction": "Please choose the correct answer to the question: Which of these is a fruit?\\n\\n"
                    "Answer1: hammer Answer2: plum Answer3: bus Answer4: violet\\n\\n"
                    "Answer format: answer1/answer2/answer3/answer4",
     "input": "", "output": "the correct answer is answer2", "answer": "answer2"}

The task is designed so that a small instruct model (SmolLM2-135M-Instruct) clearly gains from about ten
minutes of DoRA training on two CPU cores:

- format: the base model answers in words ("Plum is a fruit"), almost never with `answerK`, so
  generate-and-extract accuracy starts near zero and rises with the format alone;
- substance: every question is answerable from the options with knowledge a small model has (which word
  names a fruit, which number is the largest, 6 + 7, the opposite of "hot"), so the log-likelihood score of
  `the correct answer is answerK` can rise above chance (25%) only by learning to point at the right option;
- balance: the correct position is exactly uniform over answer1..answer4 in both splits, so a model that
  always says `answer1` scores 25%;
- short: every prompt is well under 128 tokens.

Five question kinds in equal shares: category membership, largest number, smallest number, single-digit
addition, opposites. Deterministic (fixed seed): running the script again rewrites the same bytes.

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

CATEGORIES = {
    "an animal": [
        "dog",
        "cat",
        "horse",
        "rabbit",
        "lion",
        "sheep",
        "mouse",
        "tiger",
        "elephant",
        "monkey",
        "zebra",
        "goat",
        "bear",
        "wolf",
        "fox",
        "camel",
    ],
    "a fruit": [
        "apple",
        "banana",
        "cherry",
        "grape",
        "lemon",
        "mango",
        "peach",
        "pear",
        "plum",
        "orange",
        "melon",
        "kiwi",
        "lime",
        "strawberry",
        "pineapple",
        "apricot",
    ],
    "a colour": [
        "red",
        "blue",
        "green",
        "yellow",
        "purple",
        "pink",
        "black",
        "white",
        "brown",
        "grey",
        "violet",
        "gold",
        "silver",
        "crimson",
        "turquoise",
        "beige",
    ],
    "a vehicle": [
        "car",
        "bus",
        "train",
        "bicycle",
        "truck",
        "boat",
        "plane",
        "tractor",
        "taxi",
        "van",
        "ship",
        "scooter",
        "helicopter",
        "tram",
        "motorcycle",
        "canoe",
    ],
    "a tool": [
        "hammer",
        "saw",
        "wrench",
        "drill",
        "shovel",
        "chisel",
        "rake",
        "pliers",
        "screwdriver",
        "axe",
        "spanner",
        "file",
        "ladder",
        "trowel",
        "crowbar",
        "mallet",
    ],
    "a piece of clothing": [
        "shirt",
        "coat",
        "sock",
        "scarf",
        "glove",
        "skirt",
        "jacket",
        "boot",
        "hat",
        "dress",
        "sweater",
        "jeans",
        "tie",
        "belt",
        "sandal",
        "vest",
    ],
    "a body part": [
        "hand",
        "foot",
        "knee",
        "elbow",
        "nose",
        "ear",
        "finger",
        "shoulder",
        "ankle",
        "chin",
        "wrist",
        "neck",
        "thumb",
        "toe",
        "hip",
        "lip",
    ],
    "a musical instrument": [
        "piano",
        "guitar",
        "violin",
        "drum",
        "flute",
        "trumpet",
        "harp",
        "cello",
        "clarinet",
        "banjo",
        "saxophone",
        "tuba",
        "organ",
        "ukulele",
        "oboe",
        "harmonica",
    ],
    "a country": [
        "France",
        "Japan",
        "Brazil",
        "Canada",
        "Egypt",
        "India",
        "Mexico",
        "Norway",
        "Kenya",
        "Spain",
        "Peru",
        "Italy",
        "Chile",
        "Greece",
        "Poland",
        "Vietnam",
    ],
    "a piece of furniture": [
        "chair",
        "table",
        "sofa",
        "bed",
        "desk",
        "shelf",
        "stool",
        "wardrobe",
        "bench",
        "dresser",
        "cupboard",
        "armchair",
        "couch",
        "bookcase",
        "cabinet",
        "crib",
    ],
}

OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("happy", "sad"),
    ("open", "closed"),
    ("light", "dark"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("young", "old"),
    ("high", "low"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("loud", "quiet"),
    ("thick", "thin"),
    ("long", "short"),
    ("clean", "dirty"),
    ("heavy", "light"),
    ("day", "night"),
    ("win", "lose"),
    ("push", "pull"),
    ("buy", "sell"),
    ("inside", "outside"),
    ("first", "last"),
    ("begin", "end"),
    ("true", "false"),
    ("north", "south"),
    ("east", "west"),
    ("left", "right"),
    ("top", "bottom"),
    ("arrive", "leave"),
    ("laugh", "cry"),
    ("above", "below"),
    ("before", "after"),
    ("friend", "enemy"),
    ("question", "answer"),
    ("sweet", "sour"),
    ("wide", "narrow"),
]

MC_FORMAT = "answer1/answer2/answer3/answer4"


def record(question: str, correct: str, distractors: list[str], pos: int) -> dict:
    options = distractors[:pos] + [correct] + distractors[pos:]
    choices = " ".join(f"Answer{i + 1}: {opt}" for i, opt in enumerate(options))
    answer = f"answer{pos + 1}"
    return {
        "instruction": f"Please choose the correct answer to the question: {question}\n\n{choices}\n\nAnswer format: {MC_FORMAT}",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def category(rng: random.Random, pos: int) -> dict:
    target, *others = rng.sample(sorted(CATEGORIES), 4)
    distractors = [rng.choice(CATEGORIES[c]) for c in others]
    return record(f"Which of these is {target}?", rng.choice(CATEGORIES[target]), distractors, pos)


def extreme(rng: random.Random, pos: int, largest: bool) -> dict:
    numbers = sorted(rng.sample(range(1, 100), 4))
    correct, distractors = (numbers[-1], numbers[:-1]) if largest else (numbers[0], numbers[1:])
    rng.shuffle(distractors)
    word = "largest" if largest else "smallest"
    return record(f"Which of these numbers is the {word}?", str(correct), [str(n) for n in distractors], pos)


def addition(rng: random.Random, pos: int) -> dict:
    a, b = rng.randrange(1, 10), rng.randrange(1, 10)
    total = a + b
    near = [n for n in range(total - 4, total + 5) if n != total and n >= 0]
    distractors = rng.sample(near, 3)
    return record(f"What is {a} + {b}?", str(total), [str(n) for n in distractors], pos)


def opposite(rng: random.Random, pos: int) -> dict:
    word, correct = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, correct = correct, word
    related = {w for pair in OPPOSITES if word in pair or correct in pair for w in pair}
    pool = sorted({w for pair in OPPOSITES for w in pair} - related)
    return record(f'What is the opposite of "{word}"?', correct, rng.sample(pool, 3), pos)


KINDS = [
    category,
    lambda rng, pos: extreme(rng, pos, largest=True),
    lambda rng, pos: extreme(rng, pos, largest=False),
    addition,
    opposite,
]


def make_split(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    """n records, kinds in equal shares, correct positions exactly uniform, no instruction in `exclude`."""
    slots = [(k, p) for k in range(len(KINDS)) for p in range(4)] * (n // (4 * len(KINDS)))
    rng.shuffle(slots)
    out, seen = [], set(exclude)
    for kind, pos in slots:
        while True:
            rec = KINDS[kind](rng, pos)
            if rec["instruction"] not in seen:
                break
        seen.add(rec["instruction"])
        out.append(rec)
    return out


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = make_split(rng, N_TRAIN, set())
    test = make_split(rng, N_TEST, {r["instruction"] for r in train})
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
