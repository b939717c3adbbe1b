"""The guards of issue 13 one by one: the command boundary (user errors one line, bugs keep their
traceback), Click usage errors, message clipping, the loader wrapper, the .gguf header and lock, numbers
too large for a float in math answers."""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, minimal_gguf, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_cli import cli, errors, models
from dora_cli.errors import UserError, clip
from dora_cli.eval.math_match import extract_number, gold_number, math_correct, score_math
from dora_cli.recipe import ModelConfig

SMOKE = str(ROOT / "recipes" / "smoke.yaml")


def dora(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["dora", *argv])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------
# The boundary: what is the user's becomes one line, a bug keeps its traceback


def fail_in_load_recipe(monkeypatch, error: BaseException) -> None:
    def load_recipe(*args, **kwargs):
        raise error

    monkeypatch.setattr("dora_cli.train.load_recipe", load_recipe)


@pytest.mark.parametrize("bug", [
    TypeError("unsupported operand"), KeyError("bug"),
    OSError(errno.ENOENT, "No such file or directory", "/definitely/internal/path"),
    OSError("no errno, no file"),
], ids=["TypeError", "KeyError", "ENOENT-internal-path", "bare-OSError"])
def test_a_bug_keeps_its_traceback(bug, monkeypatch, capsys):
    fail_in_load_recipe(monkeypatch, bug)
    with pytest.raises(type(bug)):
        dora(["train", SMOKE, "--dry-run"], monkeypatch, capsys)


@pytest.mark.parametrize(("error", "expected"), [
    (OSError(errno.EACCES, "Permission denied", "/anywhere/x"), "error: /anywhere/x: permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), "error: /mnt/ro/run: read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device"), "error: no space left on device"),
    (OSError(errno.ENOENT, "No such file or directory", f"{ROOT}/recipes/smoke.yaml/x"),
     f"error: {ROOT}/recipes/smoke.yaml/x: no such file or directory"),  # inside a path the user named
    (OSError(errno.ENOTDIR, "Not a directory", str(ROOT / "recipes")),
     f"error: {ROOT}/recipes: not a directory"),  # a directory above a path the user named
], ids=["EACCES", "EROFS", "ENOSPC-no-file", "ENOENT-user-path", "ENOTDIR-above-user-path"])
def test_an_os_error_that_is_the_user_s_is_one_line(error, expected, monkeypatch, capsys):
    fail_in_load_recipe(monkeypatch, error)
    code, _, err = dora(["train", SMOKE, "--dry-run"], monkeypatch, capsys)
    assert (code, err) == (2, expected + "\n")


def test_a_multi_line_user_error_is_printed_on_one_line(monkeypatch, capsys):
    fail_in_load_recipe(monkeypatch, UserError("first line\nsecond line"))
    assert dora(["train", SMOKE], monkeypatch, capsys)[2] == "error: first line second line\n"


def test_a_long_message_is_printed_whole(monkeypatch, capsys):
    message = " ".join(f"word{i}" for i in range(200))
    fail_in_load_recipe(monkeypatch, UserError(message))
    assert dora(["train", SMOKE], monkeypatch, capsys)[2] == f"error: {message}\n"


# --------------------------------------------------------------------------------------------------
# Click usage errors: one line, with Click's suggestion; --help as Typer prints it


@pytest.mark.parametrize(("argv", "expected"), [
    (["train"], "error: dora train: missing argument 'recipe' (see dora train --help)"),
    (["train", SMOKE, "--overwrit"],
     'error: dora train: unknown option --overwrit (did you mean "--overwrite"?) (see dora train --help)'),
    (["trian"], 'error: dora: no such command \'trian\' (did you mean "train"?) (see dora --help)'),
    (["eval", "x", "--limit", "abc"], "error: dora eval: invalid value for '--limit': "),
    (["train", SMOKE, "--nproc", "0"], "error: dora train: invalid value for '--nproc': "),
    (["sweep-rank", "--ranks"], "error: dora: option '--ranks' requires an argument"),
])
def test_usage_errors_are_one_line(argv, expected, monkeypatch, capsys):
    code, out, err = dora(argv, monkeypatch, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith(expected), err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "-h"], ["sweep-rank", "--help"]])
