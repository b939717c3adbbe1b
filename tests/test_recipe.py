"""Recipe loading: base inheritance, ${env:...}, dotted overrides, dump round trip, one-line errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from dora_cli import cli
from dora_cli.adapters.config import _scalar_kinds
from dora_cli.errors import UserError
from dora_cli.recipe import Recipe, check_batch, dump_recipe, load_recipe, recipe_from_dict, refuse_set_twice

MINIMAL = "model: {name_or_path: some/model}\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run every test in its own directory so that messages show short relative file names."""
    monkeypatch.chdir(tmp_path)


def write(name: str, text: str) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def user_error(path, overrides=()) -> str:
    """The message of the UserError (exactly that class) that loading raises."""
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    assert info.type is UserError
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------
# Loading


def test_minimal_recipe_gets_the_defaults():
    recipe = load_recipe(write("x.yaml", MINIMAL))
    assert isinstance(recipe, Recipe)
    assert recipe.model.name_or_path == "some/model"
    assert recipe.adapter.method == "dora" and recipe.adapter.r == 8
    assert recipe.train.epochs == 1.0 and recipe.train.max_steps is None
    assert recipe.output_dir == "runs/default"
    assert recipe.base is None


def test_paths_inside_a_recipe_are_not_resolved():
    write("sub/x.yaml", MINIMAL + "output_dir: runs/x\ndata: {sources: [{path: data/a.json}]}\n")
    recipe = load_recipe("sub/x.yaml")
    assert recipe.output_dir == "runs/x"
    assert recipe.data.sources[0].path == "data/a.json"


def test_base_inheritance_two_levels_relative_to_each_file():
    write("recipes/common/root.yaml", MINIMAL + "adapter: {r: 4, alpha: 8}\ntrain: {batch_size: 32}\n")
    write("recipes/common/mid.yaml", "base: root.yaml\nadapter: {r: 16}\noutput_dir: runs/mid\n")
    write("recipes/exp/child.yaml", "base: ../common/mid.yaml\ntrain: {micro_batch_size: 8}\n")
    recipe = load_recipe("recipes/exp/child.yaml")
    assert recipe.adapter.r == 16  # mid over root
    assert recipe.adapter.alpha == 8  # from root, kept by the merge
    assert recipe.train.batch_size == 32 and recipe.train.micro_batch_size == 8
    assert recipe.output_dir == "runs/mid"
    assert recipe.base is None


def test_deep_merge_merges_mappings_and_replaces_lists_and_scalars():
    write(
        "base.yaml",
        "model: {name_or_path: a/b, config: {model_type: llama, rope: {theta: 10000, kind: x}}}\n"
        "adapter: {target_modules: [q_proj, k_proj, v_proj], r: 4}\n"
        "expected: {boolq: 70.0, piqa: 80.0}\n",
    )
    write(
        "x.yaml",
        "base: base.yaml\n"
        "model: {config: {rope: {theta: 500000}}}\n"
        "adapter: {target_modules: [o_proj]}\n"
        "expected: {piqa: 81.5}\n"
        "train: {max_grad_norm: 1.0}\n",
    )
    recipe = load_recipe("x.yaml")
    assert recipe.model.name_or_path == "a/b"
    assert recipe.model.config == {"model_type": "llama", "rope": {"theta": 500000, "kind": "x"}}
    assert recipe.adapter.target_modules == ["o_proj"]  # a list replaces, never appends
    assert recipe.adapter.r == 4
    assert recipe.expected == {"boolq": 70.0, "piqa": 81.5}

    write("y.yaml", "base: x.yaml\nmodel: {config: null}\ntrain: {max_grad_norm: null}\n")
    recipe = load_recipe("y.yaml")
    assert recipe.model.config is None  # null replaces a whole mapping
    assert recipe.train.max_grad_norm is None


def test_env_interpolation(monkeypatch):
    monkeypatch.setenv("DORA_TEST_MODEL", "org/model")
    monkeypatch.setenv("DORA_TEST_RANK", "32")
    monkeypatch.delenv("DORA_TEST_UNSET", raising=False)
    write(
        "x.yaml",
        "model: {name_or_path: '${env:DORA_TEST_MODEL}'}\n"
        "adapter: {r: '${env:DORA_TEST_RANK}', target_modules: ['${env:DORA_TEST_UNSET,q_proj}', v]}\n"
        "output_dir: runs/${env:DORA_TEST_RANK}/${env:DORA_TEST_UNSET,}x\n"
        "eval:\n  mt_bench:\n    judge_api_key_env: $${env:KEEP}\n",
    )
    recipe = load_recipe("x.yaml")
    assert recipe.model.name_or_path == "org/model"
    assert recipe.adapter.r == 32  # a string from the environment, typed by the schema
    assert recipe.adapter.target_modules == ["q_proj", "v"]
    assert recipe.output_dir == "runs/32/x"
    assert recipe.eval.mt_bench.judge_api_key_env == "${env:KEEP}"


