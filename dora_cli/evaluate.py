"""`dora eval CKPT`: load a checkpoint (base model + adapter, or a full fine-tune) and run a suite.

    run_eval("runs/commonsense_7b/final")                        # the recipe's eval: section
    run_eval("runs/x/final", ["eval.mode=loglik", "eval.limit=100"])
    run_eval("peft_adapter_dir", base="meta-llama/Llama-2-7b-hf")  # no recipe.yaml: defaults + overrides

Steps: what the checkpoint is (an adapter, ours or PEFT's, or a whole model: `merge.inspect_checkpoint`),
its recipe (`recipe.yaml` beside the weights, dotted overrides applied), the inputs of the suite checked
(before the model is loaded), the base model (`merge.resolve_base`: --base, else the recipe's model
section, else the adapter's base_model_name_or_path) loaded with `models.load_model` and the adapter
applied with `adapters.load_adapter`, then the suite of `eval.suite`:

    commonsense  dora_cli.eval.commonsense.evaluate_commonsense   -> OUT/commonsense/
    mt_bench     dora_cli.eval.mtbench.evaluate_mt_bench          -> OUT/mt_bench/
    math         dora_cli.eval.mathqa.evaluate_math               -> OUT/math/   (eval.data_dir: the records file;
                 the prompt is the recipe's data.template)

OUT is `--out`, else `<checkpoint's parent>/eval-<checkpoint name>` (never inside the checkpoint,
whose manifest lists its files). The recipe's `expected:` numbers go into the metrics (task names + avg, mt_bench, exact_match).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dora_cli.errors import UserError
from dora_cli.recipe import ModelConfig, Recipe, load_recipe, recipe_from_dict


def _recipe(ckpt_path: Path, has_recipe: bool, overrides: list[str], base: str | None, adapter_base: str | None) -> Recipe:
    if has_recipe:
        return load_recipe(ckpt_path / "recipe.yaml", overrides)
    if not (base or adapter_base or (ckpt_path / "config.json").is_file()):
        raise UserError(f"{ckpt_path}: no recipe.yaml and no base_model_name_or_path in adapter_config.json: pass --base MODEL")
    name = base or adapter_base or str(ckpt_path)
    return recipe_from_dict({"model": {"name_or_path": name}}, source=f"{ckpt_path} (no recipe.yaml)", overrides=overrides)


def _check_suite_inputs(recipe: Recipe) -> None:
    """The suite's data, checked before the (slow) model load."""
    cfg = recipe.eval
    if cfg.suite == "commonsense":
        from dora_cli.eval.tasks import load_task, validate_tasks

        for task in validate_tasks(cfg.tasks, cfg.data_dir):
            load_task(task, cfg.data_dir, cfg.limit)
    elif cfg.suite == "mt_bench":
        from dora_cli.eval.mtbench import load_questions

        if not cfg.mt_bench.questions:
            raise UserError("eval.mt_bench.questions is not set (FastChat question.jsonl)")
        load_questions(cfg.mt_bench.questions, cfg.limit)
    else:
        from dora_cli.eval.mathqa import load_math_records

        load_math_records(cfg.data_dir, cfg.limit)


def load_for_eval(ckpt: str | Path, recipe: Recipe, base: str | None = None):
    """(model, tokenizer) of a checkpoint in eval mode: base + adapter, or the full fine-tuned model."""
    from dora_cli.adapters import load_adapter
    from dora_cli.merge import adapter_base_model, inspect_checkpoint, resolve_base
    from dora_cli.models import load_model

    info = inspect_checkpoint(ckpt)
    if info.kind == "full":
        source = recipe.model
        cfg = ModelConfig(
            name_or_path=str(info.path), tokenizer=source.tokenizer or source.name_or_path or str(info.path),
            dtype=source.dtype, trust_remote_code=source.trust_remote_code,
        )
        return load_model(cfg, for_training=False)
    info = dataclasses.replace(info, recipe=recipe)  # the recipe with the overrides
    src = resolve_base(info, adapter_base_model(info.path), base)
    model, tokenizer = load_model(src.model, for_training=False)
    load_adapter(model, info.path)
    model.eval()
    return model, tokenizer


def run_eval(
    ckpt: str | Path,
    overrides: list[str] | None = None,
    *,
    base: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate a checkpoint with its recipe's `eval:` section (plus overrides); returns the metrics.

    A target that is not a directory (a .gguf file, a hub id) is a base model, evaluated with the
    default eval settings and the overrides.
    """
    from dora_cli.merge import adapter_base_model, inspect_checkpoint

    if not Path(ckpt).is_dir():
        return _run_base_model(str(ckpt), list(overrides or []), out, overwrite, progress)
    info = inspect_checkpoint(ckpt)
    adapter_base = adapter_base_model(info.path) if info.kind == "adapter" else None
    recipe = _recipe(info.path, info.recipe is not None, list(overrides or []), base, adapter_base)
    _check_suite_inputs(recipe)
    out_dir = Path(out) if out is not None else info.path.parent / f"eval-{info.path.name}"
    model, tokenizer = load_for_eval(info.path, recipe, base)
    metrics = _run_suite(recipe, model, tokenizer, out_dir, str(info.path), f"{info.path.parent.name}-{info.path.name}", overwrite, progress)
    _report(out_dir / recipe.eval.suite, metrics)
    return metrics


def _run_base_model(name: str, overrides: list[str], out, overwrite: bool, progress: bool) -> dict:
    from dora_cli.models import load_model, resolve_source

    resolve_source(name)  # a missing local path is named before anything else
    recipe = recipe_from_dict({"model": {"name_or_path": name}}, source=name, overrides=overrides)
    _check_suite_inputs(recipe)
    label = Path(name).stem if name.lower().endswith(".gguf") else name.replace("/", "__")
    out_dir = Path(out) if out is not None else Path("runs") / f"eval-{label}"
    model, tokenizer = load_model(recipe.model, for_training=False)
    metrics = _run_suite(recipe, model, tokenizer, out_dir, name, label, overwrite, progress)
    _report(out_dir / recipe.eval.suite, metrics)
    return metrics


def _report(out_dir: Path, metrics: dict) -> None:
    """The table a person reads: results.md where the suite writes one, else the headline numbers."""
    table = out_dir / "results.md"
    if table.is_file():
        print(table.read_text().rstrip())
    else:
        headline = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "suite"}
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in headline.items()))
    print(f"(metrics and predictions in {out_dir})")


def _run_suite(recipe: Recipe, model, tokenizer, out_dir: Path, name: str, model_id: str, overwrite: bool, progress: bool) -> dict:
    cfg = recipe.eval
    if cfg.suite == "commonsense":
        from dora_cli.eval.commonsense import evaluate_commonsense_config

        return evaluate_commonsense_config(
            model, tokenizer, cfg, out_dir / "commonsense", expected=recipe.expected, model_name=name,
            overwrite=overwrite, progress=progress,
        )
    if cfg.suite == "math":
        from dora_cli.eval.mathqa import evaluate_math

        return evaluate_math(
            model, tokenizer, out_dir / "math", data=cfg.data_dir, template=recipe.data.template,
            batch_size=cfg.batch_size, limit=cfg.limit, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
            expected=recipe.expected, model_name=name, overwrite=overwrite, progress=progress,
        )
    from dora_cli.eval.mtbench import evaluate_mt_bench

    return evaluate_mt_bench(
        model, tokenizer, out_dir / "mt_bench", cfg.mt_bench, model_id=model_id,
        limit=cfg.limit, expected=recipe.expected, overwrite=overwrite, progress=progress,
    )
