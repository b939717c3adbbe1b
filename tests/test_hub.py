"""The Hugging Face Hub (hub.py): HF_HUB_OFFLINE fails at once naming the variable, an unreachable or silent hub
fails in seconds (the local cache still serves), and the message says which variable makes it immediate.

Durations are asserted only loosely (a loaded machine); the measured figures are in the report / README."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, TINY_TOKENIZER, tiny_llama

from dora_cli import cli, hub
from dora_cli import datasets as ds
from dora_cli.errors import UserError
from dora_cli.recipe import DataConfig, DataSource

MODEL = "someone/some-model"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dora_subprocess(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m dora_cli.cli ARGS` with the hub variables of `env` only (HF_*, and every *_OFFLINE such as
    TRANSFORMERS_OFFLINE, which another test module's import may have set, removed unless given)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "OFFLINE" not in k}
    full.update(env, PYTHONUNBUFFERED="1")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dora_cli.cli", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=300)
    return proc, time.monotonic() - started


def train_on_hub_id(tmp_path: Path) -> list[str]:
    return ["train", "recipes/smoke.yaml", f"model.name_or_path={MODEL}", "model.config=null", "model.tokenizer=null",
            f"output_dir={tmp_path / 'never'}"]


@pytest.fixture
def no_probe(monkeypatch):
    """The probe's cache emptied, and the network refused: a test that reaches it fails."""
    hub.probe.cache_clear()

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    yield
    hub.probe.cache_clear()


def test_hf_hub_offline_fails_at_once_naming_the_variable(no_probe, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["dora", *train_on_hub_id(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: model.name_or_path: '{MODEL}' is not a local path and could not be loaded from the "
                          "Hugging Face Hub: it is not in the local cache")
    assert "HF_HUB_OFFLINE=1 keeps the hub from being asked" in err
    assert not (tmp_path / "never").exists()


def test_an_unreachable_hub_fails_in_seconds_and_names_the_variable(tmp_path):
    proc, took = dora_subprocess(train_on_hub_id(tmp_path), {
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not answer" in proc.stderr and "HF_HUB_OFFLINE=1 makes this immediate" in proc.stderr
    assert took < 25, took  # Python's start included; it was about 50 s (huggingface_hub's retries, per file)


def test_a_silent_hub_is_given_up_after_the_timeout(monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        assert hub.probe.__wrapped__(endpoint, 0.5) == "TimeoutError: timed out"
        assert time.monotonic() - started < 5
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "3")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 3)
    assert hub._timeout() == 3.0  # the user's variable wins over PROBE_TIMEOUT
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT")
    assert hub._timeout() == hub.PROBE_TIMEOUT


def fake_hub_cache(home: Path, repo: str) -> None:
    """A model in the hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    from transformers import AutoTokenizer

    commit = "0" * 40
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    tiny_llama(vocab_size=512).save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(str(TINY_TOKENIZER)).save_pretrained(snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)


def test_an_unreachable_hub_still_loads_a_cached_model(tmp_path):
    fake_hub_cache(tmp_path / "hf", MODEL)
    proc, took = dora_subprocess(["generate", MODEL, "Name a fruit.", "--max-new-tokens", "2"], {
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr
    assert took < 25, took  # no file of the cached model is asked of the hub (a PEFT adapter_config.json was: ~23 s)


def test_a_hub_dataset_on_an_unreachable_hub_is_refused_without_trying(monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setattr(hub, "probe", lambda endpoint, timeout: "[Errno 111] Connection refused")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    with pytest.raises(UserError, match=r"data.sources\[0\].path: 'yahma/alpaca-cleaned' is not a local file .* the "
                                        r"hub at http://127.0.0.1:1 does not answer .*HF_HUB_OFFLINE=1 makes this immediate"):
        ds.load_records(DataConfig(sources=[DataSource(path="yahma/alpaca-cleaned")]))
