"""What `dora sweep-rank` reports: sweep.json, sweep.md and sweep.png, from the trials' records.

    doc = document(settings, records)     # groups, the selected settings, paired differences; every number with its n
    render_table(doc)                      # sweep.md
    plot(doc, "sweep.png")

- a group is one (method, rank, grid setting) over its seeds: each task's accuracy, the average and the
  validation loss as a mean with its 95 % confidence interval (Student t over seeds; one seed: the
  binomial interval of the test examples, labelled as such; stats.py)
- the selected setting of a grid, on the validation loss (never the test sets): per (method, rank), the
  group with the lowest mean; under --select-at R, per method the lowest at rank R and the first seed
  (`chosen_at`), used at every rank
- paired differences per rank: each method − the first method, seed by seed over the seeds both finished
  (the same seed saw the same data order), between the selected settings; the mean and its Student-t
  interval, t and p (one seed: the two binomial errors combined); a difference whose interval excludes 0
  is marked
- sweep.md: the paper's Table 15 layout with ± intervals (the selected setting starred), the selection,
  the paired-difference table, the runs whose magnitude did not train, the failed trials
- sweep.png: the average against rank with its intervals (one style per method, the paper's averages
  dotted where they apply, failed trials marked), and below it the paired differences with a zero line
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from dora_cli import stats
from dora_cli.adapters import METHODS
from dora_cli.plots import fit, model_name, save_png, series_style, y_limits

MIN_Y_SPAN = 10.0  # percentage points: the accuracy panel never stretches a smaller difference across its axis
MIN_DIFF_SPAN = 2.0  # percentage points: the same for the difference panel
EXCLUDES_ZERO = "†"
ONE_SEED = "ᵇ"


# ==================================================================================================
# The document
# ==================================================================================================
def document(settings: dict, records: list[dict]) -> dict:
    """sweep.json: the settings, every trial, the groups over seeds, the selection, the paired differences."""
    groups = make_groups(settings, records)
    selection = select(settings, records, groups)
    chosen = {(s["method"], s["rank"]): s["label"] for s in selection["selected"]}
    for g in groups:  # without a grid every group is its (method, rank)'s only setting
        g["selected"] = g["setting"] is not None and (chosen.get((g["method"], g["rank"])) == g["label"]
                                                      if settings.get("grid") else True)
    summary = {status: sum(r["status"] == status for r in records) for status in ("ok", "failed", "pending")}
    return {
        "settings": settings, "trials": records, "groups": groups, "selection": selection,
        "differences": differences(settings, records, groups), "summary": summary,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def label(setting: dict | None) -> str:
    """'optim.lr=2e-4', '' without a grid, '(to be selected)' for a study trial whose setting is not chosen yet."""
    if setting is None:
        return "(to be selected)"
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def make_groups(settings: dict, records: list[dict]) -> list[dict]:
    """One group per (method, rank, setting), in the order of the methods, the ranks, then the setting's first trial."""
    order = {m: i for i, m in enumerate(settings["methods"])}
    keyed: dict[tuple, list[dict]] = {}
    for r in records:
        keyed.setdefault((r["method"], r["rank"], label(r["setting"])), []).append(r)
    first = {key: i for i, key in enumerate(keyed)}
    ordered = sorted(keyed, key=lambda k: (order.get(k[0], len(order)), k[1], first[k]))
    return [_group(keyed[key]) for key in ordered]


