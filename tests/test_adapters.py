"""The adapter engine against the math (autograd, closed forms) and against HF PEFT as an oracle."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_peft, tiny_llama
from torch import nn

from dora_cli.adapters import (
    AdaptedLinear,
    AdapterConfig,
    adapted_modules,
    apply_adapters,
    load_adapter,
    merge_adapters,
    merged_state_dict,
    parameter_report,
    save_adapter,
    unmerge_adapters,
    unwrap,
)
from dora_cli.adapters.dropout import Dropout
from dora_cli.adapters.norm import factored_row_norm
from dora_cli.errors import UserError

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def ids(seed=0, batch=2, seq=12, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@torch.no_grad()
def perturb(model, seed=1, scale=0.05):
    """Move every adapter parameter away from its initial value (B = 0 hides most mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() + 0.1))


def adapted(method="dora", seed=0, **kw):
    model = tiny_llama(seed)
    kw.setdefault("target_modules", TARGETS)
    cfg = AdapterConfig(method=method, r=kw.pop("r", 4), alpha=kw.pop("alpha", 8), **kw)
    apply_adapters(model, cfg)
    return model, cfg


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---- the layer, alone ----------------------------------------------------------------------------
def single_layer(kind="dora", detach=True, d_in=24, d_out=16, r=4, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    layer = AdaptedLinear(base, kind, r=r, scaling=2.0, detach_norm=detach)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.magnitude.mul_(torch.rand(d_out) + 0.5)
    return layer


def test_factored_norm_equals_dense_norm():
    layer = single_layer()
    b, a, s = layer.factors()
    dense = (layer.base_layer.weight + s * b @ a).norm(dim=1)
    assert max_diff(layer.weight_norm(), dense) < 1e-6
    # r >= in takes the blockwise path
    w0 = torch.randn(8, 6)
    b, a = torch.randn(8, 10), torch.randn(10, 6)
    n = factored_row_norm(w0.pow(2).sum(1), w0 @ a.T, b, a, 0.5)
    assert max_diff(n, (w0 + 0.5 * b @ a).norm(dim=1)) < 1e-5


def test_factored_norm_for_a_bf16_base_is_computed_in_fp32():
    layer = single_layer()
    layer.base_layer.to(torch.bfloat16)
    layer.w0_norm_sq = layer.base_layer.weight.float().pow(2).sum(1)
    b, a, s = layer.factors()
    dense = (layer.base_layer.weight.float() + s * b @ a).norm(dim=1)
    assert layer.weight_norm().dtype == torch.float32
    assert max_diff(layer.weight_norm(), dense) < 1e-5


def test_detached_gradient_matches_paper_eq_11():
    """∇A, ∇B = s·Bᵀ(m/n ⊙ ∇W'), s·(m/n ⊙ ∇W')Aᵀ; ∇m = rowsum(∇W' ⊙ V/n) with V = W0 + sBA."""
    layer = single_layer(detach=True)
    x = torch.randn(5, 7, 24)
    upstream = torch.randn(5, 7, 16)
    (layer(x) * upstream).sum().backward()

    b, a, s = layer.lora_B.detach(), layer.lora_A.detach(), layer.scaling
    v = layer.base_layer.weight.detach() + s * b @ a
    n = v.norm(dim=1)
    grad_w = upstream.reshape(-1, 16).T @ x.reshape(-1, 24)  # ∇W' [out, in]
    grad_v = (layer.magnitude.detach() / n)[:, None] * grad_w  # eq. 11 with the norm constant
    assert max_diff(layer.lora_A.grad, s * b.T @ grad_v) < 1e-4
    assert max_diff(layer.lora_B.grad, s * grad_v @ a.T) < 1e-4
    assert max_diff(layer.magnitude.grad, (grad_w * v / n[:, None]).sum(1)) < 1e-4


def test_undetached_gradient_equals_autograd_through_the_norm():
    layer = single_layer(detach=False)
    x = torch.randn(3, 9, 24)
    upstream = torch.randn(3, 9, 16)
    (layer(x) * upstream).sum().backward()

    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    m = layer.magnitude.detach().clone().requires_grad_()
    v = layer.base_layer.weight.detach() + layer.scaling * b @ a
    w = m[:, None] * v / v.norm(dim=1, keepdim=True)
    (F.linear(x, w, layer.base_layer.bias.detach()) * upstream).sum().backward()
    for ours, ref in [(layer.lora_A, a), (layer.lora_B, b), (layer.magnitude, m)]:
        assert max_diff(ours.grad, ref.grad) < 1e-4


# ---- step 0 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "vera", "dvora"])
def test_step_zero_logits_equal_base(method):
    base = tiny_llama()
    model, _ = adapted(method, r=8 if method in ("lora", "dora") else 32, magnitude_only_modules=["o_proj"])
    with torch.no_grad():
        assert max_diff(model(ids()).logits, base(ids()).logits) <= 1e-6


def test_magnitude_only_modules_train_only_the_magnitude():
    model, _ = adapted("dora", target_modules=["q_proj"], magnitude_only_modules=["o_proj", "gate_proj"])
    kinds = {n.rsplit(".", 1)[-1]: m.kind for n, m in adapted_modules(model)}
    assert kinds == {"q_proj": "dora", "o_proj": "magnitude", "gate_proj": "magnitude"}
    trainable = {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "magnitude"}
    o_proj = model.model.layers[0].self_attn.o_proj
    assert not hasattr(o_proj, "lora_A")
    with torch.no_grad():
        o_proj.magnitude.mul_(2.0)
        x = torch.randn(3, 64)
        assert max_diff(o_proj(x), 2.0 * o_proj.base_layer(x)) < 1e-5


# ---- merge ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "vera", "dvora"])
def test_merge_equals_adapter_and_unmerge_restores(method):
    base = tiny_llama()
    model, _ = adapted(method, r=4 if method in ("lora", "dora") else 16, magnitude_only_modules=["o_proj"])
    perturb(model)
    with torch.no_grad():
        before = model(ids()).logits
        merge_adapters(model)
        merged = model(ids()).logits
        assert max_diff(merged, before) <= 1e-5
        unmerge_adapters(model)
        for name, layer in adapted_modules(model):
            w0 = base.get_submodule(name).weight
            assert max_diff(layer.base_layer.weight, w0) <= 1e-6
        assert max_diff(model(ids()).logits, before) <= 1e-5


def test_unwrap_and_merged_state_dict_give_a_plain_model():
    model, _ = adapted("dora", magnitude_only_modules=["o_proj"])
    perturb(model)
    with torch.no_grad():
        ref = model(ids()).logits
        state = merged_state_dict(model)
        plain = tiny_llama(seed=5)
        plain.load_state_dict(state, strict=True)
        assert max_diff(plain(ids()).logits, ref) <= 1e-5
        unwrap(model)
        assert not list(adapted_modules(model))
        assert all(type(m) is not AdaptedLinear for m in model.modules())
        assert max_diff(model(ids()).logits, ref) <= 1e-5


# ---- parameter counts -----------------------------------------------------------------------------
def test_parameter_report_counts_exactly():
    model, _ = adapted("dora", r=4, target_modules=["q_proj"], magnitude_only_modules=["o_proj"])
    report = parameter_report(model)
    per_layer = 4 * (64 + 64) + 64 + 64  # q: A, B, m; o: m
    assert report.trainable == 2 * per_layer
    assert report.total == sum(p.numel() for p in tiny_llama().parameters()) + report.trainable
    assert f"{report.percent:.4f}" in str(report)


# ---- bad input -------------------------------------------------------------------------------------
def test_pattern_matching_nothing_lists_the_linear_modules():
    with pytest.raises(UserError) as err:
        adapted("dora", target_modules=["q_prj"])
    msg = str(err.value)
    assert "q_prj" in msg and 'did you mean "q_proj"' in msg and "down_proj" in msg and "\n" not in msg


def test_module_in_both_lists_is_refused():
    with pytest.raises(UserError, match="both target_modules and magnitude_only_modules"):
        adapted("dora", target_modules=["q_proj"], magnitude_only_modules=["q_proj"])


def test_non_linear_module_is_refused():
    with pytest.raises(UserError, match="Embedding"):
        adapted("dora", target_modules=["embed_tokens"])


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="greater than 0"):
        AdapterConfig(r=0)