def test_env_interpolation_in_base_file_and_base_name(monkeypatch):
    monkeypatch.setenv("DORA_TEST_BASE", "base.yaml")
    monkeypatch.setenv("DORA_TEST_DIR", "runs/env")
    write("base.yaml", MINIMAL + "output_dir: ${env:DORA_TEST_DIR}\n")
    write("x.yaml", "base: ${env:DORA_TEST_BASE}\n")
    assert load_recipe("x.yaml").output_dir == "runs/env"


def test_a_child_value_hides_an_unset_env_var_of_its_base(monkeypatch):
    monkeypatch.delenv("DORA_TEST_UNSET", raising=False)
    write("base.yaml", MINIMAL + "output_dir: ${env:DORA_TEST_UNSET}\n")
    write("x.yaml", "base: base.yaml\noutput_dir: runs/child\n")
    assert load_recipe("x.yaml").output_dir == "runs/child"


@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        ("adapter.r=16", lambda r: r.adapter.r, 16),
        ("optim.lr=0.001", lambda r: r.optim.lr, 0.001),
        ("optim.lr=1e-4", lambda r: r.optim.lr, 1e-4),  # YAML 1.1 reads 1e-4 as a string; the schema types it
        ("adapter.rslora=true", lambda r: r.adapter.rslora, True),
        ("train.max_grad_norm=null", lambda r: r.train.max_grad_norm, None),
        ("adapter.target_modules=[q_proj,v_proj]", lambda r: r.adapter.target_modules, ["q_proj", "v_proj"]),
        ("optim.betas=[0.8, 0.9]", lambda r: r.optim.betas, (0.8, 0.9)),
        ("output_dir=runs/x", lambda r: r.output_dir, "runs/x"),
        ("train.max_steps=10", lambda r: (r.train.max_steps, r.train.epochs), (10, None)),
        ("model.config.hidden_size=32", lambda r: r.model.config, {"model_type": "llama", "hidden_size": 32}),
        ("expected.boolq=70", lambda r: r.expected, {"piqa": 80.0, "boolq": 70.0}),
        ("model.name_or_path=null", lambda r: r.model.name_or_path, None),
        ("adapter={r: 2, alpha: 4}", lambda r: (r.adapter.r, r.adapter.alpha, r.adapter.method), (2, 4.0, "lora")),
        ("data.sources=[{path: a.json, weight: 0.5}]", lambda r: r.data.sources[0].weight, 0.5),
    ],
)
def test_overrides_are_typed_by_the_schema(override, get, expected):
    write(
        "x.yaml",
        "model: {name_or_path: some/model, config: {model_type: llama}}\n"
        "adapter: {method: lora, r: 4}\nexpected: {piqa: 80}\n",
    )
    result = get(load_recipe("x.yaml", [override]))
    assert result == expected and type(result) is type(expected)


def test_overrides_apply_after_base_and_env_in_order(monkeypatch):
    monkeypatch.setenv("DORA_TEST_RANK", "32")
    write("base.yaml", MINIMAL + "adapter: {r: 4}\n")
    write("x.yaml", "base: base.yaml\nadapter: {r: '${env:DORA_TEST_RANK}'}\n")
    assert load_recipe("x.yaml").adapter.r == 32
    assert load_recipe("x.yaml", ["adapter.r=8"]).adapter.r == 8
    assert load_recipe("x.yaml", ["adapter.r=8", "adapter.r=2"]).adapter.r == 2


def test_recipe_from_dict_validates_without_touching_its_input():
    data = {"model": {"name_or_path": "a/b"}, "adapter": {"r": 4}}
    recipe = recipe_from_dict(data, "inline", ["adapter.r=2", "model.config.x=1"])
    assert recipe.adapter.r == 2 and recipe.model.config == {"x": 1}
    assert data == {"model": {"name_or_path": "a/b"}, "adapter": {"r": 4}}
    with pytest.raises(UserError, match=r'^inline: adapter\.alpah: unknown key \(did you mean "alpha"\?\)$' ):
        recipe_from_dict({"model": {"name_or_path": "a"}, "adapter": {"alpah": 4}}, "inline")


