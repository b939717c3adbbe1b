"""Ownership of output paths (issue 23): nothing of the user's is ever written over or deleted.

One rule for every command (files.check_output): a command writes into a directory only when it is
absent, empty, or an output of its own kind (the marker `.dora_output`, or the files an earlier version
wrote) holding nothing but what that kind writes; never inside a checkpoint or another output of ours
(except the places an output keeps for another kind: `eval-final` and `final-merged` in a run
directory, the trials of a sweep); `--overwrite` / `--force` remove only what the kind writes.

The property test runs random sequences of the real commands with random flags on random trees of user
files (names chosen to collide with ours) and checks that every user file is byte-identical afterwards.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, TINY_TOKENIZER, dora_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dora_cli import files, rundir
from dora_cli.errors import UserError
from dora_cli.files import check_output, clear_output, output_kind, write_output_marker

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["train", "eval", "merge", "analyze", "sweep"]


# ---- the rule, kind by kind -------------------------------------------------------------------------------
def mark(directory: Path, kind: str, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_output_marker(directory, kind)
    for name in names:
        (directory / name).write_text("x")
    return directory


OWN_ENTRY = {"train": "metrics.json", "eval": "commonsense", "merge": "config.json", "analyze": "analysis.json",
             "sweep": "sweep.json"}


@pytest.mark.parametrize("kind", KINDS)
def test_absent_empty_and_own_directories_are_written_into(kind, tmp_path):
    check_output(tmp_path / "new" / "deeper", kind, label="x")
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", kind, label="x")
    check_output(mark(tmp_path / "mine", kind, OWN_ENTRY[kind]), kind, label="x", replace=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("replace", [False, True])
def test_a_folder_with_anything_else_is_refused(kind, replace, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / OWN_ENTRY[kind]).write_text("mine")  # even a file of the name we would write
    with pytest.raises(UserError, match="holds files that dora_cli did not write"):
        check_output(user, kind, label="x", replace=replace)
    ours = mark(tmp_path / "ours", kind, OWN_ENTRY[kind], "notes.txt")
    with pytest.raises(UserError, match="holds notes.txt, which dora .* did not write"):
        check_output(ours, kind, label="x", replace=replace)
    with pytest.raises(UserError, match="holds notes.txt"):
        clear_output(ours, kind)
    assert (ours / "notes.txt").is_file() and (ours / OWN_ENTRY[kind]).is_file()  # nothing removed


@pytest.mark.parametrize("kind,other", [(a, b) for a in KINDS for b in KINDS if a != b])
def test_an_output_of_another_kind_is_refused(kind, other, tmp_path):
    with pytest.raises(UserError, match="holds an output of"):
        check_output(mark(tmp_path / "o", other, OWN_ENTRY[other]), kind, label="x")


@pytest.mark.parametrize("kind", KINDS)
def test_never_inside_a_checkpoint_or_another_output(kind, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    rundir.write_manifest(ckpt)
    for place in (ckpt, ckpt / "sub", ckpt / "a" / "b"):
        with pytest.raises(UserError, match="inside the checkpoint"):
            check_output(place, kind, label="x")
    for other in KINDS:
        with pytest.raises(UserError, match="lies inside .* an output of"):
            check_output(mark(tmp_path / f"out-{other}", other) / "sub" / "x", kind, label="x")


@pytest.mark.parametrize("place,kind", [("eval-final", "eval"), ("eval", "eval"), ("final-merged", "merge")])
def test_a_run_keeps_the_default_outputs_of_its_checkpoints(place, kind, tmp_path):
    run = mark(tmp_path / "run", "train", "train.log")
    check_output(run / place, kind, label="x")
    with pytest.raises(UserError, match="lies inside"):
        check_output(run / place, "analyze", label="x")
    mark(run / place, kind, OWN_ENTRY[kind])
    check_output(run, "train", label="x", replace=True)
    (run / place / "notes.txt").write_text("mine")  # a user file in a nested output blocks the whole clear
    with pytest.raises(UserError, match="notes.txt"):
        check_output(run, "train", label="x", replace=True)


def test_a_sweep_keeps_its_trials(tmp_path):
    sweep = mark(tmp_path / "sweep", "sweep", "sweep.json")
    check_output(sweep / "dora-r4", "train", label="x")
    with pytest.raises(UserError, match="lies inside"):
        check_output(sweep / "mine", "train", label="x")


# A directory among a kind's entries owns only what the kind writes inside it (files.OutputKind.contents,
# matched segment by segment): a user's file inside it would go with it on --overwrite / --force / a prune.
INSIDE = [
    ("train", "trackers/diary.txt"), ("train", "trackers/runs/mine/x.txt"),
    ("train", "checkpoint-3/tokenizer_old/diary.txt"),  # `tokenizer*` names a file, not a folder's contents
    ("train", "final/vocab.d/words.txt"), ("train", "eval-final/commonsense/notes.txt"),
    ("eval", "commonsense/notes.txt"), ("eval", "commonsense/predictions/old/boolq.jsonl"),
    ("eval", "math/predictions/notes.txt"), ("eval", "mt_bench/model_answer/notes.md"),
    ("eval", "lm_eval/samples/sub/x.jsonl"), ("sweep", "dora-r4/trackers/diary.txt"),
]
OURS_INSIDE = {"train": ["trackers/dora_cli/events.out.tfevents.1.host", "trackers/wandb/offline-run-1/files/config.yaml",
                         "checkpoint-3/tokenizer.json", "final/trainer_state/state.json", ".tmp-checkpoint-4-999999/x"],
               "eval": ["commonsense/predictions/boolq.jsonl", "commonsense/predictions/run.json", "math/metrics.json",
                        "mt_bench/model_answer/m.run.json", "mt_bench/model_judgment/gpt-4_single.jsonl",
                        "lm_eval/samples/arc_easy.jsonl", "commonsense/predictions/.tmp-run.json-999999.abc123"],
               "sweep": ["dora-r4/checkpoint-2/adapter_model.safetensors", "dora-r4/trackers/dora_cli/e"]}


def plant_ours(root: Path, kind: str) -> Path:
    """An output of `kind` holding what it writes inside its directories (nested outputs marked too)."""
    mark(root, kind, *([] if kind == "eval" else [OWN_ENTRY[kind]]))
    for rel in OURS_INSIDE[kind]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    if kind == "sweep":
        write_output_marker(root / "dora-r4", "train")
    if kind == "train":
        mark(root / "eval-final", "eval")
        (root / "eval-final" / "commonsense").mkdir()
        mark(root / "final-merged", "merge", "config.json")
        (root / "trackers" / "wandb" / "latest-run").symlink_to("offline-run-1")  # wandb's, inside trackers/: ours
    return root


@pytest.mark.parametrize("kind,inside", INSIDE, ids=[f"{k}-{i}" for k, i in INSIDE])
def test_a_user_file_inside_a_directory_we_write_blocks_every_write(kind, inside, tmp_path):
    out = plant_ours(tmp_path / "out", kind)
    check_output(out, kind, label="x", replace=True)  # what the kind writes inside its directories is its own
    (out / inside).parent.mkdir(parents=True, exist_ok=True)
    (out / inside).write_text("mine")
    for replace in (False, True):
        with pytest.raises(UserError, match="which dora .* did not write"):
            check_output(out, kind, label="x", replace=replace)
    with pytest.raises(UserError, match="did not write"):
        clear_output(out, kind)
    assert (out / inside).read_text() == "mine"


LINKED = [("train", "train.log"), ("train", "metrics.jsonl"), ("train", "recipe.yaml"), ("train", "checkpoint-3"),
          ("train", "trackers/wandb/debug.log"),
          ("eval", "commonsense/predictions/boolq.jsonl"), ("eval", "commonsense"), ("merge", "config.json"),
          ("analyze", "analysis.json"), ("sweep", "sweep.md"), ("sweep", "dora-r4/train.log")]


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
@pytest.mark.parametrize("kind,name", LINKED, ids=[f"{k}-{n}" for k, n in LINKED])
def test_a_link_to_a_user_file_in_our_output_is_not_ours(kind, name, link, tmp_path):
    """A run appends to train.log and metrics.jsonl and rewrites recipe.yaml in place when resumed, eval appends
    to its predictions: through a link planted under one of our names that would write into the user's file.
    dora never makes such links: they are the user's."""
    out = plant_ours(tmp_path / "out", kind) if kind in OURS_INSIDE else mark(tmp_path / "out", kind, OWN_ENTRY[kind])
    user = tmp_path / "user" / "diary"
    user.parent.mkdir()
    if link == "symlink" or name == "checkpoint-3" or name == "commonsense":
        user.mkdir() if "." not in name else user.write_text("mine")
    else:
        user.write_text("mine")
    target = out / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    if link == "symlink" or user.is_dir():
        target.symlink_to(user)
    else:
        target.hardlink_to(user)
    for replace in (False, True):
        with pytest.raises(UserError, match="(symbolic link to|other hard links).* did not write"):
            check_output(out, kind, label="x", replace=replace)
    assert user.exists()


