"""`dora analyze`: ΔM / ΔD of hand-built checkpoints with known answers, step / method / run detection,
and an end-to-end run (three smoke trainings, then the CLI) that writes analysis.json and analysis.png."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_llama

from dora_cli.adapters import AdapterConfig, adapted_modules, apply_adapters, save_adapter
from dora_cli.analyze import decomposition, pearson, run_analyze
from dora_cli.errors import UserError
from dora_cli.recipe import dump_recipe, load_recipe
from dora_cli.rundir import checkpoint_step

SMOKE = ROOT / "recipes" / "smoke.yaml"
TOKENIZER = ROOT / "data" / "tiny_tokenizer"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny"
    tiny_llama(seed=0, vocab_size=512).save_pretrained(path)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    return path


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def scale_and_rotate(w: torch.Tensor, scales: torch.Tensor, angles: torch.Tensor, seed: int) -> torch.Tensor:
    """Row i -> scales[i]·‖w_i‖·(cos θ_i ŵ_i + sin θ_i û_i) with û_i ⊥ w_i: norm × s_i, cosine cos θ_i."""
    g = torch.Generator().manual_seed(seed)
    w = w.double()
    w_hat = w / w.norm(dim=1, keepdim=True)
    u = torch.randn(w.shape, generator=g, dtype=torch.float64)
    u = u - (u * w_hat).sum(dim=1, keepdim=True) * w_hat
    u_hat = u / u.norm(dim=1, keepdim=True)
    direction = angles.cos()[:, None] * w_hat + angles.sin()[:, None] * u_hat
    return (scales[:, None] * w.norm(dim=1, keepdim=True) * direction).float()


def recipe_yaml(base: Path, method: str, **train) -> str:
    overrides = [f"model.name_or_path={base}", "model.tokenizer=null", "model.config=null", f"adapter.method={method}"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return dump_recipe(load_recipe(SMOKE, overrides))


# ---- the measures on known answers ---------------------------------------------------------------------
def test_a_full_checkpoint_with_known_scales_and_angles(base_dir, tmp_path):
    model = load(base_dir)
    expected = {}
    for i, layer in enumerate(model.model.layers):
        q = layer.self_attn.q_proj.weight
        d_out = q.shape[0]
        g = torch.Generator().manual_seed(10 + i)
        scales = (0.5 + torch.rand(d_out, generator=g)).double()  # 0.5 .. 1.5
        angles = (torch.rand(d_out, generator=g) * 1.2).double()  # 0 .. 1.2 rad
        norms = q.detach().double().norm(dim=1)
        with torch.no_grad():
            q.copy_(scale_and_rotate(q.detach(), scales, angles, seed=i))
        expected[i] = ((scales - 1).abs() * norms).mean().item(), (1 - angles.cos()).mean().item()
    ckpt = tmp_path / "ft"
    model.save_pretrained(ckpt)

    result = run_analyze([ckpt], base=str(base_dir), modules=["q_proj"], out=tmp_path / "analysis")
    (group,) = result["methods"].values()
    assert group["method"] == "full" and len(group["points"]) == 2
    for p in group["points"]:
        dm, dd = expected[p["layer"]]
        assert p["module"] == "q_proj"
        assert abs(p["delta_m"] - dm) <= 1e-5 and abs(p["delta_d"] - dd) <= 1e-5, (p, dm, dd)


def test_dora_magnitude_changes_give_delta_d_zero_and_lora_matches_the_formula(base_dir, tmp_path):
    """A DoRA checkpoint with B = 0 and m = s·‖W0‖ moves only magnitudes: ΔD = 0, ΔM = mean |s−1|·‖W0_i‖.
    A LoRA checkpoint: the point of W0 + s·B·A, computed here by hand."""
    base = load(base_dir)
    cfg = AdapterConfig(method="dora", r=4, alpha=8, target_modules=["v_proj"])
    apply_adapters(base, cfg)
    expected = {}
    for name, layer in adapted_modules(base):
        s = 1 + 0.3 * torch.randn(layer.magnitude.shape, generator=torch.Generator().manual_seed(len(name)))
        norms = layer.magnitude.detach().double().clone()
        with torch.no_grad():
            layer.magnitude.mul_(s)
        expected[name] = ((s.double() - 1).abs() * norms).mean().item()
    save_adapter(base, cfg, tmp_path / "dora", base_model=str(base_dir))

    lora = load(base_dir)
    lcfg = AdapterConfig(method="lora", r=4, alpha=8, target_modules=["v_proj"])
    apply_adapters(lora, lcfg)
    by_hand = {}
    with torch.no_grad():
        for name, layer in adapted_modules(lora):
            layer.lora_B.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
            w0 = layer.base_layer.weight
            by_hand[name] = decomposition(w0, w0 + lcfg.scaling * layer.lora_B @ layer.lora_A)
    save_adapter(lora, lcfg, tmp_path / "lora", base_model=str(base_dir))

    result = run_analyze([tmp_path / "dora", tmp_path / "lora"], modules=["v_proj"], out=tmp_path / "analysis")
    assert set(result["methods"]) == {"DoRA", "LoRA"}
    for p in result["methods"]["DoRA"]["points"]:
        assert abs(p["delta_d"]) <= 1e-6 and abs(p["delta_m"] - expected[p["name"]]) <= 1e-5
    for p in result["methods"]["LoRA"]["points"]:
        dm, dd = by_hand[p["name"]]
        assert abs(p["delta_m"] - dm) <= 1e-6 and abs(p["delta_d"] - dd) <= 1e-6 and dd > 1e-4


def test_pearson():
    import numpy as np

    x, y = [1.0, 2.0, 3.0, 4.0, 7.0], [2.0, 4.5, 6.0, 8.5, 9.0]
    assert pearson(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-12)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2], [1, 2]) is None and pearson([1, 1, 1], [1, 2, 3]) is None


# ---- steps, methods, runs ---------------------------------------------------------------------------------
def fake_run(root: Path, base: Path, method: str, steps: list[int], *, final_steps: int | None, seed: int) -> Path:
    """A run directory with adapter checkpoints at `steps` (+ final) on `base`, B drawn from `seed` and step."""
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(recipe_yaml(base, method, max_steps=max(steps)))
    cfg = AdapterConfig(method=method, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    dirs = [(s, root / f"checkpoint-{s}") for s in steps] + ([(final_steps, root / "final")] if final_steps else [])
    for step, d in dirs:
        model = load(base)
        apply_adapters(model, cfg)
        with torch.no_grad():
            for _, layer in adapted_modules(model):
                layer.lora_B.normal_(0, 0.01 * step, generator=torch.Generator().manual_seed(seed + step))
        save_adapter(model, cfg, d, base_model=str(base))
        (d / "recipe.yaml").write_text(recipe_yaml(base, method, max_steps=max(steps)))
        if d.name != "final":
            (d / "trainer_state").mkdir()
            (d / "trainer_state" / "state.json").write_text(json.dumps({"step": step, "tokens_seen": 0}))
    if final_steps:
        (root / "metrics.json").write_text(json.dumps({"steps": final_steps}))
    return root


def test_steps_methods_and_runs(base_dir, tmp_path):
    a = fake_run(tmp_path / "a", base_dir, "dora", [2, 4], final_steps=6, seed=0)
    b = fake_run(tmp_path / "b", base_dir, "dora", [3], final_steps=3, seed=100)
    c = fake_run(tmp_path / "c", base_dir, "lora", [5], final_steps=None, seed=200)
    shutil.rmtree(c / "checkpoint-5" / "trainer_state")  # no state: the step comes from the name
    assert checkpoint_step(a / "checkpoint-4") == 4 and checkpoint_step(a / "final") == 6
    assert checkpoint_step(c / "checkpoint-5") == 5

    result = run_analyze([a, b, c / "checkpoint-5"], modules=["q_proj"], out=tmp_path / "analysis")
    groups = result["methods"]
    # two dora runs: one group each; b/final repeats b/checkpoint-3 and is dropped
    assert set(groups) == {"DoRA (a)", "DoRA (b)", "LoRA"}
    assert groups["DoRA (a)"]["steps"] == [2, 4, 6] and groups["DoRA (b)"]["steps"] == [3]
    assert groups["LoRA"]["steps"] == [5] and groups["LoRA"]["run"] == str(c.resolve())
    assert all(len(g["points"]) == 2 * len(g["steps"]) for g in groups.values())  # 2 layers x q_proj
    assert groups["DoRA (a)"]["correlation"] is not None and groups["DoRA (b)"]["correlation"] is None  # 2 points


def test_refusals(base_dir, tmp_path):
    a = fake_run(tmp_path / "a", base_dir, "lora", [1], final_steps=None, seed=0)
    with pytest.raises(UserError, match="'q_prj' matches no linear module .*did you mean \"q_proj\""):
        run_analyze([a], modules=["q_prj"], out=tmp_path / "x")
    other = tmp_path / "other"
    shutil.copytree(base_dir, other)
    b = fake_run(tmp_path / "b", other, "dora", [1], final_steps=None, seed=0)
    with pytest.raises(UserError, match="pass --base"):
        run_analyze([a, b], out=tmp_path / "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no adapter_config.json"):
        run_analyze([empty], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- end to end: three smoke trainings, then the CLI ---------------------------------------------------------
@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> dict[str, Path]:
    from dora_cli.train import run_train

    root = tmp_path_factory.mktemp("runs")
    cwd, handlers = os.getcwd(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.chdir(ROOT)  # the smoke recipe's paths are relative to the repository
    try:
        runs = {}
        for method in ("full", "lora", "dora"):
            runs[method] = root / method
            run_train(SMOKE, [f"adapter.method={method}", f"output_dir={runs[method]}", "train.max_steps=10",
                              "train.save_every=5", "data.val_set_size=0",
                              # smaller steps than the smoke recipe's: the analysis does not care
                              "train.batch_size=4", "train.micro_batch_size=4", "data.cutoff_len=64"])
    finally:
        os.chdir(cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
    return runs


def test_analyze_cli_end_to_end(three_runs, tmp_path):
    out = tmp_path / "fig2"
    full, lora, dora = three_runs["full"], three_runs["lora"], three_runs["dora"]
    assert (full / "final" / "model.safetensors").is_file()  # method full saves the whole model
    args = [full, lora / "checkpoint-5", lora / "checkpoint-10", lora / "final", dora]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dora_cli.cli", "analyze", *map(str, args), "--modules", "q_proj,v_proj", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((out / "analysis.json").read_text())
    assert list(result["methods"]) == ["FT", "LoRA", "DoRA"]
    for label, g in result["methods"].items():
        assert g["steps"] == [5, 10], label
        assert len(g["points"]) == 2 * 2 * 2  # steps x layers x (q_proj, v_proj)
        assert {p["module"] for p in g["points"]} == {"q_proj", "v_proj"}
        assert all(p["delta_m"] > 0 and p["delta_d"] > 0 for p in g["points"])
        assert isinstance(g["correlation"], float) and -1 <= g["correlation"] <= 1 and math.isfinite(g["correlation"])
    png = (out / "analysis.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
