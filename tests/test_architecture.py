"""The architecture's promises (docs/ARCHITECTURE.md), checked on the code itself.

- no module imports a private name (`_x`) of another module;
- the run directory's file names are spelled in rundir.py only;
- a new adapter method is one class: a Direction defined here, registered as two methods (with and
  without a magnitude), trains, saves, loads, merges and folds through the unchanged engine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_llama
from torch import nn

from dora_cli.adapters import (
    AdapterConfig,
    adapted_modules,
    apply_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    variants,
)
from dora_cli.checkpoints import fold, read_adapter

PACKAGE = ROOT / "dora_cli"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_private_name_of_another(path):
    tree = ast.parse(path.read_text())
    me = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dora_cli") and node.module != me:
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{path.name}:{node.lineno} imports {private} from {node.module}"


RUN_FILES = ('"recipe.yaml"', '"metrics.jsonl"', '"trainer_state"', '"manifest.json"', '"train.log"', '/ "final"')


@pytest.mark.parametrize("path", [p for p in SOURCES if p.name != "rundir.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_run_directory_layout_is_spelled_in_rundir_only(path):
    spelled = [name for name in RUN_FILES if name in path.read_text()]
    assert not spelled, f"{path.name} spells {spelled}: use dora_cli.rundir's names"


# ---- a new method is one class ---------------------------------------------------------------------------
class Outer(variants.Direction):
    """A rank-one update ΔW = u · vᵀ (u [out] starts at 0, v [in] random): the smallest possible new method."""

    name = "outer"
    peft_type = "OUTER"
    tensors = {"outer_u": "outer_u", "outer_v": "outer_v"}

    @classmethod
    def init(cls, layer, d_out, d_in, opts, params):
        layer.outer_u = nn.Parameter(torch.zeros(d_out, **params))
        layer.outer_v = nn.Parameter(torch.randn(d_in, **params) / d_in**0.5)

    @classmethod
    def shapes(cls, d_out, d_in, r):
        return {"outer_u": (d_out,), "outer_v": (d_in,)}

    @classmethod
    def factors(cls, layer):
        return layer.outer_u[:, None], layer.outer_v[None, :], 1.0

    @classmethod
    def delta(cls, layer, xd):
        return (xd @ layer.outer_v.to(xd.dtype))[..., None] * layer.outer_u.to(xd.dtype)

    @classmethod
    def peft_fields(cls, cfg):
        return {}


@pytest.fixture
def outer_methods(monkeypatch):
    """Registers the two methods of `Outer` for one test (the registry is the only place that changes)."""
    monkeypatch.setitem(variants.METHODS, "outer", variants.Method("outer", "Outer", Outer, magnitude=False, peft_native=False))
    monkeypatch.setitem(variants.METHODS, "douter", variants.Method("douter", "DOuter", Outer, magnitude=True, peft_native=False))


@pytest.mark.parametrize("method", ["outer", "douter"])
def test_a_new_method_is_one_direction_class(outer_methods, method, tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    ids = torch.randint(0, 256, (2, 12))
    reference = base(ids).logits
    cfg = AdapterConfig(method=method, target_modules=["q_proj", "v_proj"])
    apply_adapters(base, cfg)
    assert len(list(adapted_modules(base))) == 4
    assert torch.equal(base(ids).logits, reference)  # u = 0 and m = ‖W0‖: the base model at step 0

    params = [p for p in base.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(2):
        base(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = base(ids).logits
    assert (trained - reference).abs().max() > 1e-4  # it trains

    save_adapter(base, cfg, tmp_path)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    assert torch.allclose(fresh(ids).logits, trained, atol=1e-6)

    adapter = read_adapter(tmp_path)  # the checkpoint reader, no model
    name, layer = next(iter(adapted_modules(base)))
    folded = fold(layer.base_layer.weight.detach(), name, adapter)
    assert torch.allclose(folded, layer.merged_weight(), atol=1e-6)

    merge_adapters(base)
    assert torch.allclose(base(ids).logits, trained, atol=1e-5)