# --------------------------------------------------------------------------------------------------
# dump_recipe


def test_dump_round_trip(monkeypatch):
    monkeypatch.setenv("DORA_TEST_DIR", "runs/env")
    write(
        "base.yaml",
        "model: {config: {model_type: llama, hidden_size: 64, rope_scaling: {factor: 2.0}, when: 2024-01-02}, "
        "tokenizer: tok/dir}\n"
        "adapter: {method: dvora, target_modules: ['.*\\.q_proj$'], vera_d_init: 0.05}\n",
    )
    write(
        "x.yaml",
        "base: base.yaml\n"
        "model: {name_or_path: null}\n"
        "data: {format: alpaca, sources: [{path: a.json, weight: 0.25}, {path: hub/set, split: test}]}\n"
        "optim: {betas: [0.8, 0.95], eps: 1.0e-6}\n"
        "schedule: {type: cosine, warmup_ratio: 0.1}\n"
        "train: {mixed_precision: 'no', max_steps: 7}\n"
        "eval: {tasks: ['yes', '007', 'null'], mt_bench: {judge_api_key_env: '$${env:NOT_EXPANDED}'}}\n"
        "output_dir: ${env:DORA_TEST_DIR}\n"
        "expected: {boolq: 70.1, avg: 77.5}\n",
    )
    recipe = load_recipe("x.yaml", ["train.seed=3", "expected.piqa=81"])
    text = dump_recipe(recipe)
    assert "base" not in yaml.safe_load(text)
    assert list(yaml.safe_load(text)) == [name for name in Recipe.model_fields if name != "base"]
    assert yaml.safe_load(text)["output_dir"] == "${env:DORA_TEST_DIR}"  # the reference, as written
    again = load_recipe(write("dumped.yaml", text))
    assert again == recipe
    assert again.eval.mt_bench.judge_api_key_env == "${env:NOT_EXPANDED}"
    assert again.eval.tasks == ["yes", "007", "null"]
    assert dump_recipe(again) == text
    resolved = dump_recipe(recipe, resolved=True)  # the values (what the identity of a run compares)
    assert yaml.safe_load(resolved)["output_dir"] == "runs/env"
    monkeypatch.delenv("DORA_TEST_DIR")
    with pytest.raises(UserError, match="dumped.yaml: output_dir: environment variable DORA_TEST_DIR is not set"):
        load_recipe("dumped.yaml")
    assert load_recipe(write("resolved.yaml", resolved)).model_dump() == recipe.model_dump()


def test_values_from_the_environment_are_saved_as_written_in_every_kind_of_place(monkeypatch):
    """A value is used, never saved: every field (strings, numbers, lists, free-form mappings, a base file) that
    took a value from the environment is dumped as written; an override replaces the reference."""
    secret = "sk-planted-0123456789"
    monkeypatch.setenv("DORA_TEST_SECRET", secret)
    monkeypatch.setenv("DORA_TEST_RANK", "8")
    write("base.yaml", MINIMAL + "eval: {mt_bench: {judge_model: 'm-${env:DORA_TEST_SECRET}'}}\n")
    write(
        "x.yaml",
        "base: base.yaml\n"
        "model: {config: {note: '${env:DORA_TEST_SECRET}'}}\n"
        "adapter: {r: '${env:DORA_TEST_RANK}', target_modules: ['${env:DORA_TEST_UNSET,q_proj}']}\n"
        "data: {sources: [{path: 'hub/${env:DORA_TEST_SECRET}', split: '${env:DORA_TEST_SECRET}'}]}\n"
        "launch: {main_process_ip: '${env:DORA_TEST_SECRET}'}\n"
        "eval: {tasks: ['${env:DORA_TEST_SECRET}'], mt_bench: {judge_url: 'http://u:${env:DORA_TEST_SECRET}@h/v1',"
        " judge_api_key_env: '${env:DORA_TEST_UNSET,KEY}'}}\n"
        "expected: {avg: '${env:DORA_TEST_RANK}'}\n",
    )
    recipe = load_recipe("x.yaml", ["eval.mt_bench.judge_model=plain"])
    assert recipe.eval.mt_bench.judge_url == f"http://u:{secret}@h/v1" and recipe.adapter.r == 8
    text = dump_recipe(recipe)
    assert secret not in text and "${env:DORA_TEST_SECRET}" in text
    saved = yaml.safe_load(text)
    assert saved["adapter"]["r"] == "${env:DORA_TEST_RANK}" and saved["expected"]["avg"] == "${env:DORA_TEST_RANK}"
    assert saved["eval"]["mt_bench"]["judge_model"] == "plain"  # the override's value
    assert load_recipe(write("again.yaml", text)) == load_recipe(write("again.yaml", text))
    assert load_recipe("again.yaml").model_dump() == recipe.model_dump()
    assert secret in dump_recipe(recipe, resolved=True)


