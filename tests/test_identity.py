"""A resumed run is the same run (issue 23).

- The run records the fingerprints of its inputs (inputs.json: each local data source's files, the base
  model's and tokenizer's files, size and sha256); `--resume` compares them and refuses a changed input in
  one line naming the recipe key and the file.
- A checkpoint is intact only when its manifest lists exactly the files present, each with its size and
  sha256: an unlisted file, a listed one missing, an emptied manifest, a link in place of a file are damage,
  and resume falls back to the newest intact checkpoint (bitwise equal to the uninterrupted run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TOKENIZER, dora_in_process, tiny_llama
from safetensors.torch import load_file

from dora_cli import rundir, train
from dora_cli.errors import UserError

SMOKE = str(ROOT / "recipes" / "smoke.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def final_weights(run: Path) -> dict:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


# ---- the manifest lists exactly the files present ----------------------------------------------------------
def edit_manifest(ckpt: Path, change) -> None:
    path = ckpt / rundir.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest["files"])
    path.write_text(json.dumps(manifest))


def unlisted_file(ckpt: Path) -> str:
    """A file of a name checkpoints hold (a whole model's, in an adapter checkpoint) that the manifest does not
    list. (A file of any other name is the user's: the run is refused, test_ownership.py.)"""
    (ckpt / "model.safetensors").write_text("x")
    return "model.safetensors is not listed"


def entry_removed_and_file_edited(ckpt: Path) -> str:
    """The issue's case: the state's step edited after its manifest entry was removed."""
    state = ckpt / rundir.STATE_DIR / "state.json"
    edit_manifest(ckpt, lambda files: files.pop(f"{rundir.STATE_DIR}/state.json"))
    data = json.loads(state.read_text())
    state.write_text(json.dumps({**data, "step": 25}))
    return "state.json is not listed"


def manifest_emptied(ckpt: Path) -> str:
    edit_manifest(ckpt, lambda files: files.clear())
    return "is not listed"


def listed_file_missing(ckpt: Path) -> str:
    (ckpt / rundir.STATE_DIR / "optimizer.pt").unlink()
    return "optimizer.pt is missing"


def link_in_place_of_a_file(ckpt: Path) -> str:
    target = ckpt.parents[1] / "elsewhere.yaml"  # outside the run directory
    shutil.move(ckpt / rundir.RECIPE_NAME, target)
    (ckpt / rundir.RECIPE_NAME).symlink_to(target)
    return "recipe.yaml is not a regular file"


def entry_outside_the_checkpoint(ckpt: Path) -> str:
    edit_manifest(ckpt, lambda files: files.update({"../train.log": {"size": 1, "sha256": "0" * 64}}))
    return "../train.log is missing"


DAMAGE = [unlisted_file, entry_removed_and_file_edited, manifest_emptied, listed_file_missing, link_in_place_of_a_file,
          entry_outside_the_checkpoint]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_manifest_that_does_not_list_exactly_the_files_is_damage_and_resume_falls_back(damage, smoke_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    shutil.rmtree(out / "final")
    phrase = damage(out / "checkpoint-30")
    problem = rundir.verify(out / "checkpoint-30")
    assert problem is not None and phrase in problem, problem
    assert rundir.verify(out / "checkpoint-20") is None
    train.run_train(SMOKE, [f"output_dir={out}"], resume=True)
    err = capsys.readouterr().err
    assert "checkpoint-30 is damaged" in err and "resuming from checkpoint-20 (step 20)" in err
    ours, ref = final_weights(out), final_weights(smoke_run)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_eval_refuses_a_checkpoint_with_a_file_its_manifest_does_not_list(smoke_run, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    shutil.copytree(smoke_run / "final", out / "final")
    (out / "final" / "extra.bin").write_bytes(b"\0")
    code, _, err = dora_in_process(["eval", out / "final", "--out", tmp_path / "ev", "--limit", "1"], monkeypatch, capfd)
    assert code == 2 and "extra.bin is not listed in manifest.json" in err
    assert not (tmp_path / "ev").exists()


# ---- the inputs of a run ---------------------------------------------------------------------------------
@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    """A data file and a model directory of the user's (a tiny LLaMA with the tiny tokenizer)."""
    from transformers import AutoTokenizer

    data = tmp_path / "train.json"
    data.write_bytes((ROOT / "data" / "smoke" / "train.json").read_bytes())
    model = tmp_path / "model"
    tiny_llama(vocab_size=512).save_pretrained(model)
    AutoTokenizer.from_pretrained(str(TINY_TOKENIZER)).save_pretrained(model)
    return data, model


def overrides(out: Path, data: Path, model: Path) -> list[str]:
    return [f"output_dir={out}", f"data.sources=[{{path: '{data}'}}]", f"model.name_or_path={model}",
            "model.config=null", "model.tokenizer=null", "train.max_steps=4", "train.save_every=2", "data.val_set_size=0"]


def interrupted_run(tmp_path: Path, data: Path, model: Path) -> Path:
    out = tmp_path / "run"
    train.run_train(SMOKE, overrides(out, data, model))
    shutil.rmtree(out / "final")
    recorded = json.loads((out / rundir.INPUTS_NAME).read_text())
    assert set(recorded) == {"data.sources[0].path", "model.name_or_path"}
    assert recorded["data.sources[0].path"]["files"]["train.json"]["size"] == data.stat().st_size
    assert "model.safetensors" in recorded["model.name_or_path"]["files"]
    return out


def same_size_other_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def replace_weights(model: Path) -> None:
    """Other weights of the same architecture: same size, same safetensors header."""
    tiny_llama(seed=1, vocab_size=512).save_pretrained(model)


CHANGES = {
    "data-edited-same-size": (lambda data, model: same_size_other_bytes(data), "data.sources[0].path", "same size, other content"),
    "data-appended": (lambda data, model: data.write_text(json.dumps(json.loads(data.read_text()) + [
        {"instruction": "q", "input": "", "output": "the correct answer is true", "answer": "true"}])),
        "data.sources[0].path", "bytes then"),
    "base-weights-replaced": (lambda data, model: replace_weights(model), "model.name_or_path", "model.safetensors has changed"),
    "base-config-edited": (lambda data, model: (model / "config.json").write_text(
        (model / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')), "model.name_or_path",
        "config.json has changed"),
    "tokenizer-file-removed": (lambda data, model: (model / "tokenizer_config.json").unlink(), "model.name_or_path",
                               "tokenizer_config.json was removed"),
    "base-file-added": (lambda data, model: (model / "extra.safetensors").write_bytes(b"x"), "model.name_or_path",
                        "extra.safetensors was added"),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_resume_refuses_a_changed_input_in_one_line_naming_it(case, inputs, tmp_path, monkeypatch, capfd):
    data, model = inputs
    out = interrupted_run(tmp_path, data, model)
    change, key, phrase = CHANGES[case]
    change(data, model)
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    code, _, err = dora_in_process(["train", SMOKE, *overrides(out, data, model), "--resume"], monkeypatch, capfd)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert key in lines[0] and phrase in lines[0] and "since the run started" in lines[0], lines[0]
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_resume_with_the_same_inputs_is_the_same_run(inputs, tmp_path, monkeypatch):
    data, model = inputs
    reference = tmp_path / "reference"
    train.run_train(SMOKE, overrides(reference, data, model))
    out = interrupted_run(tmp_path, data, model)
    (out / "checkpoint-4").rename(out / ".tmp-gone")  # killed after checkpoint-2
    shutil.rmtree(out / ".tmp-gone")
    train.run_train(SMOKE, overrides(out, data, model), resume=True)
    ours, ref = final_weights(out), final_weights(reference)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_a_run_made_before_the_record_resumes_and_is_recorded(inputs, tmp_path):
    data, model = inputs
    out = interrupted_run(tmp_path, data, model)
    (out / rundir.INPUTS_NAME).unlink()
    train.run_train(SMOKE, overrides(out, data, model), resume=True)
    assert (out / rundir.INPUTS_NAME).is_file()


def test_overwrite_records_the_new_inputs(inputs, tmp_path):
    data, model = inputs
    out = interrupted_run(tmp_path, data, model)
    same_size_other_bytes(data)
    with pytest.raises(UserError, match="has changed since the run started"):
        train.run_train(SMOKE, overrides(out, data, model), resume=True)
    train.run_train(SMOKE, overrides(out, data, model), overwrite=True)
    recorded = json.loads((out / rundir.INPUTS_NAME).read_text())
    assert recorded == rundir.input_fingerprints(train.load_recipe(SMOKE, overrides(out, data, model)))


def test_large_files_are_fingerprinted_by_samples_that_see_a_change_anywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "FULL_HASH_LIMIT", 1 << 20)
    path = tmp_path / "weights.safetensors"
    path.write_bytes(bytes(range(256)) * (3 << 14))  # 12 MiB
    first = rundir.file_fingerprint(path)
    assert set(first) == {"size", "sha256_sampled"}
    for offset in (0, 5 << 20, (12 << 20) - 1):  # the header, a block in the middle, the last byte
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0xFF
        changed = tmp_path / "changed.safetensors"
        changed.write_bytes(bytes(raw))
        offsets = [min((12 << 20) - (1 << 16), i * ((12 << 20) - (1 << 16)) // 64) for i in range(65)]
        if offset < (1 << 20) or any(o <= offset < o + (1 << 16) for o in offsets):
            assert rundir.file_fingerprint(changed) != first, offset


def test_input_change_names_the_first_difference():
    a = {"model.name_or_path": {"path": "/m", "files": {"config.json": {"size": 1, "sha256": "a"}}}}
    assert rundir.input_change(a, a) is None
    assert "another source" in rundir.input_change(a, {"model.name_or_path": {"hub": "x/y"}})
    assert "removed since" in rundir.input_change(a, {})
