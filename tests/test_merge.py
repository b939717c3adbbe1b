"""`dora merge`: every adapter kind folded into a streamed (sharded) base, random and 4-bit recipes in
memory, PEFT's own adapters, full checkpoints, and the refusals (nothing written, nothing half-written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, requires_peft, tiny_llama
from safetensors import safe_open

from dora_cli import merge as merge_mod
from dora_cli.adapters import AdapterConfig, adapted_modules, apply_adapters, save_adapter
from dora_cli.errors import RunFailure, UserError
from dora_cli.merge import run_merge
from dora_cli.recipe import dump_recipe, load_recipe

TOKENIZER = ROOT / "data" / "tiny_tokenizer"
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def save_base(path: Path, *, tied: bool = True, shard: str | None = "150KB", **overrides) -> Path:
    """A tiny random LLaMA (vocab 512, tied embeddings) saved in small shards, with the tiny tokenizer."""
    model = tiny_llama(seed=0, vocab_size=512, tie_word_embeddings=tied, **overrides)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "tiny")


def perturb(model, seed: int = 1) -> None:
    """Non-zero B / λ_b, a magnitude away from ‖W0‖: a merge that ignores any part shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            for name in ("lora_B", "vera_lambda_b", "vera_lambda_d"):
                if hasattr(layer, name):
                    p = getattr(layer, name)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if hasattr(layer, "magnitude"):
                layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))


def make_adapter(base: Path, out: Path, cfg: AdapterConfig, *, base_model: str | None = None):
    """Our adapter checkpoint (no recipe) on `base`; returns the adapter model in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    apply_adapters(model, cfg)
    perturb(model)
    save_adapter(model, cfg, out, base_model=str(base) if base_model is None else base_model)
    return model.eval()


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


CASES = {
    "lora": AdapterConfig(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"]),
    "dora+magnitude": AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                    magnitude_only_modules=["o_proj", "gate_proj", "down_proj"]),
    "vera": AdapterConfig(method="vera", r=16, target_modules=["q_proj", "v_proj", "up_proj"]),
    "dvora": AdapterConfig(method="dvora", r=16, target_modules=["q_proj", "v_proj", "up_proj"]),
    "rslora-dora": AdapterConfig(method="dora", r=4, alpha=8, rslora=True, target_modules=["q_proj"]),
}


# ---- streaming: every adapter kind ---------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_merge_reproduces_the_adapter_model(case, base_dir, tmp_path):
    adapter_model = make_adapter(base_dir, tmp_path / "ckpt", CASES[case])
    out = run_merge(tmp_path / "ckpt", out=tmp_path / "merged", verify=True)

    record = json.loads((out / "dora_merge.json").read_text())
    assert record["streamed"] and record["checkpoint_kind"] == "adapter"
    assert record["verify"]["max_abs_logit_diff"] <= 1e-4
    merged = load(out)
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert max_diff(merged(IDS).logits, adapter_model(IDS).logits) <= 1e-4
    # the same shard names and an index; tied embeddings stay tied (no lm_head tensor written)
    base_shards = sorted(p.name for p in base_dir.glob("model-*.safetensors"))
    assert len(base_shards) > 1 and sorted(p.name for p in out.glob("model-*.safetensors")) == base_shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name


def test_dora_merge_folds_the_magnitude_exactly(base_dir, tmp_path):
    """W' = diag(m / ‖W0 + sBA‖)(W0 + sBA), computed here from the formula, against the output shard."""
    cfg = AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj"])
    model = make_adapter(base_dir, tmp_path / "ckpt", cfg)
    out = run_merge(tmp_path / "ckpt", out=tmp_path / "merged")
    layer = dict(adapted_modules(model))["model.layers.1.self_attn.q_proj"]
    w = layer.base_layer.weight + cfg.scaling * layer.lora_B @ layer.lora_A
    expected = (layer.magnitude / w.norm(dim=1))[:, None] * w
    merged = load(out).model.layers[1].self_attn.q_proj.weight
    assert max_diff(merged, expected) <= 1e-6
    assert max_diff(merged.norm(dim=1), layer.magnitude) <= 1e-5  # the magnitude is the row norm


def test_dtype_bf16_and_a_single_file_base(tmp_path):
    base = save_base(tmp_path / "single", shard=None, tied=False)
    assert (base / "model.safetensors").is_file()
    cfg = AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    make_adapter(base, tmp_path / "ckpt", cfg)
    out = run_merge(tmp_path / "ckpt", out=tmp_path / "merged", dtype="bf16", verify=True)
    assert not (out / "model.safetensors.index.json").exists()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert "lm_head.weight" in f.keys()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load(out).dtype == torch.bfloat16
    record = json.loads((out / "dora_merge.json").read_text())
    assert record["dtype"] == "bfloat16" and record["verify"]["tolerance"] is None  # 16-bit: reported only


