"""The `dora` command. Parses arguments and calls one run_* function per command: no logic here.

Each command module is imported inside its command so that `dora --help` stays fast. A usage error
(missing argument, unknown option, a value of the wrong type) is one `error:` line like every other
refused input, not Click's boxed panel; `--help` is Typer's.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dora_cli.errors import UserError, note_user_paths, run_main

app = typer.Typer(
    name="dora",
    help="DoRA fine-tuning from YAML recipes: train, eval, generate, chat, merge, export, sweep-rank, analyze.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _version(value: bool) -> None:
    if value:
        from dora_cli import version_line

        print(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="Print the versions of dora_cli, torch and transformers, then exit.")] = False,
) -> None:
    """DoRA fine-tuning from YAML recipes."""


Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted recipe overrides: adapter.r=8 train.max_steps=10")]


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    overrides: Overrides = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and the trainable share, then exit.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run of a different recipe in output_dir.")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Processes (overrides launch.num_processes).")] = None,
) -> None:
    """Train a causal LM from a recipe (LoRA, DoRA, VeRA, DVoRA, full; 4-bit or not)."""
    from dora_cli.recipe import refuse_set_twice, set_by_both
    from dora_cli.train import run_train

    refuse_set_twice(overrides or [], {"launch.num_processes": set_by_both("--nproc")} if nproc is not None else {})
    run_train(recipe, overrides or [], dry_run=dry_run, resume=resume, overwrite=overwrite, nproc=nproc)


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command("eval")
def eval_(
    target: Annotated[str, typer.Argument(help="A checkpoint (ours or PEFT's), a merged model dir, a model dir, a .gguf file or a hub id.")],
    overrides: Overrides = None,
    suite: Annotated[Optional[str], typer.Option("--suite", help="commonsense, mt_bench, math or lm_eval.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated tasks (commonsense, or lm-eval's with --suite lm_eval).")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="generate (the paper's protocol) or loglik.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most N examples per task.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Root of the LLM-Adapters layout (<root>/<task>/test.json).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per forward pass (1: the reference protocol).")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="lm_eval: few-shot examples per prompt (default: each task's).")] = None,
    tasks_dir: Annotated[Optional[str], typer.Option("--tasks-dir", help="lm_eval: a directory of lm-eval task YAMLs (local-file tasks).")] = None,
    samples: Annotated[bool, typer.Option("--samples", help="lm_eval: also write every example's requests and answers.")] = False,
    questions: Annotated[Optional[str], typer.Option("--questions", help="MT-Bench question.jsonl.")] = None,
    judge_url: Annotated[Optional[str], typer.Option("--judge-url", help="OpenAI-compatible base URL of the MT-Bench judge.")] = None,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="Judge model name.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model of an adapter (default: from its recipe or config).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where metrics and predictions go (default: beside the checkpoint).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo predictions made with other settings.")] = False,
) -> None:
    """Score a model: the paper's commonsense suite (8 tasks), MT-Bench (answers + judge), math exact match or lm-eval tasks.

    Flags are shorthands for dotted overrides of the recipe's eval section (eval.tasks, eval.mode, ...).

    Example: dora eval runs/x/final eval.mode=loglik eval.limit=100
    """
    from dora_cli.evaluate import run_eval
    from dora_cli.recipe import refuse_set_twice, set_by_both

    flags = {  # recipe key: (flag, value)
        "eval.suite": ("--suite", suite), "eval.mode": ("--mode", mode), "eval.limit": ("--limit", limit),
        "eval.data_dir": ("--data-dir", data_dir), "eval.batch_size": ("--batch-size", batch_size),
        "eval.lm_eval.num_fewshot": ("--num-fewshot", num_fewshot), "eval.lm_eval.tasks_dir": ("--tasks-dir", tasks_dir),
        "eval.lm_eval.samples": ("--samples", True if samples else None), "eval.mt_bench.questions": ("--questions", questions),
        "eval.mt_bench.judge_url": ("--judge-url", judge_url), "eval.mt_bench.judge_model": ("--judge-model", judge_model),
        "eval.tasks": ("--tasks", f"[{','.join(_csv(tasks) or [])}]" if tasks else None),
    }
    given = {key: (flag, value) for key, (flag, value) in flags.items() if value is not None}
    refuse_set_twice(overrides or [], {key: set_by_both(flag) for key, (flag, _) in given.items()})
    extra = [f"{key}={value}" for key, (_, value) in given.items()]
    run_eval(target, [*extra, *(overrides or [])], base=base, out=out, overwrite=overwrite)


Target = Annotated[str, typer.Argument(help="A checkpoint (ours or PEFT's), a merged model dir, a model dir, a .gguf file or a hub id.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", min=1, max=2**31 - 1, help="New tokens per answer at most.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="0: greedy (the default); above 0: sampling.")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of the sampling (the whole session).")]
Template = Annotated[Optional[str], typer.Option("--template", help="llm_adapters, alpaca or chat (default: the recipe's; without one, chat when the tokenizer has a chat template).")]
Base = Annotated[Optional[str], typer.Option("--base", help="Base model of an adapter (default: from its recipe or config).")]


@app.command()
def generate(
    target: Target,
    prompt: Annotated[str, typer.Argument(help="The instruction (user message) to answer.")],
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    seed: Seed = 0,
    template: Template = None,
    base: Base = None,
) -> None:
    """Answer one prompt, asked through the template the model was trained with."""
    from dora_cli.generate import Sampling, run_generate

    run_generate(target, prompt, Sampling(max_new_tokens, temperature, seed), template=template, base=base)


@app.command()
def chat(
    target: Target,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    seed: Seed = 0,
    template: Template = None,
    base: Base = None,
) -> None:
    """Talk with a model: one user turn per line of stdin, the conversation kept; /exit or end of input ends it."""
    from dora_cli.generate import Sampling, run_chat

    run_chat(target, Sampling(max_new_tokens, temperature, seed), template=template, base=base)


@app.command()
def merge(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (ours or a PEFT adapter directory).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output model directory (default: CHECKPOINT-merged).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp16, bf16 or fp32 (default: the base model's).")] = "auto",
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: the one the checkpoint names).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Compare adapter and merged logits on a few prompts.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out directory.")] = False,
    into_original: Annotated[bool, typer.Option(
        "--into-original",
        help="For an adapter trained on a 4-/8-bit base: fold into the full-precision base weights "
        "(the usual QLoRA export) instead of the dequantized ones the adapter was trained against.",
    )] = False,
) -> None:
    """Fold the adapters (magnitude included) into the base weights: a plain model of the base architecture."""
    from dora_cli.merge import run_merge

    run_merge(
        checkpoint, out=out, dtype=dtype, base=base, verify=verify, force=force,
        quantized_base="original" if into_original else "dequantized",
    )


@app.command()
def export(
    target: Annotated[Path, typer.Argument(help="A checkpoint (ours or a PEFT adapter directory), a merged model directory or a model directory.")],
    gguf: Annotated[Path, typer.Option("--gguf", help="The GGUF file to write (OUT.gguf).")],
    type_: Annotated[str, typer.Option("--type", help="f32, f16, bf16 or q8_0.")] = "f16",
    ollama: Annotated[bool, typer.Option("--ollama", help="Also write OUT.Modelfile beside it, for `ollama create`.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a GGUF (and Modelfile) that dora export wrote.")] = False,
    base: Base = None,
) -> None:
    """Write a model as one GGUF file for llama.cpp / Ollama: an adapter checkpoint is merged on the fly.

    Example: dora export runs/x/final --gguf x.gguf --type q8_0 --ollama
    """
    from dora_cli.export import run_export

    run_export(target, gguf, type_=type_, ollama_modelfile=ollama, overwrite=overwrite, base=base)


@app.command("sweep-rank")
def sweep_rank(
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe (default: recipes/commonsense_7b.yaml, Table 15).")] = None,
    overrides: Overrides = None,
    ranks: Annotated[str, typer.Option("--ranks", help="Comma-separated ranks.")] = "4,8,16,32,64",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods.")] = "lora,dora",
    alpha_rule: Annotated[str, typer.Option("--alpha-rule", help="2r (alpha = 2r, as the paper) or fixed.")] = "2r",
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="Seeds: 1,2,3 (a list), 3 (seeds 1..3) or 7, (the one seed 7); default: the recipe's train.seed.")] = None,
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="KEY=v1,v2,...: also sweep a recipe key (repeatable); each method's setting is chosen on the validation loss.")] = None,
    select_at: Annotated[Optional[str], typer.Option("--select-at", help="Choose each method's grid setting at this rank with the first seed, then use it at every rank.")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="K/N: run only the trials whose index is K mod N (N processes or machines, one output directory).")] = None,
    report: Annotated[bool, typer.Option("--report", help="Write the combined reports from the finished trials; train nothing.")] = False,
) -> None:
    """The paper's rank study (Table 15, Figure 4): train and evaluate each method at each rank and seed."""
    from dora_cli.sweep import run_sweep

    run_sweep(recipe, overrides or [], ranks=_csv(ranks) or [], methods=_csv(methods) or [], alpha_rule=alpha_rule,
              seeds=seeds, grid=grid or [], select_at=select_at, shard=shard, report=report)