def test_help_is_typer_s_own(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dora", *argv])
    with pytest.raises(SystemExit) as plain:
        cli.app()  # Typer on its own, standalone
    expected = capsys.readouterr()
    code, out, err = dora(argv, monkeypatch, capsys)
    assert (code, out, err) == (plain.value.code, expected.out, expected.err) and code == 0 and "Usage" in out


def test_dora_alone_prints_the_help(monkeypatch, capsys):
    code, out, err = dora([], monkeypatch, capsys)
    assert code == 2 and "Commands" in out + err and "error" not in err


# --------------------------------------------------------------------------------------------------
# clip: one line, bounded, cut after a whole word


@settings(max_examples=200, derandomize=True, database=None)
@given(text=st.text(alphabet=st.sampled_from("ab xyz\n\t-"), max_size=400), limit=st.integers(10, 200))
def test_clip_never_cuts_a_word(text, limit):
    flat = " ".join(text.split())
    out = clip(text, limit)
    assert len(out) <= limit and "\n" not in out
    if out == flat:
        return
    assert out.endswith("...")
    kept = out[:-3]
    assert flat.startswith(kept)
    # the kept text ends at a word boundary, unless the first word alone is longer than the limit
    assert flat[len(kept.rstrip(" ,;:")):][:1] in (" ", ",", ";", ":") or " " not in flat[: limit - 2]


# --------------------------------------------------------------------------------------------------
# Loaders: the library's failure on the user's files is one line; our own bug is not hidden


def test_a_library_failure_on_the_user_s_files_names_them(tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: (_ for _ in ()).throw(KeyError("vocab")))
    model_dir = tmp_path / "m"
    tiny_llama(vocab_size=512).save_pretrained(model_dir)
    (model_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match=rf"{model_dir}: the tokenizer files cannot be loaded \(KeyError: 'vocab'\)"):
        models.load_model(ModelConfig(name_or_path=str(model_dir)))


@pytest.mark.parametrize("bug", [NameError("name 'x' is not defined"), AssertionError("invariant"), ZeroDivisionError()])
def test_a_bug_inside_a_loader_is_not_turned_into_a_user_error(bug):
    with pytest.raises(type(bug)):
        with models.loading("files cannot be loaded", where="model.name_or_path"):
            raise bug


def test_a_bare_exception_from_the_tokenizers_library_is_a_user_error():
    with pytest.raises(UserError, match=r"model.tokenizer: x: cannot be loaded \(Exception: data did not match"):
        with models.loading("x: cannot be loaded", where="model.tokenizer"):
            raise Exception("data did not match any variant of untagged enum ModelWrapper")


def test_a_real_gguf_header_is_accepted(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    models.check_gguf_header(path)
    path.write_bytes(path.read_bytes()[:30])  # the counts no longer fit
    with pytest.raises(UserError, match="damaged GGUF header"):
        models.check_gguf_header(path)


def test_concurrent_gguf_loads_convert_once_and_leave_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("DORA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m.gguf"
    minimal_gguf(source)
    calls = []

    def fake_convert(path, out_dir, **_):
        calls.append(path)
        time.sleep(0.1)
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    threads = [threading.Thread(target=models.cached_gguf_dir, args=(source,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == [models.gguf_cache_dir(source).name]


def test_a_failed_conversion_leaves_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("DORA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m.gguf"
    minimal_gguf(source)
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad tensor")))
    with pytest.raises(UserError, match=r"m.gguf: the .gguf file cannot be converted \(ValueError: bad tensor\)"):
        models.cached_gguf_dir(source)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


# --------------------------------------------------------------------------------------------------
# The model's vocabulary and memory, checked before loading weights


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_the_weights(tmp_path, monkeypatch):
    from conftest import TINY_TOKENIZER
    from transformers import AutoTokenizer

    model_dir = tmp_path / "m"
    tiny_llama(vocab_size=300).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(str(TINY_TOKENIZER)).save_pretrained(model_dir)
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(UserError, match="the tokenizer has 512 tokens but the model's embedding has 300 rows"):
        models.load_model(ModelConfig(name_or_path=str(model_dir)))


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("vocab_size", "abc", "vocab_size: expected an integer, got 'abc'"),
    ("vocab_size", 2.5, "vocab_size: expected an integer, got 2.5"),
    ("hidden_size", 10**13, "hidden_size: 10000000000000 is out of range"),
    ("seed", 2**40, "seed: expected an integer from 0 to 2\\*\\*32 - 1"),
    ("num_attention_heads", 3, "is not a multiple of the number of attention heads"),
])
def test_random_model_config_values(key, value, expected, tok):
    spec = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 4, key: value}
    with pytest.raises(UserError, match=f"model.config: .*{expected}"):
        models.check_fits_memory(models.build_config(spec, tokenizer=tok)[0], models.torch.float32)


def test_a_random_model_past_the_machine_s_memory_is_refused(tok):
    spec = {"model_type": "llama", "hidden_size": 2**20, "intermediate_size": 2**20, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4}
    with pytest.raises(UserError, match=r"model.config: this architecture has [\d,]+ parameters .* more than the"):
        models.check_fits_memory(models.build_config(spec, tokenizer=tok)[0], models.torch.float32)


# --------------------------------------------------------------------------------------------------
# Math answers: a number past float range is no number


def test_numbers_past_float_range():
    assert extract_number("the answer is " + "9" * 400) is None
    assert gold_number(int("9" * 400)) is None and gold_number("x " + "9" * 400) is None
    assert not math_correct("9" * 400, "9" * 400)
    assert gold_number(1e-5) == 1e-5 and gold_number(7) == 7.0 and gold_number(True) is None
    rows = score_math(["so 0.00001", "8"], [{"answer": 1e-5}, {"answer": "it is 8"}])
    assert rows["correct"] == 2 and rows["rows"][0]["gold"] == 1e-5


def test_reading_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "x.json"
    for content, expected in [
        (b"[" * 100_000, "nested too deeply"),
        (b"[1" + b"0" * 5000 + b"]", "a number has more digits than Python reads"),
        (b"\xff\xfe", "not UTF-8 text"),
        (b"[1,", "invalid JSON at line 1 column 4"),
    ]:
        path.write_bytes(content)
        with pytest.raises(UserError, match=f"{path}: .*{expected}"):
            with errors.reading(path):
                json.loads(path.read_text(encoding="utf-8"))
    with pytest.raises(UserError, match="cannot read: is a directory"):
        with errors.reading(tmp_path):
            tmp_path.read_text()
    assert os.path.exists(path)