def test_a_tied_lm_head_adapter_is_merged_untied_and_said(base_dir, tmp_path, capsys):
    """The base stores lm_head's weight once, as the input embedding: merging unties them (in memory), says so."""
    cfg = AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "lm_head"])
    adapter_model = make_adapter(base_dir, tmp_path / "ckpt", cfg)
    out = run_merge(tmp_path / "ckpt", out=tmp_path / "merged", verify=True)
    err = capsys.readouterr().err
    assert "lm_head.weight was tied to model.embed_tokens.weight; merging unties them" in err
    record = json.loads((out / "dora_merge.json").read_text())
    assert not record["streamed"] and record["verify"]["max_abs_logit_diff"] <= 1e-4
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = load(out)
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    assert max_diff(merged.model.embed_tokens.weight, adapter_model.model.embed_tokens.weight) == 0
    with torch.no_grad():
        assert max_diff(merged(IDS).logits, adapter_model(IDS).logits) <= 1e-4


# ---- in memory: random recipe, 4-bit recipe -------------------------------------------------------------
def recipe_checkpoint(path: Path, overrides: list[str], *, method: str = "dora"):
    """A checkpoint of ours with recipe.yaml (the smoke recipe's random model), built without training."""
    from dora_cli.adapters import save_adapter
    from dora_cli.models import load_model

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", [f"adapter.method={method}", *overrides])
    model, _ = load_model(recipe.model, for_training=False)
    apply_adapters(model, recipe.adapter)
    perturb(model)
    path.mkdir(parents=True)
    save_adapter(model, recipe.adapter, path, base_model=recipe.model.name_or_path)
    (path / "recipe.yaml").write_text(dump_recipe(recipe))
    return model.eval(), recipe


def test_random_base_from_the_recipe_is_rebuilt_with_its_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke recipe's tokenizer path is relative to the repository
    model, _ = recipe_checkpoint(tmp_path / "ckpt", [])
    out = run_merge(tmp_path / "ckpt", out=tmp_path / "merged", verify=True)
    record = json.loads((out / "dora_merge.json").read_text())
    assert not record["streamed"] and record["verify"]["max_abs_logit_diff"] <= 1e-4
    with torch.no_grad():
        assert max_diff(load(out)(IDS).logits, model(IDS).logits) <= 1e-4