def test_adapting_twice_is_refused():
    model, cfg = adapted("lora")
    with pytest.raises(UserError, match="already has adapters"):
        apply_adapters(model, cfg)


def test_full_fine_tuning_trains_everything():
    model = tiny_llama()
    assert apply_adapters(model, AdapterConfig(method="full")) == []
    report = parameter_report(model)
    assert report.trainable == report.total
    with pytest.raises(UserError, match="magnitude_only_modules"):
        apply_adapters(tiny_llama(), AdapterConfig(method="full", magnitude_only_modules=["o_proj"]))


# ---- PEFT as the oracle ---------------------------------------------------------------------------
def peft_twin(model, cfg, base_seed=0, **peft_kw):
    """A PEFT model with the same base weights and the same adapter tensors as ours."""
    import peft
    from peft import set_peft_model_state_dict

    from dora_cli.adapters import adapter_state_dict

    if cfg.method in ("lora", "dora"):
        pcfg = peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
            use_dora=cfg.method == "dora", use_rslora=cfg.rslora, **peft_kw,
        )
    else:
        pcfg = peft.VeraConfig(
            r=cfg.r, vera_dropout=cfg.dropout, target_modules=cfg.target_modules,
            projection_prng_key=cfg.vera_seed, save_projection=True, d_initial=cfg.vera_d_init,
        )
    twin = peft.get_peft_model(tiny_llama(base_seed), pcfg)
    result = set_peft_model_state_dict(twin, adapter_state_dict(model))
    assert not result.unexpected_keys, result.unexpected_keys
    return twin