def _group(trials: list[dict]) -> dict:
    ok = [t for t in trials if t["status"] == "ok"]
    head = trials[0]
    group = {
        "method": head["method"], "rank": head["rank"], "setting": head["setting"], "label": label(head["setting"]),
        "trials": [t["name"] for t in trials], "seeds": [t["seed"] for t in ok], "n": len(ok),
        "failed": sum(t["status"] == "failed" for t in trials), "pending": sum(t["status"] == "pending" for t in trials),
        "average": None, "tasks": {}, "val_loss": None,
        "trainable_percent": next((t["trainable_percent"] for t in trials if t["trainable_percent"] is not None), None),
        "examples": ok[0]["examples"] if ok else None, "paper_average": head["paper_average"],
        "train_time_s": _mean([t["train_time_s"] for t in ok]), "eval_time_s": _mean([t["eval_time_s"] for t in ok]),
        "magnitude_change": {}, "warnings": [f"{t['name']}: {w}" for t in trials for w in t.get("warnings") or []],
    }
    if ok:
        group["average"] = _accuracy([t["average"] for t in ok], ok[0]["average_se"]).to_dict()
        for task in ok[0]["tasks"]:
            values = [t["tasks"][task] for t in ok if task in t["tasks"]]
            if len(values) == len(ok):
                group["tasks"][task] = _accuracy(values, (ok[0].get("tasks_se") or {}).get(task)).to_dict()
        losses = [t["val_loss"] for t in ok if _finite(t["val_loss"])]
        if len(losses) == len(ok):
            group["val_loss"] = stats.over_seeds(losses).to_dict()
        kinds = ok[0].get("magnitude_change") or {}
        for kind in kinds:
            values = [(t.get("magnitude_change") or {}).get(kind) for t in ok]
            if all(_finite(v) for v in values):
                group["magnitude_change"][kind] = _mean(values)
    return group


def _accuracy(values: list[float], se: float | None) -> stats.Estimate:
    """Over seeds (Student t); one seed: the binomial interval of its test examples."""
    return stats.over_seeds(values) if len(values) > 1 else stats.binomial(values[0], se)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean(values: list) -> float | None:
    values = [v for v in values if _finite(v)]
    return math.fsum(values) / len(values) if values else None


# ---- the selection -----------------------------------------------------------------------------------------
def chosen_at(records: list[dict], methods: list[str]) -> dict[str, dict | str | None]:
    """--select-at: per method the setting of its selection trial with the lowest validation loss (ties: the
    first in grid order); "pending" while one is unfinished; None when none finished with a loss."""
    out: dict[str, dict | str | None] = {}
    for method in methods:
        candidates = [r for r in records if r.get("selecting") and r["method"] == method]
        if any(r["status"] == "pending" for r in candidates):
            out[method] = "pending"
            continue
        ok = [r for r in candidates if r["status"] == "ok" and _finite(r["val_loss"])]
        out[method] = min(ok, key=lambda r: r["val_loss"])["setting"] if ok else None
    return out


def select(settings: dict, records: list[dict], groups: list[dict]) -> dict:
    """{"basis": how, "selected": [per (method, rank): the setting, its validation loss, the candidates]};
    no grid: nothing to select."""
    if not settings.get("grid"):
        return {"basis": None, "selected": []}
    at = settings.get("select_at")
    selected = []
    if at is not None:
        basis = (f"each method's setting with the lowest validation loss at r={at['rank']}, seed {at['seed']}, "
                 "then used at every rank and seed")
        trials = [r for r in records if r.get("selecting")]
        for method, setting in chosen_at(records, settings["methods"]).items():
            if not isinstance(setting, dict):
                continue
            candidates = [{"label": label(r["setting"]), "val_loss": r["val_loss"], "n": 1, "status": r["status"]}
                          for r in trials if r["method"] == method]
            loss = min(c["val_loss"] for c in candidates if c["label"] == label(setting))
            for rank in settings["ranks"]:
                selected.append({"method": method, "rank": rank, "setting": setting, "label": label(setting),
                                 "val_loss": loss, "n": 1, "candidates": candidates})
        return {"basis": basis, "selected": selected}
    basis = "per (method, rank), the setting with the lowest mean validation loss over its finished seeds"
    for method in settings["methods"]:
        for rank in settings["ranks"]:
            mine = [g for g in groups if g["method"] == method and g["rank"] == rank and g["setting"] is not None]
            candidates = [{"label": g["label"], "val_loss": g["val_loss"]["mean"] if g["val_loss"] else None,
                           "n": g["n"], "status": "ok" if g["n"] else "failed" if g["failed"] else "pending"} for g in mine]
            scored = [(c["val_loss"], i) for i, c in enumerate(candidates) if c["val_loss"] is not None]
            if scored:
                best = mine[min(scored)[1]]
                selected.append({"method": method, "rank": rank, "setting": best["setting"], "label": best["label"],
                                 "val_loss": best["val_loss"]["mean"], "n": best["n"], "candidates": candidates})
    return {"basis": basis, "selected": selected}


