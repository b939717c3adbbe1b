"""dora_cli: DoRA fine-tuning from YAML recipes, exact to the paper.

The adapter engine (`dora_cli.adapters`) is usable on its own, without the CLI.
"""

__version__ = "0.1.0"


def version_line() -> str:
    """`dora --version`: this package's version and the libraries' that decide its numbers (read from the
    installed metadata, nothing imported)."""
    import platform
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "peft", "accelerate"))
    return f"dora_cli {__version__} ({libraries}; python {platform.python_version()})"
