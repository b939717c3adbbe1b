"""What the adapter layers need from a frozen base layer: its GEMM without bias, its weight.

Supported base layers: `nn.Linear` (any float dtype) and bitsandbytes `Linear4bit` (nf4 / fp4,
double quantization) and `Linear8bitLt`. bitsandbytes is imported lazily: only a model that has
such layers needs it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

_ROW_CHUNK = 4096  # rows of a low-precision weight upcast to fp32 at a time


def base_kind(layer: nn.Module) -> str | None:
    """'linear', '4bit', '8bit', or None for a layer we cannot adapt."""
    name = type(layer).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(layer.weight, "quant_state"):
        return "4bit"
    if name == "Linear8bitLt":
        return "8bit"
    if isinstance(layer, nn.Linear):
        return "linear"
    return None


def prepare_base(layer: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer on its differentiable path (no-op for other layers).

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time the layer runs in
    eval mode without gradients, and then computes through a kernel without autograd support: a
    gradient through such a layer is silently lost, and eval numerics differ from training. We undo
    the repacking and turn it off, so train and eval compute the same function.
    """
    if base_kind(layer) != "4bit":
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    layer.support_avx512bf16_for_cpu = False  # keep one numeric path in train and eval


def base_matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W0.T, without the bias, through the layer's own (possibly quantized) weight."""
    kind = base_kind(layer)
    if kind == "linear":
        return F.linear(x, layer.weight)
    if kind == "4bit":
        import bitsandbytes as bnb

        dtype = x.dtype
        if layer.compute_dtype is not None:
            x = x.to(layer.compute_dtype)
        return bnb.matmul_4bit(x, layer.weight, quant_state=layer.weight.quant_state).to(dtype)
    if kind == "8bit":
        import bitsandbytes as bnb

        layer.state.is_training = layer.training
        if layer.weight.CB is not None:
            layer.init_8bit_state()
        out = bnb.matmul(x, layer.weight, bias=None, state=layer.state)
        if not layer.state.has_fp16_weights and layer.state.CB is not None:
            layer.weight.data = layer.state.CB
        return out
    raise TypeError(f"unsupported base layer {type(layer).__name__}")


def dequantized_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight the forward pass multiplies by, as a dense [out, in] tensor (a copy for quantized layers).

    Quantized weights are dequantized exactly, in fp32 (a 4-bit layer's own matmul does the same for an
    fp32 input; for a 16-bit input it rounds these values to its compute dtype).
    """
    kind = base_kind(layer)
    if kind == "linear":
        w = layer.weight.detach()
    elif kind == "4bit":
        import bitsandbytes.functional as bnbF

        state = copy.copy(layer.weight.quant_state)
        state.dtype = torch.float32  # not the dtype the weight was quantized from: no rounding
        w = bnbF.dequantize_4bit(layer.weight.data, state)
    elif kind == "8bit":
        import bitsandbytes.functional as bnbF

        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        w = bnbF.int8_vectorwise_dequant(layer.weight.data, scb)
    else:
        raise TypeError(f"unsupported base layer {type(layer).__name__}")
    return w if dtype is None else w.to(dtype)


def weight_row_norm_sq(layer: nn.Module) -> torch.Tensor:
    """‖W0‖² per output row in fp32, [out]. Low-precision weights are upcast a block of rows at a time."""
    if base_kind(layer) == "linear":
        w = layer.weight.detach()
        if w.dtype == torch.float32:
            return w.pow(2).sum(dim=1)
        return torch.cat([blk.float().pow(2).sum(dim=1) for blk in w.split(_ROW_CHUNK)])
    return dequantized_weight(layer, torch.float32).pow(2).sum(dim=1)


def base_times_at(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """W0 · Aᵀ in fp32, [out, r], computed through the base layer's own weight.

    No dense fp32 copy of W0 is made for nn.Linear (fp32 as is, low precision a block of rows at a
    time) nor for 4-bit layers (bitsandbytes' own matmul); 8-bit layers fall back to the dense weight.
    """
    if base_kind(layer) == "linear":
        w = layer.weight.detach()
        if w.dtype == torch.float32:
            return F.linear(a.float(), w).T
        return torch.cat([F.linear(a.float(), blk.float()).T for blk in w.split(_ROW_CHUNK)])
    if base_kind(layer) == "4bit":
        import bitsandbytes as bnb

        # An fp32 input makes bitsandbytes dequantize to fp32: exact with respect to the 4-bit weight.
        return bnb.matmul_4bit(a.float(), layer.weight, quant_state=layer.weight.quant_state).T
    # Linear8bitLt's own matmul quantizes its input to int8, too coarse for the norm: use the dense weight.
    return F.linear(a.float(), dequantized_weight(layer, torch.float32)).T


def natural_dtype(layer: nn.Module) -> torch.dtype | None:
    """The floating dtype of the layer's weight: as stored (nn.Linear), before quantization (4-bit), None (8-bit)."""
    kind = base_kind(layer)
    if kind == "linear":
        return layer.weight.dtype
    if kind == "4bit":
        return layer.weight.quant_state.dtype
    return None


def dense_linear(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A frozen nn.Linear of `layer`'s shape holding `weight` (as `dtype`) and `layer`'s bias."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype)
    dense.weight.data.copy_(weight)
    if layer.bias is not None:
        dense.bias.data.copy_(layer.bias.data)
    return dense.requires_grad_(False)
