"""adapters/dropout.py: inverted dropout from geometric gaps. The mask's distribution (rates, gaps,
independence, uniform over positions), the values and gradients it gives, its reproducibility, and its
use in the adapted layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dora_cli.adapters import dropout as dropout_module
from dora_cli.adapters.dropout import Dropout, dropout, event_positions

PS = (0.01, 0.05, 0.3, 0.5, 0.51, 0.7, 0.95)


def _mask(n: int, q: float, seed: int) -> torch.Tensor:
    events = torch.zeros(n, dtype=torch.bool)
    events[event_positions(n, q, torch.Generator().manual_seed(seed))] = True
    return events


@pytest.mark.parametrize("q", PS)
def test_events_are_iid_bernoulli(q):
    """The event rate overall and in 8 segments (a wrong join of two batches of gaps shows in one), P(event |
    the previous position was an event) (independence), and the gap distribution P(gap = k), k = 1..4, each
    within 5 standard errors of the Bernoulli(q) process."""
    n = 2_000_000
    events = _mask(n, q, seed=11)

    def near(observed: float, expected: float, count: int, what: str):
        se = math.sqrt(expected * (1 - expected) / count)
        assert abs(observed - expected) <= 5 * se, (what, observed, expected, se)

    near(events.float().mean().item(), q, n, "rate")
    for i, part in enumerate(events.chunk(8)):
        near(part.float().mean().item(), q, part.numel(), f"segment {i}")
    after_event = events[1:][events[:-1]]
    near(after_event.float().mean().item(), q, after_event.numel(), "after an event")
    gaps = torch.diff(events.nonzero().flatten())
    for k in range(1, 5):
        near((gaps == k).float().mean().item(), (1 - q) ** (k - 1) * q, gaps.numel(), f"gap {k}")


@pytest.mark.parametrize("n", [1, 2, 7, 100, 4097])
@pytest.mark.parametrize("q", [0.001, 0.5, 0.999])
def test_positions_are_sorted_distinct_and_in_range(n, q):
    for seed in range(20):
        pos = event_positions(n, q, torch.Generator().manual_seed(seed))
        assert pos.dtype == torch.int64
        assert bool((pos >= 0).all()) and bool((pos < n).all())
        assert bool((torch.diff(pos) > 0).all())


def test_gaps_drawn_one_batch_at_a_time_give_the_same_positions(monkeypatch):
    """The continuation after a batch of gaps that falls short of n (here every batch: one gap) is the same
    process: the same uniforms in the same order give the same positions."""
    want = event_positions(20_000, 0.07, torch.Generator().manual_seed(5))
    monkeypatch.setattr(dropout_module, "_batch", lambda mean: 1)
    got = event_positions(20_000, 0.07, torch.Generator().manual_seed(5))
    assert torch.equal(got, want) and want.numel() > 1000


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_values_and_gradients_are_inverted_dropout_under_its_mask(p, dtype, layout):
    """y = x·s or 0 (s = 1 / (1 − p) applied as F.dropout would under the same mask), and the gradient is the
    upstream gradient under the same mask and scale; the kept set is the one the positions say."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 48, generator=gen).to(dtype)
    if layout == "transposed":
        x = x.T  # a non-contiguous input: the mask applies to its logical (row-major) order
    x.requires_grad_(True)
    torch.manual_seed(9)
    y = dropout(x, p)
    q = p if p <= 0.5 else 1 - p
    events = torch.zeros(x.numel(), dtype=torch.bool)
    events[event_positions(x.numel(), q, torch.Generator().manual_seed(9))] = True
    kept = (~events if p <= 0.5 else events).view(x.shape)
    scale = 1 / (1 - p)
    want = torch.where(kept, x.detach() * scale, torch.zeros((), dtype=dtype))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.detach(), want)
    upstream = torch.randn(x.shape, generator=gen).to(dtype)
    y.backward(upstream)
    assert torch.equal(x.grad, torch.where(kept, upstream * scale, torch.zeros((), dtype=dtype)))


def test_the_backward_is_the_adjoint_in_float64():
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    for p in (0.2, 0.8):
        def f(x, p=p):
            torch.manual_seed(4)  # the same mask in every evaluation of gradcheck
            return dropout(x, p)
        assert torch.autograd.gradcheck(f, (x,))


def test_masks_follow_the_seed():
    x = torch.ones(4096)
    torch.manual_seed(1)
    a = dropout(x, 0.1)
    torch.manual_seed(1)
    b = dropout(x, 0.1)
    torch.manual_seed(2)
    c = dropout(x, 0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_off_in_eval_at_p_zero_and_for_empty_inputs():
    x = torch.randn(3, 5)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    assert dropout(torch.empty(0, 5), 0.3).shape == (0, 5)
    module = Dropout(0.3)
    assert isinstance(module, nn.Dropout) and repr(module) == repr(nn.Dropout(0.3))
    module.eval()
    assert module(x) is x


def test_off_the_cpu_it_is_f_dropout():
    x = torch.randn(16, 16, device="meta")
    assert dropout(x, 0.5).device.type == "meta"  # F.dropout's path: no host read of positions


def test_adapted_layers_use_it_and_drop_only_the_update():
    from dora_cli.adapters.layers import AdaptedLinear

    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(32, 24, bias=False), "lora", r=4, scaling=2.0, dropout=0.4)
    assert isinstance(layer.dropout, Dropout)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 32)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    xd = dropout(x, 0.4)
    want = F.linear(x, layer.base_layer.weight) + 2.0 * F.linear(F.linear(xd, layer.lora_A), layer.lora_B)
    assert torch.allclose(y, want, atol=1e-5)
    assert not torch.allclose(y, F.linear(x, layer.base_layer.weight) + 2.0 * F.linear(F.linear(x, layer.lora_A), layer.lora_B), atol=1e-3)


