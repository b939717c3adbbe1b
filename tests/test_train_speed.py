"""The training loop's speed levers keep its semantics: the LM head on trained positions only, the fused
AdamW, thread settings and torch.compile (no graph breaks through the adapters)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, tiny_llama, tiny_qwen2

from dora_cli import launch
from dora_cli.adapters import AdapterConfig, apply_adapters
from dora_cli.batching import pack
from dora_cli.lm_loss import keeps_selected_logits, loss_terms, trained_positions
from dora_cli.train import run_train

pytestmark = pytest.mark.usefixtures("one_thread")
BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def adapted(arch: str, method: str):
    model = BUILDERS[arch]()
    apply_adapters(model, AdapterConfig(method=method, r=4, alpha=8, dropout=0.0,
                                        target_modules=["q_proj", "v_proj", "down_proj"]))
    return model.train()


def random_batch(seed: int, rows: int, length: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of random lengths whose labels are trained on a random span each (-100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (rows, length), generator=g)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i in range(rows):
        n = int(torch.randint(3, length + 1, (1,), generator=g))
        start = int(torch.randint(1, n, (1,), generator=g))
        mask[i, :n] = 1
        labels[i, start:n] = ids[i, start:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("seed", range(4))
def test_selected_logits_give_the_models_own_loss_and_gradients(arch, method, seed):
    batch = random_batch(seed, rows=3, length=17)
    model = adapted(arch, method)
    assert keeps_selected_logits(model)
    reference = model(**batch, use_cache=False).loss
    reference.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    total, count = loss_terms(model, batch, trained_positions(batch["labels"]))
    (total / count).backward()
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(total / count, reference, rtol=1e-6, atol=1e-6)
    got = grads(model)
    assert got.keys() == expected.keys() and got
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name


def test_full_logits_path_equals_the_selected_one():
    batch = random_batch(7, rows=4, length=12)
    model = adapted("llama", "dora")
    full = loss_terms(model, batch, None)
    kept = loss_terms(model, batch, trained_positions(batch["labels"]))
    assert torch.equal(full[1], kept[1]) and torch.allclose(full[0], kept[0], rtol=1e-6)


def test_packed_batches_keep_exactly_the_trained_positions():
    g = torch.Generator().manual_seed(3)
    examples = []
    for n, prompt in ((7, 4), (5, 2), (9, 6)):
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = pack(examples)
    keep = trained_positions(batch["labels"])
    assert keep.numel() == int((batch["labels"][0, 1:] != -100).sum()) < batch["labels"].shape[1] // 2
    model = adapted("qwen2", "dora")
    reference = model(**batch, use_cache=False).loss
    total, count = loss_terms(model, batch, keep)
    assert torch.allclose(total / count, reference, rtol=1e-6, atol=1e-6)


def test_a_forward_without_logits_to_keep_is_detected():
    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):
            raise AssertionError("not called")

    assert not keeps_selected_logits(Plain())
    assert keeps_selected_logits(tiny_llama())


# ---- threads -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("others", "cores", "default", "expected"), [
    (0.0, 2, 2, 2), (0.4, 2, 2, 2), (1.0, 2, 2, 1), (3.5, 2, 2, 1), (8.0, 2, 2, 1),
    (2.0, 8, 8, 6), (7.0, 8, 4, 1), (0.0, 16, 4, 4), (4.4, 16, 16, 12),
])
def test_default_threads_leave_the_busy_cores(monkeypatch, others, cores, default, expected):
    chosen = []
    monkeypatch.setattr(launch, "busy_cores", lambda: others)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda _pid: set(range(cores)))
    monkeypatch.setattr(launch.torch, "get_num_threads", lambda: default)
    monkeypatch.setattr(launch.torch, "set_num_threads", chosen.append)
    line = launch.set_threads(None, "cpu")
    assert (chosen or [default])[-1] == expected
    assert ("busy" in line) == (expected != default)
    assert launch.set_threads(None, "cuda") == f"threads: {default}"
    chosen.clear()
    assert launch.set_threads(3, "cpu") == "threads: 3 (train.threads)" and chosen == [3]


@pytest.mark.parametrize(("average", "running", "expected"), [
    (4.0, [5] * 9, 3.0),            # busy now and over the last minute
    (4.0, [1] * 9, 0.0),            # a job just ended: the average still lags
    (0.3, [6] * 9, 0.0),            # a job just started: not yet counted
    (3.0, [1, 9, 9, 2, 2, 9, 2, 2, 9], 1.0),  # a moment's spikes: the median
])
def test_busy_cores_need_the_average_and_the_moment_to_agree(monkeypatch, tmp_path, average, running, expected):
    readings = iter(f"{average} 1 1 {n}/300 4242\n" for n in running)
    real_path = launch.Path
    monkeypatch.setattr(launch.os, "getloadavg", lambda: (average, average, average))
    monkeypatch.setattr(launch, "Path", lambda p: type("P", (), {"read_text": lambda self: next(readings)})()
                        if p == "/proc/loadavg" else real_path(p))
    monkeypatch.setattr(launch.time, "sleep", lambda _s: None)
    assert launch.busy_cores() == pytest.approx(expected)


# ---- through dora train --------------------------------------------------------------------------------------
SHORT = ["adapter.dropout=0", "train.max_steps=4", "train.log_every=1", "train.save_every=null"]


def run(out, *overrides):
    return run_train(ROOT / "recipes" / "smoke.yaml", [f"output_dir={out}", *SHORT, *overrides])


def tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "adapter_model.safetensors")


def test_fused_adamw_is_the_default_and_trains_like_the_for_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run(tmp_path / "fused", "train.threads=1")
    run(tmp_path / "loop", "optim.fused=false", "train.threads=1")
    log = (tmp_path / "fused" / "train.log").read_text()
    assert "AdamW (fused)" in log and "threads: 1 (train.threads)" in log
    assert "AdamW (fused)" not in (tmp_path / "loop" / "train.log").read_text()
    a, b = tensors(tmp_path / "fused"), tensors(tmp_path / "loop")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    losses = [[x["loss"] for x in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
              for d in ("fused", "loop")]
    assert len(losses[0]) == 4 and max(abs(x - y) for x, y in zip(*losses, strict=True)) <= 1e-5


# ---- torch.compile -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "dvora"])
def test_the_training_forward_traces_without_graph_breaks(method):
    import torch._dynamo

    if method == "dvora":
        model = BUILDERS["llama"]()
        apply_adapters(model, AdapterConfig(method="dvora", r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"]))
        model.train()
    else:
        model = adapted("llama", method)
    batch = random_batch(1, rows=2, length=10)

    def step(batch, keep):
        total, count = loss_terms(model, batch, keep)
        return total / count

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(batch, trained_positions(batch["labels"]))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
