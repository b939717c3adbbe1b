"""What sweep.png and analysis.png share: a style per series, model names, y ranges, titles that fit.

- `series_style(i)`: colour, marker, marker size, fill and line style of the i-th series; neighbours differ
  in all of them, so two series that tie stay visible (a large hollow marker around a small filled one,
  a solid line beside a dashed one)
- `model_name(name_or_path)`: a hub id as it is, a local path by its last component
- `y_limits(values, min_span, floor, ceiling)`: limits holding every value, at least `min_span` wide, so
  that a small difference is not stretched across the whole axis
- `fit(text, inches, fontsize)`: the text wrapped to the width it has
- `save_png(fig, path)`: written atomically
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
SIZES = (9, 5, 8, 5, 8, 6, 7, 6)
LINES = ("-", "--", "-.", (0, (5, 2, 1, 2, 1, 2)), (0, (8, 3)))


def series_style(i: int) -> dict:
    """Keyword arguments of Axes.plot / errorbar for the i-th series (0-based)."""
    return {
        "color": f"C{i % 10}",
        "marker": MARKERS[i % len(MARKERS)],
        "markersize": SIZES[i % len(SIZES)],
        "fillstyle": "none" if i % 2 == 0 else "full",
        "markeredgewidth": 1.6,
        "linestyle": LINES[i % len(LINES)],
        "linewidth": 1.6,
    }


def model_name(name_or_path: str | None) -> str:
    """How a figure names a model: a hub id (owner/name) as it is, a local path or .gguf file by its last
    component."""
    if not name_or_path:
        return "random model"
    path = Path(name_or_path).expanduser()
    local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists() or path.suffix.lower() == ".gguf"
    if not local:
        return name_or_path
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def y_limits(values: list[float], min_span: float, floor: float = -math.inf, ceiling: float = math.inf) -> tuple[float, float]:
    """(low, high) holding every finite value with a 5 % margin, at least `min_span` wide, centred on the
    values and kept within [floor, ceiling] where the span allows."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (floor, ceiling) if math.isfinite(floor) and math.isfinite(ceiling) else (0.0, 1.0)
    low, high = min(finite), max(finite)
    margin = 0.05 * (high - low)
    low, high = low - margin, high + margin
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    if low < floor:
        low, high = floor, max(high, floor + min_span)
    if high > ceiling:
        low, high = min(low, ceiling - min_span), ceiling
    return max(low, floor), min(high, ceiling)


def fit(text: str, inches: float, fontsize: float = 10) -> str:
    """`text` wrapped to lines that fit `inches` at `fontsize` points (an average glyph is ~0.55 em wide)."""
    chars = max(12, int(inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars, break_long_words=True, break_on_hyphens=False)) or text


def save_png(fig, path: str | Path, dpi: int = 120) -> None:
    from dora_cli.files import atomic_file

    atomic_file(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
