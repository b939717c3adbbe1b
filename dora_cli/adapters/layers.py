"""AdaptedLinear: LoRA, DoRA, magnitude-only, VeRA and DVoRA on a frozen linear layer.

Shapes follow PyTorch: the base weight W0 is [out, in]; A (`lora_A`) is [r, in], B (`lora_B`) is
[out, r]; the magnitude m is [out]. With g = m / n and n = ‖W0 + ΔW‖ per output row
(docs/MATH.md), the DoRA forward reuses the one base GEMM:

    y = g ⊙ (W0·x + ΔW·drop(x)) + b                      (dropout_mode "fast", the default)
    y = W0·x + (g − 1) ⊙ (W0·drop(x)) + g ⊙ ΔW·drop(x) + b  ("delta": the official code; 2 GEMMs)

Both are equal without dropout and in eval mode. n is computed with the factored norm (norm.py),
detached by default (paper Sec. 4.3). The combination g ⊙ z + b is a custom autograd function that
keeps the layer's output, not z, for the magnitude gradient (z = (y − b) / g): the output is usually
kept by the next operation anyway, so DoRA costs almost no activation memory over LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from dora_cli.adapters.base_ops import (
    base_kind,
    base_matmul,
    base_times_at,
    dense_linear,
    dequantized_weight,
    prepare_base,
    weight_row_norm_sq,
)
from dora_cli.adapters.norm import EPS, factored_row_norm
from dora_cli.adapters.variants import METHODS, LayerOptions, Magnitude, VeraProjections


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
    """A frozen linear layer (`base_layer`) with one adapter: a method of variants.METHODS (its `kind`)."""

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
        if kind not in METHODS:
            raise ValueError(f"unknown adapter kind {kind!r}")
        if base_kind(base_layer) is None:
            raise TypeError(f"cannot adapt a {type(base_layer).__name__}")
        prepare_base(base_layer)
        self.base_layer = base_layer
        self.kind = kind
        self.method = METHODS[kind]
        self.direction = self.method.direction
        self.r = r if self.direction else 0
        self.scaling = 1.0
        self.detach_norm = detach_norm
        self.dropout_mode = dropout_mode
        self.dropout = nn.Dropout(dropout) if dropout > 0 and self.direction else nn.Identity()
        self.merged = False
        self._merge_state: dict = {}

        d_out, d_in = base_layer.out_features, base_layer.in_features
        device = base_layer.weight.device
        params = dict(device=device, dtype=torch.float32)
        if self.direction:
            opts = LayerOptions(r=r, scaling=scaling, vera=vera, vera_d_init=d_init)
            self.direction.init(self, d_out, d_in, opts, params)
        if self.method.magnitude:
            with torch.no_grad():
                norm_sq = weight_row_norm_sq(base_layer).float()
            # m = ‖W0‖ from the weight the forward sees (dequantized for 4-bit): g = 1 exactly at step 0.
            Magnitude.init(self, norm_sq)
            # A zero row of W0 gives g = 0 there, where z cannot be recovered from y: keep z instead.
            self.keep_z = device.type != "meta" and bool((norm_sq <= 0).any())

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT key suffix -> this layer's live adapter tensor."""
        return {suffix: getattr(self, attr) for suffix, attr in self.method.tensors.items()}

    # ---- the update ΔW = scale · B · A ------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B [out, r], A [r, in], scale) with ΔW = scale · B · A."""
        return self.direction.factors(self)

    def delta_weight(self) -> torch.Tensor:
        """ΔW as a dense [out, in] fp32 tensor (merge and analysis only)."""
        if not self.direction:
            return torch.zeros(self.base_layer.out_features, self.base_layer.in_features, device=self.magnitude.device)
        return self.direction.delta_weight(self)

    # ---- the magnitude side ---------------------------------------------------------------------
    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + ΔW‖ per output row, fp32 [out]; constant in backward when detach_norm."""
        if not self.direction:
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
        if not self.method.magnitude:  # lora, vera
            return self.direction.add_delta(self, self.base_layer(x), self.dropout(x))
        g = self.magnitude_scale()
        bias = self.base_layer.bias
        if self.direction and self.dropout_mode == "delta" and self.training and self.dropout.p > 0:
            xd = self.dropout(x)
            gx = g.to(x.dtype)
            return self.base_layer(x) + (gx - 1) * base_matmul(self.base_layer, xd) + gx * self.direction.delta(self, xd)
        z = base_matmul(self.base_layer, x)
        if self.direction:
            z = self.direction.add_delta(self, z, self.dropout(x))
        return _DoraScale.apply(z, g, bias, self.keep_z)

    # ---- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', g): W' = diag(g)·(W0 + ΔW) with g = m / ‖W0 + ΔW‖ with a magnitude, else (W0 + ΔW, None)."""
        w = dequantized_weight(self.base_layer, torch.float32)
        if self.direction:
            w = w + self.delta_weight()
        if not self.method.magnitude:
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
            self._merge_state["dense"] = dense_linear(base, w, base.compute_dtype or torch.float32)
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
        return f"kind={self.kind}" + (f", {self.direction.describe(self)}" if self.direction else "")
