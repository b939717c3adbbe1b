"""The Hugging Face Hub (hub.py): HF_HUB_OFFLINE fails at once naming the variable, an unreachable or silent hub
fails in seconds (the local cache still serves), and the message says which variable makes it immediate.

What an unreachable hub is asked is counted (a local endpoint that hangs up), not timed: a loaded machine
makes any duration noisy."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
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


def asked_for_the_model(requests: list[str]) -> list[str]:
    """The request lines that name the model (its files, its API entry); huggingface_hub's own calls that
    name no repository (one at import in some versions) are not the loader asking."""
    return [line for line in requests if MODEL in line or "/resolve/" in line]


@contextlib.contextmanager
def hanging_up_hub():
    """An endpoint that reads each request's first line and hangs up unanswered (the probe sees the hub as
    unreachable); yields (endpoint, request lines): what was asked, counted instead of timed (every retry of
    huggingface_hub's, ~50 s per file against a closed port, is one line more)."""
    connections = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.2)
        stop = threading.Event()

        def serve():
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(2)
                try:
                    connections.append(conn.recv(200).split(b"\r\n")[0].decode())
                except OSError:
                    connections.append("?")
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}", connections
        finally:
            stop.set()
            thread.join()


def dora_subprocess(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m dora_cli.cli ARGS` with the hub variables of `env` only (HF_*, and every *_OFFLINE such as
    TRANSFORMERS_OFFLINE, which another test module's import may have set, removed unless given)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "OFFLINE" not in k}
    full.update(env, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "dora_cli.cli", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=300)


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


def test_an_unreachable_hub_is_asked_once_and_the_error_names_the_variable(tmp_path):
    with hanging_up_hub() as (endpoint, connections):
        proc = dora_subprocess(train_on_hub_id(tmp_path), {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not answer" in proc.stderr and "HF_HUB_OFFLINE=1 makes this immediate" in proc.stderr
    assert asked_for_the_model(connections) == [] and connections.count("HEAD / HTTP/1.1") == 1, connections


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
    with hanging_up_hub() as (endpoint, connections):
        proc = dora_subprocess(["generate", MODEL, "Name a fruit.", "--max-new-tokens", "2"],
                               {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr
    # the probe only: no file of the cached model is asked (a PEFT adapter_config.json was, with retries: ~23 s)
    assert asked_for_the_model(connections) == [] and connections.count("HEAD / HTTP/1.1") == 1, connections


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
