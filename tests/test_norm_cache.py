"""The inference-mode norm cache: with gradients off, g = m / ‖W0 + ΔW‖ is computed once per layer and reused
until the layer's state changes (adapters/layers.py).

Two properties, over dtypes x bases x methods and over every event that changes a layer:
- the cached forward equals the uncached one (gradients on: no cache) bit for bit;
- after an event, the next forward recomputes the norm of every layer (and then reuses it), and equals a
  forward of a fresh model holding the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_cases import BASES, DTYPES, adapted, base_model, perturb

from dora_cli.adapters import (
    AdapterConfig,
    adapted_modules,
    apply_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from dora_cli.adapters.layers import AdaptedLinear

MAGNITUDE_METHODS = ("dora", "dvora", "magnitude")
TOKENS = torch.arange(3, 40).reshape(1, -1) % 97


@pytest.fixture
def norm_calls(monkeypatch):
    """How many times AdaptedLinear.weight_norm ran (a list, reset by the test)."""
    calls = []
    real = AdaptedLinear.weight_norm

    def counted(self):
        calls.append(self)
        return real(self)

    monkeypatch.setattr(AdaptedLinear, "weight_norm", counted)
    return calls


def logits(model, *, grad: bool = False) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model(TOKENS).logits.detach().clone()


def n_layers(model) -> int:
    return sum(1 for _ in adapted_modules(model))


@pytest.mark.parametrize("method", MAGNITUDE_METHODS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cached_forward_is_the_uncached_one_bit_for_bit(dtype, base, method, norm_calls):
    if base != "plain" and dtype == "fp16" and base == "int8":
        pytest.skip("int8 bases compute in fp16 only on CUDA")
    _, model, _ = adapted("llama", DTYPES[dtype], base, method)
    model.eval()
    uncached = logits(model, grad=True)
    norm_calls.clear()
    first = logits(model)
    assert len(norm_calls) == n_layers(model)  # computed once per layer ...
    second = logits(model)
    assert len(norm_calls) == n_layers(model)  # ... and reused
    with torch.inference_mode():
        third = model(TOKENS).logits.clone()
    assert len(norm_calls) == n_layers(model)
    for out in (first, second, third):
        assert torch.equal(out, uncached)


def _optimizer_step(model, fused: bool):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=fused, foreach=False if fused else None)
    model(TOKENS, labels=TOKENS).loss.backward()
    opt.step()
    model.eval()


def _optimizer_step_staying_in_eval(model, fused: bool):
    """A step with the model left in eval mode: only the parameters' versions / the step counter tell."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=fused, foreach=False if fused else None)
    model(TOKENS, labels=TOKENS).loss.backward()
    opt.step()


def _edit(name: str):
    @torch.no_grad()
    def edit(model):
        for _, layer in adapted_modules(model):
            if hasattr(layer, name):
                getattr(layer, name).mul_(1.5)
    return edit


@torch.no_grad()
def _replace_magnitude(model):
    for _, layer in adapted_modules(model):
        layer.magnitude.data = layer.magnitude.data * 0.5


def _load_other_state(model):
    """Another adapter's weights loaded into the live model (as a resume or a state-dict load does)."""
    other = copy.deepcopy(model)
    perturb(other, seed=7)
    model.load_state_dict(other.state_dict())


EVENTS = {
    "adamw-step": lambda model: _optimizer_step(model, fused=False),
    "fused-adamw-step": lambda model: _optimizer_step(model, fused=True),
    "fused-step-in-eval-mode": lambda model: _optimizer_step_staying_in_eval(model, fused=True),
    "edit-magnitude": _edit("magnitude"),
    "edit-lora_A": _edit("lora_A"),
    "edit-lora_B": _edit("lora_B"),
    "edit-vera_lambda_b": _edit("vera_lambda_b"),
    "edit-vera_lambda_d": _edit("vera_lambda_d"),
    "replace-magnitude": _replace_magnitude,
    "load_state_dict": _load_other_state,
    "merge-unmerge": lambda model: (merge_adapters(model), unmerge_adapters(model)),
    "train-eval": lambda model: (model.train(), model.eval()),
}


