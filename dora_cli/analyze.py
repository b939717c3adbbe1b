"""`dora analyze CKPT ...`: the paper's weight-decomposition analysis (Sec. 3.2, eq. 3-4, Figure 2).

For a module with base weight W0 and effective (merged) weight Wt at training step t, per output row i
(rows = output features, the axis DoRA normalises in training):

    ΔM_t = mean_i | ‖Wt_i‖ − ‖W0_i‖ |          ΔD_t = mean_i ( 1 − cos(Wt_i, W0_i) )

Features, top to bottom:
- checkpoints: ours (adapter or `method: full`), PEFT adapter directories, or whole run directories
  (`output_dir`: every `checkpoint-<step>` and `final`); any methods, any number of steps
- method from the checkpoint's recipe.yaml (else the adapter config); step from
  trainer_state/state.json, else the directory name (`checkpoint-<step>`; `final`: the run's last
  step from metrics.json); points are grouped by method, and by run when two runs share a method
- the base is loaded once: only the analysed modules' weights are read from a safetensors directory
  (other bases: `load_model`, dequantized weights for a 4-bit recipe); an adapter checkpoint's
  effective weights come from its tensors (merge.fold, no model per checkpoint); a full checkpoint's
  from its own safetensors
- analysis.json: every point (group, step, layer, module, ΔM, ΔD) and per group the Pearson
  correlation of ΔD with ΔM over all its points; analysis.png: one scatter panel per group on shared
  axes, colour by step, the least-squares line and the correlation in the title, the number of points in
  the caption (the paper's Figure 2)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dora_cli import rundir
from dora_cli.adapters import METHODS, linear_module_names, matches, read_adapter_config
from dora_cli.checkpoints import (
    Adapter,
    Base,
    Checkpoint,
    check_fits,
    fold,
    inspect_checkpoint,
    read_adapter,
    read_shapes,
    read_tensors,
    resolve_base,
)
from dora_cli.console import say
from dora_cli.errors import UserError, did_you_mean
from dora_cli.files import (
    OutputKind,
    atomic_file,
    check_output,
    json_with,
    output_kind,
    register_output_kind,
    write_json,
    write_output_marker,
)
from dora_cli.plots import fit, model_name

JSON_NAME = "analysis.json"
PNG_NAME = "analysis.png"
LAYER_RE = re.compile(r"\.(\d+)\.")
DISPLAY = {"full": "FT", **{name: m.display for name, m in METHODS.items()}}
PAPER = {"model": "VL-BART", "FT": -0.62, "DoRA": -0.31, "LoRA": 0.83}
ANALYZE_OUTPUT = register_output_kind(OutputKind(
    "analyze", "dora analyze", entries=(JSON_NAME, PNG_NAME),
    legacy=lambda directory: json_with(directory / JSON_NAME, "definition", "methods", "paper") is not None,
))
"""What `dora analyze` writes in --out."""


# ==================================================================================================
# Entry point
# ==================================================================================================
def run_analyze(
    checkpoints: list[str | Path],
    *,
    base: str | None = None,
    modules: list[str] | None = None,
    out: str | Path = "analysis",
) -> dict:
    """Compute ΔM / ΔD for every checkpoint and module; write out/analysis.json and out/analysis.png."""
    modules = list(modules) if modules is not None else ["q_proj", "v_proj"]
    if not modules:
        raise UserError("--modules: expected at least one module name (for example q_proj,v_proj)")
    out = check_output(Path(out), ANALYZE_OUTPUT.name, label=f"--out {out}")
    ckpts = [describe(c) for c in expand(checkpoints)]
    ckpts = _dedupe_and_group(ckpts)
    src = _common_base(ckpts, base)

    w0, shapes = base_weights(src, modules)  # the base, read once
    names = sorted(w0, key=_order)
    notes = [note for c in ckpts if (note := _read_and_check(c, shapes, names, modules))]  # every refusal first
    say(f"analysing {len(names)} modules of {src.description} in {len(ckpts)} checkpoints")
    for note in notes:
        say(note)

    points: list[dict] = []
    for c in ckpts:
        points += _points(c, w0, shapes, names)

    result = summarize(ckpts, points, src, modules)
    check_output(out, ANALYZE_OUTPUT.name, label=f"--out {out}")  # again: a file may have appeared meanwhile
    out.mkdir(parents=True, exist_ok=True)
    if output_kind(out) is None:
        write_output_marker(out, ANALYZE_OUTPUT.name)
    write_json(out / JSON_NAME, result)
    atomic_file(out / PNG_NAME, lambda p: plot(result, p))
    for label, g in result["methods"].items():
        corr = "n/a" if g["correlation"] is None else f"{g['correlation']:+.3f}"
        say(f"{label}: {len(g['points'])} points, corr(ΔD, ΔM) = {corr}")
    say(f"wrote {out / JSON_NAME} and {out / PNG_NAME}")
    return result


# ==================================================================================================
# The checkpoints: what they are, which method, which step
# ==================================================================================================
@dataclass
class Analysed:
    ckpt: Checkpoint
    method: str
    run: Path
    step: int | None
    group: str = ""
    adapter: Adapter | None = None  # an adapter checkpoint's tensors, read once


def expand(paths: list[str | Path]) -> list[Path]:
    """Checkpoint directories; a run directory (checkpoint-<step>/ and final/ inside) stands for all of them."""
    if not paths:
        raise UserError("no checkpoints given")
    found: list[Path] = []
    for p in map(Path, paths):
        ckpts = rundir.run_checkpoints(p)
        found += ckpts if ckpts else [p]
    return found


def describe(path: Path) -> Analysed:
    ckpt = inspect_checkpoint(path)
    if ckpt.recipe is not None:
        method = ckpt.recipe.adapter.method
    elif ckpt.kind == "full":
        method = "full"
    else:
        method = read_adapter_config(path)[0].method
    run = path.resolve().parent if rundir.is_checkpoint_name(path.name) else path.resolve()
    return Analysed(ckpt, method, run, rundir.checkpoint_step(path))


def _dedupe_and_group(ckpts: list[Analysed]) -> list[Analysed]:
    """Drop a checkpoint that repeats (run, step) of an earlier one (final = its last checkpoint-<step>)."""
    seen: dict[tuple, Path] = {}
    kept = []
    for c in ckpts:
        key = (c.run, c.step, c.method) if c.step is not None else (c.ckpt.path.resolve(),)
        if key in seen:
            say(f"skipping {c.ckpt.path}: same run and step as {seen[key]}")
            continue
        seen[key] = c.ckpt.path
        kept.append(c)
    # group labels: the method, and the run when two runs share a method
    runs: dict[str, list[Path]] = {}
    for c in kept:
        runs.setdefault(c.method, [])
        if c.run not in runs[c.method]:
            runs[c.method].append(c.run)
    for c in kept:
        label = DISPLAY.get(c.method, c.method)
        c.group = label if len(runs[c.method]) == 1 else f"{label} ({c.run.name})"
    if len({c.group for c in kept}) < sum(len(v) for v in runs.values()):  # two runs with the same dir name
        for c in kept:
            if len(runs[c.method]) > 1:
                c.group = f"{DISPLAY.get(c.method, c.method)} ({c.run})"
    return kept


def _common_base(ckpts: list[Analysed], base: str | None) -> Base:
    """The one base every checkpoint was trained on (--base, else their recipes / adapter configs must agree)."""
    first = ckpts[0]
    if base is not None:
        return resolve_base(first.ckpt, base)
    resolved = []
    for c in ckpts:
        if c.ckpt.recipe is None and c.ckpt.kind == "full":
            raise UserError(f"{c.ckpt.path}: a full fine-tuning checkpoint without recipe.yaml: pass --base MODEL")
        resolved.append((c, resolve_base(c.ckpt)))
    key = lambda b: (b.model.name_or_path, b.model.config, b.model.tokenizer, b.model.quantization.mode)  # noqa: E731
    for c, b in resolved[1:]:
        if key(b) != key(resolved[0][1]):
            raise UserError(
                f"{c.ckpt.path} was trained on {b.description}, {first.ckpt.path} on {resolved[0][1].description}: "
                "pass --base MODEL to compare them against one base"
            )
    return resolved[0][1]


# ==================================================================================================
# Weights: the base once, then each checkpoint's effective weights of the chosen modules
# ==================================================================================================
def _order(name: str) -> tuple:
    m = LAYER_RE.search(name)
    return (int(m.group(1)) if m else -1, name)


def select(names: list[str], patterns: list[str]) -> list[str]:
    """Module names matched by the patterns (PEFT's rule: a name, a dotted suffix, or a full regex)."""
    chosen = []
    for pattern in patterns:
        hits = [n for n in names if matches(n, pattern)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UserError(
                f"--modules: {pattern!r} matches no linear module{did_you_mean(pattern, short)}; "
                f"modules of this model: {', '.join(short)}"
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def base_weights(src: Base, patterns: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """({module: W0 as the trained forward saw it}, {module: weight shape} of every linear module)."""
    if src.directory is not None:
        shapes = {n: s for n, s in read_shapes(src.directory).shapes.items() if len(s) == 2}
        chosen = select(list(shapes), patterns)
        tensors = read_tensors(src.directory, [f"{n}.weight" for n in chosen])
        return {n: _cast(tensors[f"{n}.weight"], src.cast) for n in chosen}, shapes

    from dora_cli.adapters.base_ops import dequantized_weight
    from dora_cli.models import load_model

    model, _ = load_model(src.model, for_training=False, label=src.label)
    linear = {n: model.get_submodule(n) for n in linear_module_names(model)}
    shapes = {n: (m.out_features, m.in_features) for n, m in linear.items()}
    chosen = select(list(linear), patterns)
    w0 = {n: dequantized_weight(linear[n]).detach().clone() for n in chosen}
    del model
    return w0, shapes


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _read_and_check(c: Analysed, shapes: dict, names: list[str], patterns: list[str]) -> str | None:
    """An adapter checkpoint's tensors, checked against the base (a full one: its analysed weights are
    there); UserError when it adapts none of the analysed modules; a note when it adapts only some."""
    if c.ckpt.kind != "adapter":
        have = read_shapes(c.ckpt.path).shapes
        missing = [n for n in names if n not in have]
        if missing:
            raise UserError(f"{c.ckpt.path}: holds no tensor {missing[0]}.weight (is it a full fine-tuning "
                            "checkpoint of this base?)")
        return None
    c.adapter = read_adapter(c.ckpt.path)
    check_fits(c.adapter, shapes, base="the base")
    if not any(n in c.adapter.modules for n in names):
        adapted = sorted({n.rsplit(".", 1)[-1] for n in c.adapter.modules})
        raise UserError(
            f"--modules {','.join(patterns)}: {c.ckpt.path} has no adapter on these modules "
            f"(it adapts {', '.join(adapted)}{did_you_mean(patterns[0], adapted)})"
        )
    skipped = [n for n in names if n not in c.adapter.modules]
    if skipped:
        return f"{c.ckpt.path}: {len(skipped)} analysed modules have no adapter (for example {skipped[0]}); left out"
    return None


def effective_weights(c: Analysed, w0: dict[str, torch.Tensor], shapes: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """{module: Wt in fp32} of the analysed modules the checkpoint changes."""
    if c.ckpt.kind == "full":
        tensors = read_tensors(c.ckpt.path, [f"{n}.weight" for n in names])
        return {n: tensors[f"{n}.weight"].float() for n in names}
    adapter = c.adapter
    vera = adapter.vera(shapes)
    return {n: fold(w0[n], n, adapter, vera) for n in names if n in adapter.modules}


def _points(c: Analysed, w0: dict[str, torch.Tensor], shapes: dict, names: list[str]) -> list[dict]:
    points = []
    for name, wt in effective_weights(c, w0, shapes, names).items():
        dm, dd = decomposition(w0[name], wt)
        m = LAYER_RE.search(name)
        points.append({
            "group": c.group, "method": c.method, "step": c.step, "checkpoint": str(c.ckpt.path),
            "layer": int(m.group(1)) if m else None, "module": name.rsplit(".", 1)[-1], "name": name,
            "delta_m": dm, "delta_d": dd,
        })
    return points


# ==================================================================================================
# The measures
# ==================================================================================================
@torch.no_grad()
def decomposition(w0: torch.Tensor, wt: torch.Tensor) -> tuple[float, float]:
    """(ΔM, ΔD) of Wt against W0, per output row (dim 1 = inputs is reduced), in float64."""
    a, b = w0.double(), wt.double()
    n0, nt = a.norm(dim=1), b.norm(dim=1)
    delta_m = (nt - n0).abs().mean().item()
    cos = (a * b).sum(dim=1) / (n0 * nt).clamp_min(1e-300)
    delta_d = (1.0 - cos).mean().item()
    return delta_m, delta_d


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's r, or None with fewer than 3 points or a constant variable."""
    if len(x) < 3:
        return None
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    xs, ys = xs - xs.mean(), ys - ys.mean()
    den = (xs.pow(2).sum() * ys.pow(2).sum()).sqrt().item()
    if den == 0.0 or not math.isfinite(den):
        return None
    return (xs * ys).sum().item() / den


def summarize(ckpts: list[Analysed], points: list[dict], src: Base, patterns: list[str]) -> dict:
    methods: dict[str, dict] = {}
    for c in ckpts:
        g = methods.setdefault(c.group, {"method": c.method, "run": str(c.run), "checkpoints": [], "points": []})
        g["checkpoints"].append({"path": str(c.ckpt.path), "step": c.step})
    for p in points:
        methods[p["group"]]["points"].append({k: v for k, v in p.items() if k not in ("group", "method")})
    for g in methods.values():
        pts = g["points"]
        g["correlation"] = pearson([p["delta_d"] for p in pts], [p["delta_m"] for p in pts])
        by_step: dict = {}
        for p in pts:
            by_step.setdefault(p["step"], []).append(p)
        g["correlation_by_step"] = {
            str(s): pearson([p["delta_d"] for p in v], [p["delta_m"] for p in v]) for s, v in sorted(by_step.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        }
        g["steps"] = sorted({p["step"] for p in pts if p["step"] is not None})
    return {
        "base": src.description,
        "modules": patterns,
        "definition": "per output row i: dM = mean_i |‖Wt_i‖ − ‖W0_i‖|, dD = mean_i (1 − cos(Wt_i, W0_i)); "
                      "correlation = Pearson r of dD with dM over all points of a method",
        "paper": PAPER,
        "methods": methods,
    }


# ==================================================================================================
# The figure
# ==================================================================================================
def plot(result: dict, path: str | Path):
    """One scatter panel per method on shared axes: x = ΔD, y = ΔM, colour and marker by step, the
    least-squares line; titles wrapped to their panel, the number of points in the caption. Returns the
    figure."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    groups = list(result["methods"].items())
    panel = 4.4
    fig = Figure(figsize=(panel * max(1, len(groups)), 4.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(groups)), squeeze=False, sharex=True, sharey=True)[0]
    markers = "o^sDvP*Xh<>"
    for ax, (label, g) in zip(axes, groups):
        pts = g["points"]
        steps = sorted({p["step"] for p in pts}, key=lambda s: (s is None, s or 0))
        cmap = colormaps["viridis"]
        for i, step in enumerate(steps):
            sel = [p for p in pts if p["step"] == step]
            colour = cmap(i / max(1, len(steps) - 1))
            ax.scatter([p["delta_d"] for p in sel], [p["delta_m"] for p in sel], s=18, color=colour,
                       marker=markers[i % len(markers)], label=f"step {step}" if step is not None else "step ?",
                       edgecolors="none", alpha=0.85)
        x = np.array([p["delta_d"] for p in pts], dtype=float)
        y = np.array([p["delta_m"] for p in pts], dtype=float)
        if len(pts) >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, slope * xs + intercept, color="crimson", linewidth=1.5, label="least squares")
        corr = g["correlation"]
        title = f"{label}  (corr = {corr:+.2f})" if corr is not None else f"{label}  (corr n/a)"
        ax.set_title(fit(title, panel, 10), fontsize=10)
        ax.set_xlabel("ΔD  (mean 1 − cos per row)")
        ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("ΔM  (mean |Δ‖row‖|)")
    width = panel * max(1, len(groups))
    fig.suptitle(fit(f"Weight decomposition: {', '.join(result['modules'])} of {model_name(result['base'])}", width, 11), fontsize=11)
    fig.supxlabel(fit(_caption(result), width, 8), fontsize=8)
    fig.savefig(path, dpi=120, format="png")
    return fig


def _caption(result: dict) -> str:
    """The number of points behind each panel, and what one point is."""
    counts = ", ".join(f"{label}: {len(g['points'])}" for label, g in result["methods"].items())
    return (f"One point per module, layer and checkpoint (points per panel: {counts}); shared axes; "
            "the line is the least-squares fit of ΔM on ΔD, corr its Pearson correlation.")
