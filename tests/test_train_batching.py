"""`dora train` with data.packing / data.group_by_length (in process, the smoke recipe, dropout off).

A packed run trains like the unpacked one (same losses step by step, same tokens, same validation loss);
a grouped + packed run killed after a checkpoint resumes bitwise; a model whose attention does not isolate
packed examples is refused with one line before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from safetensors.torch import load_file

from dora_cli.errors import UserError
from dora_cli.train import run_train

pytestmark = pytest.mark.usefixtures("one_thread")
SMOKE = ROOT / "recipes" / "smoke.yaml"
SHORT = ["adapter.dropout=0", "train.max_steps=8", "train.log_every=1", "train.save_every=null"]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke recipe's data paths are relative to the repository


def train(out: Path, *overrides: str, recipe: Path = SMOKE, **kw) -> Path:
    return run_train(recipe, [f"output_dir={out}", *SHORT, *overrides], **kw)


def losses(run: Path) -> list[float]:
    return [x["loss"] for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in x]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("grouped", [False, True])
def test_packed_run_trains_like_unpacked(tmp_path, grouped):
    group = f"data.group_by_length={str(grouped).lower()}"
    train(tmp_path / "padded", group)
    train(tmp_path / "packed", group, "data.packing=true")
    padded, packed = losses(tmp_path / "padded"), losses(tmp_path / "packed")
    assert len(padded) == len(packed) == 8
    assert max(abs(a - b) for a, b in zip(padded, packed, strict=True)) <= 1e-5
    a, b = metrics(tmp_path / "padded"), metrics(tmp_path / "packed")
    assert a["tokens"] == b["tokens"] and abs(a["val_loss"] - b["val_loss"]) <= 1e-5


def test_grouped_packed_run_resumes_bitwise(tmp_path):
    levers = ["data.group_by_length=true", "data.packing=true", "adapter.dropout=0.05", "train.save_every=4"]
    full = tmp_path / "full"
    train(full, *levers)
    cut = tmp_path / "cut"  # the run as a kill after checkpoint-4 leaves it
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoint-8")
    train(cut, *levers, resume=True)
    assert "resuming from checkpoint-4" in (cut / "train.log").read_text()
    ours, ref = load_file(str(cut / "final" / "adapter_model.safetensors")), load_file(str(full / "final" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys()
    assert all((ours[k] == ref[k]).all() for k in ref)


def test_packing_refused_for_a_model_that_does_not_isolate(tmp_path):
    recipe = yaml.safe_load(SMOKE.read_text())
    recipe["model"]["config"] = {
        "model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "word_embed_proj_dim": 64, "max_position_embeddings": 256, "seed": 0,
    }
    recipe["adapter"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
    path = tmp_path / "opt.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^data\.packing: .*\(opt, attention sdpa\).*set data\.packing: false$"):
        train(out, "data.packing=true", recipe=path)
    assert not out.exists()
    train(out, recipe=path)  # the same model trains unpacked
    assert (out / "final").is_dir()
