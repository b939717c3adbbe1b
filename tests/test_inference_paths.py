"""Every inference path runs the adapter model in eval mode without gradients, so that DoRA's norm cache engages:
the row norm ‖W0 + ΔW‖ is computed once per layer for the whole command, not once per forward.

Paths: `dora eval` (loglik and generate, and the lm_eval suite; `dora sweep-rank` evaluates its trials and
`make demo` its "after" phase through the same `evaluate` / `load_for_eval`), `dora generate`, `dora chat`.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import ROOT
from test_merge import recipe_checkpoint

from dora_cli.adapters import AdaptedLinear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def spy(monkeypatch):
    """Counts AdaptedLinear forwards and norm computations; records any forward in train mode or with gradients."""
    seen = {"forwards": 0, "norms": 0, "layers": set(), "wrong": []}
    forward, weight_norm = AdaptedLinear.forward, AdaptedLinear.weight_norm

    def counted_forward(self, x):
        seen["forwards"] += 1
        seen["layers"].add(id(self))
        if self.training or torch.is_grad_enabled():
            seen["wrong"].append((self.training, torch.is_grad_enabled()))
        return forward(self, x)

    def counted_norm(self):
        seen["norms"] += 1
        return weight_norm(self)

    monkeypatch.setattr(AdaptedLinear, "forward", counted_forward)
    monkeypatch.setattr(AdaptedLinear, "weight_norm", counted_norm)
    return seen


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke recipe's paths are relative to the repository
    recipe_checkpoint(tmp_path / "ckpt", ["adapter.dropout=0.1"])
    return tmp_path / "ckpt"


def run_eval(ckpt, mode: str):
    from dora_cli.evaluate import run_eval

    run_eval(ckpt, [f"eval.mode={mode}", "eval.limit=6", "eval.batch_size=3", "eval.max_new_tokens=4",
                    "eval.num_beams=1"], out=ckpt.parent / f"eval-{mode}")


def run_lm_eval(ckpt):
    from dora_cli.evaluate import run_eval

    run_eval(ckpt, ["eval.suite=lm_eval", "eval.tasks=[llm_adapters_boolq]", "eval.limit=6", "eval.batch_size=1"],
             out=ckpt.parent / "eval-lm_eval")


def run_generate(ckpt):
    from dora_cli.generate import Sampling, run_generate

    run_generate(ckpt, "Is the sky blue?", Sampling(max_new_tokens=6))


def run_chat(ckpt):
    from dora_cli.generate import Sampling, run_chat

    run_chat(ckpt, Sampling(max_new_tokens=4), stdin=io.StringIO("Hi\nAnd then?\n"))


PATHS = {
    "eval loglik": lambda c: run_eval(c, "loglik"),
    "eval generate": lambda c: run_eval(c, "generate"),
    "eval lm_eval": run_lm_eval,
    "generate": run_generate,
    "chat": run_chat,
}


@pytest.mark.parametrize("path", list(PATHS))
def test_the_norm_is_computed_once_per_layer_on_every_inference_path(path, checkpoint, spy):
    PATHS[path](checkpoint)
    layers = len(spy["layers"])
    assert layers == 10  # q / k / v / up / down in 2 layers
    assert spy["wrong"] == []  # every forward in eval mode, without gradients
    assert spy["forwards"] >= 3 * layers  # several forwards per layer ...
    assert spy["norms"] == layers  # ... and one norm per layer
