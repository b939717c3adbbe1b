"""What a person reads after a run: standard errors and n in eval tables, the MT-Bench score on the console,
`dora eval --help`'s example, and the figures (styles that keep tied methods apart, error bars, a sensible
y range, the model by name, titles that fit their panel, shared axes, the counts in the caption)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from test_eval_mtbench import JUDGE_PROMPTS, QUESTIONS, REFS, StubJudge, write_jsonl
from test_eval_run import checkpoint

from dora_cli import analyze, cli, sweep_report
from dora_cli.eval.report import average_se, binomial_se, results_table, summarize, task_metrics
from dora_cli.plots import model_name, series_style, y_limits
from dora_cli.recipe import load_recipe


def dora(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`dora ARGS` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["dora", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- standard errors ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_binomial_se_is_the_standard_deviation_of_the_mean_of_the_outcomes(counts):
    correct, n = counts
    outcomes = np.array([1.0] * correct + [0.0] * (n - correct))
    assert binomial_se(correct, n) == pytest.approx(100 * outcomes.std() / math.sqrt(n), abs=1e-9)
    assert task_metrics([{"correct": i < correct, "prediction": "x"} for i in range(n)])["se"] == pytest.approx(
        binomial_se(correct, n), abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))), min_size=1, max_size=8))
def test_the_average_se_is_that_of_a_mean_of_independent_accuracies(tasks):
    per_task = {f"t{i}": {"correct": c, "n": n, "accuracy": 100 * c / n} for i, (c, n) in enumerate(tasks)}
    variance = sum((100 * np.array([1.0] * c + [0.0] * (n - c))).var() / n for c, n in tasks) / len(tasks) ** 2
    assert average_se(per_task) == pytest.approx(math.sqrt(variance), abs=1e-9)


def test_results_table_carries_se_and_n():
    per_task = {
        "boolq": task_metrics([{"correct": i < 3, "prediction": "true"} for i in range(4)]),
        "piqa": task_metrics([{"correct": i < 1, "prediction": "solution1"} for i in range(10)]),
    }
    metrics = summarize(per_task, {"mode": "loglik"}, {"avg": 50.0})
    assert metrics["tasks"]["boolq"]["se"] == pytest.approx(100 * math.sqrt(0.75 * 0.25 / 4), abs=1e-4)
    assert metrics["average_se"] == pytest.approx(math.sqrt(per_task["boolq"]["se"] ** 2 + per_task["piqa"]["se"] ** 2) / 2, abs=1e-4)
    assert metrics["n"] == 14
    lines = results_table(metrics, "m").splitlines()
    assert lines[2] == "| m | 75.0 ± 21.7 | 10.0 ± 9.5 | - | - | - | - | - | - | 42.5 ± 11.8 |"
    assert lines[3] == "| paper | - | - | - | - | - | - | - | - | 50.0 |"
    assert lines[4] == "| n | 4 | 10 | - | - | - | - | - | - | 14 |"


# ---- the console -------------------------------------------------------------------------------------------
@pytest.fixture
def mt_checkpoint(tmp_path, monkeypatch) -> tuple[Path, Path]:
    if not (ROOT / "data" / "tiny_tokenizer" / "tokenizer.json").is_file():
        pytest.skip("data/tiny_tokenizer is absent")
    monkeypatch.chdir(ROOT)
    d = tmp_path / "mt"
    write_jsonl(d / "question.jsonl", QUESTIONS[:2])  # writing (8, 6) and math (3, 3) from the stub
    write_jsonl(d / "judge_prompts.jsonl", JUDGE_PROMPTS)
    write_jsonl(d / "reference_answer" / "gpt-4.jsonl", REFS)
    ckpt = tmp_path / "run" / "final"
    checkpoint(ckpt, ["eval.suite=mt_bench", f"eval.mt_bench.questions={d / 'question.jsonl'}", "eval.mt_bench.max_new_tokens=3"])
    return ckpt, tmp_path


def test_mt_bench_prints_its_score(mt_checkpoint, monkeypatch, capsys):
    ckpt, tmp = mt_checkpoint
    judge = StubJudge()
    try:
        code, out, err = dora(monkeypatch, capsys, "eval", ckpt, "--judge-url", judge.url, "--judge-model", "stub",
                              "expected.mt_bench=5.5", "--out", tmp / "judged")
    finally:
        judge.close()
    assert code == 0, err
    assert "MT-Bench score 5.00 / 10 (turn 1 5.50, turn 2 4.50; 4 judged turns); paper 5.5, difference -0.50" in out
    code, out, err = dora(monkeypatch, capsys, "eval", ckpt, "--out", tmp / "answers")
    assert code == 0, err
    assert "MT-Bench score: none (no judge: set eval.mt_bench.judge_url and eval.mt_bench.judge_model)" in out


def test_eval_help_shows_an_override_that_works(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = dora(monkeypatch, capsys, "eval", "--help")
    assert code == 0
    example = re.search(r"Example: dora eval (\S+) ((?:eval\.\S+=\S+ ?)+)", out)
    assert example, out
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", example.group(2).split())
    assert recipe.eval.mode == "loglik" and recipe.eval.limit == 100


# ---- figures ------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=12), st.floats(0.5, 50))
def test_y_limits_hold_every_value_and_span_at_least_the_minimum(values, min_span):
    low, high = y_limits(values, min_span, floor=0.0, ceiling=100.0)
    assert 0.0 <= low <= min(values) and max(values) <= high <= 100.0
    assert high - low >= min(min_span, 100.0) - 1e-9


@pytest.mark.parametrize("name, shown", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("/work/main/.cache/models/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
    ("./models/llama-7b/", "llama-7b"),
    ("~/models/tiny.Q4_K_M.gguf", "tiny.Q4_K_M"),
    ("data/tiny_tokenizer", "tiny_tokenizer"),  # exists, relative to the repository
    (None, "random model"),
])
def test_model_names_in_figures(name, shown, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert model_name(name) == shown


def test_neighbouring_series_differ_in_marker_line_and_fill():
    styles = [series_style(i) for i in range(5)]
    for a, b in zip(styles, styles[1:]):
        for key in ("color", "marker", "linestyle", "fillstyle", "markersize"):
            assert a[key] != b[key], key
    assert len({s["marker"] for s in styles}) == len({str(s["linestyle"]) for s in styles}) == 5


def draw(fig):
    """Lay the figure out on an Agg canvas, as savefig does; returns the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def fits(renderer, text, box) -> bool:
    """Whether the drawn `text` is no wider than the bounding box `box` (pixels)."""
    return text.get_window_extent(renderer).width <= box.width + 1