def test_a_4bit_recipe_merges_into_the_dequantized_weights_by_default(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from dora_cli.adapters.base_ops import dequantized_weight
    from dora_cli.models import load_model

    monkeypatch.chdir(ROOT)
    model, recipe = recipe_checkpoint(tmp_path / "ckpt", ["model.quantization.mode=nf4", "adapter.target_modules=[q_proj]"])
    out = run_merge(tmp_path / "ckpt", out=tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = load(out)
    assert merged.dtype == torch.float32
    # an adapted layer: AdaptedLinear's own merge on the 4-bit weight; a plain one: its dequantized weight
    layer = dict(adapted_modules(model))["model.layers.0.self_attn.q_proj"]
    assert max_diff(merged.model.layers[0].self_attn.q_proj.weight, layer.merged_weight()) <= 1e-6
    o_proj = model.model.layers[0].self_attn.o_proj
    assert max_diff(merged.model.layers[0].self_attn.o_proj.weight, dequantized_weight(o_proj, torch.float32)) == 0

    # quantized_base="original": the full-precision weights of the recipe's model (streamed when on disk)
    out2 = run_merge(tmp_path / "ckpt", out=tmp_path / "merged-orig", quantized_base="original")
    plain, _ = load_model(recipe.model.model_copy(update={"quantization": recipe.model.quantization.model_copy(update={"mode": "none"})}), for_training=False)
    assert max_diff(load(out2).model.layers[0].self_attn.o_proj.weight, plain.model.layers[0].self_attn.o_proj.weight) == 0
    assert json.loads((out2 / "dora_merge.json").read_text())["quantized_base"] == "original"


# ---- PEFT's own adapter directory, full checkpoints -----------------------------------------------------
@requires_peft
def test_a_peft_dora_adapter_directory(base_dir, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    twin = peft.get_peft_model(base, pcfg).eval()
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
        expected = twin(IDS).logits
    twin.save_pretrained(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir)
    out = run_merge(tmp_path / "peft", out=tmp_path / "merged")
    with torch.no_grad():
        assert max_diff(load(out)(IDS).logits, expected) <= 1e-4


def test_a_full_checkpoint_is_converted(base_dir, tmp_path):
    ckpt = tmp_path / "full"
    shutil.copytree(base_dir, ckpt)
    out = run_merge(ckpt, out=tmp_path / "merged", dtype="fp16")
    original, converted = load(ckpt), load(out)
    assert converted.dtype == torch.float16
    for (k, a), b in zip(original.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(a.to(torch.float16), b), k
    with pytest.raises(UserError, match="already a whole model"):
        run_merge(ckpt, out=tmp_path / "other", base=str(base_dir))


# ---- refusals ---------------------------------------------------------------------------------------------
def test_a_directory_without_an_adapter_is_refused(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    with pytest.raises(UserError, match="no adapter_config.json .*a run directory"):
        run_merge(tmp_path / "run", out=tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        run_merge(tmp_path / "nope", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_adapter_that_does_not_fit_is_refused(base_dir, tmp_path):
    three = save_base(tmp_path / "three_layers", num_hidden_layers=3)
    make_adapter(three, tmp_path / "names", AdapterConfig(method="dora", r=4, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="does not fit .*layers.2.self_attn.q_proj is not a linear module"):
        run_merge(tmp_path / "names", out=tmp_path / "out", base=str(base_dir))
    wide = save_base(tmp_path / "wide", hidden_size=96, intermediate_size=128)
    make_adapter(wide, tmp_path / "shapes", AdapterConfig(method="lora", r=4, target_modules=["v_proj"]))
    with pytest.raises(UserError, match="does not fit .*lora_A has shape"):
        run_merge(tmp_path / "shapes", out=tmp_path / "out", base=str(base_dir))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_an_existing_out_is_refused_unless_force_and_never_half_written(base_dir, tmp_path, monkeypatch):
    make_adapter(base_dir, tmp_path / "ckpt", CASES["dora"])
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in (False, True):  # a folder of the user's is never written into, --force or not
        with pytest.raises(UserError, match="holds files that dora_cli did not write \\(keep.txt\\)"):
            run_merge(tmp_path / "ckpt", out=out, force=force)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    run_merge(tmp_path / "ckpt", out=out)  # an empty directory is written into
    first = (out / "dora_merge.json").read_text()
    with pytest.raises(UserError, match="already holds a merged model; pass --force"):
        run_merge(tmp_path / "ckpt", out=out)
    with pytest.raises(UserError, match="holds files that dora_cli did not write"):  # the checkpoint itself
        run_merge(tmp_path / "ckpt", out=tmp_path / "ckpt", force=True)
    with pytest.raises(UserError, match="--dtype"):
        run_merge(tmp_path / "ckpt", out=out, dtype="fp8", force=True)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge_mod, "fold", boom)  # fails in the middle of the shards
    with pytest.raises(RuntimeError, match="disk full"):
        run_merge(tmp_path / "ckpt", out=out, force=True)
    assert (out / "dora_merge.json").read_text() == first
    monkeypatch.undo()

    def wrong(*args, **kwargs):
        raise RunFailure("--verify: differs")

    monkeypatch.setattr(merge_mod, "verify_merge", wrong)
    with pytest.raises(RunFailure):
        run_merge(tmp_path / "ckpt", out=out, force=True, verify=True)
    assert (out / "dora_merge.json").read_text() == first
    monkeypatch.undo()

    (out / "notes.txt").write_text("mine")  # the user's file in a merged model: --force refuses to clear it
    with pytest.raises(UserError, match="holds notes.txt, which dora merge did not write"):
        run_merge(tmp_path / "ckpt", out=out, force=True)
    (out / "notes.txt").unlink()
    record = json.loads(first)  # a stamp the rewrite must replace (two merges can share every field)
    record["seconds"] = -1.0
    (out / "dora_merge.json").write_text(json.dumps(record))
    run_merge(tmp_path / "ckpt", out=out, force=True)
    assert json.loads((out / "dora_merge.json").read_text())["seconds"] >= 0  # written anew, not kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_reports_a_user_error_on_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "dora_cli.cli", "merge", str(tmp_path / "missing")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: does not exist"]


def test_force_onto_a_symlinked_out_is_refused_and_touches_neither_link_nor_target(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "ckpt", CASES["dora"])
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    (tmp_path / "merged").symlink_to(target)
    with pytest.raises(UserError, match="is a symbolic link; dora merge never clears through one"):
        run_merge(tmp_path / "ckpt", out=tmp_path / "merged", force=True)
    assert (tmp_path / "merged").is_symlink() and (target / "mine.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .old / .tmp left behind


def test_sigterm_during_a_merge_cleans_up_and_exits_143(base_dir, tmp_path, monkeypatch, capsys):
    """The real CLI entry: SIGTERM half-way through the shards leaves no temporary and no --out."""
    import signal

    from dora_cli import cli

    make_adapter(base_dir, tmp_path / "ckpt", CASES["dora"])
    real = merge_mod.fold

    def terminated_mid_way(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "fold", terminated_mid_way)
    monkeypatch.setattr(sys, "argv", ["dora", "merge", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 143 and capsys.readouterr().err.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
