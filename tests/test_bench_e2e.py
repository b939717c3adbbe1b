"""bench/bench_e2e.py, the harness itself: its JSON, and that both sides (and the floor) train on the same tokens.

No timing is asserted (benchmarks are never timed tests): only the structure of the report and that HF
Trainer + PEFT received exactly the micro-batches `dora train` ran, step by step.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import ROOT, requires_peft


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "bench_e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def quick_report(e2e, tmp_path_factory) -> dict:
    """One quick round on the tiny random model: LoRA, ours + HF, and a lever `dora train` does not know."""
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    code = e2e.main(["--quick", "--methods", "lora", "--configs", "baseline,train.not_a_lever=1", "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


@requires_peft
def test_report_structure(quick_report):
    r = quick_report
    assert r["complete"] is True
    assert r["settings"]["timed_steps"] == 3 and r["settings"]["warmup_steps"] == 1 and r["settings"]["rounds"] == 1
    assert r["settings"]["configs"]["baseline"] == {"ours_overrides": [], "hf": {}, "every_side_overrides": []}
    assert r["settings"]["omp_wait_policy"] == "PASSIVE"  # the default, as the workers ran
    env = r["environment"]
    assert env["cpu_count"] >= 1 and len(env["load_average_start"]) == 3 and len(env["load_average_end"]) == 3
    assert all(env["versions"][pkg] for pkg in ("torch", "transformers", "peft"))
    runs = r["runs"]["demo"]["lora"]
    # HF has no such lever; the floor reads the recipe with the overrides, as ours
    assert set(runs) == {"ours/baseline", "hf/baseline", "floor/baseline", "ours/train.not_a_lever=1",
                         "floor/train.not_a_lever=1"}
    for key in ("ours/baseline", "hf/baseline", "floor/baseline"):
        entry = runs[key]
        assert entry["status"] == "ok", entry
        (one,) = entry["rounds"]
        assert one["steps"] == 4 and len(one["step_times_s"]) == 3
        assert all(t > 0 for t in one["step_times_s"])
        assert one["step_time_s"] > 0 and one["real_tokens_per_s"] > 0 and one["peak_rss_mb"] > 0
        assert 0 <= one["padding_fraction"] < 1
        assert entry["median"]["step_time_s"] == one["step_time_s"]
    assert runs["hf/baseline"]["rounds"][0]["hf_sampling"] == "sequential"


@requires_peft
def test_unknown_lever_is_recorded_not_fatal(quick_report):
    for side in ("ours", "floor"):
        status = quick_report["runs"]["demo"]["lora"][f"{side}/train.not_a_lever=1"]["status"]
        assert status.startswith("unsupported: error:") and "not_a_lever" in status


@requires_peft
def test_both_sides_train_on_the_same_tokens_per_step(quick_report):
    runs = quick_report["runs"]["demo"]["lora"]
    ours, hf = runs["ours/baseline"]["rounds"][0], runs["hf/baseline"]["rounds"][0]
    assert ours["real_tokens_per_step"] == hf["real_tokens_per_step"]
    assert ours["padded_tokens_per_step"] == hf["padded_tokens_per_step"]
    assert len(set(ours["real_tokens_per_step"])) > 1  # distinct batches: a shifted order would show
    assert sum(ours["real_tokens_per_step"]) == ours["tokens_seen_by_dora"]  # dora train's own count agrees
    assert quick_report["tokens_match"] == {"demo": {"lora": {"baseline": [True]}}}
    floor = runs["floor/baseline"]["rounds"][0]
    assert floor["real_tokens_per_step"] == ours["real_tokens_per_step"]
    assert floor["padded_tokens_per_step"] == ours["padded_tokens_per_step"]
    assert floor["optimizer"] is None and floor["lr_per_step"] == []


@requires_peft
def test_both_sides_use_the_same_learning_rate_every_step(quick_report):
    runs = quick_report["runs"]["demo"]["lora"]
    ours, hf = runs["ours/baseline"]["rounds"][0], runs["hf/baseline"]["rounds"][0]
    assert len(ours["lr_per_step"]) == 4 and len(set(ours["lr_per_step"])) > 1  # the schedule moves
    assert hf["lr_per_step"] == pytest.approx(ours["lr_per_step"], rel=1e-12)


@requires_peft
def test_ratios_name_their_figures(quick_report):
    ratios = {e["name"]: e for e in quick_report["ratios"]["demo"]}
    lora = ratios["lora: HF step time / ours"]
    assert lora["value"] == pytest.approx(lora["numerator"]["value"] / lora["denominator"]["value"])
    assert lora["numerator"]["run"] == "hf/baseline" and lora["target"] == ">= 1.0" and lora["pass"] in (True, False)
    dora = ratios["dora: HF step time / ours"]
    assert dora["value"] is None and dora["pass"] is None and dora["numerator"]["status"] == "not run"
    floor = ratios["lora: ours / floor step time"]
    # the recipe as written: reported, its precision the recipe's (the targets sit on fp32 / bf16 set explicitly)
    assert floor["denominator"]["run"] == "floor/baseline" and floor["target"] is None
    assert floor["value"] == pytest.approx(floor["numerator"]["value"] / floor["denominator"]["value"])
    assert not any("bf16" in name for name in ratios)  # not run: not listed
    assert not any("packing" in name for name in ratios)  # a uniform-length workload has no packing ratio


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_tokens_per_step_undoes_a_prefetching_loader(e2e, micro):
    """HF's loader collates one micro-batch ahead, so the step during which a batch is collated is wrong
    for it; by position it is right. Ours collates in the step: by step it is right."""
    steps, sizes = 3, [(10 + i, 16 + i) for i in range(3 * micro + 1)]  # one extra: the prefetched batch
    expected = [sum(sizes[s * micro + j][0] for j in range(micro)) for s in range(steps)]
    in_step = [(i // micro, r, p, 0.0) for i, (r, p) in enumerate(sizes)]
    ahead = [(max(0, (i - 1) // micro), r, p, 0.0) for i, (r, p) in enumerate(sizes)]
    assert e2e.tokens_per_step(in_step, steps, None)[0] == expected
    assert e2e.tokens_per_step(ahead, steps, micro)[0] == expected


def test_no_counted_batches_give_no_token_figures(e2e):
    """If dora train stops taking its collate function from a known factory, the figures say so, not 0."""
    rec = {"batches": [], "micro_per_step": None, "started": 0.0}
    fig = e2e.token_figures(rec, steps=4, warmup=1, timed_s=3.0)
    assert fig["real_tokens_per_s"] is None and fig["padding_fraction"] is None
    assert "no micro-batch counted" in fig["tokens_note"]


@pytest.mark.parametrize(
    "name, ours, hf, both",
    [
        ("baseline", (), {}, ()),
        ("group_by_length", ("data.group_by_length=true",), {"group_by_length": True}, ()),
        ("packing", ("data.packing=true",), None, ()),
        ("threads3", ("train.threads=3",), None, ()),
        ("fp32", (), {}, ("train.mixed_precision=no",)),
        ("bf16", (), {}, ("train.mixed_precision=bf16",)),
        ("packing+compile", ("data.packing=true", "train.compile=true"), None, ()),
        ("optim.lr=0.1+group_by_length", ("optim.lr=0.1", "data.group_by_length=true"), None, ()),
        ("fp32+group_by_length", ("data.group_by_length=true",), {"group_by_length": True}, ("train.mixed_precision=no",)),
    ],
)
def test_configurations(e2e, name, ours, hf, both):
    lever = e2e.parse_config(name)
    assert lever.ours == ours and lever.hf == hf and lever.both == both


@pytest.mark.parametrize("config, precision", [("fp32", "no"), ("bf16", "bf16"), ("baseline", None)])
def test_precision_reaches_every_side(e2e, tmp_path, config, precision):
    """A precision configuration sets the recipe's train.mixed_precision for ours, HF (whose bf16 / fp16 flags
    follow the recipe) and the floor alike; the baseline leaves the recipe as written on every side."""
    from types import SimpleNamespace

    args = SimpleNamespace(warmup=1, steps=2, tiny=True)
    for side in ("ours", "hf", "floor"):
        spec = e2e.worker_spec(e2e.Job("demo", "lora", config, side), args, "recipes/smollm2_demo.yaml", tmp_path)
        set_to = [o.split("=", 1)[1] for o in spec["overrides"] if o.startswith("train.mixed_precision=")]
        assert set_to == ([precision] if precision else []), (side, spec["overrides"])


def test_ratio_names_are_unique(e2e):
    """Each ratio names one pair of runs: a report keyed by name (as the README's tables read it) loses none."""
    names = [s.name for s in e2e.ratio_specs()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", ["fp32+bf16", "fp32+train.mixed_precision=bf16", "optim.lr=0.1+optim.lr=0.2",
                                  "group_by_length+data.group_by_length=false"])
