"""dora_cli: DoRA fine-tuning from YAML recipes, exact to the paper.

The adapter engine (`dora_cli.adapters`) is usable on its own, without the CLI.
"""

__version__ = "0.1.0"