def test_clear_removes_what_the_kind_wrote_and_keeps_the_lock(tmp_path):
    run = mark(tmp_path / "run", "train", "train.log", "metrics.jsonl", rundir.LEGACY_MARKER)
    (run / "checkpoint-3").mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "h"}))
    mark(run / "eval-final", "eval", "commonsense")
    clear_output(run, "train")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_runs_of_earlier_versions_are_recognised(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / rundir.LEGACY_MARKER).write_text("mine")
    assert output_kind(old) is None
    (old / rundir.LEGACY_MARKER).write_text(rundir.LEGACY_MARKER_TEXT)
    assert output_kind(old) == "train"
    older = tmp_path / "older"  # before the marker: a recipe it saved beside the log it wrote
    older.mkdir()
    shutil.copy(ROOT / "recipes" / "smoke.yaml", older / "recipe.yaml")
    assert output_kind(older) is None  # a recipe alone is a user's folder
    (older / "train.log").write_text("x")
    assert output_kind(older) == "train"
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "dora_merge.json").write_text("{}")  # a file of that name is not enough: what we wrote in it
    assert output_kind(merged) is None
    (merged / "dora_merge.json").write_text(json.dumps({"checkpoint": "c", "checkpoint_kind": "adapter", "base": "b"}))
    assert output_kind(merged) == "merge"
    ev = tmp_path / "ev" / "commonsense"
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text("{}")
    assert output_kind(ev.parent) is None
    (ev / "metrics.json").write_text(json.dumps({"suite": "commonsense", "settings": {}}))
    assert output_kind(ev.parent) == "eval"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "analysis.json").write_text(json.dumps({"definition": "", "methods": {}, "paper": {}}))
    assert output_kind(tmp_path / "a") == "analyze"
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"settings": {}, "trials": [], "summary": {}}))
    assert output_kind(tmp_path / "s") == "sweep"