@requires_peft
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_logits_gradients_and_merge_equal_peft(method):
    model, cfg = adapted(method, r=4, alpha=8)
    perturb(model)
    twin = peft_twin(model, cfg)
    model.train(), twin.train()
    batch = ids()
    ours = model(batch, labels=batch)
    theirs = twin(batch, labels=batch)
    assert max_diff(ours.logits, theirs.logits) <= 1e-5
    ours.loss.backward()
    theirs.loss.backward()
    names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
             "magnitude": "lora_magnitude_vector.default.weight"}
    twin_params = dict(twin.named_parameters())
    compared = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module, leaf = name.rsplit(".", 1)
        ref = twin_params[f"base_model.model.{module}.{names[leaf]}"]
        assert max_diff(p.grad, ref.grad) <= 1e-5, name
        compared += 1
    assert compared == len([p for p in twin.parameters() if p.requires_grad])
    # merged weights
    with torch.no_grad():
        ours_merged = merged_state_dict(model)
        theirs_merged = twin.merge_and_unload().state_dict()
    for key, value in theirs_merged.items():
        assert max_diff(ours_merged[key], value) <= 1e-5, key


@requires_peft
def test_delta_dropout_mode_equals_peft_under_the_same_mask():
    model, cfg = adapted("dora", r=4, alpha=8, dropout=0.3, dropout_mode="delta")
    perturb(model)
    twin = peft_twin(model, cfg)
    for name, module in twin.named_modules():  # PEFT's layers draw their masks as ours do (adapters/dropout.py)
        if name.endswith("lora_dropout"):
            module["default"] = Dropout(0.3)
    model.train(), twin.train()
    batch = ids()
    torch.manual_seed(123)
    ours = model(batch, labels=batch)
    torch.manual_seed(123)
    theirs = twin(batch, labels=batch)
    assert max_diff(ours.logits, theirs.logits) <= 1e-5
    ours.loss.backward(), theirs.loss.backward()
    a = model.model.layers[1].mlp.down_proj.lora_A.grad
    b = twin.base_model.model.model.layers[1].mlp.down_proj.lora_A.default.weight.grad
    assert max_diff(a, b) <= 1e-5
    # and the fast mode really is different under dropout (one GEMM, dropout on the update only)
    fast = copy.deepcopy(model)
    for _, layer in adapted_modules(fast):
        layer.dropout_mode = "fast"
    torch.manual_seed(123)
    assert max_diff(fast(batch).logits, ours.logits) > 1e-4