def test_dump_of_defaults_round_trips():
    recipe = load_recipe(write("x.yaml", MINIMAL))
    assert load_recipe(write("y.yaml", dump_recipe(recipe))) == recipe


# --------------------------------------------------------------------------------------------------
# Bad input: one line, the file (or override), the key, what was expected


@pytest.mark.parametrize("kind", ["device", "named pipe", "link to a device", "base a device", "too large"])
def test_a_recipe_that_is_not_a_small_regular_file_is_refused_unread(kind):
    """/dev/zero would be read until memory runs out, a named pipe would wait for a writer forever."""
    path = Path("x.yaml")
    if kind == "device":
        path = Path("/dev/zero")
    elif kind == "named pipe":
        os.mkfifo(path)
    elif kind == "link to a device":
        path.symlink_to("/dev/zero")
    elif kind == "base a device":
        write("x.yaml", "base: /dev/zero\n" + MINIMAL)
    else:
        write("x.yaml", MINIMAL + "# " + "x" * (1 << 20) + "\n")
    message = user_error(path)
    if kind == "too large":
        assert message == "x.yaml: is over 1,048,576 bytes, the most a recipe file may have"
    else:
        assert message.endswith("not a regular file (a device, a pipe or a socket), not a recipe file"), message


def test_malformed_yaml_names_file_and_line():
    write("x.yaml", "model:\n  name_or_path: a\nadapter: {r: 4\ntrain:\n  max_steps: 3\n")
    message = user_error("x.yaml")
    assert message.startswith("x.yaml:")
    line = int(message.split(":")[1])
    assert line in (3, 4)
    assert "malformed YAML" in message


def test_malformed_yaml_bad_indentation_line():
    write("x.yaml", "model:\n  name_or_path: a\n adapter: 1\n")
    assert user_error("x.yaml").startswith("x.yaml:3: malformed YAML: ")


def test_special_character_line():
    write("x.yaml", "model: {name_or_path: a}\noutput_dir: a\x01b\n")
    assert user_error("x.yaml").startswith("x.yaml:2: malformed YAML: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "x.yaml: expected a mapping of sections (model:, adapter:, ...), got a list"),
        ("just text\n", "x.yaml: expected a mapping of sections (model:, adapter:, ...), got 'just text'"),
        ("", "x.yaml: empty recipe (a minimal one is `model: {name_or_path: some/model}`)"),
    ],
)
def test_document_must_be_a_mapping(text, expected):
    assert user_error(write("x.yaml", text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "adapter: {rr: 8}\n", 'x.yaml: adapter.rr: unknown key (did you mean "r"?)'),
        (MINIMAL + "adaptor: {r: 8}\n", 'x.yaml: adaptor: unknown key (did you mean "adapter"?)'),
        (
            MINIMAL + "zzz: 1\n",
            "x.yaml: zzz: unknown key (valid keys here: adapter, base, data, eval, expected, launch, model, optim, "
            "output_dir, schedule, train)",
        ),
        ("modle: {name_or_path: a}\n", 'x.yaml: modle: unknown key (did you mean "model"?) (+1 more)'),
        (
            MINIMAL + "data: {sources: [{path: a}, {pth: b}]}\n",
            'x.yaml: data.sources[1].pth: unknown key (did you mean "path"?) (+1 more)',
        ),
        (MINIMAL + "train: {batch_size: abc}\n", "x.yaml: train.batch_size: expected an integer, got 'abc'"),
        (MINIMAL + "train: {batch_size: 2.5}\n", "x.yaml: train.batch_size: expected an integer, got 2.5"),
        (MINIMAL + "optim: {lr: fast}\n", "x.yaml: optim.lr: expected a number, got 'fast'"),
        (MINIMAL + "adapter: {rslora: maybe}\n", "x.yaml: adapter.rslora: expected true or false, got 'maybe'"),
        (MINIMAL + "output_dir: [a]\n", "x.yaml: output_dir: expected a string, got a list"),
        (MINIMAL + "adapter: 5\n", "x.yaml: adapter: expected a mapping, got 5"),
        (MINIMAL + "train: {batch_size: 0}\n", "x.yaml: train.batch_size: expected a value > 0, got 0"),
        (MINIMAL + "optim: {lr: .inf}\n", "x.yaml: optim.lr: expected a finite number, got inf"),
        (MINIMAL + "expected: {boolq: .nan}\n", "x.yaml: expected.boolq: expected a finite number, got nan"),
        (
            MINIMAL + "adapter: {method: doro}\n",
            "x.yaml: adapter.method: expected one of dora, dvora, full, lora or vera, got 'doro' (did you mean \"dora\"?)",
        ),
        (
            MINIMAL + "train: {mixed_precision: off}\n",  # YAML 1.2: off is a string, not false
            "x.yaml: train.mixed_precision: expected one of bf16, fp16 or no, got 'off'",
        ),
        ("adapter: {r: 4}\n", "x.yaml: model: required, not set"),
        (
            "model: {dtype: float32}\n",
            "x.yaml: model: set model.name_or_path (hub id, directory or .gguf file) or model.config",
        ),
        (
            MINIMAL + "schedule: {warmup_steps: 1, warmup_ratio: 0.1}\n",
            "x.yaml: schedule: set schedule.warmup_steps or schedule.warmup_ratio, not both",
        ),
        (MINIMAL + "optim: {betas: [0.9]}\n", "x.yaml: optim.betas[1]: missing item"),
        (MINIMAL + "expected: {1: 2.0}\n", "x.yaml: expected: keys must be strings, got 1"),
        (
            MINIMAL + "adapter: {rr: 8, method: doro}\ntrain: {batch_size: x}\n",
            'x.yaml: adapter.rr: unknown key (did you mean "r"?) (+2 more)',
        ),
    ],
)
def test_schema_errors_are_one_line(text, expected):
    assert user_error(write("x.yaml", text)) == expected


