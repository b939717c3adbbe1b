"""The README stays true: every recipe key is documented, every documented command exists."""

from __future__ import annotations

from conftest import ROOT
from pydantic import BaseModel

from dora_cli.cli import app
from dora_cli.recipe import Recipe

README = (ROOT / "README.md").read_text()


def recipe_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += recipe_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_recipe_key_is_in_the_readme_reference():
    missing = [key for key in recipe_keys(Recipe) if f"`{key}`" not in README]
    assert missing == []


def test_every_command_is_documented():
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert set(commands) == {"train", "eval", "generate", "chat", "merge", "export", "sweep-rank", "analyze"}
    for command in commands:
        assert f"### dora {command}" in README
    assert "make demo" in README and "make test" in README
