"""Shared fixtures: tiny random models built in code, paths to real data (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SMOLLM2_DIR = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
TINY_TOKENIZER = ROOT / "data" / "tiny_tokenizer"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, attention_bias=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer LLaMA with hidden 64, random weights, fp32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


def tiny_qwen2(seed: int = 0, **overrides):
    """A 2-layer Qwen2 (biases on q / k / v) with hidden 64, random weights, fp32, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()


def minimal_gguf(path: Path) -> Path:
    """A GGUF file that names an architecture and holds one tensor: what passes the checks before a conversion."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tok():
    """The project's tiny byte-level tokenizer (data/tiny_tokenizer, vocab 512)."""
    from transformers import AutoTokenizer

    if not (TINY_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("data/tiny_tokenizer is absent (data/make_tiny_tokenizer.py)")
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module: tiny models run much faster without a thread wake-up per small
    op, on a busy machine too. Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def smollm2_dir() -> Path:
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip("SmolLM2-135M-Instruct not fetched (make fetch-model)")
    return SMOLLM2_DIR


@pytest.fixture
def real_recipe_env(smollm2_dir, shared_data, monkeypatch) -> tuple[Path, Path]:
    """The shipped SmolLM2 recipes' environment: cwd the repository, SMOLLM2_DIR and DORA_SHARED_DATA set."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SMOLLM2_DIR", str(smollm2_dir))
    monkeypatch.setenv("DORA_SHARED_DATA", str(shared_data))
    return smollm2_dir, shared_data


def dora_in_process(argv, monkeypatch, capture, stdin: str | None = None, cwd: Path = ROOT) -> tuple[int, str, str]:
    """`dora ARGV` in this process from `cwd` (the repository root): (exit status, stdout, stderr). `capture`:
    pytest's capsys or capfd (cleared first); `stdin`: the text the command reads."""
    import io
    import sys

    from dora_cli import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["dora", *map(str, argv)])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capture.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capture.readouterr()
    return code, out.out, out.err


def train_killed_at_checkpoint(args: list[str], out: Path, step: int, timeout: float = 240) -> None:
    """`python -m dora_cli.cli train ARGS output_dir=OUT`, SIGKILLed once OUT/checkpoint-<step> exists
    (its final/ never written)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "dora_cli.cli", "train", *args, f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (out / f"checkpoint-{step}").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()


def run_dora(*args, timeout=600, check=True, **kw):
    """`python -m dora_cli.cli ARGS` from the repository root, as a user would run it."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dora_cli.cli", *map(str, args)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout, **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dora {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One uninterrupted run of recipes/smoke.yaml: the reference for resume and multi-process tests."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    run_dora("train", "recipes/smoke.yaml", f"output_dir={out}")
    return out


def has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


requires_peft = pytest.mark.skipif(not has_peft(), reason="peft is not installed")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