def test_yaml_1_2_scalars_no_is_a_string_and_1e_4_a_float():
    recipe = load_recipe(write("x.yaml", MINIMAL + "train: {mixed_precision: no}\noptim: {lr: 1e-4}\n"))
    assert recipe.train.mixed_precision == "no" and recipe.optim.lr == 1e-4
    assert load_recipe(write("y.yaml", dump_recipe(recipe))) == recipe


def test_an_error_in_a_base_file_names_that_file():
    write("recipes/base.yaml", MINIMAL + "adapter: {rr: 4}\ntrain: {batch_size: 16}\n")
    write("recipes/x.yaml", "base: base.yaml\ntrain: {batch_size: many}\n")
    assert user_error("recipes/x.yaml") == 'recipes/base.yaml: adapter.rr: unknown key (did you mean "r"?) (+1 more)'
    write("recipes/y.yaml", "base: base.yaml\nadapter: {rr: 8}\n")
    assert user_error("recipes/y.yaml").startswith("recipes/y.yaml: adapter.rr: unknown key")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "train: {seed: 1" + "0" * 5000 + "}\n", "x.yaml: malformed YAML: a number has more digits than Python reads"),
        ("model: " + "[" * 2000 + "]" * 2000 + "\n", "x.yaml: malformed YAML: nested too deeply"),
        ("model: " + "[" * 150 + "]" * 150 + "\n", "x.yaml: model[0][0]...: nested more than 100 levels"),
        ("model: &a [*a]\n", "x.yaml: model[0][0]...: nested more than 100 levels"),
    ],
)
def test_pathological_yaml(text, expected):
    assert user_error(write("x.yaml", text)).startswith(expected)


def test_not_utf8():
    Path("x.yaml").write_bytes(b"model: {name_or_path: \xff\xfe}\n")
    assert user_error("x.yaml") == "x.yaml: not a UTF-8 text file"


def test_missing_file():
    assert user_error("nope.yaml") == "nope.yaml: no such file"


def test_directory_instead_of_file():
    Path("adir").mkdir()
    assert user_error("adir") == "adir: is a directory, not a recipe file"


def test_unknown_base_file():
    write("recipes/x.yaml", "base: ../common/missing.yaml\n" + MINIMAL)
    assert user_error("recipes/x.yaml") == "recipes/x.yaml: base: no such file common/missing.yaml"


def test_base_must_be_a_file_name():
    write("x.yaml", "base: [a.yaml]\n" + MINIMAL)
    assert user_error("x.yaml") == "x.yaml: base: expected a file name, got a list"


def test_base_cycle_lists_the_cycle():
    write("a.yaml", "base: b.yaml\n" + MINIMAL)
    write("b.yaml", "base: c.yaml\n")
    write("c.yaml", "base: a.yaml\n")
    assert user_error("a.yaml") == "c.yaml: base: cycle a.yaml -> b.yaml -> c.yaml -> a.yaml"


