"""The adapter arithmetic that autograd alone would do imprecisely or wastefully: two autograd functions.

`widen_linear(x, w, p)`: drop(x)·wᵀ computed in w's dtype (the adapter's fp32, as PEFT casts its input)
while the backward keeps x in its own, possibly 16-bit, dtype (the dropped x under autocast in autocast's):
the numbers of `F.linear(dropout(x, p).float(), w)` (dropout.py's masks) without keeping an fp32 copy of
every adapted layer's input, and with the dropout's backward folded into its own.

`rescale(...)`: the magnitude of DoRA, DVoRA and magnitude-only layers, added to the base layer's own
output as a correction that is exactly zero at initialisation (PEFT's formulation):

    y = base_out + [(g − 1) ⊙ w0x + g ⊙ s·u·Bᵀ]        w0x = base_out − bias   (one base GEMM)
                                                        w0x = W0·drop(x)        (dropout_mode delta)

with g = m / n [out], u = A·drop(x) [.., r], B [out, r]. The base layer adds its bias inside its own
GEMM (in its compute dtype, for nn.Linear and bitsandbytes alike), so at step 0 (g = 1 exactly, B = 0)
y is the base layer's output bit for bit. Everything is summed in fp32 (the fast form as
g ⊙ base_out + (1 − g) ⊙ bias + ..., one pass less, as exact at g = 1) and rounded once to the
activation dtype.

The backward needs z = w0x + s·u·Bᵀ per token for the magnitude gradient Σ_t grad_y ⊙ z. It keeps one
[tokens, out] tensor, chosen by the caller (`keep_output`):

- the output y (as a copy-on-write alias, `torch._lazy_clone`): no memory when the next operation keeps
  y anyway (the attention keeps v, the gated MLP keeps up_proj's output), and an in-place write to y
  downstream copies it instead of breaking the backward. z = y / g: used only without a bias and with
  every |g| ≥ G_MIN, where the division is as exact as y itself.
- otherwise w0x's source, the base output (or W0·drop(x)) in its own dtype: z's base part is then
  exact whatever g and the bias are, and its low-rank part needs no [tokens, out] tensor at all:
  Σ_t grad_y ⊙ s·u·Bᵀ = s · rowsum(B ⊙ grad_yᵀ·u), and grad_yᵀ·u is the product grad B needs anyway.

Precision: GEMMs run in the dtype of their inputs as autocast leaves them (fp32 adapter weights
without autocast, autocast's dtype under it, as PEFT); every product that feeds a reduction over
tokens (the magnitude gradient, grad B) and every elementwise step of the correction is fp32, so
nothing overflows in fp16 before the sum.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from dora_cli.adapters.dropout import drop, dropped_grad, geometric_path

G_MIN = 1.0 / 64
"""Below this |g| = |m| / n in some row, the rescale keeps w0x's source instead of its output."""