@pytest.mark.parametrize("method", ("dora", "dvora"))
@pytest.mark.parametrize("event", EVENTS)
def test_after_each_event_the_next_forward_uses_the_new_weights(event, method, norm_calls, tmp_path):
    if event.startswith("edit-lora") and method == "dvora" or event.startswith("edit-vera") and method == "dora":
        pytest.skip("the method has no such tensor")
    change = EVENTS[event]
    _, model, cfg = adapted("llama", torch.float32, "plain", method)
    model.eval()
    before = logits(model)  # fills the cache
    change(model)
    norm_calls.clear()
    after = logits(model)
    assert len(norm_calls) == n_layers(model), "the norm was not recomputed after the event"
    assert torch.equal(after, logits(model, grad=True))

    # A fresh model holding the same adapter weights computes the same logits.
    save_adapter(model, cfg, tmp_path / "now")
    fresh = base_model("llama", torch.float32)
    load_adapter(fresh, tmp_path / "now")
    fresh.eval()
    torch.testing.assert_close(after, logits(fresh), rtol=0, atol=1e-6)
    if event not in ("merge-unmerge", "train-eval"):  # these leave the weights (up to rounding) as they were
        assert not torch.allclose(before, after), "the event changed nothing: the test could not fail"


def test_merged_layers_bypass_the_cache_and_unmerge_recomputes(norm_calls):
    _, model, _ = adapted("llama", torch.float32, "plain", "dora")
    model.eval()
    unmerged = logits(model)
    merge_adapters(model)
    norm_calls.clear()
    merged = logits(model)
    assert norm_calls == []
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    unmerge_adapters(model)
    again = logits(model)
    assert len(norm_calls) == n_layers(model)
    assert torch.equal(again, logits(model, grad=True))


def test_training_forwards_never_use_the_cache(norm_calls):
    _, model, _ = adapted("llama", torch.float32, "plain", "dora")
    model.eval()
    logits(model)
    model.train()
    norm_calls.clear()
    for _ in range(2):
        model(TOKENS, labels=TOKENS).loss.backward()
    assert len(norm_calls) == 2 * n_layers(model)  # the norm follows every training forward
    assert all(not layer._g_cache for _, layer in adapted_modules(model))


def test_the_cache_holds_g_only():
    _, model, _ = adapted("llama", torch.float32, "plain", "dora")
    model.eval()
    logits(model)
    for _, layer in adapted_modules(model):
        _, _, g, up, _ = layer._g_cache
        assert g.shape == (layer.base_layer.out_features,)  # O(out · (r + 1)) per layer, not a weight
        assert up.shape == layer.lora_B.shape