@requires_peft
def test_vera_equals_peft():
    model, cfg = adapted("vera", r=16, target_modules=["q_proj", "v_proj", "down_proj"])
    perturb(model)
    twin = peft_twin(model, cfg)
    with torch.no_grad():
        assert max_diff(model(ids()).logits, twin(ids()).logits) <= 1e-5


@requires_peft
def test_vera_projections_equal_peft_for_the_same_seed():
    import peft

    model, cfg = adapted("vera", r=16, vera_seed=7, target_modules=["q_proj", "v_proj"])
    twin = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=16, target_modules=["q_proj", "v_proj"], projection_prng_key=7))
    assert torch.equal(model.vera_projections.A, twin.base_model.vera_A["default"])
    assert torch.equal(model.vera_projections.B, twin.base_model.vera_B["default"])


@requires_peft
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_peft_loads_our_checkpoint(method, tmp_path):
    import peft

    model, cfg = adapted(method, r=4 if method != "vera" else 16)
    perturb(model)
    save_adapter(model, cfg, tmp_path, base_model="tiny")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert max_diff(model(ids()).logits, theirs(ids()).logits) <= 1e-5


@requires_peft
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_we_load_peft_checkpoints(method, tmp_path):
    import peft

    if method == "vera":
        pcfg = peft.VeraConfig(r=16, target_modules=["q_proj", "v_proj"], save_projection=False, projection_prng_key=3)
    else:
        pcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=method == "dora")
    theirs = peft.get_peft_model(tiny_llama(), pcfg)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    cfg = load_adapter(ours, tmp_path)
    assert cfg.method == method
    with torch.no_grad():
        assert max_diff(ours(ids()).logits, theirs(ids()).logits) <= 1e-5


@requires_peft
@pytest.mark.parametrize("method", ["dvora", "magnitude"])
def test_extensions_round_trip_and_peft_refuses_them(method, tmp_path):
    import peft

    if method == "dvora":
        model, cfg = adapted("dvora", r=16)
    else:
        model, cfg = adapted("dora", target_modules=["q_proj"], magnitude_only_modules=["o_proj"])
    perturb(model)
    save_adapter(model, cfg, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "DORA_CLI" and (tmp_path / "dora_cli_adapter.json").is_file()
    with pytest.raises(KeyError, match="DORA_CLI"):
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    reloaded = tiny_llama()
    assert load_adapter(reloaded, tmp_path) == cfg
    with torch.no_grad():
        assert max_diff(model(ids()).logits, reloaded(ids()).logits) == 0


def test_adapters_join_the_mode_of_the_model(tmp_path):
    model, cfg = adapted("dora", dropout=0.5)
    perturb(model)
    save_adapter(model, cfg, tmp_path)
    frozen = tiny_llama().eval()
    load_adapter(frozen, tmp_path)
    assert all(not m.training for m in frozen.modules())
    with torch.no_grad():  # dropout is off in eval mode: two forwards agree
        assert max_diff(frozen(ids()).logits, frozen(ids()).logits) == 0


def test_load_refuses_an_adapter_that_does_not_fit(tmp_path):
    model, cfg = adapted("dora", r=4)
    save_adapter(model, cfg, tmp_path)
    wider = tiny_llama(intermediate_size=96)
    with pytest.raises(UserError, match="does not fit this base model.*shape"):
        load_adapter(wider, tmp_path)
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_pickle_adapter_is_refused(tmp_path):
    model, cfg = adapted("lora")
    save_adapter(model, cfg, tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(UserError, match="only safetensors"):
        load_adapter(tiny_llama(), tmp_path)
