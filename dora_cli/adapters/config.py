"""What the adapter engine takes: one pydantic model, shared with the recipe's `adapter:` section."""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from dora_cli.adapters.variants import recipe_methods
from dora_cli.errors import did_you_mean, one_of

FULL = "full"
"""Full fine-tuning: no adapter, every weight trains."""


def method_names() -> tuple[str, ...]:
    """What `adapter.method` takes: every method with a direction update (variants.METHODS), and full.
    The magnitude-only method applies per module (`magnitude_only_modules`)."""
    return (*recipe_methods(), FULL)


class Schema(BaseModel):
    """Base of the adapter config and of every recipe section: an unknown key, inf / nan and a boolean
    where a number is expected (or a number where true / false is, in lists and mappings too) are refused.
    pydantic alone reads `r: true` as 1 and `rslora: 1` as true; a string still converts (`${env:R}` gives
    "8")."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        problem = _misfit(cls.model_fields[info.field_name].annotation, value)
        if problem:
            raise ValueError(problem)
        return value


def _misfit(annotation: Any, value: Any) -> str | None:
    """Why `value` does not fit `annotation` although pydantic would convert it: a boolean where only numbers
    go, or a number where only true / false go, looking inside lists, tuples and mappings; else None."""
    kinds = _scalar_kinds(annotation)
    numbers = bool(kinds & {int, float})
    if isinstance(value, bool):
        return f"expected a number, got {str(value).lower()}" if numbers and bool not in kinds else None
    if type(value) in (int, float):
        return f"expected true or false, got {value}" if bool in kinds and not numbers else None
    for kind in kinds:
        origin, args = get_origin(kind), [a for a in get_args(kind) if a is not Ellipsis]
        if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
            items, element = value, Union[tuple(args)]  # noqa: UP007 - a union built at run time
        elif origin is dict and isinstance(value, dict) and len(args) == 2:
            items, element = value.values(), args[1]
        else:
            continue
        problem = next(filter(None, (_misfit(element, item) for item in items)), None)
        if problem:
            return problem
    return None


def _scalar_kinds(annotation: Any) -> set[Any]:
    """The types a field takes, through Annotated, Optional, unions and Literal (`Count | None` -> {int,
    NoneType}, `Literal[1, 2]` -> {int})."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*map(_scalar_kinds, get_args(annotation)))
    if origin is Annotated:
        return _scalar_kinds(get_args(annotation)[0])
    if origin is Literal:
        return {type(choice) for choice in get_args(annotation)}
    return {annotation}


class AdapterConfig(Schema):
    """The adapter of a run, with PEFT-familiar names.

    method: lora | dora | vera | dvora | full (method_names()).
        DoRA at half rank (the paper's DoRA†) is just `r` halved.
    target_modules: module-name patterns. A plain identifier (`q_proj`) matches modules whose name is
        that or ends in `.q_proj`; anything else is a regular expression that must match the full name.
    magnitude_only_modules: patterns of modules that train only the DoRA magnitude (paper Table 6).
    """

    method: str = "dora"
    r: int = Field(8, gt=0, le=65536)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], min_length=1
    )
    magnitude_only_modules: list[str] = Field(default_factory=list)
    rslora: bool = False
    detach_norm: bool = True
    """Treat the row norm as a constant in backward (paper Sec. 4.3); false = Table 7's full gradient."""
    dropout_mode: Literal["fast", "delta"] = "fast"
    """fast: one base GEMM, dropout on the low-rank branch only; delta: the official code's semantics."""
    vera_seed: int = Field(0, ge=0, le=2**64 - 1)
    """Seed of VeRA / DVoRA's shared frozen random matrices (PEFT: projection_prng_key); torch.Generator
    takes up to 2**64 - 1."""
    vera_d_init: float = 0.1

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        names = method_names()
        if value not in names:
            raise ValueError(f"expected one of {one_of(names)}, got {value!r}{did_you_mean(value, names)}")
        return value

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

