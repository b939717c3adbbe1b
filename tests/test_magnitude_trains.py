"""The DoRA magnitude is really trained: metrics.json records how far each module kind's magnitude and
direction factors moved, and a run whose magnitude stayed exactly where it started says so."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_dora
from safetensors.torch import load_file

from dora_cli import train
from dora_cli.adapters.change import tensor_changes, untrained_magnitudes
from dora_cli.recipe import load_recipe
from dora_cli.rundir import LOG_NAME, RunDir

SMOKE = ROOT / "recipes" / "smoke.yaml"
SHORT = ["train.max_steps=3", "train.batch_size=4", "train.save_every=null", "data.max_samples=24",
         "data.val_set_size=4", "train.threads=1"]
KINDS = {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}  # the smoke recipe's targets
WARNING = "the magnitude did not train"


def run(tmp_path, monkeypatch, *overrides) -> tuple[dict, str]:
    """Train the smoke recipe in process; (metrics.json, train.log)."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(SMOKE, [*SHORT, f"output_dir={tmp_path / 'run'}", *overrides])
    train.train(recipe)
    out = RunDir(tmp_path / "run")
    return json.loads(out.metrics_file.read_text()), (out.path / LOG_NAME).read_text()


@pytest.mark.parametrize("method, precision", [
    ("dora", []),  # fp32
    ("dora", ["train.mixed_precision=bf16"]),  # bf16 autocast on the CPU
    ("dora", ["model.quantization.mode=nf4"]),  # a 4-bit base (QDoRA)
    ("dvora", []),  # the other direction with a magnitude
], ids=["dora-fp32", "dora-bf16-autocast", "dora-nf4-base", "dvora-fp32"])
def test_a_normal_run_records_the_change_and_does_not_warn(method, precision, tmp_path):
    # A process of its own: Accelerate keeps one mixed precision per process.
    out = tmp_path / "run"
    extra = ["adapter.r=4"] if method == "dvora" else []
    proc = run_dora("train", SMOKE, *SHORT, f"output_dir={out}", f"adapter.method={method}", *extra, *precision)
    metrics, log = json.loads(RunDir(out).metrics_file.read_text()), (out / LOG_NAME).read_text()
    changes = metrics["adapter_change"]
    assert set(changes) == KINDS
    for kind, tensors in changes.items():
        assert tensors["magnitude"]["relative"] > 0, kind
        assert 0 < tensors["magnitude"]["initial"]
        direction = {"lora_A", "lora_B"} if method == "dora" else {"vera_lambda_b", "vera_lambda_d"}
        assert set(tensors) == {"magnitude", *direction}
        starts_at_zero = "lora_B" if method == "dora" else "vera_lambda_b"
        assert tensors[starts_at_zero]["relative"] is None and tensors[starts_at_zero]["change"] > 0
    assert metrics["warnings"] == [] and WARNING not in log and WARNING not in proc.stderr


def test_a_frozen_magnitude_warns_on_the_console_in_the_log_and_in_metrics(tmp_path, monkeypatch, capsys):
    import dora_cli.adapters as adapters

    real = adapters.apply_adapters

    def frozen(model, cfg):
        names = real(model, cfg)
        for name, p in model.named_parameters():
            if name.endswith((".q_proj.magnitude", ".v_proj.magnitude")):
                p.requires_grad_(False)  # frozen on purpose: the optimizer never sees it
        return names

    monkeypatch.setattr(adapters, "apply_adapters", frozen)
    metrics, log = run(tmp_path, monkeypatch)
    changes = metrics["adapter_change"]
    assert changes["q_proj"]["magnitude"]["change"] == 0 and changes["v_proj"]["magnitude"]["change"] == 0
    assert changes["k_proj"]["magnitude"]["change"] > 0  # trained as usual
    assert changes["q_proj"]["lora_A"]["change"] > 0  # the direction trained
    [line] = metrics["warnings"]
    assert line.startswith(f"{WARNING}: the q_proj, v_proj magnitudes are exactly their initial value after 3 steps")
    assert f"warning: {line}" in log and f"warning: {line}" in capsys.readouterr().err


def test_lora_records_its_direction_and_never_warns(tmp_path, monkeypatch):
    metrics, _ = run(tmp_path, monkeypatch, "adapter.method=lora")
    assert metrics["warnings"] == []
    assert all(set(t) == {"lora_A", "lora_B"} for t in metrics["adapter_change"].values())


def test_the_recorded_change_is_the_norm_of_the_saved_adapter_minus_the_base(tmp_path, monkeypatch):
    """An independent reference: m0 = ‖W0‖ per row of the base model's own weights, m and B from the
    saved final/ adapter, the norms over every layer of a kind."""
    from dora_cli.models import load_model

    metrics, _ = run(tmp_path, monkeypatch)
    recipe = load_recipe(SMOKE, [*SHORT, f"output_dir={tmp_path / 'run'}"])
    base, _ = load_model(recipe.model, for_training=False)
    weights = dict(base.named_parameters())
    saved = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    for kind in KINDS:
        m_keys = sorted(k for k in saved if k.endswith(f"{kind}.lora_magnitude_vector"))
        assert len(m_keys) == 2  # two layers
        m0 = torch.cat([weights[k.removeprefix("base_model.model.").replace("lora_magnitude_vector", "weight")]
                        .detach().double().norm(dim=1) for k in m_keys])
        m = torch.cat([saved[k].double() for k in m_keys])
        recorded = metrics["adapter_change"][kind]["magnitude"]
        assert recorded["initial"] == pytest.approx(m0.norm().item(), rel=1e-6)
        assert recorded["relative"] == pytest.approx(((m - m0).norm() / m0.norm()).item(), rel=1e-5)
        b = torch.cat([saved[k.replace("lora_magnitude_vector", "lora_B.weight")].double().flatten() for k in m_keys])
        assert metrics["adapter_change"][kind]["lora_B"]["change"] == pytest.approx(b.norm().item(), rel=1e-6)


def test_tensor_changes_groups_layers_by_kind_and_skips_shared_tensors():
    start = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.tensor([3.0, 4.0]),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector": torch.tensor([0.0, 0.0]),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(2, 1),
        "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector": torch.tensor([1.0]),
        "base_model.vera_A": torch.ones(2, 2),
    }
    end = {**start,
           "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector": torch.tensor([0.0, 5.0]),
           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.tensor([[0.0], [2.0]]),
           "base_model.vera_A": torch.zeros(2, 2)}
    changes = tensor_changes(start, end)
    assert changes == {
        "q_proj": {"magnitude": {"change": 5.0, "initial": 5.0, "relative": 1.0},
                   "lora_B": {"change": 2.0, "initial": 0.0, "relative": None}},
        "up_proj": {"magnitude": {"change": 0.0, "initial": 1.0, "relative": 0.0}},
    }
    assert untrained_magnitudes(changes) == ["up_proj"]