def test_base_naming_itself_is_a_cycle():
    write("sub/a.yaml", "base: ./a.yaml\n" + MINIMAL)
    assert user_error("sub/a.yaml") == "sub/a.yaml: base: cycle sub/a.yaml -> sub/a.yaml"


def test_unset_env_var_names_file_key_and_variable(monkeypatch):
    monkeypatch.delenv("DORA_TEST_UNSET", raising=False)
    write("base.yaml", MINIMAL + "adapter: {target_modules: [q, 'x${env:DORA_TEST_UNSET}']}\n")
    write("x.yaml", "base: base.yaml\n")
    assert user_error("x.yaml") == (
        "base.yaml: adapter.target_modules[1]: environment variable DORA_TEST_UNSET is not set "
        "(default: ${env:DORA_TEST_UNSET,value})"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${env:1BAD}", "x.yaml: output_dir: bad environment variable name '1BAD' in ${env:...}"),
        ("a${env:HOME", "x.yaml: output_dir: unterminated ${env:...} in 'a${env:HOME'"),
    ],
)
def test_malformed_env_reference(value, expected):
    write("x.yaml", MINIMAL + f"output_dir: '{value}'\n")
    assert user_error("x.yaml") == expected


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("adapter.r", "override adapter.r: expected key=value with a dotted key, e.g. train.max_steps=10"),
        ("=3", "override =3: expected key=value with a dotted key, e.g. train.max_steps=10"),
        ("adapter..r=3", "override adapter..r=3: expected key=value with a dotted key, e.g. train.max_steps=10"),
        ("adapter.rr=8", 'override adapter.rr=8: adapter.rr: unknown key (did you mean "r"?)'),
        ("trian.max_steps=8", 'override trian.max_steps=8: trian: unknown key (did you mean "train"?)'),
        ("model.quantization.mod=nf4", 'override model.quantization.mod=nf4: model.quantization.mod: unknown key (did you mean "mode"?)'),
        ("adapter.r.x=1", "override adapter.r.x=1: adapter.r: not a section; set adapter.r=<value> as a whole"),
        ("data.sources.0.path=a", "override data.sources.0.path=a: data.sources: not a section; set data.sources=<value> as a whole"),
        ("base=other.yaml", "override base=other.yaml: base: cannot be overridden (overrides apply after inheritance)"),
        ("train.max_steps=abc", "override train.max_steps=abc: train.max_steps: expected an integer, got 'abc'"),
        ("adapter.method=doro", "override adapter.method=doro: adapter.method: expected one of dora, dvora, full, lora or vera, got 'doro' (did you mean \"dora\"?)"),
        ("adapter={rr: 1}", 'override adapter={rr: 1}: adapter.rr: unknown key (did you mean "r"?)'),
        ("model.name_or_path=null", "override model.name_or_path=null: model: set model.name_or_path (hub id, directory or .gguf file) or model.config"),
        ("adapter.target_modules=[q_proj", "override adapter.target_modules=[q_proj: malformed YAML value: expected ',' or ']', but got '<stream end>'"),
        ("expected.boolq=high", "override expected.boolq=high: expected.boolq: expected a number, got 'high'"),
        ("output_dir=3", "override output_dir=3: output_dir: expected a string, got 3"),
        ("launch.zero_stage=4", "override launch.zero_stage=4: launch.zero_stage: expected one of 1, 2 or 3, got 4"),
    ],
)
def test_bad_overrides(override, expected):
    write("x.yaml", MINIMAL)
    assert user_error("x.yaml", [override]) == expected


def test_recursive_override_value():
    write("x.yaml", MINIMAL)
    assert user_error("x.yaml", ["model.config.x=&a [*a]"]) == (
        "override model.config.x=&a [*a]: model.config.x...: nested more than 100 levels"
    )


def test_an_error_that_no_override_touched_names_the_file():
    write("x.yaml", MINIMAL + "train: {batch_size: abc}\n")
    assert user_error("x.yaml", ["adapter.r=4"]) == "x.yaml: train.batch_size: expected an integer, got 'abc'"


def test_override_into_a_non_mapping_value():
    write("x.yaml", "model: {name_or_path: a, config: 3}\n")
    assert user_error("x.yaml", ["model.config.hidden_size=3"]) == (
        "override model.config.hidden_size=3: model.config: is 3, not a mapping"
    )


