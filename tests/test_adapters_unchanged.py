"""The pass-saving changes of issue 22 (functional.py's rescale, Direction.add_delta under autocast) against
the code they replaced (functional_260d390.py): the same output and the same gradients, bit for bit, for
every activation dtype x adapter dtype x autocast x bias x dropout mode x rescale form, with and without
gradients. A faster path that changes a number is not faster."""

from __future__ import annotations

import itertools
import types

import functional_260d390 as before
import pytest
import torch

from dora_cli.adapters import functional
from dora_cli.adapters.variants import LowRank

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
AUTOCAST = (None, torch.bfloat16, torch.float16)
TOKENS, D_IN, D_OUT, R = (2, 5), 8, 6, 3


def _name(x) -> str:
    return "none" if x is None else str(x).removeprefix("torch.")


def _same(got: list, want: list, where: str) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), (where, i)
        if g is not None:
            assert g.dtype == w.dtype and torch.equal(g, w), (where, i, g.dtype, w.dtype,
                                                              (g.double() - w.double()).abs().max().item())


def _run(fn, inputs: list, autocast, grad: bool) -> list:
    """fn(*inputs) under the autocast, then its backward with a fixed upstream gradient: [y, grads...]."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(grad) for t in inputs]
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None), torch.set_grad_enabled(grad):
        y = fn(*leaves)
    out = [y.detach()]
    if grad:
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
        y.backward(upstream)
        out += [None if t is None else t.grad for t in leaves]
    return out


FORMS = ("fast", "fast-bias", "delta", "keep-output", "magnitude-only")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("autocast", AUTOCAST, ids=_name)
@pytest.mark.parametrize("act, adapter", list(itertools.product(DTYPES, DTYPES)), ids=lambda d: _name(d))
def test_the_rescale_is_the_previous_one_bit_for_bit(act, adapter, autocast, form):
    gen = torch.Generator().manual_seed(1)
    base_out = torch.randn(*TOKENS, D_OUT, generator=gen).to(act)
    w0x = torch.randn(*TOKENS, D_OUT, generator=gen).to(act) if form == "delta" else None
    u = None if form == "magnitude-only" else torch.randn(*TOKENS, R, generator=gen).to(adapter)
    b = torch.randn(D_OUT, R, generator=gen).to(adapter)
    g = (1 + 0.3 * torch.randn(D_OUT, generator=gen)).to(adapter)
    bias = torch.randn(D_OUT, generator=gen).to(act) if form in ("fast-bias", "magnitude-only") else None
    for grad in (True, False):
        results = []
        for module in (before, functional):
            def fn(base_out, w0x, u, b, g, bias, module=module):
                return module.rescale(base_out, g, w0x=w0x, u=u, b=None if u is None else b, scale=0.37, bias=bias,
                                      keep_output=form == "keep-output")
            results.append(_run(fn, [base_out, w0x, u, b, g, bias], autocast, grad))
        _same(results[1], results[0], f"grad={grad}")


@pytest.mark.parametrize("tokens", [TOKENS, (3, 211)], ids=["60", "1266"])  # a vector tail; many vectors
@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0, 0.5, 0.375, 0.37, 16 / 8**0.5], ids=["1", "2", "4", "0.5", "0.375", "0.37", "rslora"])
@pytest.mark.parametrize("autocast", AUTOCAST, ids=_name)
@pytest.mark.parametrize("act, adapter", list(itertools.product(DTYPES, DTYPES)), ids=lambda d: _name(d))
def test_the_low_rank_add_is_the_previous_one_bit_for_bit(act, adapter, autocast, scale, tokens):
    """LoRA's forward: base + scale·(x·Aᵀ)·Bᵀ. Under autocast a 16-bit sum in one pass gives the fp32 sum's
    rounding only where scale·(16-bit number) is exact: a scale rounded to 16 bits, or a product rounded
    before the sum (the add's scalar loop), would change the numbers."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(R, D_IN, generator=gen).to(adapter)
    b = torch.randn(D_OUT, R, generator=gen).to(adapter)
    base = torch.randn(*tokens, D_OUT, generator=gen).to(act)
    xd = torch.randn(*tokens, D_IN, generator=gen).to(act)
    for grad in (True, False):
        def ours(a, b, base, xd):
            return LowRank.add_delta(types.SimpleNamespace(lora_A=a, lora_B=b, scaling=scale), base, xd)

        def theirs(a, b, base, xd):
            return before.add_delta(b, a, scale, base, xd)

        _same(_run(ours, [a, b, base, xd], autocast, grad), _run(theirs, [a, b, base, xd], autocast, grad), f"grad={grad}")


@pytest.mark.parametrize("p", [0.3, 0.7])
@pytest.mark.parametrize("scale", [2.0, 0.37], ids=["2", "0.37"])
@pytest.mark.parametrize("autocast", AUTOCAST, ids=_name)
@pytest.mark.parametrize("act, adapter", list(itertools.product(DTYPES, DTYPES)), ids=lambda d: _name(d))
def test_the_low_rank_add_with_dropout_is_the_previous_dropout_then_add(act, adapter, autocast, scale, p):
    """Dropout folded into the first product (drawn straight into the GEMM's dtype under autocast) against
    dropout.dropout(x, p) then the previous add under the same mask: the same output and the same gradients of
    A, B and base bit for bit; x's gradient up to where dropout's scale is applied (the [r, in] factor)."""
    from dora_cli.adapters.dropout import dropout

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(R, D_IN, generator=gen).to(adapter)
    b = torch.randn(D_OUT, R, generator=gen).to(adapter)
    base = torch.randn(3, 211, D_OUT, generator=gen).to(act)
    x = torch.randn(3, 211, D_IN, generator=gen).to(act)

    def ours(a, b, base, x):
        torch.manual_seed(5)
        return LowRank.add_delta(types.SimpleNamespace(lora_A=a, lora_B=b, scaling=scale), base, x, p)

    def theirs(a, b, base, x):
        torch.manual_seed(5)
        return before.add_delta(b, a, scale, base, dropout(x, p))

    got, want = _run(ours, [a, b, base, x], autocast, True), _run(theirs, [a, b, base, x], autocast, True)
    _same(got[:4], want[:4], "output, grad A, B, base")
    gx, wx = got[4].double(), want[4].double()
    assert got[4].dtype == want[4].dtype and torch.equal(gx == 0, wx == 0)
    tol = max({torch.float64: 1e-12, torch.float32: 1e-5}.get(d, 2e-2) for d in (act, adapter, autocast or act))
    assert torch.allclose(gx, wx, rtol=tol, atol=tol * wx.abs().max().item())


@pytest.mark.parametrize("autocast", AUTOCAST, ids=_name)
@pytest.mark.parametrize("act, adapter", list(itertools.product(DTYPES, DTYPES)), ids=lambda d: _name(d))
def test_widen_linear_without_dropout_keeps_x_itself_and_its_double_backward(act, adapter, autocast):
    """Without dropout the backward keeps what the previous code kept (the caller's x, not a copy in the dtype the
    GEMM reads it in), so x stays in the graph: a create_graph backward gives its d(grad_w)/dx bit for bit."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(5, D_IN, generator=gen).to(act)
    w0 = torch.randn(R, D_IN, generator=gen).to(adapter)
    results, copies = [], []
    for module in (before, functional):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, kept=kept: kept.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                u = module.widen_linear(x, w)
        copies.append(sorted(str(t.dtype) for t in kept if t.shape == x.shape and t.data_ptr() != x.data_ptr()))
        (gw,) = torch.autograd.grad(u.double().pow(2).sum(), w, create_graph=True)
        (gx,) = torch.autograd.grad(gw.sum(), x)
        results.append([u.detach(), gw.detach(), gx])
    assert copies[1] == copies[0]  # [tokens, in] tensors kept besides x itself
    _same(results[1], results[0], "u, grad w, d(sum grad w)/dx")
