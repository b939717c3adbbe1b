"""data.packing (dora_cli/batching.py): a packed micro-batch trains exactly like the same examples unpacked.

Per-example losses and the gradients of every LoRA / DoRA adapter parameter are compared, packed (one row,
positions restarting, attention_mask None) against the trainer's right-padded batch, on LLaMA- and
Qwen2-shaped tiny models (Qwen2: q/k/v biases), over parametrised and hypothesis-drawn length mixes that
include length-1 examples and examples of the full cutoff. Controls show that the comparison fails when
isolation is broken. The probe `check_packing` accepts the models that isolate and refuses the ones that
do not (OPT's attention ignores restarting positions, Mamba is recurrent).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_cli.adapters import AdapterConfig, apply_adapters
from dora_cli.batching import LEAK_RATIO, check_packing, make_collate, pack, packing_leak, real_tokens
from dora_cli.datasets import IGNORE_INDEX, Collator
from dora_cli.errors import UserError
from dora_cli.recipe import DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CUTOFF = 32  # data.cutoff_len of these examples: the longest an example can be
VOCAB = 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-5


def tiny_qwen2(seed: int = 0):
    """A 2-layer Qwen2 (biases on q/k/v) with hidden 64, random weights, fp32, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny(model_type: str, **config):
    """A tiny random model of another architecture, for the probe."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()


ARCHS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def adapted(arch: str, method: str):
    """A tiny model with adapters on every projection; B drawn at random so that every adapter parameter
    (A, B and the magnitude) has a non-zero gradient. Train mode (no dropout)."""
    model = ARCHS[arch]()
    apply_adapters(model, AdapterConfig(method=method, r=4, alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def examples_of(lengths: list[int], seed: int = 0) -> list[dict]:
    """Random examples of the given lengths; some have a masked prompt (train_on_inputs false)."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(VOCAB) for _ in range(n)]
        prompt = rng.choice([0, 0, n // 2, n - 1]) if n > 1 else 0
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "attention_mask": [1] * n})
    return out


def has_target(examples: list[dict]) -> bool:
    """Some label after an example's first token is a target (else the loss is 0 / 0, packed or not)."""
    return any(label != IGNORE_INDEX for ex in examples for label in ex["labels"][1:])


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting labels[t + 1] at t (0 where not a target), [batch, seq - 1]."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp_min(0), reduction="none")
    return loss * (targets != IGNORE_INDEX)


def per_example_packed(model, examples, **inputs_override) -> list[tuple[float, int]]:
    """(summed loss, targets) of each example from one packed forward."""
    batch = pack(examples)
    batch.update(inputs_override)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    losses = token_losses(model(**inputs, use_cache=False).logits, batch["labels"])[0]
    targets = (batch["labels"][0, 1:] != IGNORE_INDEX)
    out, start = [], 0
    for ex in examples:
        end = start + len(ex["input_ids"])  # the predictions made at positions start .. end - 2
        out.append((losses[start : end - 1].sum().item(), int(targets[start : end - 1].sum())))
        start = end
    return out


