"""The magnitude path where it used to break: in-place operations downstream, collapsed magnitudes, outputs near
the fp16 range, autocast, gradient checkpointing, torch.compile; tied embeddings on merge; PEFT features we lack."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from adapter_cases import RefLinear, adapted, own_grads, rel_error
from conftest import tiny_llama
from torch import nn
from torch.utils.checkpoint import checkpoint

from dora_cli.adapters import (
    AdaptedLinear,
    AdapterConfig,
    UntiedWeightsWarning,
    adapter_state_dict,
    apply_adapters,
    load_adapter,
    merge_adapters,
    merged_state_dict,
    peft_config,
    unwrap,
)
from dora_cli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def dora_layer(dtype=torch.float32, bias=False, d_in=32, d_out=24, seed=0, kind="dora") -> AdaptedLinear:
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
        if bias:
            base.bias.copy_(4 * torch.randn(d_out, generator=gen))
    layer = AdaptedLinear(base.to(dtype).requires_grad_(False), kind, r=4, scaling=2.0)
    with torch.no_grad():
        if hasattr(layer, "lora_B"):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
        layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen))
    return layer.train()


def exact_grads(layer, x, upstream, after=lambda y: y):
    """float64 gradients of sum(after(layer(x)) * upstream) from the textbook formula."""
    ref = RefLinear(layer)
    (after(ref(x.double())) * upstream.double()).sum().backward()
    return {n: p.grad for n, p in ref.named_parameters()}


# ---- in-place operations downstream ------------------------------------------------------------------------
class AddsOneInPlace(nn.Module):
    """A wrapper whose forward modifies the adapted layer's output in place, then keeps it for its own backward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        y.add_(1)
        return y * y


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_in_place_operation_after_the_layer_keeps_the_gradient_right(dtype, bias, checkpointed):
    layer = dora_layer(dtype, bias)
    wrapper = AddsOneInPlace(layer)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    upstream = torch.randn(16, 24, generator=torch.Generator().manual_seed(2))
    out = checkpoint(wrapper, x, use_reentrant=False) if checkpointed else wrapper(x)
    (out.float() * upstream).sum().backward()
    want = exact_grads(layer, x.detach(), upstream, after=lambda y: (y + 1) * (y + 1))
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for name, grad in want.items():
        assert rel_error(getattr(layer, name).grad, grad) <= bound, name


# ---- collapsed magnitudes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 1e-12, 1e-3], ids=["zero", "1e-12", "1e-3"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_collapsed_magnitude_rows_get_the_exact_finite_gradient(dtype, bias, value):
    """The magnitude gradient Σ_t grad_y ⊙ z / n does not depend on m: a row with m = 0 gets the same one."""
    layer = dora_layer(dtype, bias)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    upstream = torch.randn(16, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    layer(x).backward(upstream)  # one step with healthy magnitudes: the layer may keep its output
    layer.zero_grad()
    with torch.no_grad():
        layer.magnitude[:4] = value  # changed in place: the layer must notice
    layer(x).backward(upstream)
    want = exact_grads(layer, x, upstream)
    assert torch.isfinite(layer.magnitude.grad).all()
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert rel_error(layer.magnitude.grad[:4], want["magnitude"][:4]) <= tol
    assert rel_error(layer.magnitude.grad, want["magnitude"]) <= tol
    assert rel_error(layer.lora_A.grad, want["lora_A"]) <= 1e-5


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_an_optimizer_step_that_collapses_a_magnitude_row_is_noticed(impl):
    """The fused AdamW updates parameters without bumping their versions: the layer still re-checks g
    after every optimizer step, so a row the step drives to m = 0 gets the exact gradient next."""
    layer = dora_layer()
    x, upstream = torch.randn(16, 32), torch.randn(16, 24)
    with torch.no_grad():
        layer.magnitude[:4] = 1.0
    layer(x).backward(upstream)  # healthy magnitudes: the layer may keep its output (checked, cached)
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    optimizer = torch.optim.AdamW([layer.magnitude], lr=1.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, **options)
    layer.magnitude.grad = torch.zeros_like(layer.magnitude)
    layer.magnitude.grad[:4] = 1.0  # Adam's first step moves each of these rows by lr: 1 -> 0
    optimizer.step()
    assert torch.equal(layer.magnitude[:4], torch.zeros(4))
    layer.zero_grad()
    layer(x).backward(upstream)
    want = exact_grads(layer, x, upstream)
    assert torch.isfinite(layer.magnitude.grad).all()
    assert rel_error(layer.magnitude.grad[:4], want["magnitude"][:4]) <= 1e-5
    assert rel_error(layer.magnitude.grad, want["magnitude"]) <= 1e-5


def test_a_zero_row_of_w0_trains_without_nan():
    layer = dora_layer()
    with torch.no_grad():
        layer.base_layer.weight[0] = 0
    fresh = AdaptedLinear(layer.base_layer, "dora", r=4, scaling=2.0).train()
    fresh(torch.randn(8, 32)).pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fresh.parameters() if p.requires_grad)


@pytest.mark.parametrize("recover", [True, False], ids=["from-output", "kept-base-output"])
def test_both_ways_of_keeping_z_give_the_exact_gradient(recover):
    layer = dora_layer()
    layer.recover_z_from_output = recover
    x, upstream = torch.randn(16, 32), torch.randn(16, 24)
    layer(x).backward(upstream)
    for name, grad in exact_grads(layer, x, upstream).items():
        assert rel_error(getattr(layer, name).grad, grad) <= 1e-5, name