@pytest.mark.parametrize("p", [0.05, 0.7])
@pytest.mark.parametrize("x_dtype, autocast", [(torch.float32, False), (torch.float64, False), (torch.float32, True),
                                               (torch.bfloat16, True), (torch.bfloat16, False)],
                         ids=["fp32", "fp64", "fp32-autocast", "bf16-autocast", "bf16"])
def test_widen_linear_with_dropout_is_dropout_then_the_product(p, x_dtype, autocast):
    """functional.widen_linear(x, w, p) (dropout folded into the product's autograd node) against dropout(x, p)
    followed by widen_linear(xd, w) under the same mask: the same output bit for bit, and the same gradients up
    to where the scale is applied (to w's [r, in] factor instead of the [tokens, in] gradient)."""
    from dora_cli.adapters.functional import widen_linear

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 40, 24, generator=gen).to(x_dtype)
    w0 = torch.randn(4, 24, generator=gen, dtype=torch.float64 if x_dtype == torch.float64 else torch.float32)
    upstream = torch.randn(3, 40, 4, generator=gen)
    results = []
    for fused in (True, False):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        torch.manual_seed(8)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            u = widen_linear(x, w, p) if fused else widen_linear(dropout(x, p), w)
        u.backward(upstream.to(u.dtype))
        results.append((u.detach(), x.grad, w.grad))
    (u1, gx1, gw1), (u2, gx2, gw2) = results
    assert u1.dtype == u2.dtype and torch.equal(u1, u2)
    assert torch.equal(gw1, gw2)
    assert gx1.dtype == gx2.dtype == x_dtype
    assert torch.equal(gx1 == 0, gx2 == 0)  # the same mask
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[x_dtype if not autocast else torch.bfloat16]
    assert torch.allclose(gx1.double(), gx2.double(), rtol=tol, atol=tol * gx2.double().abs().max().item())


def test_a_dropout_module_put_in_eval_is_off_in_a_training_layer():
    """`layer.dropout.eval()` switches dropout off as calling the module did before it was folded into
    widen_linear (the layer reads p, not the module's output)."""
    from dora_cli.adapters.layers import AdaptedLinear

    for method, mode in (("lora", "fast"), ("dora", "fast"), ("dora", "delta")):
        torch.manual_seed(0)
        layer = AdaptedLinear(nn.Linear(16, 12, bias=False).requires_grad_(False), method, r=4, scaling=2.0, dropout=0.5,
                              dropout_mode=mode)
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(3, 16)
        want = layer.eval()(x)
        layer.train()
        layer.dropout.eval()
        assert torch.allclose(layer(x), want, atol=1e-6), (method, mode)


def test_widen_linear_at_p_one_is_zero_not_a_division_by_zero():
    from dora_cli.adapters.functional import widen_linear

    x, w = torch.randn(4, 6), torch.randn(3, 6, requires_grad=True)
    u = widen_linear(x, w, 1.0)
    assert torch.equal(u, torch.zeros(4, 3))


def test_widen_linear_with_dropout_refuses_a_double_backward_it_would_get_wrong():
    """grad_w = grad_uᵀ·drop(x) is built from the dropped x the forward keeps, not from x in the graph:
    a create_graph backward would leave out d(grad_w)/dx silently; it raises instead."""
    from dora_cli.adapters.functional import widen_linear

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    u = widen_linear(x, w, 0.3)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(u.sum(), w, create_graph=True)
    u = widen_linear(x, w, 0.3)
    (gw,) = torch.autograd.grad(u.sum(), w)  # a first-order backward is unchanged
    assert gw.shape == w.shape


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_under_autocast_the_dropped_input_is_kept_in_the_gemms_dtype(x_dtype, autocast):
    """With dropout under autocast the backward keeps the dropped x as the GEMM reads it, in autocast's dtype:
    no [tokens, in] copy in fp32 (nor in x's dtype when that differs) is kept besides it."""
    from dora_cli.adapters.functional import widen_linear

    x = torch.randn(4, 50, 24).to(x_dtype).requires_grad_(True)
    w = torch.randn(3, 24, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=autocast):
            u = widen_linear(x, w, 0.1)
    inputs = [t for t in kept if t.shape == x.shape]
    assert [t.dtype for t in inputs] == [autocast]
    u.float().sum().backward()
    assert x.grad.dtype == x_dtype
