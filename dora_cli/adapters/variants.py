"""Adapter methods as compositions: a direction update (low-rank, VeRA, none) times a magnitude (on / off).

    method      direction   magnitude   ΔW                                   PEFT
    lora        LowRank     off         s·B·A                                LORA
    dora        LowRank     on          s·B·A, then rows scaled to m         LORA + use_dora
    vera        Vera        off         diag(λ_b)·B_s·diag(λ_d)·A_s          VERA
    dvora       Vera        on          VeRA's ΔW, then rows scaled to m     (ours: DORA_CLI)
    magnitude   —           on          0, rows scaled to m                  (ours: DORA_CLI)

A direction class owns everything about its update: the parameters it registers on an adapted layer,
`factors()` (ΔW = scale·B·A: the forward x·Aᵀ·Bᵀ, the factored norm and merging all follow from it), the
PEFT tensor names and shapes, its fragment of `adapter_config.json` and how to read PEFT's back. The
magnitude (`Magnitude`) owns m and the cached ‖W0‖². `AdaptedLinear` (layers.py), checkpoint I/O,
merge checks, the sweep and the analysis ask a `Method` and never branch on a method's name.

A new method is a `Method(...)` line in `METHODS`; a new kind of update is one `Direction` subclass
beside it (options it needs beyond r / alpha / dropout go in `AdapterConfig`).

The classes are stateless: like PEFT's LoraVariant they act on the layer passed to them, so the
parameters keep their flat, PEFT-like names (`layer.lora_A`, `layer.magnitude`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dora_cli.adapters.functional import add_low_rank, one_pass_add, widen_linear


@dataclass(frozen=True)
class LayerOptions:
    """What a direction needs to build its parameters on one layer."""

    r: int
    scaling: float = 1.0
    vera: VeraProjections | None = None
    vera_d_init: float = 0.1


# ==================================================================================================
# Directions
# ==================================================================================================
class Direction:
    """A kind of directional update ΔW = scale · B · A. Subclasses fill in init, shapes, factors and the
    PEFT translation; the forward (x·Aᵀ, then ·Bᵀ) and the merge follow from `factors`."""

    name: ClassVar[str]
    peft_type: ClassVar[str]
    tensors: ClassVar[dict[str, str]]
    """PEFT key suffix (after `base_model.model.<module>.`) -> attribute of the adapted layer."""
    peft_keys: ClassVar[frozenset[str]]
    """The fields of PEFT's adapter_config.json that `from_peft` reads (any value it accepts is supported)."""

    @classmethod
    def init(cls, layer: nn.Module, d_out: int, d_in: int, opts: LayerOptions, params: dict) -> None:
        """Register the direction's parameters on `layer` (fp32; `params` gives the device)."""
        raise NotImplementedError

    @classmethod
    def shapes(cls, d_out: int, d_in: int, r: int) -> dict[str, tuple[int, ...]]:
        """attribute -> shape of every tensor `init` registers."""
        raise NotImplementedError

    @classmethod
    def factors(cls, layer) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B [out, r], A [r, in], scale) with ΔW = scale · B · A."""
        raise NotImplementedError

    @classmethod
    def add_delta(cls, layer, base: torch.Tensor, x: torch.Tensor, p: float = 0.0) -> torch.Tensor:
        """base + ΔW · drop(x) without forming ΔW (p: dropout on x, functional.widen_linear):
        scale · (xd·Aᵀ)·Bᵀ in the adapter's dtype (functional.py),
        summed with base in fp32 and rounded once to base's dtype (PEFT's LoRA forward). The add rides in
        the up-projection's GEMM (addmm), or under autocast in one pass over the two 16-bit tensors (which
        is computed in fp32 and rounded once: the same numbers, without an fp32 copy of base and back; only
        where functional.one_pass_add says it is so: the scale a power of two >= 1, as alpha = r or 2r);
        with B = 0 the result is `base` bit for bit."""
        b, a, scale = cls.factors(layer)
        u = widen_linear(x, a, p)
        if one_pass_add(base, u, b, scale):
            return add_low_rank(base, u, b, alpha=scale)
        acc = base.to(torch.promote_types(base.dtype, b.dtype))
        return add_low_rank(acc, u, b, alpha=scale).to(base.dtype)

    @classmethod
    def delta_weight(cls, layer) -> torch.Tensor:
        """ΔW as a dense [out, in] fp32 tensor (merge and analysis only)."""
        b, a, scale = cls.factors(layer)
        return scale * (b.float() @ a.float())

    @classmethod
    def peft_fields(cls, cfg) -> dict:
        """This direction's fields of adapter_config.json for an AdapterConfig."""
        raise NotImplementedError

    @classmethod
    def from_peft(cls, raw: dict) -> dict:
        """AdapterConfig fields from a PEFT adapter_config.json of this direction's peft_type.

        ValueError("<field>: ...") for a value of one of `peft_keys` that dora_cli does not support.
        """
        raise NotImplementedError

    @classmethod
    def describe(cls, layer) -> str:
        return f"r={layer.r}"


