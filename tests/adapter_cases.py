"""The cases of the adapter precision matrix: tiny LLaMA / Qwen2 models on every base, and float64 references.

A base is "plain" (nn.Linear) or a bitsandbytes layer made in process from the same weights ("nf4", "fp4",
"int8"; lm_head stays plain, as transformers leaves it). The float64 references compute the textbook
function of the same (rounded, dequantized) weights with autograd, independently of the engine:

    y = (m / ‖V‖) ⊙ (V·x) + b  with V = W0 + ΔW and the norm constant (DoRA kinds),   y = V·x + b otherwise.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_qwen2
from torch import nn

from dora_cli.adapters import AdapterConfig, adapted_modules, apply_adapters, merged_state_dict
from dora_cli.adapters.base_ops import base_kind, dequantized_weight

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASES = ("plain", "nf4", "fp4", "int8")
METHODS = ("lora", "dora", "dvora", "magnitude")
PEFT_METHODS = ("lora", "dora", "vera")
ARCHS = ("llama", "llama_bias", "qwen2")
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
"""Machine epsilon: the spacing of the dtype's numbers just above 1."""


# ---- bases ----------------------------------------------------------------------------------------------
def quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight (nf4 / fp4 with double quantization, or int8) and its bias."""
    bnb = pytest.importorskip("bitsandbytes")
    d_in, d_out, has_bias = linear.in_features, linear.out_features, linear.bias is not None
    weight = linear.weight.data.clone()
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=has_bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(d_in, d_out, bias=has_bias, compute_dtype=compute_dtype, quant_type=mode)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=mode, compress_statistics=True)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to(linear.weight.device).requires_grad_(False)


def quantize(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    """Every nn.Linear except lm_head replaced, in place, by its bitsandbytes twin."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized_linear(module, mode, compute_dtype))
    return model


def tiny(arch: str, seed: int = 0) -> nn.Module:
    """The fp32 tiny model of `arch`; biases (where the architecture has them) drawn non-zero, larger than W0·x."""
    if arch == "qwen2":
        model = tiny_qwen2(seed)
    else:
        model = tiny_llama(seed, **({"attention_bias": True, "mlp_bias": True} if arch == "llama_bias" else {}))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def base_model(arch: str, dtype: torch.dtype, base: str = "plain", compute_dtype: torch.dtype | None = None, seed: int = 0):
    model = tiny(arch, seed).to(dtype)
    if base != "plain":
        quantize(model, base, compute_dtype or dtype)
    return model