@pytest.mark.parametrize("dropout_mode", ("fast", "delta"))
def test_no_grad_in_training_mode_keeps_the_dropout_semantics(dropout_mode):
    cfg = AdapterConfig(method="dora", r=4, alpha=8, dropout=0.5, dropout_mode=dropout_mode,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    model = base_model("llama", torch.float32)
    apply_adapters(model, cfg)
    perturb(model)
    model.train()
    outs = []
    for grad in (True, False, False):
        torch.manual_seed(3)
        outs.append(logits(model, grad=grad))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ---- state changes the versions do not show --------------------------------------------------------------------
@torch.no_grad()
def _replace_every_tensor_twice(model):
    """`.data` replaced twice: the second tensor may land at the address the first replacement freed, with the
    parameter's own version counter untouched (set_data keeps it): an address and a version cannot tell."""
    for _ in range(2):
        for _, layer in adapted_modules(model):
            for p in layer.parameters(recurse=False):
                p.data = p.data * 0.75


def _half_and_back(model):
    """A dtype round trip (as `model.half()` to save memory, then `.float()`): every tensor replaced twice."""
    model.half()
    model.float()


def _rescale_updates(model):
    for _, layer in adapted_modules(model):
        layer.scaling *= 3


@torch.no_grad()
def _same_address_new_storage(model):
    """What an allocator handing a freed address back does, made certain: each tensor's `.data` becomes a new
    storage over the very memory of the old one, whose values were changed behind torch's back."""
    for _, layer in adapted_modules(model):
        for p in layer.parameters(recurse=False):
            if not hasattr(p, "_dora_buffer"):  # first time: move the tensor onto a numpy buffer we own
                p._dora_buffer = p.detach().numpy().copy()
                p.data = torch.from_numpy(p._dora_buffer)
                continue
            p._dora_buffer *= 0.75
            p.data = torch.from_numpy(p._dora_buffer)


REPLACEMENTS = {"replace-twice": _replace_every_tensor_twice, "half-then-float": _half_and_back,
                "same-address": _same_address_new_storage, "scaling": _rescale_updates}


@pytest.mark.parametrize("method", MAGNITUDE_METHODS)
@pytest.mark.parametrize("event", REPLACEMENTS)
def test_replaced_tensors_and_a_new_scaling_are_seen(event, method):
    """After each change, the cached forward equals the uncached one (repeated: the allocator gets every chance
    to hand a freed address back)."""
    if event == "scaling" and method != "dora":
        pytest.skip("only LoRA's update has a scaling")
    _, model, _ = adapted("llama", torch.float32, "plain", method)
    model.eval()
    REPLACEMENTS[event](model)
    for _ in range(4):
        before = logits(model)
        REPLACEMENTS[event](model)
        after = logits(model)
        assert torch.equal(after, logits(model, grad=True))
        if event != "half-then-float":
            assert not torch.equal(before, after), "the change changed nothing: the test could not fail"


def test_a_model_built_under_inference_mode_runs_and_computes_the_same():
    """Inference tensors have no version counter: such a layer is not cached, and its forward is unchanged."""
    _, model, _ = adapted("llama", torch.float32, "plain", "dora")
    model.eval()
    want = logits(model)
    with torch.inference_mode():
        _, built, _ = adapted("llama", torch.float32, "plain", "dora")
        built.eval()
        first = built(TOKENS).logits.clone()
        for _, layer in adapted_modules(built):
            layer.magnitude.mul_(2)  # an in-place edit no version counter records
        second = built(TOKENS).logits.clone()
    assert torch.equal(first, want)
    for _, layer in adapted_modules(model):
        layer.magnitude.data.mul_(2)
    assert torch.equal(second, logits(model, grad=True))


@pytest.mark.parametrize("method", ("dora", "dvora"))
def test_cached_forwards_do_not_rebuild_the_factors(method, monkeypatch):
    """With g cached, a forward costs the low-rank product and one [out] multiply: B·diag(g) and A are kept with g
    (DVoRA's factors are a product of λ_b, B_s and λ_d: [out, r] work per layer and forward otherwise)."""
    _, model, _ = adapted("llama", torch.float32, "plain", method)
    model.eval()
    want = logits(model, grad=True)
    calls = []
    real = AdaptedLinear.factors
    monkeypatch.setattr(AdaptedLinear, "factors", lambda self: calls.append(self) or real(self))
    assert torch.equal(logits(model), want)
    calls.clear()
    assert torch.equal(logits(model), want)
    assert calls == []


def test_a_model_with_filled_caches_copies_and_pickles(tmp_path):
    """The caches hold weak references to this model's storages: a deep copy or a pickle leaves them behind
    (a copied weak reference would be released twice), and the copy computes the same."""
    _, model, _ = adapted("llama", torch.float32, "plain", "dora")
    model.eval()
    want = logits(model)
    copies = [copy.deepcopy(model) for _ in range(3)]
    torch.save(model, tmp_path / "m.pt")
    copies.append(torch.load(tmp_path / "m.pt", weights_only=False))
    for other in copies:
        assert all(not layer._g_cache for _, layer in adapted_modules(other))
        assert torch.equal(logits(other), want)
    del copies
    assert torch.equal(logits(model), want)
