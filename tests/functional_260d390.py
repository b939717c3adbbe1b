"""dora_cli/adapters/functional.py as it was at 260d390, before issue 22 saved passes under autocast: the
oracle of test_adapters_unchanged.py (the faster code must give these numbers bit for bit), with the
add of Direction.add_delta of that version (`add_delta`)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

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


# ---- x·wᵀ in w's dtype, keeping x narrow ---------------------------------------------------------------
class _WidenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.autocast = _autocast_state(x)
        ctx.save_for_backward(x, w)
        return F.linear(x.to(w.dtype), w)

    @staticmethod
    def backward(ctx, grad_u):
        x, w = ctx.saved_tensors
        grad_x = grad_w = None
        with _autocast(ctx.autocast):
            if ctx.needs_input_grad[0]:
                grad_x = (grad_u @ w.to(grad_u.dtype)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (_rows(grad_u).T @ _rows(x).to(grad_u.dtype)).to(w.dtype)
        return grad_x, grad_w


def widen_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x·wᵀ in w's dtype (autocast permitting); the backward keeps x as it is."""
    if x.dtype == w.dtype:
        return F.linear(x, w)
    return _WidenLinear.apply(x, w)


# ---- the up-projection ------------------------------------------------------------------------------------
def add_low_rank(acc: torch.Tensor, u: torch.Tensor, up: torch.Tensor, alpha: float = 1.0, *, inplace: bool = False):
    """acc + alpha · u·upᵀ ([..., out]) in acc's dtype: one fused addmm, or under autocast a GEMM in
    autocast's dtype whose result is added in acc's dtype (autocast would round acc and the sum too).

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


# ---- the magnitude -----------------------------------------------------------------------------------------
def _column_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_t a ⊙ b over tokens, [out], the products formed in fp32."""
    return (_wide(_rows(a)) * _wide(_rows(b))).sum(dim=0)


def scaled_up(b: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """diag(g)·scale·B [out, r]: the up-projection of the rescaled low-rank term."""
    return b * (g * scale)[:, None]


def _rescaled(base_out, w0x, u, up, g, bias) -> torch.Tensor:
    """The rescale's value (the forward of _Rescale, and the whole of it without gradients); up = scaled_up(...)."""
    out = _wide(base_out)
    if w0x is not None:  # delta mode: out + (g − 1)·w0x + ...
        acc = _wide(w0x) * (g - 1)
    else:  # out + (g − 1)·(out − bias) + ... = g·out + (1 − g)·bias + ...: one pass less
        acc = out * g
        if bias is not None:
            acc += _wide(bias) * (1 - g)
    acc = acc.contiguous()  # our own temporary, returned as the output: no view
    if u is not None:  # g ⊙ s·u·Bᵀ = u·(diag(g)·s·B)ᵀ
        add_low_rank(acc, u, up, inplace=True)
    if w0x is not None:
        acc += out
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
        gy = _wide(grad_y)
        gy_g = gy * g
        grad_base = grad_w0x = grad_u = grad_b = grad_g = grad_bias = None
        if need_base:
            grad_base = grad_y if ctx.delta_mode else gy_g.to(grad_y.dtype)
        if need_w0x:
            grad_w0x = (gy * (g - 1)).to(kept.dtype)
        if need_bias:  # y = g·(base_out − bias + ...) + bias: the bias itself is not scaled
            grad_bias = (_rows(gy).sum(dim=0) * (1 - g)).to(bias.dtype)

        gy_u = None  # grad_yᵀ·u [out, r], fp32
        if u is not None and (need_b or (need_g and not ctx.keep_output)):
            with _autocast(ctx.autocast):
                gy_u = _wide(_rows(gy).T.to(u.dtype) @ _rows(u))
        if need_u:
            with _autocast(ctx.autocast):
                grad_u = (gy_g.to(u.dtype) @ (b * s).to(u.dtype)).to(u.dtype)
        if need_b:
            grad_b = (gy_u * (g * s)[:, None]).to(b.dtype)
        if need_g:
            if ctx.keep_output:  # z = y / g (no bias; every |g| >= G_MIN)
                grad_g = _column_dot(gy, kept) / g
            else:
                z0 = _wide(kept) if ctx.delta_mode or bias is None else _wide(kept) - _wide(bias)
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


def add_delta(b: torch.Tensor, a: torch.Tensor, scale: float, base: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
    """variants.Direction.add_delta at 260d390: base + scale·(xd·Aᵀ)·Bᵀ, summed in fp32 (or wider), rounded once."""
    acc = base.to(torch.promote_types(base.dtype, b.dtype))
    return add_low_rank(acc, widen_linear(xd, a), b, alpha=scale).to(base.dtype)