# ---- paired differences ------------------------------------------------------------------------------------
def differences(settings: dict, records: list[dict], groups: list[dict]) -> list[dict]:
    """Per rank, each method − the first method between their selected groups, paired by seed."""
    methods = settings["methods"]
    if len(methods) < 2:
        return []
    by_name = {r["name"]: r for r in records}
    chosen = {(g["method"], g["rank"]): g for g in groups if g.get("selected")}
    out = []
    for rank in settings["ranks"]:
        base = chosen.get((methods[0], rank))
        for method in methods[1:]:
            other = chosen.get((method, rank))
            entry = {"rank": rank, "method": method, "baseline": methods[0], "seeds": [], "n": 0, "per_seed": {},
                     "average": None, "tasks": {}, "val_loss": None,
                     "baseline_setting": base["label"] if base else None, "setting": other["label"] if other else None}
            if base and other:
                a = {by_name[n]["seed"]: by_name[n] for n in base["trials"] if by_name[n]["status"] == "ok"}
                b = {by_name[n]["seed"]: by_name[n] for n in other["trials"] if by_name[n]["status"] == "ok"}
                seeds = [s for s in settings["seeds"] if s in a and s in b]
                entry.update(seeds=seeds, n=len(seeds))
                if seeds:
                    _fill_difference(entry, [a[s] for s in seeds], [b[s] for s in seeds])
            out.append(entry)
    return out


def _fill_difference(entry: dict, a: list[dict], b: list[dict]) -> None:
    entry["per_seed"] = {str(x["seed"]): y["average"] - x["average"] for x, y in zip(a, b)}
    entry["average"] = _paired([x["average"] for x in a], [y["average"] for y in b], a[0]["average_se"], b[0]["average_se"])
    for task in a[0]["tasks"]:
        if all(task in x["tasks"] for x in a + b):
            entry["tasks"][task] = _paired([x["tasks"][task] for x in a], [y["tasks"][task] for y in b],
                                           (a[0].get("tasks_se") or {}).get(task), (b[0].get("tasks_se") or {}).get(task))
    if all(_finite(x["val_loss"]) for x in a + b):
        entry["val_loss"] = stats.paired([x["val_loss"] for x in a], [y["val_loss"] for y in b]).to_dict()


def _paired(a: list[float], b: list[float], a_se: float | None, b_se: float | None) -> dict:
    if len(a) > 1:
        return stats.paired(a, b).to_dict()
    return stats.binomial_difference(a_se, b_se, b[0] - a[0]).to_dict()


# ==================================================================================================
# sweep.md
# ==================================================================================================
def _tasks(doc: dict) -> list[str]:
    """The tasks of the table: the ones evaluated trials report (an lm-eval group or tag stands for its tasks),
    else the ones asked; the paper's eight in its order first."""
    from dora_cli.eval.tasks import TASKS

    reported = [t for trial in doc["trials"] if trial["status"] == "ok" for t in trial.get("tasks", {})]
    names = list(dict.fromkeys(reported or doc["settings"]["eval"]["tasks"]))
    return [*(t for t in TASKS if t in names), *(t for t in names if t not in TASKS)]


def _column(task: str) -> str:
    from dora_cli.eval.tasks import TASKS

    return TASKS[task].column if task in TASKS else task


def _display(method: str) -> str:
    return METHODS[method].display if method in METHODS else method