def adapter_config(method: str) -> AdapterConfig:
    """The config of `method` on TARGETS; magnitude-only on all of them (the engine takes that, the recipe
    schema wants a direction target: hence model_construct)."""
    if method == "magnitude":
        return AdapterConfig.model_construct(method="dora", target_modules=[], magnitude_only_modules=TARGETS)
    return AdapterConfig(method=method, r=16 if method in ("vera", "dvora") else 4, alpha=8, target_modules=TARGETS)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1) -> None:
    """Adapter tensors away from their initial values: non-zero B / λ, magnitudes off ‖W0 + ΔW‖."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapted_modules(model):
        for name in ("lora_B", "vera_lambda_b", "vera_lambda_d"):
            if hasattr(layer, name):
                p = getattr(layer, name)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if hasattr(layer, "magnitude"):
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen))


def adapted(arch: str, dtype: torch.dtype, base: str, method: str, seed: int = 0, compute_dtype=None):
    """(plain base model, the same base with the adapter applied and perturbed, its config)."""
    cfg = adapter_config(method)
    model = base_model(arch, dtype, base, compute_dtype, seed)
    plain = merged_state_dict(model, torch.float64)  # the weights the base computes with, exactly
    apply_adapters(model, cfg)
    perturb(model)
    return plain, model, cfg


def own_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> gradient, for every trainable parameter."""
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ---- float64 references -------------------------------------------------------------------------------
class RefLinear(nn.Module):
    """One adapted layer in float64 from the textbook formula (the norm detached, as the engine's default)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.w0 = dequantized_weight(layer.base_layer, torch.float64)
        bias = layer.base_layer.bias
        self.bias = None if bias is None else bias.detach().double()
        for name, p in layer.named_parameters(recurse=False):
            setattr(self, name, nn.Parameter(p.detach().double().clone()))
        self.scaling, self.r = layer.scaling, layer.r
        self.vera = getattr(layer, "vera", None)

    def delta(self) -> torch.Tensor:
        d_out, d_in = self.w0.shape
        if hasattr(self, "lora_A"):
            return self.scaling * self.lora_B @ self.lora_A
        if hasattr(self, "vera_lambda_b"):
            b_s, a_s = self.vera.B[:d_out, : self.r].double(), self.vera.A[: self.r, :d_in].double()
            return (self.vera_lambda_b[:, None] * b_s * self.vera_lambda_d[None, :]) @ a_s
        return torch.zeros_like(self.w0)

    def forward(self, x):
        v = self.w0 + self.delta()
        y = x.double() @ v.T
        if hasattr(self, "magnitude"):
            y = y * (self.magnitude / v.norm(dim=1).detach())
        return y if self.bias is None else y + self.bias


def reference(arch: str, plain_state: dict, model: nn.Module, seed: int = 0) -> nn.Module:
    """The float64 twin of an adapted model: the same weights (dequantized) and adapter values, RefLinear layers."""
    ref = tiny(arch, seed).double()
    ref.load_state_dict(plain_state, strict=True)
    ref.requires_grad_(False)
    for name, layer in adapted_modules(model):
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, RefLinear(layer))
    return ref


# ---- PEFT twins ----------------------------------------------------------------------------------------
PEFT_SUFFIX = {
    "lora_A.default.weight": "lora_A", "lora_B.default.weight": "lora_B",
    "lora_magnitude_vector.default.weight": "magnitude",
    "vera_lambda_b.default": "vera_lambda_b", "vera_lambda_d.default": "vera_lambda_d",
}


def peft_twin(model: nn.Module, cfg: AdapterConfig, base: nn.Module) -> nn.Module:
    """`base` (a fresh copy of `model`'s base) with PEFT's adapter of the same method and values."""
    import peft
    from peft import set_peft_model_state_dict

    from dora_cli.adapters import adapter_state_dict

    if cfg.method == "vera":
        pcfg = peft.VeraConfig(r=cfg.r, target_modules=cfg.target_modules, save_projection=True, projection_prng_key=cfg.vera_seed)
    else:
        pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.target_modules, use_dora=cfg.method == "dora")
    twin = peft.get_peft_model(base, pcfg)
    result = set_peft_model_state_dict(twin, adapter_state_dict(model))
    assert not result.unexpected_keys, result.unexpected_keys
    return twin


def peft_grads(twin: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's gradients under our parameter names."""
    out = {}
    for name, p in twin.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.")
            for suffix, ours in PEFT_SUFFIX.items():
                name = name.replace(suffix, ours)
            out[name] = p.grad
    return out


# ---- errors ----------------------------------------------------------------------------------------------
def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def rel_error_by_kind(got: dict, want: dict) -> dict[str, float]:
    """The relative error of every kind of tensor (lora_A, magnitude, ...), all layers' tensors concatenated."""
    kinds: dict[str, tuple[list, list]] = {}
    for name, w in want.items():
        g = got[name]
        kind = name.rsplit(".", 1)[-1]
        kinds.setdefault(kind, ([], []))
        kinds[kind][0].append(g.double().flatten())
        kinds[kind][1].append(w.double().flatten())
    return {k: rel_error(torch.cat(g), torch.cat(w)) for k, (g, w) in kinds.items()}


def layer_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The dtypes of every floating weight of every linear-like layer."""
    return {m.weight.dtype for m in model.modules() if base_kind(m) is not None and m.weight.is_floating_point()}