def per_example_unpacked(model, examples) -> list[tuple[float, int]]:
    """(summed loss, targets) of each example from the trainer's right-padded batch."""
    batch = Collator(pad_token_id=0)(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    losses = token_losses(logits, batch["labels"])
    targets = batch["labels"][:, 1:] != IGNORE_INDEX
    return [(losses[i].sum().item(), int(targets[i].sum())) for i in range(len(examples))]


def assert_same_losses(packed, unpacked):
    assert [n for _, n in packed] == [n for _, n in unpacked]
    for (s_p, n), (s_u, _) in zip(packed, unpacked, strict=True):
        if n:
            assert abs(s_p / n - s_u / n) <= TOL, (s_p / n, s_u / n)


def adapter_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def assert_same_training(model, examples, *, every_gradient_nonzero: bool):
    """The step's loss (token-weighted mean over the micro-batch) and every adapter gradient match.

    The comparison is not vacuous: some gradient is non-zero, or every one when asked (a lone two-token
    example has a genuinely zero query gradient: its only prediction attends to one key)."""
    loss_p, grads_p = adapter_grads(model, pack(examples))
    loss_u, grads_u = adapter_grads(model, Collator(pad_token_id=0)(examples))
    assert abs(loss_p - loss_u) <= TOL
    assert grads_p.keys() == grads_u.keys() and grads_p
    nonzero = [bool(grads_u[name].abs().max() > 0) for name in grads_u]
    assert all(nonzero) if every_gradient_nonzero else any(nonzero)
    for name in grads_p:
        torch.testing.assert_close(grads_p[name], grads_u[name], atol=TOL, rtol=TOL, msg=name)


# --------------------------------------------------------------------------------------------------
# the collate function


def test_pack_layout():
    examples = examples_of([3, 1, 4])
    examples[0]["labels"] = [IGNORE_INDEX, 11, 12]
    batch = pack(examples)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    assert batch["input_ids"][0].tolist() == sum((ex["input_ids"] for ex in examples), [])
    labels = batch["labels"][0].tolist()
    assert labels[:3] == [IGNORE_INDEX, 11, 12]
    assert labels[3] == IGNORE_INDEX and labels[4] == IGNORE_INDEX  # every example's first label
    assert labels[5:] == examples[2]["labels"][1:]
    assert real_tokens(batch) == 8


def test_make_collate_follows_the_recipe(tok):
    examples = examples_of([5, 2])
    assert make_collate(DataConfig(packing=True), tok)(examples)["input_ids"].shape == (1, 7)
    padded = make_collate(DataConfig(), tok)(examples)
    assert padded["input_ids"].shape == (2, 5) and real_tokens(padded) == 7


# --------------------------------------------------------------------------------------------------
# packed == unpacked

MIXES = [
    [1, CUTOFF, 7],
    [CUTOFF, CUTOFF, CUTOFF, CUTOFF],
    [1, 1, 9],
    [5],
    [2, 1, CUTOFF, 3, 17],
    [CUTOFF - 1, 2, 1, 1, 30, 8, 6, 12],
]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("lengths", MIXES, ids=lambda x: "-".join(map(str, x)))
def test_packed_equals_unpacked(arch, method, lengths):
    model = adapted(arch, method)
    examples = examples_of(lengths, seed=len(lengths))
    assert has_target(examples)
    assert_same_losses(per_example_packed(model, examples), per_example_unpacked(model, examples))
    assert_same_training(model, examples, every_gradient_nonzero=len(lengths) > 1)


LENGTH_MIXES = st.lists(st.integers(1, CUTOFF), min_size=1, max_size=6)
MODELS: dict = {}  # one adapted model per (arch, method) for all drawn examples


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", ["lora", "dora"])
@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(lengths=LENGTH_MIXES, seed=st.integers(0, 2**16))
def test_packed_equals_unpacked_drawn(arch, method, lengths, seed):
    if (arch, method) not in MODELS:
        MODELS[arch, method] = adapted(arch, method)
    model = MODELS[arch, method]
    examples = examples_of(lengths, seed)
    if not has_target(examples):
        return
    assert_same_losses(per_example_packed(model, examples), per_example_unpacked(model, examples))
    assert_same_training(model, examples, every_gradient_nonzero=False)


# --------------------------------------------------------------------------------------------------
# controls: the comparison fails when isolation is broken


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_comparison_sees_continuing_positions(arch):
    """Packed without position_ids: transformers sees one sequence, examples attend to each other."""
    model = adapted(arch, "dora")
    examples = examples_of([9, 7, 12], seed=3)
    leaky = per_example_packed(model, examples, position_ids=torch.arange(28)[None])
    unpacked = per_example_unpacked(model, examples)
    with pytest.raises(AssertionError):
        assert_same_losses(leaky, unpacked)


def test_packing_needs_use_cache_false():
    """In train mode a model builds a cache unless told not to, and with a cache transformers skips the
    packed-sequence detection: the trainer must call the model with use_cache=False."""
    model = adapted("llama", "dora")
    examples = examples_of([9, 7, 12], seed=3)
    batch = pack(examples)
    isolated = model(**batch, use_cache=False).loss.item()
    with torch.no_grad():
        assert abs(model(**batch).loss.item() - isolated) > 1e-3


# --------------------------------------------------------------------------------------------------
# the probe: decided from the model


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # flex isolates too, but compiles for minutes
def test_probe_accepts_isolating_models(arch, attention):
    model = ARCHS[arch]()
    model.set_attn_implementation(attention)
    model.train()
    state = torch.random.get_rng_state()
    assert packing_leak(model) <= 1e-6
    check_packing(model, DataConfig(packing=True))
    assert model.training and torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probe_accepts_half_precision(dtype):
    assert packing_leak(tiny_llama().to(dtype)) <= LEAK_RATIO


LEAKING = {
    "opt": dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=64),
    "mamba": dict(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2),
}


@pytest.mark.parametrize("model_type", sorted(LEAKING))
def test_probe_refuses_models_that_leak(model_type):
    model = tiny(model_type, **LEAKING[model_type])
    assert packing_leak(model) > 0.1
    with pytest.raises(UserError) as err:
        check_packing(model, DataConfig(packing=True))
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.packing: ") and model_type in message
    assert "data.packing: false" in message
    check_packing(model, DataConfig(packing=False))  # nothing to check without packing