def test_a_foreign_lock_file_is_not_ours(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / ".lock").write_text("my own lock file")
    with pytest.raises(UserError, match="did not write"):
        check_output(folder, "train", label="x")
    (folder / ".lock").write_text(json.dumps({"pid": 1, "host": "h"}))  # a lock of ours, its command stopped
    check_output(folder, "train", label="x")


@pytest.mark.parametrize("kind", KINDS)
def test_a_directory_a_live_command_of_ours_is_claiming_right_now_is_not_foreign(kind, tmp_path, monkeypatch):
    """Two shards of a sweep started at once: one makes the directory and writes its lock and its marker
    (each a temporary renamed into place) while the other checks it. The temporaries of a live command of
    ours are not a user's files."""
    import os

    target = tmp_path / "out"
    checked = []
    real_link, real_fsync = os.link, files.fsync_path

    def link(src, dst, *args, **kwargs):  # the lock's complete temporary, about to be linked into place
        check_output(target, kind, label="out")
        checked.append(dst)
        return real_link(src, dst, *args, **kwargs)

    def fsync(path):  # the marker's complete temporary, about to be renamed into place
        if Path(path).name.startswith(files.TMP_PREFIX):
            check_output(target, kind, label="out")
            checked.append(path)
        real_fsync(path)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(files, "fsync_path", fsync)
    lock = rundir.RunLock(target)
    lock.acquire()
    write_output_marker(target, kind)
    lock.release()
    assert len(checked) == 2
    check_output(target, kind, label="out")


def test_every_kind_is_registered_by_its_module():
    assert set(files.OUTPUT_KINDS) | set(files._kinds()) >= set(KINDS)


# ---- the property: random user trees x random command sequences ------------------------------------------
NAMES = ["out", "m", "an", "sw", "notes.txt", "recipe.yaml", "train.log", "metrics.json", "final", ".dora_run",
         ".lock", "eval-final", "final-merged", "analysis.json", "config.json", "sweep", "checkpoint-1", "data"]
PLACES = ["out", "out/final", "out/eval-final", "out/final-merged", "out/x", "m", "an", "sw", "data", "."]


def user_tree() -> st.SearchStrategy:
    """Paths (1 to 3 levels of NAMES) -> contents."""
    path = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
    return st.dictionaries(path, st.binary(min_size=0, max_size=16), max_size=5)


COMMANDS = st.lists(st.tuples(
    st.sampled_from(["train", "eval", "merge", "analyze", "sweep", "user"]),
    st.sampled_from(PLACES),  # where its output goes
    st.booleans(),  # --overwrite / --force / --resume
), min_size=1, max_size=4)