def test_a_key_set_twice_in_one_configuration_is_refused(e2e, name):
    """Sides would disagree (HF reads only the every-side overrides) or the last value would win silently."""
    with pytest.raises(ValueError, match="sets the same key twice"):
        e2e.parse_config(name)


def test_hf_precision_follows_the_recipe(e2e, tmp_path):
    """HF's bf16 / fp16 flags come from the recipe's train.mixed_precision, which a precision configuration
    sets on the HF side too (test_precision_reaches_every_side): so fp32 is fp32 on both sides."""
    from types import SimpleNamespace

    from dora_cli.recipe import load_recipe

    pytest.importorskip("transformers")
    plan = SimpleNamespace(micro=8, accumulation=1, total_steps=3)
    for precision, flags in (("no", (False, False)), ("bf16", (True, False)), ("fp16", (False, True))):
        recipe = load_recipe(str(ROOT / "recipes" / "smollm2_demo.yaml"), [f"train.mixed_precision={precision}"])
        try:
            args = e2e.hf_training_arguments(recipe, plan, False, str(tmp_path / "hf"))
        except ValueError as err:  # transformers refuses fp16 without a GPU on some versions
            assert precision == "fp16", err
            continue
        assert (args.bf16, args.fp16) == flags


def test_floor_targets_are_on_the_precision_configurations(e2e):
    """Issue 22's targets sit on fp32 and bf16 set explicitly, not on the recipe as written (whose precision is the
    recipe's: bf16 for the demo recipe), which is reported without a target."""
    floor = [s for s in e2e.ratio_specs() if s.denominator[1].startswith("floor/") and s.figure == "step_time_s"]
    targeted = {s.numerator[1].split("/")[1] for s in floor if s.target}
    assert targeted == {"fp32", "bf16"}
    assert {s.numerator[1] for s in floor if not s.target} == {"ours/baseline"}


def test_unknown_configuration_is_refused(e2e):
    with pytest.raises(ValueError, match="unknown configuration 'pakcing'"):
        e2e.parse_config("pakcing")


def test_the_floor_computes_input_gradients_only(e2e):
    """The floor pays no weight-gradient GEMM: no parameter gets a gradient, yet the backward reaches the
    first layer (the embedding output requires grad), as an adapter on the first layer needs."""
    import torch
    from conftest import tiny_llama

    model = e2e.freeze_to_floor(tiny_llama()).train()
    seen = {}
    model.model.layers[0].self_attn.q_proj.register_full_backward_hook(
        lambda _m, grad_in, _grad_out: seen.update(q0=grad_in[0]))
    ids = torch.randint(0, 256, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert seen["q0"] is not None and seen["q0"].abs().sum() > 0  # the input gradient of layer 0's q_proj
