"""AdaptedLinear: LoRA, DoRA, magnitude-only, VeRA and DVoRA on a frozen linear layer.

Shapes follow PyTorch: the base weight W0 is [out, in]; A (`lora_A`) is [r, in], B (`lora_B`) is
[out, r]; the magnitude m is [out]. With g = m / n and n = ‖W0 + ΔW‖ per output row
(DORA_MATH.md), the DoRA forward reuses the one base GEMM:

    y = g ⊙ (W0·x + ΔW·drop(x)) + b                      (dropout_mode "fast", the default)
    y = W0·x + (g − 1) ⊙ (W0·drop(x)) + g ⊙ ΔW·drop(x) + b  ("delta": the official code; 2 GEMMs)

Both are equal without dropout and in eval mode. n is computed with the factored norm (norm.py),
detached by default (paper Sec. 4.3). The combination g ⊙ z + b is a custom autograd function that
keeps the layer's output, not z, for the magnitude gradient (z = (y − b) / g): the output is usually
kept by the next operation anyway, so DoRA costs almost no activation memory over LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dora_cli.adapters.base_ops import (
    base_kind,
    base_matmul,
    base_times_at,
    dequantized_weight,
    prepare_base,
    weight_row_norm_sq,
)
from dora_cli.adapters.norm import EPS, factored_row_norm

KINDS = ("lora", "dora", "vera", "dvora", "magnitude")
LOW_RANK_KINDS = ("lora", "dora")
VERA_KINDS = ("vera", "dvora")
MAGNITUDE_KINDS = ("dora", "dvora", "magnitude")


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


class _DoraScale(torch.autograd.Function):
    """y = g ⊙ z + bias, keeping y (or z when asked) for the backward pass."""

    @staticmethod
    def forward(ctx, z, g, bias, keep_z: bool):
        g = g.to(z.dtype)
        y = z * g
        if bias is not None:
            y.add_(bias.to(y.dtype))
        ctx.keep_z = keep_z
        ctx.save_for_backward(z if keep_z else y, g, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved, g, bias = ctx.saved_tensors
        needs_z, needs_g, needs_bias, _ = ctx.needs_input_grad
        grad_z = grad_y * g if needs_z else None
        grad_g = grad_bias = None
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        if needs_g:
            # Σ_t G ⊙ z; from the output: z = (y − bias) / g.
            dot = (grad_y * saved).reshape(-1, grad_y.shape[-1]).sum(dim=0, dtype=torch.float32)
            if not ctx.keep_z:
                if bias is not None:
                    dot = dot - bias.float() * flat_grad.sum(dim=0, dtype=torch.float32)
                dot = dot / g.float()
            grad_g = dot
        if needs_bias:
            grad_bias = flat_grad.sum(dim=0).to(bias.dtype)
        return grad_z, grad_g, grad_bias, None


class AdaptedLinear(nn.Module):
    """A frozen linear layer (`base_layer`) with one adapter of kind lora / dora / vera / dvora / magnitude."""

    def __init__(
        self,
        base_layer: nn.Module,
        kind: str,
        *,
        r: int = 0,
        scaling: float = 1.0,
        dropout: float = 0.0,
        detach_norm: bool = True,
        dropout_mode: str = "fast",
        vera: VeraProjections | None = None,
        d_init: float = 0.1,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown adapter kind {kind!r}")
        if base_kind(base_layer) is None:
            raise TypeError(f"cannot adapt a {type(base_layer).__name__}")
        if kind in VERA_KINDS and vera is None:
            raise ValueError("VeRA / DVoRA layers need the shared VeraProjections")
        prepare_base(base_layer)
        self.base_layer = base_layer
        self.kind = kind
        self.r = r if kind != "magnitude" else 0
        self.scaling = scaling if kind in LOW_RANK_KINDS else 1.0
        self.detach_norm = detach_norm
        self.dropout_mode = dropout_mode
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind != "magnitude" else nn.Identity()
        self.merged = False
        self._merge_state: dict = {}

        d_out, d_in = base_layer.out_features, base_layer.in_features
        device = base_layer.weight.device
        params = dict(device=device, dtype=torch.float32)
        if kind in LOW_RANK_KINDS:
            self.lora_A = nn.Parameter(torch.empty(r, d_in, **params))
            self.lora_B = nn.Parameter(torch.zeros(d_out, r, **params))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and LoRA
        if kind in VERA_KINDS:
            if vera.A.shape[0] < r or vera.A.shape[1] < d_in or vera.B.shape[0] < d_out:
                raise ValueError("the shared VeRA projections are smaller than this layer")
            object.__setattr__(self, "vera", vera)  # shared: not a submodule of every layer
            self.vera_lambda_b = nn.Parameter(torch.zeros(d_out, **params))
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_init), **params))
        if kind in MAGNITUDE_KINDS:
            with torch.no_grad():
                norm_sq = weight_row_norm_sq(base_layer).float()
            self.register_buffer("w0_norm_sq", norm_sq, persistent=False)
            # m = ‖W0‖ from the weight the forward sees (dequantized for 4-bit): g = 1 exactly at step 0.
            self.magnitude = nn.Parameter(norm_sq.sqrt())
            # A zero row of W0 gives g = 0 there, where z cannot be recovered from y: keep z instead.
            self.keep_z = device.type != "meta" and bool((norm_sq <= 0).any())

    # ---- the update ΔW = scale · B · A ------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B [out, r], A [r, in], scale) with ΔW = scale · B · A."""
        if self.kind in LOW_RANK_KINDS:
            return self.lora_B, self.lora_A, self.scaling
        d_out, d_in = self.base_layer.out_features, self.base_layer.in_features
        a = self.vera.A[: self.r, :d_in]
        b = self.vera_lambda_b[:, None] * self.vera.B[:d_out, : self.r] * self.vera_lambda_d[None, :]
        return b, a, 1.0

    def _delta(self, xd: torch.Tensor) -> torch.Tensor:
        """ΔW · xd without forming ΔW."""
        dt = xd.dtype
        if self.kind in LOW_RANK_KINDS:
            u = F.linear(xd, self.lora_A.to(dt)) * self.scaling  # [..., r]
            return F.linear(u, self.lora_B.to(dt))
        d_out, d_in = self.base_layer.out_features, self.base_layer.in_features
        u = F.linear(xd, self.vera.A[: self.r, :d_in].to(dt)) * self.vera_lambda_d.to(dt)
        return F.linear(u, self.vera.B[:d_out, : self.r].to(dt)) * self.vera_lambda_b.to(dt)

    def _plus_delta(self, base: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
        """base + ΔW · xd; for LoRA / DoRA the add rides in the second small GEMM (addmm)."""
        if self.kind not in LOW_RANK_KINDS:
            return base + self._delta(xd)
        dt = xd.dtype
        u = F.linear(xd, self.lora_A.to(dt)) * self.scaling  # [..., r]
        out = torch.addmm(base.reshape(-1, base.shape[-1]), u.reshape(-1, u.shape[-1]), self.lora_B.to(dt).T)
        return out.view(base.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW as a dense [out, in] fp32 tensor (merge and analysis only)."""
        if self.kind == "magnitude":
            return torch.zeros(self.base_layer.out_features, self.base_layer.in_features, device=self.magnitude.device)
        b, a, scale = self.factors()
        return scale * (b.float() @ a.float())

    # ---- the magnitude side ---------------------------------------------------------------------
    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + ΔW‖ per output row, fp32 [out]; constant in backward when detach_norm."""
        if self.kind == "magnitude":
            return self.w0_norm_sq.clamp_min(EPS * EPS).sqrt()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):
            b, a, scale = self.factors()
            w0_at = base_times_at(self.base_layer, a)  # [out, r]
            return factored_row_norm(self.w0_norm_sq, w0_at, b, a, scale)

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / n, fp32 [out]."""
        return self.magnitude / self.weight_norm()

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            merged = self._merge_state.get("dense")
            return merged(x) if merged is not None else self.base_layer(x)
        if self.kind not in MAGNITUDE_KINDS:  # lora, vera
            return self._plus_delta(self.base_layer(x), self.dropout(x))
        g = self.magnitude_scale()
        bias = self.base_layer.bias
        if self.kind != "magnitude" and self.dropout_mode == "delta" and self.training and self.dropout.p > 0:
            xd = self.dropout(x)
            gx = g.to(x.dtype)
            return self.base_layer(x) + (gx - 1) * base_matmul(self.base_layer, xd) + gx * self._delta(xd)
        z = base_matmul(self.base_layer, x)
        if self.kind != "magnitude":
            z = self._plus_delta(z, self.dropout(x))
        return _DoraScale.apply(z, g, bias, self.keep_z)

    # ---- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', g): W' = diag(g)·(W0 + ΔW) with g = m / ‖W0 + ΔW‖ for DoRA kinds, else (W0 + ΔW, None)."""
        w = dequantized_weight(self.base_layer, torch.float32) + self.delta_weight()
        if self.kind not in MAGNITUDE_KINDS:
            return w, None
        scale = self.magnitude.float() / w.norm(dim=1).clamp_min(EPS)
        return scale[:, None] * w, scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The effective weight as a dense fp32 [out, in] tensor (merged or not)."""
        if self.merged:
            dense = self._merge_state.get("dense")
            return (dense.weight if dense is not None else self.base_layer.weight).float().clone()
        return self._merged()[0]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the layer; forward then costs one plain GEMM.

        nn.Linear: the weight is overwritten; unmerge restores it with the g = m / n cached here.
        Quantized bases: a dense merged copy serves the forward and the quantized weight is kept.
        """
        if self.merged:
            return
        w, scale = self._merged()
        base = self.base_layer
        if base_kind(base) == "linear":
            self._merge_state["scale"] = scale
            base.weight.data.copy_(w.to(base.weight.dtype))
        else:
            dtype = base.compute_dtype or torch.float32
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=w.device, dtype=dtype)
            dense.weight.data.copy_(w)
            if base.bias is not None:
                dense.bias.data.copy_(base.bias.data)
            self._merge_state["dense"] = dense.requires_grad_(False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.base_layer
        if self._merge_state.pop("dense", None) is None:
            w = base.weight.data.float()
            scale = self._merge_state.pop("scale", None)
            if scale is not None:
                w = w / scale[:, None]
            w = w - self.delta_weight()
            base.weight.data.copy_(w.to(base.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        extra = f"kind={self.kind}"
        if self.kind != "magnitude":
            extra += f", r={self.r}"
        if self.kind in LOW_RANK_KINDS:
            extra += f", scaling={self.scaling:g}"
        return extra