class LowRank(Direction):
    """LoRA's update: A [r, in] Kaiming-uniform (a = √5), B [out, r] zero, scale = alpha / r (rsLoRA: / √r)."""

    name = "lowrank"
    peft_type = "LORA"
    tensors = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
    peft_keys = frozenset({"r", "target_modules", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights"})
    plain_inits = (True, False, "gaussian", "eva", "orthogonal", "mica")
    """PEFT initialisations that leave the base weights as they are (PiSSA, OLoRA, CorDA, LoftQ change them)."""

    @classmethod
    def init(cls, layer, d_out, d_in, opts, params):
        layer.scaling = opts.scaling
        layer.lora_A = nn.Parameter(torch.empty(opts.r, d_in, **params))
        layer.lora_B = nn.Parameter(torch.zeros(d_out, opts.r, **params))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # as nn.Linear and LoRA

    @classmethod
    def shapes(cls, d_out, d_in, r):
        return {"lora_A": (r, d_in), "lora_B": (d_out, r)}

    @classmethod
    def factors(cls, layer):
        return layer.lora_B, layer.lora_A, layer.scaling

    @classmethod
    def peft_fields(cls, cfg):
        return {
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora, "init_lora_weights": True,
            "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
        }

    @classmethod
    def from_peft(cls, raw):
        init = raw.get("init_lora_weights", True)
        if not any(init is v or (isinstance(v, str) and init == v) for v in cls.plain_inits):
            raise ValueError(
                f"init_lora_weights: {init!r} changes the base weights, which dora_cli does not reproduce "
                "(convert the adapter to plain LoRA in PEFT first)"
            )
        return {
            "r": raw["r"], "alpha": raw.get("lora_alpha", 8), "dropout": raw.get("lora_dropout", 0.0),
            "rslora": bool(raw.get("use_rslora")),
        }

    @classmethod
    def describe(cls, layer):
        return f"r={layer.r}, scaling={layer.scaling:g}"


class Vera(Direction):
    """VeRA's update from the model's shared frozen projections: λ_b [out] (init 0), λ_d [r] (init d_init)."""

    name = "vera"
    peft_type = "VERA"
    tensors = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}
    peft_keys = frozenset({"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights"})
    shared_tensors = {"base_model.vera_A": "A", "base_model.vera_B": "B"}
    """Keys of the model-wide projections (VeraProjections attributes)."""

    @classmethod
    def init(cls, layer, d_out, d_in, opts, params):
        vera = opts.vera
        if vera is None:
            raise ValueError("VeRA / DVoRA layers need the shared VeraProjections")
        if vera.A.shape[0] < opts.r or vera.A.shape[1] < d_in or vera.B.shape[0] < d_out:
            raise ValueError("the shared VeRA projections are smaller than this layer")
        object.__setattr__(layer, "vera", vera)  # shared: not a submodule of every layer
        layer.vera_lambda_b = nn.Parameter(torch.zeros(d_out, **params))
        layer.vera_lambda_d = nn.Parameter(torch.full((opts.r,), float(opts.vera_d_init), **params))

    @classmethod
    def shapes(cls, d_out, d_in, r):
        return {"vera_lambda_b": (d_out,), "vera_lambda_d": (r,)}

    @classmethod
    def _slices(cls, layer) -> tuple[torch.Tensor, torch.Tensor]:
        d_out, d_in = layer.base_layer.out_features, layer.base_layer.in_features
        return layer.vera.B[:d_out, : layer.r], layer.vera.A[: layer.r, :d_in]

    @classmethod
    def factors(cls, layer):
        b_s, a_s = cls._slices(layer)
        return layer.vera_lambda_b[:, None] * b_s * layer.vera_lambda_d[None, :], a_s, 1.0

    @classmethod
    def peft_fields(cls, cfg):
        return {
            "vera_dropout": cfg.dropout, "projection_prng_key": cfg.vera_seed, "save_projection": True,
            "d_initial": cfg.vera_d_init, "init_weights": True,
        }

    @classmethod
    def from_peft(cls, raw):
        return {
            "r": raw["r"], "dropout": raw.get("vera_dropout", 0.0), "vera_seed": raw.get("projection_prng_key", 0),
            "vera_d_init": raw.get("d_initial", 0.1),
        }


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain √2 (a = 0), fan_in = shape[1]: bound √(6 / fan_in)."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen random pair shared by all VeRA / DVoRA layers of a model: A_s [r, in_max], B_s [out_max, r].

    Drawn from `seed` on the CPU generator, A_s first, so that the same seed gives the same matrices
    as PEFT's `projection_prng_key`. Non-persistent buffers: one copy per model, not per layer.
    """

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.seed = seed
        if torch.device(device).type == "meta":
            a, b = torch.empty(r, in_max, device="meta"), torch.empty(out_max, r, device="meta")
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            a = _kaiming_uniform((r, in_max), gen)
            b = _kaiming_uniform((out_max, r), gen)
        self.register_buffer("A", a.to(device), persistent=False)
        self.register_buffer("B", b.to(device), persistent=False)


# ==================================================================================================
# The magnitude
# ==================================================================================================
class Magnitude:
    """DoRA's magnitude m [out], initialised to ‖W0‖ per row of the weight the forward sees."""

    tensors = {"lora_magnitude_vector": "magnitude"}

    @staticmethod
    def init(layer, w0_norm_sq: torch.Tensor) -> None:
        layer.register_buffer("w0_norm_sq", w0_norm_sq, persistent=False)
        layer.magnitude = nn.Parameter(w0_norm_sq.sqrt())

    @staticmethod
    def shapes(d_out: int) -> dict[str, tuple[int, ...]]:
        return {"magnitude": (d_out,)}


# ==================================================================================================
# Methods
# ==================================================================================================
@dataclass(frozen=True)
class Method:
    """A direction (or none) and a magnitude (on or off), with the names users and PEFT know it by."""

    name: str
    display: str
    direction: type[Direction] | None
    magnitude: bool
    peft_native: bool
    """PEFT can load it as is (else our checkpoints mark it peft_type DORA_CLI, which PEFT refuses)."""

    def tensor_shapes(self, d_out: int, d_in: int, r: int) -> dict[str, tuple[int, ...]]:
        """attribute -> shape of every tensor a layer of this method carries."""
        shapes = self.direction.shapes(d_out, d_in, r) if self.direction else {}
        return {**shapes, **(Magnitude.shapes(d_out) if self.magnitude else {})}

    @property
    def tensors(self) -> dict[str, str]:
        """PEFT key suffix -> layer attribute."""
        return {**(self.direction.tensors if self.direction else {}), **(Magnitude.tensors if self.magnitude else {})}

    @property
    def ranked(self) -> bool:
        """Has a rank r (a direction update): what the rank sweep varies."""
        return self.direction is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", "LoRA", LowRank, magnitude=False, peft_native=True),
        Method("dora", "DoRA", LowRank, magnitude=True, peft_native=True),
        Method("vera", "VeRA", Vera, magnitude=False, peft_native=True),
        Method("dvora", "DVoRA", Vera, magnitude=True, peft_native=False),
        Method("magnitude", "magnitude-only", None, magnitude=True, peft_native=False),
    )
}
PEFT_DIRECTIONS: dict[str, type[Direction]] = {d.peft_type: d for d in (LowRank, Vera)}
"""PEFT's own peft_type -> direction, for reading adapter_config.json files that PEFT wrote."""


def recipe_methods() -> tuple[str, ...]:
    """The methods `adapter.method` names: those with a direction update (magnitude-only applies per module)."""
    return tuple(name for name, m in METHODS.items() if m.ranked)


def tensor_suffixes() -> dict[str, str]:
    """Every PEFT key suffix an adapted layer can carry -> its attribute."""
    return {s: a for m in METHODS.values() for s, a in m.tensors.items()}


def compose(direction: type[Direction] | None, magnitude: bool) -> Method:
    """The method with this direction and magnitude (ValueError if there is none)."""
    for m in METHODS.values():
        if m.direction is direction and m.magnitude == magnitude:
            return m
    raise ValueError(f"no adapter method has direction {direction} and magnitude {magnitude}")