@app.command()
def analyze(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints to analyse (full, LoRA, DoRA; any steps).")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: from the checkpoints' recipe).")] = None,
    modules: Annotated[str, typer.Option("--modules", help="Comma-separated module names.")] = "q_proj,v_proj",
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("analysis"),
) -> None:
    """The weight-decomposition analysis (paper Sec. 3.2, Figure 2): ΔM and ΔD per layer."""
    from dora_cli.analyze import run_analyze

    run_analyze(checkpoints, base=base, modules=_csv(modules) or [], out=out)


def main() -> None:
    note_user_paths(*_path_arguments(sys.argv[1:]))
    run_main(lambda: sys.exit(_invoke()))


def _path_arguments(argv: list[str]) -> list[str]:
    """The words of the command line that may name files: arguments and option values, not overrides."""
    paths = []
    for word in argv:
        if word.startswith("--") and "=" in word:
            paths.append(word.partition("=")[2])
        elif not word.startswith("-") and "=" not in word:
            paths.append(word)
    return paths


def _invoke() -> int:
    """Run the Typer app; its exit status. A usage error becomes a UserError (one line, status 2)."""
    click = _click_exceptions()
    try:
        result = app(standalone_mode=False)
    except click.NoArgsIsHelpError as err:  # `dora` alone: Typer has printed the help
        return err.exit_code
    except click.ClickException as err:
        raise UserError(usage_message(err)) from None
    return result if isinstance(result, int) else 0


def _click_exceptions():
    """Click's exception classes: Typer >= 0.22 carries its own copy of Click, older Typer uses Click."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _subcommands(ctx) -> list[str]:
    """The command names below the root, innermost first (the root is `dora`, however it was started)."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return names


def usage_message(err) -> str:
    """Click's usage error as `<command>: <what is wrong> (did you mean ...) (see <command> --help)`."""
    ctx = getattr(err, "ctx", None)
    command = " ".join(["dora", *reversed(_subcommands(ctx))])
    if isinstance(err, _click_exceptions().NoSuchOption):
        hint = f' (did you mean "{err.possibilities[0]}"?)' if err.possibilities else ""
        text = f"unknown option {err.option_name}{hint}"
    else:
        text = " ".join(err.format_message().split()).rstrip(".")
        text = text[:1].lower() + text[1:]
        text = re.sub(r"\.? ?Did you mean '([^']*)'\?", r' (did you mean "\1"?)', text)
    return f"{command}: {text} (see {command} --help)"


if __name__ == "__main__":
    main()
