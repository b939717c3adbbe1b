"""Inverted dropout on the CPU without a random number per element.

nn.Dropout draws one uniform number per element with the CPU generator, serially (about 5 ns an
element here): for the low-rank branch of q/k/v/up/down at 8 x 128 tokens of SmolLM2 that is 118
million draws, about 0.6 s of a 3.3 s training step. Which elements an i.i.d. Bernoulli(p) mask drops
is equally well described by the gaps between them, i.i.d. geometric on {1, 2, ...}: drawing the gaps
costs one uniform number per *dropped* element (p·n of them, or (1 − p)·n kept ones for p > 1/2), and
the mask has exactly the same distribution (up to the 53-bit resolution of the uniforms, as for
Bernoulli sampling itself).

The output is x·s (s = 1 / (1 − p), rounded once to x's dtype like any scalar product) with the drawn
positions set to zero, and the backward does the same to the gradient; only the positions are kept for
it (8 bytes per dropped element, or per kept one above p = 1/2: less than a bool mask's byte per element
while p < 1/8 or p > 7/8, as for the usual 0.05-0.1, up to 4x more at p = 1/2). The masks come from torch's default
generator, so they follow `torch.manual_seed` (train.py seeds each micro-batch), but they are not the
masks nn.Dropout would draw for the same seed. Off the CPU, and under torch.compile, this is
`F.dropout`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _batch(mean: float) -> int:
    """How many gaps to draw when `mean` events are expected in what is left: 6 standard deviations more."""
    return int(mean + 6 * math.sqrt(mean) + 16)


def event_positions(n: int, q: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The sorted positions in [0, n) of an i.i.d. Bernoulli(q) process (0 < q < 1), int64, from geometric gaps.

    A gap is ⌈log(u) / log(1 − q)⌉ for a uniform u in [0, 1): P(gap = k) = (1 − q)^(k−1)·q (u = 0 gives an
    infinite gap, probability 2⁻⁵³). Gaps are drawn in batches sized to pass n with overwhelming probability
    and continued from the last position when they do not.
    """
    log_keep = math.log1p(-q)
    chunks, last = [], -1.0
    while last < n - 1:
        mean = (n - 1 - last) * q
        gaps = torch.rand(_batch(mean), dtype=torch.float64, generator=generator)
        positions = gaps.log_().div_(log_keep).ceil_().cumsum_(0).add_(last)
        chunks.append(positions)
        last = positions[-1].item()
    positions = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return positions[: int(torch.searchsorted(positions, float(n)))].long()  # (sorted: the ones below n lead)


def drop(x: torch.Tensor, p: float, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x·s with the dropped elements zero, as a new contiguous tensor; the positions `dropped_grad` needs):
    the dropped positions for p <= 1/2, the kept ones above.

    dtype: the result's, if not x's: x·s computed in x's dtype, then rounded to `dtype` (the numbers of
    `drop(x, p)[0].to(dtype)`; x's-dtype product is a temporary, freed at once)."""
    scale = 1.0 / (1.0 - p)
    y = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    if p <= 0.5:
        positions = event_positions(x.numel(), p)
        torch.mul(x, scale, out=y)
        y.view(-1).index_fill_(0, positions, 0)
    else:
        positions = event_positions(x.numel(), 1.0 - p)
        y.zero_()
        y.view(-1)[positions] = (x.reshape(-1)[positions] * scale).to(y.dtype)
    return y, positions


def dropped_grad(grad: torch.Tensor, positions: torch.Tensor, p: float, scaled: bool = False) -> torch.Tensor:
    """The gradient through `drop`: grad·s at the kept positions, 0 at the dropped ones. scaled: `grad` is
    already multiplied by s and a temporary of the caller's (zeroed in place)."""
    scale = 1.0 if scaled else 1.0 / (1.0 - p)
    if p <= 0.5:
        out = grad.contiguous() if scaled else torch.mul(grad, scale).contiguous()
        out.view(-1).index_fill_(0, positions, 0)
        return out
    out = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    kept = grad.reshape(-1)[positions]
    out.view(-1)[positions] = kept if scaled else kept * scale
    return out


def geometric_path(x: torch.Tensor, p: float) -> bool:
    """Whether dropout(x, p) draws its mask from geometric gaps: 0 < p < 1 (p = 1 is F.dropout's zeros, the
    scale 1 / (1 − p) not finite), x not empty, on the CPU, outside torch.compile."""
    return 0 < p < 1 and x.numel() > 0 and x.device.type == "cpu" and not torch.compiler.is_compiling()


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        y, positions = drop(x, p)
        ctx.p = p
        ctx.save_for_backward(positions)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (positions,) = ctx.saved_tensors
        return dropped_grad(grad_y, positions, ctx.p), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with the mask drawn from geometric gaps on the CPU (see the module)."""
    if not training or p == 0 or x.numel() == 0:
        return x
    if not geometric_path(x, p):
        return F.dropout(x, p, training)
    return _Dropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout drawing its mask with `dropout` (the same p, train / eval behaviour and repr)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