# ---- fp16 range, autocast ----------------------------------------------------------------------------------
def test_fp16_outputs_near_the_range_give_finite_magnitude_gradients():
    """|grad_y · y| beyond 65504: the products are formed in fp32 before the sum over tokens."""
    layer = dora_layer(torch.float16)
    with torch.no_grad():
        layer.base_layer.weight.mul_(4000)  # outputs of order 1e4
        layer.w0_norm_sq.mul_(4000**2)
        layer.magnitude.mul_(4000)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).half()
    y = layer(x)
    assert y.abs().max() > 8000 and torch.isfinite(y).all()
    upstream = torch.full_like(y, 30.0)  # grad_y · y ~ 3e5 per element
    y.backward(upstream)
    want = exact_grads(layer, x, upstream)
    assert torch.isfinite(layer.magnitude.grad).all()
    assert rel_error(layer.magnitude.grad, want["magnitude"]) <= 4e-3


def test_the_norm_is_fp32_under_autocast():
    layer = dora_layer()
    plain = layer.weight_norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = layer.weight_norm()
    assert under.dtype == torch.float32 and torch.equal(under, plain)


# ---- gradient checkpointing, torch.compile ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradient_checkpointing_gives_the_same_gradients(arch, dtype):
    from dora_cli.models import enable_gradient_checkpointing

    grads = []
    for checkpointed in (False, True):
        _, model, _ = adapted(arch, dtype, "plain", "dora")
        if checkpointed:
            enable_gradient_checkpointing(model)
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append(own_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.slow  # about 10 s of tracing and compiling on 2 cores
def test_torch_compile_traces_without_graph_breaks_and_keeps_the_gradients():
    import torch._dynamo

    _, model, _ = adapted("qwen2", torch.float32, "plain", "dora")
    model.train()
    model(IDS, labels=IDS).loss.backward()
    eager = {n: g.clone() for n, g in own_grads(model).items()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model(ids).logits)(IDS)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch.compile(model, backend="aot_eager")(IDS, labels=IDS).loss.backward()
    for name, grad in own_grads(model).items():
        assert rel_error(grad, eager[name]) <= 1e-5, name


# ---- tied embeddings ----------------------------------------------------------------------------------------
def tied_with_lm_head_adapted():
    model = tiny_llama(tie_word_embeddings=True)
    apply_adapters(model, AdapterConfig(method="dora", r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    return model.eval()


def test_merging_a_tied_lm_head_unties_it_and_says_so():
    model = tied_with_lm_head_adapted()
    embedding = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        want = model(IDS).logits
        with pytest.warns(UntiedWeightsWarning, match="lm_head.weight was tied to model.embed_tokens.weight"):
            merge_adapters(model)
        assert (model(IDS).logits - want).abs().max() <= 1e-5
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the input embedding did not change
    assert model.config.tie_word_embeddings is False


def test_an_unwrapped_tied_model_saves_and_reloads_as_it_computes(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tied_with_lm_head_adapted()
    with torch.no_grad():
        want = model(IDS).logits
    with pytest.warns(UntiedWeightsWarning):
        unwrap(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (reloaded(IDS).logits - want).abs().max() <= 1e-5


def test_merged_state_dict_of_a_tied_model_warns_and_loads_untied():
    model = tied_with_lm_head_adapted()
    with torch.no_grad():
        want = model(IDS).logits
    with pytest.warns(UntiedWeightsWarning, match="tie_word_embeddings=False"):
        state = merged_state_dict(model)
    assert model.model.embed_tokens.weight is model.lm_head.base_layer.weight  # the model itself is unchanged
    plain = tiny_llama(tie_word_embeddings=False)
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert (plain(IDS).logits - want).abs().max() <= 1e-5


def test_a_tied_model_without_lm_head_adapted_stays_tied():
    model = tiny_llama(tie_word_embeddings=True)
    apply_adapters(model, AdapterConfig(method="dora", r=4, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntiedWeightsWarning)
        unwrap(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


# ---- PEFT features we do not support ------------------------------------------------------------------------
UNSUPPORTED = {
    "exclude_modules": ["model.layers.0.self_attn.q_proj"],
    "modules_to_save": ["lm_head"],
    "rank_pattern": {"q_proj": 8},
    "alpha_pattern": {"q_proj": 32},
    "layers_to_transform": [0],
    "layer_replication": [[0, 1]],
    "use_qalora": True,
    "lora_bias": True,
    "bias": "all",
    "fan_in_fan_out": True,
    "trainable_token_indices": [1, 2],
    "target_parameters": ["mlp.experts.gate_up_proj"],
    "init_lora_weights": "pissa",
    "some_future_feature": {"on": True},
}


def peft_directory(path, **fields):
    """A PEFT-layout LoRA adapter of tiny_llama's q / v projections, adapter_config.json carrying `fields`."""
    from safetensors.torch import save_file

    model = tiny_llama()
    cfg = AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"])
    apply_adapters(model, cfg)
    path.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({**peft_config(model, cfg), **fields}))
    return path


@pytest.mark.parametrize("field", list(UNSUPPORTED))
def test_a_peft_feature_we_lack_is_named_in_the_error(field, tmp_path):
    directory = peft_directory(tmp_path / "adapter", **{field: UNSUPPORTED[field]})
    with pytest.raises(UserError, match=rf"adapter_config.json: {field}: ") as err:
        load_adapter(tiny_llama(), directory)
    assert "does not fit" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "fields",
    [{"init_lora_weights": "gaussian"}, {"init_lora_weights": False}, {"runtime_config": {"ephemeral_gpu_offload": True}},
     {"exclude_modules": None, "layers_pattern": "layers", "eva_config": None, "ensure_weight_tying": False}],
    ids=["gaussian-init", "random-init", "runtime", "switched-off"],
)
def test_settings_without_effect_on_the_loaded_adapter_are_accepted(fields, tmp_path):
    assert load_adapter(tiny_llama(), peft_directory(tmp_path / "adapter", **fields)).method == "lora"