def render_table(doc: dict) -> str:
    """Markdown: the paper's Table 15 layout (mean ± 95 % interval over seeds), then the selection, the paired
    differences, the magnitude warnings and the failed trials."""
    settings = doc["settings"]
    tasks = _tasks(doc)
    grid = bool(settings.get("grid"))
    paper = settings.get("paper_reference") is not None
    columns = ["Model", "r", *(["Setting"] if grid else []), "Seeds", "# Params (%)", *map(_column, tasks), "Avg",
               "Val loss", "Train (s)", "Eval (s)", *(["Paper Avg"] if paper else [])]
    lines = [f"# Rank study: {model_name(settings['model'])}", "", "| " + " | ".join(columns) + " |",
             "|---|---:|" + ("---|" if grid else "") + "---:|" * (len(columns) - 2 - grid)]
    for g in doc["groups"]:
        if g["n"]:
            cells = [_estimate(g["tasks"].get(t)) for t in tasks] + [_estimate(g["average"])]
        else:
            cells = ["-"] * len(tasks) + ["failed" if g["failed"] and not g["pending"] else "pending"]
        cells += [_estimate(g["val_loss"], 4), _seconds(g["train_time_s"]), _seconds(g["eval_time_s"])]
        if paper:
            cells.append(_cell(g["paper_average"]))
        star = " ★" if grid and g["selected"] else ""
        setting = [g["label"] + star] if grid else []
        lines.append("| " + " | ".join([_display(g["method"]), str(g["rank"]), *setting, _seeds(g),
                                         _percent(g["trainable_percent"]), *cells]) + " |")
    lines += ["", _note(doc)]
    if grid:
        lines += ["", *_selection_lines(doc)]
    if doc["differences"]:
        lines += ["", *_difference_lines(doc, tasks)]
    warnings = [w for g in doc["groups"] for w in g["warnings"]]
    if warnings:
        lines += ["", "Runs whose magnitude did not train:", "", *(f"- {w}" for w in warnings)]
    failed = [t for t in doc["trials"] if t["status"] == "failed"]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- {t['name']}: {t['error']}" for t in failed]
    return "\n".join(lines) + "\n"


def _note(doc: dict) -> str:
    settings = doc["settings"]
    ev = settings["eval"]
    alpha = "alpha = 2r" if settings["alpha_rule"] == "2r" else f"alpha = {settings['alpha']} (fixed)"
    if ev.get("suite") == "lm_eval":
        note = f"Model {settings['model']}. lm-eval's headline metric of each task (%), {alpha}"
    else:
        note = f"Model {settings['model']}. Accuracy (%), {alpha}; eval mode {ev['mode']}"
    if ev["limit"]:
        note += f", the first {ev['limit']} examples of each task"
    note += (
        f"; {_examples(doc)}. Each cell: the mean over the seeds (Seeds: how many finished) ± the half-width of its"
        " 95 % confidence interval, Student t over seeds; "
        f"{ONE_SEED} one seed: ± the 95 % binomial interval of the test examples alone (1.96 standard errors; it"
        " leaves out the run-to-run spread of training). Avg is the macro average over the tasks evaluated. Val"
        " loss: the validation loss (data.val_set_size examples held out of the training data); times in seconds"
        " (training, and the evaluation's predictions), means over seeds."
    )
    if settings.get("grid"):
        note += " ★: the selected setting (below)."
    if settings.get("paper_reference") is not None:
        note += " Paper Avg: the paper's Table 15 (LLaMA-7B, eight tasks, one run)."
    return note


def _selection_lines(doc: dict) -> list[str]:
    selection = doc["selection"]
    lines = [f"## Selected on the validation loss: {selection['basis']}", "",
             "| Model | r | Selected | Val loss | Candidates (val loss) | Avg (test) |", "|---|---:|---|---:|---|---:|"]
    groups = {(g["method"], g["rank"], g["label"]): g for g in doc["groups"]}
    at = doc["settings"].get("select_at")
    for s in selection["selected"]:
        if at is not None and s["rank"] != at["rank"]:
            continue  # under --select-at one choice per method, made at rank R: its row stands for every rank
        g = groups.get((s["method"], s["rank"], s["label"]))
        candidates = ", ".join(f"{c['label']}: {_loss(c['val_loss'])}" for c in s["candidates"])
        rank = f"{s['rank']} (for all)" if at is not None else str(s["rank"])
        lines.append(f"| {_display(s['method'])} | {rank} | {s['label']} | {_loss(s['val_loss'])} | {candidates} | "
                     f"{_estimate(g['average']) if g and g['n'] else '-'} |")
    if not selection["selected"]:
        lines.append("| - | - | nothing selected yet | - | - | - |")
    return lines