def _scalar_fields(model=Recipe, prefix=()):
    """(dotted key, kinds) of every scalar field of the schema, through nested sections (not lists of them)."""
    for name, field in model.model_fields.items():
        kinds = _scalar_kinds(field.annotation)
        nested = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if nested:
            yield from _scalar_fields(nested[0], (*prefix, name))
        elif kinds & {int, float, bool}:
            yield ".".join((*prefix, name)), kinds


NUMBERS = [key for key, kinds in _scalar_fields() if bool not in kinds]
BOOLEANS = [key for key, kinds in _scalar_fields() if not kinds & {int, float}]


def test_the_field_lists_cover_the_schema():
    assert {"adapter.r", "adapter.alpha", "optim.lr", "train.micro_batch_size", "train.max_steps", "launch.zero_stage"} <= set(NUMBERS)
    assert {"adapter.rslora", "model.trust_remote_code"} <= set(BOOLEANS)


@pytest.mark.parametrize("key", NUMBERS)
def test_a_boolean_is_not_taken_for_a_number(key):
    """pydantic's lax mode reads true as 1: `adapter.r=true` would train at rank 1."""
    write("x.yaml", MINIMAL)
    assert user_error("x.yaml", [f"{key}=true"]) == f"override {key}=true: {key}: expected a number, got true"


@pytest.mark.parametrize("key", BOOLEANS)
@pytest.mark.parametrize("value", ["1", "0", "0.0"])
def test_a_number_is_not_taken_for_true_or_false(key, value):
    write("x.yaml", MINIMAL)
    assert user_error("x.yaml", [f"{key}={value}"]) == f"override {key}={value}: {key}: expected true or false, got {value}"


@pytest.mark.parametrize(("override", "says"), [
    ("optim.betas=[false, 0.9]", "optim.betas: expected a number, got false"),
    ("expected={avg: true}", "expected: expected a number, got true"),
    ("data.sources=[{path: a.json, weight: true}]", "data.sources[0].weight: expected a number, got true"),
    ("eval.tasks=[true]", None),  # a list of strings: pydantic refuses a boolean itself
])
def test_inside_lists_and_mappings_too(override, says):
    write("x.yaml", MINIMAL)
    message = user_error("x.yaml", [override])
    assert says is None or message == f"override {override}: {says}"


@pytest.mark.parametrize(("override", "get", "expected"), [
    ("adapter.r=010", lambda r: r.adapter.r, 10),  # YAML 1.1: octal 8
    ("adapter.r=0x10", lambda r: r.adapter.r, 16),
    ("output_dir=2024-01-01", lambda r: r.output_dir, "2024-01-01"),  # YAML 1.1: a date
    ("output_dir=1:30", lambda r: r.output_dir, "1:30"),  # YAML 1.1: 90
    ("output_dir='0o17'", lambda r: r.output_dir, "0o17"),  # a string read as a number once saved unquoted
])
def test_numbers_are_read_as_yaml_1_2_and_saved_as_read(override, get, expected):
    write("x.yaml", MINIMAL)
    recipe = load_recipe("x.yaml", [override])
    assert get(recipe) == expected
    write("saved.yaml", dump_recipe(recipe))
    assert get(load_recipe("saved.yaml")) == expected


def test_sexagesimal_is_not_a_number():
    write("x.yaml", MINIMAL + "adapter: {r: 1:30}\n")
    assert user_error("x.yaml") == "x.yaml: adapter.r: expected an integer, got '1:30'"


@pytest.mark.parametrize(("overrides", "options", "says"), [
    (["adapter.r=4", "adapter.r=16"], {}, "override adapter.r=16: adapter.r: also set by the override adapter.r=4; give it once"),
    (["adapter.r=4", "adapter={r: 16}"], {}, "override adapter={r: 16}: adapter.r: also set by the override adapter.r=4"),
    (["model.config={seed: 1}", "model.config=null"], {}, "override model.config=null: model.config.seed: also set by"),
    (["eval={limit: 2}"], {"eval.limit": "set by both --limit and this override; give one"},
     "override eval={limit: 2}: eval.limit: set by both --limit and this override; give one"),
    ([" adapter.r =4"], {"adapter.r": "X"}, "override adapter.r =4: adapter.r: X"),
    (["adapter={r: 4, alpha: 8}", "adapter.dropout=0.1", "adapter={}", "eval.limit=2"], {"eval.mode": "X"}, None),
])
def test_a_key_set_twice_on_the_command_line_is_refused(overrides, options, says):
    if says is None:
        refuse_set_twice(overrides, options)
        return
    with pytest.raises(UserError) as info:
        refuse_set_twice(overrides, options)
    assert str(info.value).startswith(says)


