"""The `dora` command. Parses arguments and calls one run_* function per command: no logic here.

Each command module is imported inside its command so that `dora --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dora_cli.errors import UserError

app = typer.Typer(
    name="dora",
    help="DoRA fine-tuning from YAML recipes: train, eval, merge, sweep-rank, analyze.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

@app.callback()
def _root() -> None:
    """DoRA fine-tuning from YAML recipes."""


Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted recipe overrides: adapter.r=8 train.max_steps=10")]


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    overrides: Overrides = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and the trainable share, then exit.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run of a different recipe in output_dir.")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Processes (overrides launch.num_processes).")] = None,
) -> None:
    """Train a causal LM from a recipe (LoRA, DoRA, VeRA, DVoRA, full; 4-bit or not)."""
    from dora_cli.train import run_train

    run_train(recipe, overrides or [], dry_run=dry_run, resume=resume, overwrite=overwrite, nproc=nproc)


def main() -> None:
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
