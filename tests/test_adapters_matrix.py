"""The production matrix on whole tiny models: LLaMA (with and without biases) and Qwen2 shapes x fp32 / bf16 /
fp16 x nn.Linear / nf4 / fp4 / int8 bases x LoRA / DoRA / DVoRA / magnitude-only.

- step 0: the adapted model's logits are the base model's, bit for bit (also under autocast);
- gradients: finite, within a few epsilons of the float64 reference (adapter_cases.reference), with and
  without autocast, with and without loss scaling; where PEFT has the method, within NOISE of PEFT's
  error (through a whole network both carry the base model's rounding, realised in a different order:
  the layer-level comparison in test_adapters_precision.py is the strict one);
- merge -> forward, unmerge -> forward, merged_state_dict -> strict load into a plain model -> forward,
  unwrap -> forward: logits within `merge_tolerance` of the adapter model's (README, "Exactness"), every
  layer left in the model's dtype, no quantized layer left.
"""

from __future__ import annotations

import pytest
import torch
from adapter_cases import (
    ARCHS,
    BASES,
    DTYPES,
    EPS,
    METHODS,
    adapted,
    adapter_config,
    base_model,
    layer_dtypes,
    own_grads,
    peft_grads,
    peft_twin,
    reference,
    rel_error_by_kind,
    tiny,
)

from dora_cli.adapters import (
    AdaptedLinear,
    apply_adapters,
    merge_adapters,
    merged_state_dict,
    unmerge_adapters,
    unwrap,
)
from dora_cli.adapters.base_ops import base_kind

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
NOISE = 1.5
CASES = [(a, d, b, m) for a in ARCHS for d in DTYPES for b in BASES for m in METHODS]


def case_id(case) -> str:
    return "-".join(case)


def needs_bnb(base: str) -> None:
    if base != "plain":
        pytest.importorskip("bitsandbytes")


def modes(dtype: torch.dtype) -> list[tuple[torch.dtype | None, float]]:
    """(autocast dtype, loss scale) pairs that apply to a model of `dtype`."""
    if dtype == torch.float32:
        return [(None, 1.0), (torch.bfloat16, 1.0), (torch.float16, 1.0)]
    if dtype == torch.float16:
        return [(None, 1.0), (None, 1024.0)]
    return [(None, 1.0)]


def gradients(model, autocast, scale: float, read=own_grads) -> dict[str, torch.Tensor]:
    """The gradients (`read` from the model, unscaled) of one training step's loss."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = model(IDS, labels=IDS).loss
    (loss.float() * scale).backward()
    return {n: g.double() / scale for n, g in read(model).items()}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_step_zero_is_the_base_model_bit_for_bit(case):
    arch, dt, base, method = case
    needs_bnb(base)
    dtype = DTYPES[dt]
    for autocast in [None, torch.bfloat16] if dtype == torch.float32 else [None]:
        # a fresh base each time: bitsandbytes casts its bias to the dtype it last computed in
        model = base_model(arch, dtype, base).train()  # train mode: an int8 base computes differently in it
        with torch.no_grad():
            want = _logits(model, autocast)
            apply_adapters(model, adapter_config(method))
            assert torch.equal(_logits(model, autocast), want), f"autocast {autocast}"


def _logits(model, autocast=None):
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return model(IDS).logits


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_against_float64_and_peft(case):
    arch, dt, base, method = case
    needs_bnb(base)
    dtype = DTYPES[dt]
    plain, model, cfg = adapted(arch, dtype, base, method)
    ref = reference(arch, plain, model)
    ref(IDS, labels=IDS).loss.backward()
    exact = own_grads(ref)
    twin = peft_twin(model, cfg, base_model(arch, dtype, base)) if method in ("lora", "dora") and base != "int8" else None
    for autocast, scale in modes(dtype):
        ours = gradients(model, autocast, scale)
        assert all(torch.isfinite(g).all() for g in ours.values())
        errors = rel_error_by_kind(ours, exact)
        bound = max(4 * EPS[autocast or dtype], 1e-5)
        assert max(errors.values()) <= bound, (autocast, scale, errors)
        if twin is not None:
            theirs = rel_error_by_kind(gradients(twin, autocast, scale, read=peft_grads), exact)
            for kind, err in errors.items():
                assert err <= max(NOISE * theirs[kind], 1e-6), (autocast, scale, kind, err, theirs[kind])


def merge_tolerance(dtype: torch.dtype, base: str) -> float:
    """Max |merged − adapter| logit difference, relative to max(1, max |logit|): two roundings of the dtype
    (fp32: a few more, 2e-6), and for an int8 base its own per-token int8 quantization of the input, which
    the dense merged layer no longer does (2^-4)."""
    return 2.0**-4 if base == "int8" else max(2 * EPS[dtype], 2e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_merge_unwrap_and_merged_state_dict_reproduce_the_adapter_model(case):
    arch, dt, base, method = case
    needs_bnb(base)
    dtype = DTYPES[dt]
    _, model, _ = adapted(arch, dtype, base, method)
    model.eval()
    with torch.no_grad():
        want = model(IDS).logits.float()
        tol = merge_tolerance(dtype, base) * max(1.0, want.abs().max().item())

        def close(logits) -> float:
            diff = (logits.float() - want).abs().max().item()
            assert diff <= tol, f"{diff:.2e} > {tol:.2e}"
            return diff

        merge_adapters(model)
        close(model(IDS).logits)
        unmerge_adapters(model)
        close(model(IDS).logits)

        plain = tiny(arch).to(dtype)
        plain.load_state_dict(merged_state_dict(model), strict=True)
        close(plain(IDS).logits)

        unwrap(model)
        assert not any(isinstance(m, AdaptedLinear) or base_kind(m) in ("4bit", "8bit") for m in model.modules())
        assert layer_dtypes(model) == {dtype}
        close(model(IDS).logits)
