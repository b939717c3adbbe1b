"""AdaptedLinear: LoRA, DoRA, magnitude-only, VeRA and DVoRA on a frozen linear layer.

Shapes follow PyTorch: the base weight W0 is [out, in]; A (`lora_A`) is [r, in], B (`lora_B`) is
[out, r]; the magnitude m is [out]. With g = m / n and n = ‖W0 + ΔW‖ per output row
(docs/MATH.md), every method starts from the base layer's own forward (its GEMM, its bias, its
dtype) and adds what the adapter changes:

    LoRA / VeRA   y = base(x) + ΔW·drop(x)
    magnitude     y = base(x) + (g − 1) ⊙ (base(x) − b) + g ⊙ ΔW·drop(x)        (dropout_mode "fast")
                  y = base(x) + (g − 1) ⊙ W0·drop(x) + g ⊙ ΔW·drop(x)           ("delta": the official
                                                                                 code; a second GEMM)

"fast" is g ⊙ (W0·x + ΔW·drop(x)) + b, one base GEMM; both are equal without dropout and in eval mode.
drop is inverted dropout with PEFT's semantics; on the CPU its masks come from geometric gaps (dropout.py).
The addition is fp32 and rounded once to the activation dtype; at step 0 (B = 0, g = m / n = 1
exactly) it adds exactly zero, so the adapted model computes the base model bit for bit, in every
dtype and on every base (bitsandbytes adds the bias in its compute dtype: we never re-add it).

The low-rank branch runs in the adapter's fp32 (the input is cast, as PEFT does; its 16-bit copy is
what the backward keeps) or in autocast's dtype under autocast. n is the factored norm (norm.py),
fp32 even under autocast, detached by default (paper Sec. 4.3).

What the magnitude's backward keeps (functional.py has the arithmetic). It needs z = W0·x + ΔW·drop(x)
per token:

- no bias, dropout_mode fast, every |g| >= G_MIN (1/64): the layer's output y, as a copy-on-write alias,
  and z = y / g. The output is usually kept by the next operation anyway (attention keeps v, the
  gated MLP keeps up_proj's output), so DoRA costs almost no activation memory over LoRA; an in-place
  operation on y downstream makes the alias a real copy instead of breaking the backward.
- otherwise (a bias, which makes (y − b) / g lose the digits the bias carries; a row whose magnitude
  has collapsed, m = 0 included; dropout_mode delta): the base output (resp. W0·drop(x)) in its own
  dtype: one [tokens, out] tensor, the gradient exact for every g. The |g| test is redone only when an
  adapter parameter changed (once per optimizer step), and under torch.compile the layer always keeps
  the base output (no data-dependent branch in the graph).

Inference (gradients off: eval, `torch.no_grad`, `inference_mode`): g is computed once and reused until the
layer's state changes (an optimizer step, an in-place edit or a replacement of any of its tensors, a merge /
unmerge, a switch between train and eval), so a DoRA forward costs LoRA's plus one [out] multiply; no
weight is cached, only g [out] and the g-scaled B [out, r] of the low-rank term. With gradients on, n follows every step as before.
An in-place edit is seen through the tensor's version counter, which an edit through `.data`
(`p.data.copy_(...)`) bypasses: after such an edit call `model.eval()` again (any train / eval switch
recomputes g). Tensors made under `inference_mode` have no version counter: their layers are not cached.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from dora_cli.adapters.base_ops import (
    base_kind,
    base_matmul,
    base_times_at,
    dense_linear,
    dequantized_weight,
    natural_dtype,
    prepare_base,
    weight_row_norm_sq,
)
from dora_cli.adapters.dropout import Dropout
from dora_cli.adapters.functional import G_MIN, rescale, scaled_up, widen_linear
from dora_cli.adapters.norm import EPS, factored_row_norm
from dora_cli.adapters.variants import METHODS, LayerOptions, Magnitude, VeraProjections

_optimizer_steps = 0
"""Optimizer steps taken in this process, by any torch optimizer. A layer's cached |g| check is keyed on it
as well as on its parameters' versions: the fused AdamW kernel updates parameters without bumping
`_version`."""


def _count_optimizer_step(_optimizer, _args, _kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _pins(tensors: list[torch.Tensor]) -> list[StorageWeakRef]:
    """Weak references to the tensors' storages: held with a state key, they keep the storages' ids in the key
    from being reused by later storages (an allocator hands freed addresses back), without keeping the memory of
    a replaced tensor alive."""
    return [StorageWeakRef(t.untyped_storage()) for t in tensors]


class AdaptedLinear(nn.Module):
    """A frozen linear layer (`base_layer`) with one adapter: a method of variants.METHODS (its `kind`)."""

    recover_z_from_output = True
    """Whether a bias-free layer may keep its output for the magnitude gradient (see the module); False keeps
    the base output always: exact for every g in every dtype, at the cost of one [tokens, out] tensor."""

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
        self.dropout = Dropout(dropout) if dropout > 0 and self.direction else nn.Identity()
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
        self._g_checked: tuple = ()  # (state key, its pins, every |g| >= G_MIN) of the last check
        self._g_cache: tuple = ()  # (state key, its pins, g, scaled_up, A) of the last forward without gradients
        self._generation = 0

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
        """n = ‖W0 + ΔW‖ per output row, fp32 [out] (also under autocast); constant in backward when detach_norm."""
        if not self.direction:
            return self.w0_norm_sq.clamp_min(EPS * EPS).sqrt()
        grad = torch.is_grad_enabled() and not self.detach_norm
        with torch.set_grad_enabled(grad), torch.autocast(self.magnitude.device.type, enabled=False):
            b, a, scale = self.factors()
            w0_at = base_times_at(self.base_layer, a)  # [out, r]
            return factored_row_norm(self.w0_norm_sq, w0_at, b, a, scale)

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / n, fp32 [out]."""
        return self.magnitude / self.weight_norm()

    def _cached_scale(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(g, scaled_up(B, g, scale), A) without gradients: computed once, reused until the layer's state changes
        (recomputed every time for a layer of inference tensors, whose in-place edits no version records)."""
        tensors = self._state_tensors()
        key = self._state_key(tensors)
        if key is None or not self._g_cache or self._g_cache[0] != key:
            g = self.magnitude_scale()
            up = a = None
            if self.direction:
                b, a, scale = self.factors()
                up = scaled_up(b, g, scale)
            self._g_cache = () if key is None else (key, _pins(tensors), g, up, a)
            return g, up, a
        return self._g_cache[2:]

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every tensor g depends on: the adapter's, ‖W0‖², the base weight and VeRA's shared projections."""
        tensors = [*self._parameters.values(), *self._buffers.values(), self._modules["base_layer"].weight]
        vera = self.__dict__.get("vera")  # the model-wide projections (not a submodule)
        if vera is not None:
            tensors += [vera.A, vera.B]
        return tensors

    def _state_key(self, tensors: list[torch.Tensor]) -> tuple | None:
        """Changes whenever g might: an optimizer step (fused AdamW bumps no version), an in-place edit of one of
        `tensors` (its version), a replaced one (its storage: kept apart from any later storage by the pins a cache
        holds with its key), a new scaling, a merge / unmerge / train() (the generation). None for inference
        tensors, which have no version counter."""
        try:
            return (_optimizer_steps, self._generation, self.scaling, self.r,
                    *[(t.untyped_storage()._cdata, t.data_ptr(), t.storage_offset(), t._version) for t in tensors])
        except RuntimeError:  # "Inference tensors do not track version counter"
            return None

    def __getstate__(self) -> dict:
        """A copy or a pickle leaves the caches behind (their weak references belong to this layer's tensors)."""
        return {**self.__dict__, "_g_cache": (), "_g_checked": ()}

    def _forget_g(self) -> None:
        self._generation += 1
        self._g_cache = ()

    def train(self, mode: bool = True):
        self._forget_g()
        return super().train(mode)

    def _output_recovers_z(self, g: torch.Tensor) -> bool:
        """May the backward recover z = y / g from the output? (bias-free, every |g| >= G_MIN; see the module)"""
        if not torch.is_grad_enabled() or not self.recover_z_from_output or self.base_layer.bias is not None:
            return False
        if torch.compiler.is_compiling():
            return False
        tensors = self._state_tensors()
        key = self._state_key(tensors)
        if key is None or not self._g_checked or self._g_checked[0] != key:
            self._g_checked = (key, _pins(tensors), bool((g.detach().abs() >= G_MIN).all()))
        return self._g_checked[2]

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._merged_forward(x)
        base_out = self.base_layer(x)  # the base's own GEMM, bias and dtype
        # dropout (the identity in eval mode) is applied with the low-rank branch's first GEMM (widen_linear)
        # (the dropout module's own train / eval flag counts too, as when it was called: `layer.dropout.eval()`)
        p = self.dropout.p if self.training and self.dropout.training and isinstance(self.dropout, nn.Dropout) else 0.0
        if not self.method.magnitude:  # lora, vera
            return self.direction.add_delta(self, base_out, x, p)
        delta_dropout = self.dropout_mode == "delta" and p > 0
        if not delta_dropout and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            g, up, a = self._cached_scale()  # inference
            u = widen_linear(x, a, p) if self.direction else None
            return rescale(base_out, g, u=u, up=up, bias=self.base_layer.bias)
        self._g_cache = ()
        g = self.magnitude_scale()
        u = b = None
        scale = 1.0
        if delta_dropout:  # one mask for both W0 and ΔW
            xd = self.dropout(x)
            b, a, scale = self.factors()
            w0x = base_matmul(self.base_layer, xd)
            return rescale(base_out, g, w0x=w0x, u=widen_linear(xd, a), b=b, scale=scale)
        if self.direction:
            b, a, scale = self.factors()
            u = widen_linear(x, a, p)  # ΔW·drop(x) = scale · u·Bᵀ, left to the rescale
        keep_output = self._output_recovers_z(g)
        return rescale(base_out, g, u=u, b=b, scale=scale, bias=self.base_layer.bias, keep_output=keep_output)

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
    def merge(self, dtype: torch.dtype | None = None) -> None:
        """Fold the adapter into the layer; forward then costs one plain GEMM.

        nn.Linear: the weight is overwritten in its dtype; unmerge restores it (up to that dtype's
        rounding) with the g = m / n cached here. Quantized bases: a dense merged copy in `dtype`
        (default: the dtype the weight had before quantization, else fp32) serves the forward, which
        casts its input to that dtype and its output back; the quantized weight is kept.
        """
        if self.merged:
            return
        w, scale = self._merged()
        base = self.base_layer
        if base_kind(base) == "linear":
            self._merge_state["scale"] = scale
            base.weight.data.copy_(w.to(base.weight.dtype))
        else:
            self._merge_state["dense"] = dense_linear(base, w, dtype or natural_dtype(base) or torch.float32)
        self.merged = True
        self._forget_g()

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self._merge_state.get("dense")
        if dense is None:
            return self.base_layer(x)
        return dense(x.to(dense.weight.dtype)).to(x.dtype)

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
        self._forget_g()

    def extra_repr(self) -> str:
        return f"kind={self.kind}" + (f", {self.direction.describe(self)}" if self.direction else "")
