"""The DoRA row norm ‖W0 + ΔW‖ without materialising W0 + ΔW (docs/MATH.md, "factored norm").

With ΔW = s·B·A (B [out, r], A [r, in]):

    n² = ‖W0‖²_row + 2s·rowsum(B ⊙ (W0·Aᵀ)) + s²·rowsum((B·(A·Aᵀ)) ⊙ B)

`‖W0‖²_row` is cached by the caller (W0 is frozen) and `W0·Aᵀ` comes from the base layer's own
matmul, so no [out, in] temporary exists. When r ≥ in (VeRA / DVoRA at r = 1024 on a small model),
A·Aᵀ would cost more than ΔW itself, and the quadratic term is taken from B·A a block of rows at a time.
Everything is fp32; the norm is clamped away from zero.
"""

from __future__ import annotations

import torch

EPS = 1e-12
_ROW_BLOCK = 1024


def delta_row_norm_sq(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """rowsum((B·A)²) = rowsum((B·(A·Aᵀ)) ⊙ B), [out], fp32."""
    b, a = b.float(), a.float()
    r, d_in = a.shape
    if r < d_in:
        return ((b @ (a @ a.T)) * b).sum(dim=1)
    return torch.cat([(blk @ a).pow(2).sum(dim=1) for blk in b.split(_ROW_BLOCK)])


def factored_row_norm(
    w0_norm_sq: torch.Tensor, w0_at: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float
) -> torch.Tensor:
    """‖W0 + scale·B·A‖ per output row, [out], fp32.

    w0_norm_sq: ‖W0‖² per row [out]; w0_at: W0·Aᵀ [out, r]; b: [out, r]; a: [r, in].
    """
    b = b.float()
    n_sq = w0_norm_sq + (2.0 * scale) * (b * w0_at).sum(dim=1) + (scale * scale) * delta_row_norm_sq(b, a)
    return n_sq.clamp_min(EPS * EPS).sqrt()
