"""Cost of the input guards of issue 13: refusing a "billion laughs" recipe, and redacting judge answers.

    .venv/bin/python bench/bench_input_guards.py          # a few seconds; writes bench/results/input_guards.json

- YAML alias bombs: documents of 9 aliases per level (9**levels values once expanded), loaded with
  `recipe.load_recipe`; the time to the refusal and the peak Python memory (tracemalloc) while loading.
- Redaction: seconds per MB of judge text through `redact.Redactor` (no key inside, the worst case: every
  window is looked up), against the 4 MB a judge answer may have.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dora_cli.errors import UserError  # noqa: E402
from dora_cli.eval.judge import MAX_RESPONSE_BYTES  # noqa: E402
from dora_cli.eval.redact import Redactor  # noqa: E402
from dora_cli.recipe import MAX_VALUES, load_recipe  # noqa: E402

OUT = REPO / "bench" / "results" / "input_guards.json"


def laughs(levels: int, width: int = 9) -> str:
    lines = ["model: {name_or_path: some/model}", f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def bomb(levels: int) -> dict:
    text = laughs(levels)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bomb.yaml"
        path.write_text(text)
        tracemalloc.start()
        start = time.perf_counter()
        try:
            load_recipe(path)
            outcome = "loaded"
        except UserError as err:
            outcome = str(err).split(": ", 1)[1]
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return {"levels": levels, "bytes": len(text), "values_if_expanded": 9 ** (levels + 1),
            "seconds": round(seconds, 5), "peak_python_mb": round(peak / 2**20, 3), "outcome": outcome}


def redaction(megabytes: int = 2) -> dict:
    redact = Redactor("sk-proj-" + "a1B2c3D4e5F6g7H8i9J0" * 2)
    text = ("The assistant's answer is mostly correct, but misses a step. Rating: [[6]]\n" * 20_000)[: megabytes * 2**20]
    start = time.perf_counter()
    redact(text)
    seconds = time.perf_counter() - start
    return {"megabytes": megabytes, "seconds": round(seconds, 3), "seconds_per_mb": round(seconds / megabytes, 3),
            "max_response_mb": MAX_RESPONSE_BYTES / 2**20}


def main() -> None:
    result = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "max_values": MAX_VALUES,
        "alias_bombs": [bomb(levels) for levels in (3, 4, 8, 10, 30)],
        "redaction": redaction(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
