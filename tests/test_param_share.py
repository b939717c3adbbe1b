"""The paper's "# Params (%)" column, reproduced on LLaMA-7B / 13B built on the meta device (no weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dora_cli.adapters import AdapterConfig, apply_adapters, parameter_report

QKVUD = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QKV, OGUD = ["q_proj", "k_proj", "v_proj"], ["o_proj", "gate_proj", "up_proj", "down_proj"]

SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}

# (model, method, direction targets, magnitude-only targets, r, the paper's value): docs/MATH.md and the paper's tables
ROWS = [
    ("7b", "lora", QKVUD, [], 32, 0.83),
    ("7b", "dora", QKVUD, [], 32, 0.84),
    ("7b", "dora", QKVUD, [], 16, 0.43),
    ("7b", "dora", QKV, OGUD, 32, 0.39),
    ("13b", "lora", QKVUD, [], 32, 0.67),
    ("13b", "dora", QKVUD, [], 32, 0.68),
    ("13b", "dora", QKVUD, [], 16, 0.35),
    ("13b", "dora", QKV, OGUD, 32, 0.31),
    ("7b", "lora", ALL, [], 64, 2.31),
    ("7b", "dora", ALL, [], 64, 2.33),
    ("7b", "vera", ALL, [], 1024, 0.02),
    ("7b", "dvora", ALL, [], 1024, 0.04),
    *[("7b", "lora", QKVUD, [], r, p) for r, p in zip((4, 8, 16, 32, 64), (0.10, 0.21, 0.42, 0.83, 1.64))],
    *[("7b", "dora", QKVUD, [], r, p) for r, p in zip((4, 8, 16, 32, 64), (0.11, 0.22, 0.43, 0.84, 1.65))],
]


def meta_llama(size: str) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=32000, tie_word_embeddings=False, **SIZES[size])
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_llama_7b_has_its_known_size():
    assert sum(p.numel() for p in meta_llama("7b").parameters()) == 6_738_415_616


@pytest.mark.parametrize("size,method,targets,magnitude_only,r,paper", ROWS)
def test_trainable_share_matches_the_paper(size, method, targets, magnitude_only, r, paper):
    model = meta_llama(size)
    cfg = AdapterConfig(method=method, r=r, alpha=2 * r, target_modules=targets, magnitude_only_modules=magnitude_only)
    apply_adapters(model, cfg)
    assert parameter_report(model).percent == pytest.approx(paper, abs=0.01)
