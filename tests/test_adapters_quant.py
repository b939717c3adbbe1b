"""QLoRA / QDoRA: adapters on bitsandbytes 4-bit (nf4, fp4, double quantization) and 8-bit bases, on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from dora_cli.adapters import (
    AdapterConfig,
    adapted_modules,
    apply_adapters,
    load_adapter,
    merge_adapters,
    merged_state_dict,
    save_adapter,
    unmerge_adapters,
    unwrap,
)
from dora_cli.adapters.base_ops import dequantized_weight, prepare_base
from dora_cli.errors import UserError

bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(path)
    return path


def quantized(path, mode="nf4"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, dtype=torch.float32).eval()
    for module in model.modules():
        prepare_base(module)
    return model


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
@pytest.mark.parametrize("method", ["dora", "lora", "dvora"])
def test_step_zero_equals_the_quantized_base(tiny_dir, mode, method):
    model = quantized(tiny_dir, mode)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.nested
    with torch.no_grad():
        ref = model(IDS).logits
    apply_adapters(model, AdapterConfig(method=method, r=4 if method != "dvora" else 32, target_modules=TARGETS))
    with torch.no_grad():
        assert (model(IDS).logits - ref).abs().max().item() <= 1e-6
    # the magnitude starts at the norm of the dequantized weight
    q = model.model.layers[0].self_attn.q_proj
    if method != "lora":
        assert torch.allclose(q.magnitude, dequantized_weight(q.base_layer, torch.float32).norm(dim=1), atol=1e-5)


def test_qdora_gradients_reach_every_layer(tiny_dir):
    model = quantized(tiny_dir)
    apply_adapters(model, AdapterConfig(method="dora", r=4, target_modules=TARGETS))
    model.train()
    for _, layer in adapted_modules(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    model(IDS, labels=IDS).loss.backward()
    first = model.model.layers[0].self_attn.q_proj  # its gradient crosses every 4-bit layer above
    for p in (first.lora_A, first.lora_B, first.magnitude):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_qdora_merge_dequantizes_and_matches(tiny_dir):
    model = quantized(tiny_dir)
    apply_adapters(model, AdapterConfig(method="dora", r=4, target_modules=TARGETS))
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            layer.lora_B.normal_(0, 0.05)
            layer.magnitude.mul_(1.05)
        before = model(IDS).logits
        merge_adapters(model)
        assert (model(IDS).logits - before).abs().max().item() <= 1e-4
        unmerge_adapters(model)
        assert (model(IDS).logits - before).abs().max().item() <= 1e-6
        unwrap(model)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        assert (model(IDS).logits - before).abs().max().item() <= 1e-4


def test_adapter_trained_on_4bit_round_trips(tiny_dir, tmp_path):
    model = quantized(tiny_dir)
    cfg = AdapterConfig(method="dora", r=4, target_modules=TARGETS)
    apply_adapters(model, cfg)
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            layer.lora_B.normal_(0, 0.05)
        ref = model(IDS).logits
    save_adapter(model, cfg, tmp_path)
    again = quantized(tiny_dir)
    load_adapter(again, tmp_path)
    with torch.no_grad():
        assert (again(IDS).logits - ref).abs().max().item() == 0


def test_8bit_base(tiny_dir):
    model = quantized(tiny_dir, "int8")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    with torch.no_grad():
        ref = model(IDS).logits
    apply_adapters(model, AdapterConfig(method="dora", r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        assert (model(IDS).logits - ref).abs().max().item() <= 1e-6
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert model.model.layers[1].self_attn.v_proj.lora_B.grad.abs().sum() > 0


def test_full_fine_tuning_of_a_quantized_base_is_refused(tiny_dir):
    with pytest.raises(UserError, match="cannot train a quantized base"):
        apply_adapters(quantized(tiny_dir), AdapterConfig(method="full"))


@pytest.mark.parametrize(
    ("mode", "compute"), [("nf4", torch.bfloat16), ("fp4", torch.float32), ("int8", None)],
    ids=["nf4-bf16-compute", "fp4-fp32-compute", "int8"],
)
def test_a_transformers_quantized_model_merges_unwraps_and_gives_a_plain_state_dict(tiny_dir, mode, compute):
    """The recipe's default (an fp32 model, bf16 4-bit compute) and 8-bit: merge in place and unwrap work, the
    unwrapped model is fp32 throughout and forgets its quantization, the merged state dict loads strictly."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=qcfg, dtype=torch.float32).eval()
    apply_adapters(model, AdapterConfig(method="dora", r=4, target_modules=TARGETS))
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            layer.lora_B.normal_(0, 0.05)
        want = model(IDS).logits
        # README's merge tolerance: 2 epsilons of the 4-bit compute dtype; int8 rounds its input to int8
        rel = 2.0**-4 if mode == "int8" else max(2 * torch.finfo(compute).eps, 2e-6)
        tol = rel * max(1.0, want.abs().max().item())
        merge_adapters(model)
        assert (model(IDS).logits - want).abs().max() <= tol
        unmerge_adapters(model)
        state = merged_state_dict(model)
        plain = tiny_llama()
        plain.load_state_dict(state, strict=True)
        assert (plain(IDS).logits - want).abs().max() <= tol
        unwrap(model)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
        assert (model(IDS).logits - want).abs().max() <= tol