def test_a_string_from_the_environment_still_converts(monkeypatch):
    monkeypatch.setenv("DORA_TEST_R", "4")
    monkeypatch.setenv("DORA_TEST_FLAG", "true")
    write("x.yaml", MINIMAL + "adapter: {r: '${env:DORA_TEST_R}', rslora: '${env:DORA_TEST_FLAG}'}\n")
    adapter = load_recipe("x.yaml").adapter
    assert (adapter.r, adapter.rslora) == (4, True)


@pytest.mark.parametrize("alpha", ["0", "-1", "-16.0"])
def test_alpha_must_be_positive(alpha):
    write("x.yaml", MINIMAL)
    assert user_error("x.yaml", [f"adapter.alpha={alpha}"]).endswith(f"adapter.alpha: expected a value > 0.0, got {alpha}")


# --------------------------------------------------------------------------------------------------
# check_batch


@pytest.mark.parametrize(("batch", "micro", "procs", "steps"), [(16, 4, 1, 4), (16, 4, 2, 2), (8, 8, 1, 1), (48, 2, 3, 8)])
def test_check_batch_returns_accumulation_steps(batch, micro, procs, steps):
    recipe = recipe_from_dict({"model": {"name_or_path": "a"}, "train": {"batch_size": batch, "micro_batch_size": micro}}, "t")
    assert check_batch(recipe, procs) == steps


def test_check_batch_not_divisible():
    recipe = recipe_from_dict({"model": {"name_or_path": "a"}, "train": {"batch_size": 16, "micro_batch_size": 4}}, "t")
    with pytest.raises(UserError) as info:
        check_batch(recipe, 3)
    assert info.type is UserError
    assert str(info.value) == (
        "train.batch_size=16 is not divisible by train.micro_batch_size=4 x 3 processes (= 12); "
        "use a multiple of 12 such as train.batch_size=12"
    )
    with pytest.raises(UserError, match=r"x 1 process \(= 32\).*train\.batch_size=32$"):
        check_batch(recipe_from_dict({"model": {"name_or_path": "a"}, "train": {"micro_batch_size": 32}}, "t"), 1)
    with pytest.raises(UserError, match="at least 1"):
        check_batch(recipe, 0)


# --------------------------------------------------------------------------------------------------
# The CLI turns a UserError into one line and exit status 2


def test_cli_main_prints_one_line_and_exits_2(monkeypatch, capsys):
    write("x.yaml", MINIMAL + "adapter: {rr: 8}\n")

    def fake_app(**_):
        load_recipe("x.yaml")

    monkeypatch.setattr(cli, "app", fake_app)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == 'error: x.yaml: adapter.rr: unknown key (did you mean "r"?)\n'


def test_cli_main_keeps_the_traceback_of_a_bug(monkeypatch):
    def buggy_app(**_):
        raise KeyError("bug")

    monkeypatch.setattr(cli, "app", buggy_app)
    with pytest.raises(KeyError):
        cli.main()


@pytest.mark.skipif(importlib.util.find_spec("dora_cli.train") is None, reason="dora_cli/train.py not written yet")
def test_dora_train_bad_recipe_exits_2_without_traceback(tmp_path):
    write("bad.yaml", MINIMAL + "adapter: {rr: 8}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "dora_cli.cli", "train", "bad.yaml", "--dry-run"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ['error: bad.yaml: adapter.rr: unknown key (did you mean "r"?)']


def test_a_value_an_override_replaces_is_never_looked_up_in_the_environment():
    """`dora eval CKPT eval.mt_bench.judge_url=null` works without the judge's key its recipe names."""
    write("x.yaml", MINIMAL + "eval: {mt_bench: {judge_url: 'http://u:${env:DORA_TEST_UNSET}@h/v1', "
                              "judge_model: '${env:DORA_TEST_UNSET}'}}\n")
    with pytest.raises(UserError, match="environment variable DORA_TEST_UNSET is not set"):
        load_recipe("x.yaml")
    with pytest.raises(UserError, match="judge_model: environment variable DORA_TEST_UNSET is not set"):
        load_recipe("x.yaml", ["eval.mt_bench.judge_url=null"])  # the other reference is still needed
    recipe = load_recipe("x.yaml", ["eval.mt_bench.judge_url=null", "eval.mt_bench={judge_model: m}"])
    assert recipe.eval.mt_bench.judge_url is None and recipe.eval.mt_bench.judge_model == "m"
    assert "${env:" not in dump_recipe(recipe)