def caption(fig):
    """The figure's caption (its supxlabel) as a drawn text."""
    from matplotlib.text import Text

    return fig.findobj(lambda o: isinstance(o, Text) and o.get_text() == fig.get_supxlabel())[0]


def tie_doc(model: str, seeds: int = 1) -> dict:
    """Two methods within half a point of each other at every rank (each seed a little apart); LoRA r=16 failed."""
    records = []
    for seed in range(1, seeds + 1):
        for method, averages in (("lora", [61.0, 61.5, 61.25, None]), ("dora", [61.0, 61.5, 61.0, 61.5])):
            for rank, avg in zip((2, 4, 8, 16), averages):
                value = avg + 0.5 * (seed - 1) * (1 if method == "dora" else -1) if avg else None
                records.append({
                    "name": f"{method}-r{rank}-s{seed}", "method": method, "rank": rank, "seed": seed, "setting": {},
                    "status": "ok" if avg else "failed", "error": None if avg else "nan", "trainable_percent": 0.1,
                    "tasks": {"boolq": value} if avg else {}, "tasks_se": {"boolq": 2.4} if avg else {}, "average": value,
                    "average_se": 2.4 if avg else None, "examples": 400 if avg else None, "val_loss": 1.0 if avg else None,
                    "train_time_s": 1.0, "eval_time_s": 1.0, "paper_average": None, "warnings": [], "magnitude_change": {},
                    "selecting": False,
                })
    settings_ = {"model": model, "methods": ["lora", "dora"], "ranks": [2, 4, 8, 16], "seeds": list(range(1, seeds + 1)),
                 "grid": {}, "select_at": None, "paper_reference": None, "alpha_rule": "2r", "alpha": "2r",
                 "eval": {"tasks": ["boolq"], "mode": "loglik", "limit": 200}}
    return sweep_report.document(settings_, records)


