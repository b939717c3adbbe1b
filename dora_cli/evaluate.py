"""`dora eval TARGET`: score a checkpoint, a merged model or a base model on a suite.

    evaluate("runs/x/final", recipe)                      # library: a target and the recipe to use
    run_eval("runs/x/final", ["eval.mode=loglik"])        # CLI: the checkpoint's recipe.yaml + overrides
    run_eval("peft_adapter_dir", base="meta-llama/Llama-2-7b-hf")  # no recipe.yaml: defaults + overrides

TARGET is a checkpoint directory (an adapter, ours or PEFT's, or a whole model: `checkpoints.inspect_checkpoint`),
or a base model (a model directory without an adapter, a .gguf file, a hub id). Steps: the recipe (the
checkpoint's `recipe.yaml` with the dotted overrides, else the defaults), the suite's inputs checked
(`eval.suites`, before the model is loaded), the output directory checked and locked, the model loaded (the
base of `checkpoints.resolve_base` + the adapter), then the suite of `eval.suite` writes into OUT/<suite>/.

OUT is `--out`, else `<checkpoint's parent>/eval-<checkpoint name>` (never inside the checkpoint, whose
manifest lists its files), else `runs/eval-<model>` for a base model. Two evaluations never write into the
same OUT at once (a lock, as `dora train` takes on its output_dir).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dora_cli import rundir
from dora_cli.checkpoints import (
    UNUSED_IN_EVAL,
    Checkpoint,
    adapter_base_model,
    inspect_checkpoint,
    resolve_base,
)
from dora_cli.errors import UserError, clip
from dora_cli.eval.suites import SUITES, SuiteRun, suite_of
from dora_cli.files import (
    OutputKind,
    check_output,
    json_with,
    output_kind,
    register_output_kind,
    unclaim_if_unused,
    write_output_marker,
)
from dora_cli.recipe import ModelConfig, Recipe, load_recipe, override_keys, recipe_from_dict

READ_IN_EVAL = (("eval",), ("model",), ("data", "template"), ("data", "format"), ("expected",))
"""What `dora eval` reads of a recipe: an override of anything else (adapter.r, train.*) would change nothing."""


def _legacy_eval(directory: Path) -> bool:
    """An evaluation an earlier version wrote: suite directories holding its results, nothing else."""
    names = {p.name for p in directory.iterdir()} - {rundir.LOCK_NAME}
    return bool(names) and names <= set(SUITES) and any(
        (json_with(directory / n / "metrics.json", "suite", "settings") or {}).get("suite") == n
        or json_with(directory / n / "predictions" / "run.json") is not None
        or any((directory / n / "model_answer").glob("*.run.json")) for n in names
    )


EVAL_OUTPUT = register_output_kind(OutputKind("eval", "dora eval", entries=tuple(SUITES), legacy=_legacy_eval,
                                              contents=tuple((name, s.writes) for name, s in SUITES.items())))
"""What `dora eval` writes in OUT: one directory per suite."""


@dataclass(frozen=True)
class Target:
    """What is evaluated: a checkpoint directory, or a base model by name."""

    name: str  # as given (a path, a hub id)
    checkpoint: Checkpoint | None  # None: a base model (.gguf, hub id, or a model directory)

    @property
    def label(self) -> str:
        """A file-name-safe id of the target (MT-Bench's model_id)."""
        if self.checkpoint is not None:
            return f"{self.checkpoint.path.parent.name}-{self.checkpoint.path.name}"
        return Path(self.name).stem if self.name.lower().endswith(".gguf") else self.name.replace("/", "__")

    def default_out(self) -> Path:
        if self.checkpoint is not None:
            return self.checkpoint.path.parent / f"eval-{self.checkpoint.path.name}"
        return Path("runs") / f"eval-{self.label}"


def find_target(name: str | Path, overrides: list[str] | None = None,
                optional: tuple[str, ...] = UNUSED_IN_EVAL) -> Target:
    """Classify TARGET without loading anything (a missing local path is a UserError); `overrides` of its
    recipe replace values that are then never looked up (a `${env:...}` the command does not need)."""
    from dora_cli.models import resolve_source

    if Path(name).is_dir():
        return Target(str(name), inspect_checkpoint(name, overrides or [], optional))
    resolve_source(str(name), where="TARGET")
    return Target(str(name), None)


def target_recipe(target: Target, overrides: list[str], base: str | None = None,
                  optional: tuple[str, ...] = UNUSED_IN_EVAL) -> Recipe:
    """The recipe of an evaluation: the checkpoint's own (recipe.yaml), else the defaults for its base;
    then the dotted overrides. `optional`: keys whose `${env:...}` may stay unset (MT-Bench's, unless the
    suite is MT-Bench)."""
    ckpt = target.checkpoint
    if ckpt is not None and ckpt.recipe is not None:
        path = ckpt.path / rundir.RECIPE_NAME
        recipe = load_recipe(path, overrides, optional=optional)
        if recipe.eval.suite == "mt_bench" and "eval.mt_bench" in optional:  # MT-Bench needs its settings
            recipe = load_recipe(path, overrides, optional=[k for k in optional if k != "eval.mt_bench"])
        return recipe
    if ckpt is None:
        name = target.name
    elif ckpt.kind == "adapter":
        name = base or adapter_base_model(ckpt.path)
        if not name:
            raise UserError(f"{ckpt.path}: no recipe.yaml and no base_model_name_or_path in adapter_config.json: pass --base MODEL")
    else:
        name = str(ckpt.path)
    source = f"{ckpt.path} (no recipe.yaml)" if ckpt is not None else name
    return recipe_from_dict({"model": {"name_or_path": name}}, source=source, overrides=overrides)


def load_for_eval(target: Target, recipe: Recipe, base: str | None = None):
    """(model, tokenizer) in eval mode: base + adapter, a full fine-tuned checkpoint, or a base model."""
    from dora_cli.adapters import load_adapter
    from dora_cli.models import load_model

    ckpt = target.checkpoint
    if ckpt is None:
        return load_model(recipe.model, for_training=False)
    if ckpt.kind == "full":
        source = recipe.model
        cfg = ModelConfig(
            name_or_path=str(ckpt.path), tokenizer=source.tokenizer or source.name_or_path or str(ckpt.path),
            dtype=source.dtype, trust_remote_code=source.trust_remote_code,
        )
        return load_model(cfg, for_training=False)
    src = resolve_base(ckpt, base, recipe=recipe)  # the recipe with the overrides
    model, tokenizer = load_model(src.model, for_training=False, label=src.label)
    load_adapter(model, ckpt.path)
    model.eval()
    return model, tokenizer


def evaluate(
    target: str | Path | Target,
    recipe: Recipe,
    *,
    base: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run `recipe.eval` on `target`; writes OUT/<suite>/ and returns the suite's metrics."""
    target = target if isinstance(target, Target) else find_target(target)
    suite = suite_of(recipe)
    suite.check_inputs(recipe)
    out_dir = Path(out) if out is not None else target.default_out()
    check_output(out_dir, EVAL_OUTPUT.name, label=f"--out {out}" if out else f"eval output {out_dir}")
    with rundir.RunLock(out_dir, what="dora eval", noun="--out directory"):
        model, tokenizer = load_for_eval(target, recipe, base)
        check_output(out_dir, EVAL_OUTPUT.name, label=f"--out {out}" if out else f"eval output {out_dir}")
        if output_kind(out_dir) is None:
            write_output_marker(out_dir, EVAL_OUTPUT.name)
        run = SuiteRun(
            recipe, model, tokenizer, out_dir / suite.name, model_name=target.name if target.checkpoint is None
            else str(target.checkpoint.path), model_id=target.label, overwrite=overwrite, progress=progress,
        )
        try:
            metrics = suite.run(run)
        except UserError:
            unclaim_if_unused(out_dir)
            raise
    _report(run.out_dir, metrics)
    return metrics


def run_eval(
    target: str | Path,
    overrides: list[str] | None = None,
    *,
    base: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """`dora eval`: the target's recipe (or the defaults) with the overrides, then `evaluate`."""
    for text in overrides or []:
        for key in override_keys(text):
            if not any(key[:len(read)] == read for read in READ_IN_EVAL):
                raise UserError(f"{'.'.join(key)}: dora eval does not read it (it reads "
                                f"{', '.join('.'.join(r) for r in READ_IN_EVAL)})", where=f"override {clip(text, 120)}")
    found = find_target(target, list(overrides or []))
    recipe = target_recipe(found, list(overrides or []), base)
    return evaluate(found, recipe, base=base, out=out, overwrite=overwrite, progress=progress)


def _report(out_dir: Path, metrics: dict) -> None:
    """The table a person reads: results.md where the suite writes one, else the headline numbers (and a
    judged score: MT-Bench's)."""
    table = out_dir / "results.md"
    if table.is_file():
        print(table.read_text().rstrip())
    else:
        headline = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "suite"}
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in headline.items()))
    if "scores" in metrics:
        print(_judged_score(metrics))
    print(f"(metrics and predictions in {out_dir})")


def _judged_score(metrics: dict) -> str:
    """`MT-Bench score 6.21 / 10 (turn 1 6.50, turn 2 5.92; 160 judged turns)`, or why there is none."""
    scores = metrics["scores"]
    if not scores or scores.get("overall") is None:
        if metrics.get("judge") is None:
            return "MT-Bench score: none (no judge: set eval.mt_bench.judge_url and eval.mt_bench.judge_model)"
        return "MT-Bench score: none (the judge gave no valid rating)"
    turns = ", ".join(f"turn {t} {v:.2f}" for t, v in scores["turns"].items() if v is not None)
    rated = scores["judged_turns"] - scores["invalid_turns"]
    line = f"MT-Bench score {scores['overall']:.2f} / 10 ({turns}; {rated} judged turns)"
    difference = (metrics.get("difference") or {}).get("mt_bench")
    if difference is not None:
        line += f"; paper {metrics['expected']['mt_bench']:.1f}, difference {difference:+.2f}"
    return line