def plant(root: Path, tree: dict[str, bytes]) -> dict[Path, bytes]:
    """Write the user's files (a path that would go under one of them is skipped); what was written."""
    written: dict[Path, bytes] = {}
    for rel, data in tree.items():
        path = root / rel
        if any(p in written for p in path.parents) or path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[path] = data
    return written


def argv(command: str, place: str, flag: bool, ws: Path, recipe: Path) -> list[str]:
    out = str(ws / place)
    run_final = str(ws / "out" / "final")
    tiny = ["train.max_steps=1", "train.save_every=1", "data.val_set_size=0", "train.log_every=1"]
    if command == "train":
        return ["train", recipe, f"output_dir={out}", *tiny, *(["--overwrite"] if flag else [])]
    if command == "eval":
        return ["eval", run_final, "--out", out, "--tasks", "boolq", "--limit", "1", "--mode", "loglik",
                "--data-dir", str(ROOT / "data" / "smoke" / "commonsense"), *(["--overwrite"] if flag else [])]
    if command == "merge":
        return ["merge", run_final, "--out", out, *(["--force"] if flag else [])]
    if command == "analyze":
        return ["analyze", run_final, "--out", out]
    return ["sweep-rank", recipe, "--ranks", "2", "--methods", "lora", f"output_dir={out}", *tiny,
            "eval.limit=1", "eval.tasks=[boolq]", f"eval.data_dir={ROOT / 'data' / 'smoke' / 'commonsense'}"]


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=user_tree(), commands=COMMANDS, prepare=st.booleans())
def test_random_commands_never_change_a_user_file(tree, commands, prepare, monkeypatch, capfd):
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        ws.mkdir()
        written = plant(ws, tree)
        # The recipe and its data are the user's files too, in a folder of their own or among the others.
        home = ws / "data" if not (ws / "data").is_file() else ws
        home.mkdir(exist_ok=True)
        data = home / "train-data.json"
        data.write_bytes((ROOT / "data" / "smoke" / "train.json").read_bytes())
        recipe = home / "my-recipe.yaml"
        text = (ROOT / "recipes" / "smoke.yaml").read_text()
        text = text.replace("tokenizer: data/tiny_tokenizer", f"tokenizer: {TINY_TOKENIZER}")
        recipe.write_text(text.replace("path: data/smoke/train.json", f"path: {data}"))
        written.update({data: data.read_bytes(), recipe: recipe.read_bytes()})
        if prepare:  # a run of ours to evaluate, merge and analyse, when `out` is free
            commands = [("train", "out", False), *commands]
        for i, (command, place, flag) in enumerate(commands):
            if command == "user":  # the user adds a file between two commands, into whatever is there now
                path = ws / place / (f"mine-{i}.txt" if flag else "notes.txt")
                if path.parent.is_dir() and not path.exists():
                    path.write_bytes(b"mine %d" % i)
                    written[path] = path.read_bytes()
                continue
            code, _, err = dora_in_process(argv(command, place, flag, ws, recipe), monkeypatch, capfd)
            assert "Traceback" not in err, err
            assert code in (0, 2), (command, place, flag, code, err)
        for path, data_ in written.items():
            assert path.is_file() and not path.is_symlink(), f"{path.relative_to(ws)} is gone ({commands})"
            assert path.read_bytes() == data_, f"{path.relative_to(ws)} changed ({commands})"


@pytest.mark.parametrize("inside,named", [("checkpoint-3/README.md", "checkpoint-3/README.md"), ("final/notes/x.txt", "final/notes"),
                                          ("checkpoint-3/trainer_state/mine.pt", "checkpoint-3/trainer_state/mine.pt")])
def test_a_user_file_inside_a_checkpoint_blocks_every_write_into_the_run(inside, named, tmp_path):
    """A checkpoint is replaced when resumed past it, pruned by keep_last, cleared by --overwrite: what the user
    put inside it would go with it. The files a checkpoint holds are known by name; anything else is the user's."""
    run = mark(tmp_path / "run", "train", "train.log")
    for name in ("checkpoint-3/adapter_model.safetensors", "checkpoint-3/trainer_state/state.json",
                 "final/model-00001-of-00002.safetensors", "final/tokenizer.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    check_output(run, "train", label="x", replace=True)
    (run / inside).parent.mkdir(parents=True, exist_ok=True)
    (run / inside).write_text("mine")
    for replace in (False, True):
        with pytest.raises(UserError, match=f"holds {named}, which dora train did not write"):
            check_output(run, "train", label="x", replace=replace)