def _difference_lines(doc: dict, tasks: list[str]) -> list[str]:
    baseline = _display(doc["differences"][0]["baseline"])
    columns = ["Model", "r", "Seeds", *map(_column, tasks), "Avg", "p", "Avg per seed", "Val loss"]
    lines = [f"## Paired differences: method − {baseline}, seed by seed (percentage points)", "",
             "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for d in doc["differences"]:
        name = f"{_display(d['method'])} − {baseline}"
        if not d["n"]:
            lines.append(f"| {name} | {d['rank']} | 0 | " + " | ".join(["-"] * (len(columns) - 3)) + " |")
            continue
        avg = d["average"]
        per_seed = ", ".join(f"{v:+.1f}" for v in d["per_seed"].values())
        p = "-" if avg.get("p") is None else f"{avg['p']:.3f}"
        cells = [_estimate(d["tasks"].get(t), sign=True) for t in tasks] + [_estimate(avg, sign=True), p, per_seed,
                                                                              _estimate(d["val_loss"], 4, sign=True)]
        seeds = f"{d['n']}{ONE_SEED if avg['basis'] == stats.BINOMIAL else ''}"
        lines.append(f"| {name} | {d['rank']} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", f"Each difference is taken per seed (both trials of a seed saw the same data order and initial "
              "adapter draw), between each method's selected setting; the mean ± the half-width of its 95 % "
              f"interval (Student t over seeds; p: paired t-test). {EXCLUDES_ZERO}: the interval excludes 0. "
              f"{ONE_SEED} one seed: ± the two binomial intervals combined (test examples only)."]
    return lines


def _estimate(e: dict | None, digits: int = 1, sign: bool = False) -> str:
    if e is None:
        return "-"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = fmt.format(e["mean"])
    if e["half_width"] is not None:
        text += f" ± {e['half_width']:.{digits}f}"
    if sign and e.get("excludes_zero"):
        text += f" {EXCLUDES_ZERO}"
    return text


def _seeds(g: dict) -> str:
    total = g["n"] + g["failed"] + g["pending"]
    text = str(g["n"]) if g["n"] == total else f"{g['n']} of {total}"
    return text + (ONE_SEED if g["average"] and g["average"]["basis"] == stats.BINOMIAL else "")


def _examples(doc: dict) -> str:
    """'n = 400 test examples per trial (2 tasks)', from the trials evaluated so far."""
    counts = sorted({t["examples"] for t in doc["trials"] if t["status"] == "ok" and t["examples"] is not None})
    if not counts:
        return "no trial evaluated yet"
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    tasks = len(_tasks(doc))
    return f"n = {n} test examples per trial ({tasks} task{'s' if tasks != 1 else ''})"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _percent(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


# ==================================================================================================
# sweep.png
# ==================================================================================================
def plot(doc: dict, path: Path):
    """The selected groups' average accuracy ± its 95 % interval against rank (log2 axis, the ranks as ticks),
    one style per method (markers, line styles and a small sideways offset keep tied methods apart), failed
    groups marked with x at the bottom, the paper's averages dotted, at least MIN_Y_SPAN points of y range;
    below, the paired differences against the first method with their intervals and a zero line. Written
    atomically; returns the figure."""
    from matplotlib.figure import Figure

    settings = doc["settings"]
    two = bool(doc["differences"])
    width = 6.4
    fig = Figure(figsize=(width, 7.2 if two else 4.6), layout="constrained")
    axes = fig.subplots(2 if two else 1, 1, sharex=True, squeeze=False)[:, 0]
    _accuracy_panel(doc, axes[0])
    if two:
        _difference_panel(doc, axes[1])
    ranks = settings["ranks"]
    axes[-1].set_xlabel("rank r")
    for ax in axes:
        _rank_axis(ax, ranks)
    axes[0].set_title(fit(f"Rank study: {model_name(settings['model'])}", width, 11), fontsize=11)
    fig.supxlabel(fit(f"{_examples(doc)}; {_bars(doc)}", width, 8), fontsize=8)
    save_png(fig, path)
    return fig


def _rank_axis(ax, ranks: list[int]) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(ranks) / 1.4, max(ranks) * 1.4)
    ax.grid(True, alpha=0.3)


def _shift(i: int, count: int) -> float:
    """A sideways offset on the log axis, so that tied methods do not cover each other."""
    return 2 ** (0.035 * (i - (count - 1) / 2))


def _errors(estimates: list[dict]) -> list[list[float]]:
    return [[e["mean"] - e["low"] if e["low"] is not None else 0.0 for e in estimates],
            [e["high"] - e["mean"] if e["high"] is not None else 0.0 for e in estimates]]


def _accuracy_panel(doc: dict, ax) -> None:
    settings = doc["settings"]
    methods = settings["methods"]
    shown: list[float] = []
    for i, method in enumerate(methods):
        style, name = series_style(i), _display(method)
        mine = [g for g in doc["groups"] if g["method"] == method and g["selected"]]
        ok = sorted((g for g in mine if g["n"]), key=lambda g: g["rank"])
        if ok:
            estimates = [g["average"] for g in ok]
            low, high = _errors(estimates)
            ys = [e["mean"] for e in estimates]
            ax.errorbar([g["rank"] * _shift(i, len(methods)) for g in ok], ys, yerr=[low, high], capsize=3,
                        elinewidth=1.0, label=name, **style)
            shown += [y - e for y, e in zip(ys, low)] + [y + e for y, e in zip(ys, high)]
        failed = sorted({g["rank"] for g in doc["groups"] if g["method"] == method and g["failed"]
                         and not any(o["rank"] == g["rank"] for o in ok)})
        if failed:  # x in axis coordinates: at the bottom, whatever the accuracies
            ax.plot(failed, [0.04] * len(failed), "x", color=style["color"], markersize=10, markeredgewidth=2,
                    transform=ax.get_xaxis_transform(), label=f"{name} failed")
        reference = sorted({(g["rank"], g["paper_average"]) for g in mine if g["paper_average"] is not None})
        if settings.get("paper_reference") and reference:
            ax.plot(*zip(*reference), linestyle=":", marker=style["marker"], fillstyle="none", color=style["color"],
                    alpha=0.7, label=f"{name} (paper)")
            shown += [y for _, y in reference]
    ax.set_ylim(*y_limits(shown, MIN_Y_SPAN, floor=0.0, ceiling=100.0))
    ax.set_ylabel("average accuracy (%)")
    _legend(ax)


def _difference_panel(doc: dict, ax) -> None:
    methods = doc["settings"]["methods"]
    shown = [0.0]
    for i, method in enumerate(methods[1:], 1):
        style = series_style(i)
        mine = sorted((d for d in doc["differences"] if d["method"] == method and d["n"]), key=lambda d: d["rank"])
        if mine:
            estimates = [d["average"] for d in mine]
            low, high = _errors(estimates)
            ys = [e["mean"] for e in estimates]
            ax.errorbar([d["rank"] * _shift(i, len(methods)) for d in mine], ys, yerr=[low, high], capsize=3,
                        elinewidth=1.0, label=f"{_display(method)} − {_display(methods[0])}", **style)
            shown += [y - e for y, e in zip(ys, low)] + [y + e for y, e in zip(ys, high)]
    ax.axhline(0.0, color="black", linewidth=1.0, zorder=0)
    ax.set_ylim(*y_limits(shown, MIN_DIFF_SPAN))
    ax.set_ylabel("paired difference (points)")
    _legend(ax)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _bars(doc: dict) -> str:
    """What the error bars are: Student t over n seeds, or (one seed) binomial."""
    counts = sorted({g["n"] for g in doc["groups"] if g["selected"] and g["n"]})
    if not counts:
        return "error bars: 95 % confidence intervals"
    if counts == [1]:
        return "error bars: 95 % binomial intervals of the test examples (one seed)"
    n = str(counts[-1]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"error bars: 95 % confidence intervals over n = {n} seeds (Student t; one seed: binomial)"