# ---- autocast in a backward ---------------------------------------------------------------------------
def _autocast_state(t: torch.Tensor) -> tuple[str, bool, torch.dtype]:
    device = t.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _autocast(state: tuple[str, bool, torch.dtype]):
    """The forward's autocast state again (the backward usually runs outside the autocast region)."""
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled) if enabled else contextlib.nullcontext()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or as it is if it is wider (a float64 model stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., k] -> [tokens, k]."""
    return t.reshape(-1, t.shape[-1])


# ---- x·wᵀ in w's dtype, keeping x narrow; dropout on x ------------------------------------------------
def _gemm_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype x enters F.linear(x.to(w.dtype), w) in: w's, or autocast's where autocast casts x.to(w.dtype)
    again and the cast to w's dtype is exact (w fp32, or x's own dtype), so that x may go straight in."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or torch.float64 in (x.dtype, w.dtype) or w.dtype not in (torch.float32, x.dtype):
        return w.dtype
    return torch.get_autocast_dtype(device)


class _WidenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, p: float):
        ctx.autocast = _autocast_state(x)
        ctx.x_dtype = x.dtype
        # x goes into the GEMM in w's dtype, or straight in autocast's (the same numbers as through w's:
        # the casts up and back are exact); the backward keeps x itself, or with dropout the dropped x in x's
        # dtype, under autocast in autocast's (the GEMM's input: no fp32 copy kept, none cast back)
        gemm_dtype = _gemm_dtype(x, w)
        positions = None
        if p:  # the dropped input is what the backward keeps, as nn.Dropout + linear would
            x, positions = drop(x, p, dtype=None if gemm_dtype == w.dtype else gemm_dtype)
        ctx.p = p
        ctx.save_for_backward(x, w, positions)
        return F.linear(x.to(gemm_dtype), w)

    @staticmethod
    def backward(ctx, grad_u):
        x, w, positions = ctx.saved_tensors
        if ctx.p and torch.is_grad_enabled():  # create_graph: grad_w's dependence on x is not in the graph
            raise RuntimeError("widen_linear(x, w, p > 0) has no double backward (the dropped x it keeps is not x's "
                               "function in the graph): use dropout(x, p) and widen_linear(xd, w) for that")
        grad_x = grad_w = None
        with _autocast(ctx.autocast):
            if ctx.needs_input_grad[0]:
                if ctx.p:  # dropout's scale rides in the [r, in] factor; its zeros are written in place
                    grad_x = (grad_u @ (w * (1.0 / (1.0 - ctx.p))).to(grad_u.dtype)).to(ctx.x_dtype)
                    grad_x = dropped_grad(grad_x, positions, ctx.p, scaled=True)
                else:
                    grad_x = (grad_u @ w.to(grad_u.dtype)).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (_rows(grad_u).T @ _rows(x).to(grad_u.dtype)).to(w.dtype)
        return grad_x, grad_w, None


def widen_linear(x: torch.Tensor, w: torch.Tensor, p: float = 0.0) -> torch.Tensor:
    """dropout(x, p)·wᵀ in w's dtype (autocast permitting); the backward keeps x, or the dropped x in x's dtype
    (under autocast in autocast's, the dtype the GEMM reads it in).

    p: inverted dropout on x first (training), its mask from adapters/dropout.py on the CPU (F.dropout
    elsewhere); its backward shares this one's [tokens, in] gradient instead of a pass of its own."""
    if geometric_path(x, p):
        return _WidenLinear.apply(x, w, p)
    if p:
        x = F.dropout(x, p)
    if x.dtype == w.dtype:
        return F.linear(x, w)
    return _WidenLinear.apply(x, w, 0.0)


# ---- the up-projection ------------------------------------------------------------------------------------
def add_low_rank(acc: torch.Tensor, u: torch.Tensor, up: torch.Tensor, alpha: float = 1.0, *, inplace: bool = False):
    """acc + alpha · u·upᵀ ([..., out]) in acc's dtype: one fused addmm, or under autocast a GEMM in
    autocast's dtype whose result is added in acc's dtype (autocast would round acc and the sum too; a
    16-bit acc is summed in fp32 and rounded once, as every 16-bit add on the CPU and GPU is).

    inplace: into `acc` (a contiguous temporary of the caller), which is returned.
    """
    acc2d, u2d = _rows(acc), _rows(u)
    if torch.is_autocast_enabled(acc.device.type):
        delta = F.linear(u2d, up)
        out = acc2d.add_(delta, alpha=alpha) if inplace else torch.add(acc2d, delta, alpha=alpha)
    elif inplace:
        out = acc2d.addmm_(u2d.to(acc.dtype), up.T.to(acc.dtype), alpha=alpha)
    else:
        out = torch.addmm(acc2d, u2d.to(acc.dtype), up.T.to(acc.dtype), alpha=alpha)
    return acc if inplace else out.view(acc.shape)


def one_pass_add(acc: torch.Tensor, u: torch.Tensor, up: torch.Tensor, alpha: float) -> bool:
    """Whether add_low_rank(acc, u, up, alpha) may add into a 16-bit `acc` as it is, with the numbers of the
    sum in an fp32 copy of acc rounded back: under autocast, where the GEMM's result has acc's dtype (inputs
    that autocast casts: not float64) and alpha is a power of two >= 1. A 16-bit add computes a + alpha·b
    in fp32 and rounds once only in its vectorised loop; its scalar loop (the elements past the last full
    vector of a thread's share) rounds alpha·b to 16 bits first, exact only for such an alpha (barring
    overflow past the dtype's largest number, where the sum is not finite anyway)."""
    device = acc.device.type
    if not torch.is_autocast_enabled(device) or acc.dtype != torch.get_autocast_dtype(device):
        return False
    return torch.float64 not in (u.dtype, up.dtype) and alpha >= 1 and math.frexp(alpha)[0] == 0.5


# ---- the magnitude -----------------------------------------------------------------------------------------
def _column_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_t a ⊙ b over tokens, [out], the products formed in fp32 (`a` is fp32 or wider; `b` is promoted as it is read)."""
    return torch.mul(_rows(a), _rows(b)).sum(dim=0)


def scaled_up(b: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """diag(g)·scale·B [out, r]: the up-projection of the rescaled low-rank term."""
    return b * (g * scale)[:, None]


def _rescaled(base_out, w0x, u, up, g, bias) -> torch.Tensor:
    """The rescale's value (the forward of _Rescale, and the whole of it without gradients); up = scaled_up(...).

    Mixed-dtype products and sums promote a 16-bit operand to fp32 as they read it: the numbers of an fp32
    copy, without the copy's pass over [tokens, out]. The [out] factors are made fp32 (or wider) first, so
    that a 16-bit g (parameters cast by FSDP / DeepSpeed) never makes the sum 16-bit."""
    wide = torch.promote_types(torch.promote_types(base_out.dtype, g.dtype), torch.float32)
    if w0x is not None:  # delta mode: out + (g − 1)·w0x + ...
        acc = torch.mul(w0x, (g - 1).to(wide))
    else:  # out + (g − 1)·(out − bias) + ... = g·out + (1 − g)·bias + ...: one pass less
        acc = torch.mul(base_out, g.to(wide))
        if bias is not None:
            acc += _wide(bias) * (1 - g)
    acc = acc.contiguous()  # our own temporary, returned as the output: no view
    if u is not None:  # g ⊙ s·u·Bᵀ = u·(diag(g)·s·B)ᵀ
        add_low_rank(acc, u, up, inplace=True)
    if w0x is not None:
        acc += base_out
    return acc.to(base_out.dtype)


class _Rescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, w0x, u, b, g, bias, scale: float, keep_output: bool):
        y = _rescaled(base_out, w0x, u, None if u is None else scaled_up(b, g, scale), g, bias)
        ctx.autocast = _autocast_state(base_out)
        ctx.scale, ctx.keep_output, ctx.delta_mode = scale, keep_output, w0x is not None
        kept = torch._lazy_clone(y) if keep_output else (w0x if w0x is not None else base_out)
        ctx.save_for_backward(kept, u, b, g, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        kept, u, b, g, bias = ctx.saved_tensors
        need_base, need_w0x, need_u, need_b, need_g, need_bias = ctx.needs_input_grad[:6]
        s = ctx.scale
        # fp32 (wider) products of the 16-bit grad_y, promoted as they are read; grad_y itself feeds the
        # GEMMs that run in its dtype (its fp32 copy would be rounded back to the same numbers).
        gy = _wide(grad_y) if need_g or need_bias else grad_y
        gy_g = torch.mul(grad_y, g)
        grad_base = grad_w0x = grad_u = grad_b = grad_g = grad_bias = None
        if need_base:
            grad_base = grad_y if ctx.delta_mode else gy_g.to(grad_y.dtype)
        if need_w0x:
            grad_w0x = torch.mul(grad_y, g - 1).to(kept.dtype)
        if need_bias:  # y = g·(base_out − bias + ...) + bias: the bias itself is not scaled
            grad_bias = (_rows(gy).sum(dim=0) * (1 - g)).to(bias.dtype)

        gy_u = None  # grad_yᵀ·u [out, r], fp32
        if u is not None and (need_b or (need_g and not ctx.keep_output)):
            with _autocast(ctx.autocast):
                gy_u = _wide(_rows(grad_y).T.to(u.dtype) @ _rows(u))
        if need_u:
            with _autocast(ctx.autocast):
                # grad_y ⊙ g in u's dtype: grad_base when it is that already (the same rounding)
                same = grad_base is not None and not ctx.delta_mode and grad_base.dtype == u.dtype
                grad_u = ((grad_base if same else gy_g.to(u.dtype)) @ (b * s).to(u.dtype)).to(u.dtype)
        if need_b:
            grad_b = (gy_u * (g * s)[:, None]).to(b.dtype)
        if need_g:
            if ctx.keep_output:  # z = y / g (no bias; every |g| >= G_MIN)
                grad_g = _column_dot(gy, kept) / g
            else:
                z0 = kept if ctx.delta_mode or bias is None else _wide(kept) - _wide(bias)
                grad_g = _column_dot(gy, z0)
                if gy_u is not None:
                    grad_g = grad_g + s * (_wide(b) * gy_u).sum(dim=1)
        return grad_base, grad_w0x, grad_u, grad_b, grad_g, grad_bias, None, None


def rescale(
    base_out: torch.Tensor,
    g: torch.Tensor,
    *,
    w0x: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    keep_output: bool = False,
    up: torch.Tensor | None = None,
) -> torch.Tensor:
    """base_out + (g − 1) ⊙ w0x + g ⊙ scale·u·bᵀ, with w0x = base_out − bias unless given (see the module).

    keep_output: the backward recovers z from the output (only valid without bias and w0x, |g| >= G_MIN).
    up: scaled_up(b, g, scale) when the caller has it (inference, cached with g).
    """
    if not torch.is_grad_enabled():  # inference: the same arithmetic without the autograd node
        if up is None and u is not None:
            up = scaled_up(b, g, scale)
        return _rescaled(base_out, w0x, u, up, g, bias)
    return _Rescale.apply(base_out, w0x, u, b, g, bias, scale, keep_output)
