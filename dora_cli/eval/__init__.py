"""Evaluation of a loaded (model, tokenizer): commonsense (8 tasks), math exact match, MT-Bench.

    tasks.py       the 8 LLM-Adapters tasks: answer patterns, extraction, test-set loading
    predict.py     batched beam-search generation (left padding) and log-likelihood scoring
    commonsense.py the commonsense run: resumable predictions, metrics.json, results.md
    report.py      metrics and the paper's Table 1 in Markdown
    math_match.py  final-number exact match (orca-math style data)
    mathqa.py      the math run: generate answers to question / answer records, exact match
    mtbench.py     MT-Bench answers (FastChat format) and the MT-Bench run
    judge.py       the LLM judge over HTTP (OpenAI-compatible), ratings and scores
    harness.py     the lm_eval suite: lm-evaluation-harness tasks on the loaded model (optional extra)
    suites.py      the registry `dora eval` and the sweep run: checks, defaults, runs
"""

from dora_cli.eval.commonsense import evaluate_commonsense, predict_examples
from dora_cli.eval.judge import JudgeClient, judge_answers, parse_rating, summarize_scores
from dora_cli.eval.math_match import extract_number, math_correct, score_math
from dora_cli.eval.mathqa import evaluate_math, load_math_records
from dora_cli.eval.mtbench import evaluate_mt_bench, generate_answers, load_questions
from dora_cli.eval.predict import generate_batch, loglik_batch, loglik_batch_reference
from dora_cli.eval.tasks import TASKS, extract_answer, load_task, validate_tasks

__all__ = [
    "TASKS", "JudgeClient", "evaluate_commonsense", "evaluate_math", "evaluate_mt_bench",
    "extract_answer", "extract_number", "generate_answers", "generate_batch", "judge_answers", "load_math_records",
    "load_questions", "load_task", "loglik_batch", "loglik_batch_reference", "math_correct", "parse_rating", "predict_examples",
    "score_math", "summarize_scores", "validate_tasks",
]