def test_sweep_png_keeps_tied_methods_apart_with_error_bars_and_a_sensible_range(tmp_path):
    from matplotlib.container import ErrorbarContainer

    fig = sweep_report.plot(tie_doc("/some/where/SmolLM2-135M-Instruct"), tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == ["LoRA", "DoRA"]
    lora, dora_ = (c.lines[0] for c in bars)
    assert lora.get_marker() != dora_.get_marker() and lora.get_linestyle() != dora_.get_linestyle()
    assert not np.allclose(np.asarray(lora.get_xdata(), float), np.asarray(dora_.get_xdata(), float)[:3])  # a sideways offset: tied points do not cover each other
    half = 1.959963984540054 * 2.4  # one seed: the 95 % binomial interval
    for c in bars:
        segments = c.lines[2][0].get_segments()
        assert all(seg[1][1] - seg[0][1] == pytest.approx(2 * half) for seg in segments)
    low, high = ax.get_ylim()
    assert high - low >= sweep_report.MIN_Y_SPAN and low <= 61.0 - half and high >= 61.5 + half
    assert ax.get_title() == "Rank study: SmolLM2-135M-Instruct"
    assert "n = 400 test examples per trial (1 task)" in fig.get_supxlabel()
    assert "binomial" in fig.get_supxlabel() and "one seed" in " ".join(fig.get_supxlabel().split())
    renderer = draw(fig)
    assert fits(renderer, ax.title, fig.bbox) and fits(renderer, caption(fig), fig.bbox)
    hub = sweep_report.plot(tie_doc("HuggingFaceTB/SmolLM2-135M-Instruct"), tmp_path / "hub.png")
    assert hub.axes[0].get_title() == "Rank study: HuggingFaceTB/SmolLM2-135M-Instruct"


def test_sweep_png_shows_student_t_intervals_and_the_paired_differences_around_zero(tmp_path):
    from matplotlib.container import ErrorbarContainer

    doc = tie_doc("SmolLM2-135M-Instruct", seeds=3)
    fig = sweep_report.plot(doc, tmp_path / "sweep.png")
    accuracy, difference = fig.axes[:2]
    [lora, _] = [c for c in accuracy.containers if isinstance(c, ErrorbarContainer)]
    group = next(g for g in doc["groups"] if (g["method"], g["rank"]) == ("lora", 2))
    assert group["average"]["basis"] == "student-t over seeds" and group["n"] == 3
    seg = lora.lines[2][0].get_segments()[0]
    assert seg[1][1] - seg[0][1] == pytest.approx(2 * group["average"]["half_width"])
    [diff] = [c for c in difference.containers if isinstance(c, ErrorbarContainer)]
    assert diff.get_label() == "DoRA − LoRA"
    assert list(diff.lines[0].get_ydata()) == pytest.approx([d["average"]["mean"] for d in doc["differences"] if d["n"]])
    assert [d["n"] for d in doc["differences"]] == [3, 3, 3, 0]  # LoRA r=16 failed: nothing to pair
    zero = [line for line in difference.get_lines() if list(line.get_ydata()) == [0, 0]]
    assert zero, "the difference panel has a zero line"
    low, high = difference.get_ylim()
    assert low < 0 < high
    assert "Student t" in " ".join(fig.get_supxlabel().split())


def test_analysis_png_shares_axes_and_its_titles_fit(tmp_path):
    def group(scale: float, n: int) -> dict:
        points = [{"step": s, "delta_d": scale * (i + 1), "delta_m": 2 * scale * (i + 1)} for s in (5, 10) for i in range(n)]
        return {"points": points, "correlation": 1.0}

    result = {
        "base": "/some/where/SmolLM2-135M-Instruct", "modules": ["q_proj", "v_proj"],
        "methods": {"FT": group(1e-3, 4), "LoRA (a-long-run-directory-name-for-the-lora-run-at-rank-8)": group(1e-4, 3)},
    }
    fig = analyze.plot(result, tmp_path / "analysis.png")
    first, second = fig.axes[:2]
    assert first.get_ylim() == second.get_ylim() and first.get_xlim() == second.get_xlim()
    assert "SmolLM2-135M-Instruct" in fig.get_suptitle() and "/some/where" not in fig.get_suptitle()
    assert "FT: 8" in fig.get_supxlabel() and ": 6)" in fig.get_supxlabel()
    renderer = draw(fig)
    for ax in (first, second):
        assert fits(renderer, ax.title, ax.bbox), ax.get_title()
    assert fits(renderer, caption(fig), fig.bbox)
