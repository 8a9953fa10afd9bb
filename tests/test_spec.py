"""The search spec (YAML -> validated objects, errors naming the key) and its Optuna search space."""

from __future__ import annotations

import copy
import io
import math
import re
import sys
import time
import tracemalloc

import optuna
import pytest
import yaml

from vpt_tune.search.space import DefineByRun, make_sampler
from vpt_tune.spec import (
    MAX_SPEC_BYTES, MAX_SPEC_NODES, OBJECTIVES, Param, SearchSpec, SpecError, load_spec, validate,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = {"name": "t", "space": {"num_prompts": {"int": [1, 8]}}}


def _with(**sections) -> dict:
    raw = copy.deepcopy(BASE)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def _error(raw: dict) -> str:
    with pytest.raises(SpecError) as err:
        validate(raw, "my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml:")  # names the file
    return message


def _write(tmp_path, raw, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


# ---------------------------------------------------------------- valid specs


def test_builtin_demo_spec_validates():
    spec = load_spec("demo")
    assert spec.name == "demo"
    assert sorted(spec.objectives) == sorted(OBJECTIVES)
    assert spec.space.searched()  # something is searched
    assert isinstance(spec.space.depth, Param) and spec.space.depth.when == {"placement": ["last_k"]}
    assert load_spec("demo.yaml") == spec


@pytest.mark.parametrize("name, layout, tasks", [("vtab_pc", "vtab-1k", 19), ("fgvc_pc", "fgvc", 5)])
def test_builtin_benchmark_pc_specs(monkeypatch, name, layout, tasks):
    from vpt_tune.data.benchmarks import expand_tasks

    monkeypatch.setenv("VTAB_ROOT", "/data/vtab-1k")
    monkeypatch.setenv("FGVC_ROOT", "/data/fgvc")
    spec = load_spec(f"search_spaces/{name}.yaml")
    assert spec.data.benchmark == layout and len(expand_tasks(layout, spec.data.tasks)) == tasks
    assert spec.backbone.model == "vit_base_patch16_224.augreg_in21k" and spec.backbone.weights == "hub"
    assert spec.method == "vpt" and spec.space.placement == "deep" and spec.condensation.epochs > 0
    assert isinstance(spec.space.condensation_ratio, Param) and max(spec.space.num_prompts.choice) == 200


def test_minimal_spec_gets_defaults():
    spec = validate(copy.deepcopy(BASE))
    assert list(spec.space.searched()) == ["num_prompts"]
    assert spec.space.placement == "deep"
    assert spec.search.sampler in ("tpe", "nsga2", "gp", "random")


def test_spec_file_with_set_overrides(tmp_path):
    path = _write(tmp_path, BASE)
    spec = load_spec(path, [
        "search.trials_per_task=8",
        "train.warmup_epochs=0.5",
        "space.placement={choice: [deep, last_k]}",
        "space.depth=3",
        "data.tasks=[a, b]",
    ])
    assert spec.search.trials_per_task == 8 and isinstance(spec.search.trials_per_task, int)
    assert spec.train.warmup_epochs == 0.5
    assert isinstance(spec.space.placement, Param) and spec.space.placement.choice == ["deep", "last_k"]
    assert spec.space.depth == 3
    assert spec.data.tasks == ["a", "b"]
    assert spec.space.num_prompts.int_range == (1, 8)  # untouched siblings survive
    # the file itself is not modified
    assert yaml.safe_load(path.read_text()) == BASE


def test_env_vars_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("VPT_TEST_ROOT", "/data/vtab")
    monkeypatch.setenv("VPT_TEST_NAME", "run7")
    path = _write(tmp_path, _with(name="x-${VPT_TEST_NAME}", data={"root": "${VPT_TEST_ROOT}/1k"}))
    spec = load_spec(path, ["storage=${VPT_TEST_ROOT}/out"])
    assert spec.data.root == "/data/vtab/1k"
    assert spec.name == "x-run7"
    assert spec.storage == "/data/vtab/out"


# ---------------------------------------------------------------- errors name the key path


def test_unknown_top_level_key():
    assert re.search(r"^my.yaml: bogus: .*Extra inputs", _error(_with(bogus=1)))


def test_unknown_nested_keys():
    assert "train.epochz" in _error(_with(train={"epochz": 3}))
    message = _error(_with(space={"num_prompts": {"int": [1, 8], "lgo": True}}))
    assert "space.num_prompts.lgo" in message


@pytest.mark.parametrize(
    "section, key_path",
    [
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"space": {"num_prompts": "many"}}, "space.num_prompts"),
        ({"search": {"trials_per_task": 0}}, "search.trials_per_task"),
        ({"backbone": {"img_size": [224]}}, "backbone.img_size"),
    ],
)
def test_wrong_type(section, key_path):
    assert key_path in _error(_with(**section))


def test_every_entry_fixed_is_an_empty_space():
    message = _error(_with(space={"num_prompts": 8, "placement": "deep", "base_lr": 1.0}))
    assert "space" in message and "empty" in message


def test_low_above_high():
    message = _error(_with(space={"base_lr": {"float": [2.0, 1.0]}}))
    assert "space.base_lr" in message and "2.0" in message


@pytest.mark.parametrize("low", [0.0, -1.0])
def test_log_range_needs_positive_low(low):
    message = _error(_with(space={"base_lr": {"float": [low, 1.0], "log": True}}))
    assert "space.base_lr" in message and "log" in message


def test_param_needs_exactly_one_kind():
    assert "space.num_prompts" in _error(_with(space={"num_prompts": {"int": [1, 2], "choice": [1]}}))
    assert "space.num_prompts" in _error(_with(space={"num_prompts": {"log": True}}))


def test_unknown_sampler():
    message = _error(_with(search={"sampler": "cmaes"}))
    assert re.search(r"search\b.*sampler", message) and "cmaes" in message
    for name in ("tpe", "nsga2", "gp", "random", "grid"):
        assert name in message  # the fix: the valid names


@pytest.mark.parametrize("placement", ["diagonal", {"choice": ["deep", "diagonal"]}])
def test_unknown_placement(placement):
    message = _error(_with(space={"num_prompts": {"int": [1, 8]}, "placement": placement}))
    assert re.search(r"space\b.*placement", message) and "diagonal" in message


@pytest.mark.parametrize("ref", ["placement", "nonexistent"])
def test_when_must_refer_to_an_earlier_param(ref):
    space = {
        "num_prompts": {"int": [1, 8], "when": {ref: ["deep"]}},
        "placement": {"choice": ["deep", "shallow"]},
    }
    message = _error(_with(space=space))
    assert "num_prompts.when" in message and ref in message


@pytest.mark.parametrize("placement", ["first_k", "last_k", {"choice": ["deep", "first_k"]}])
def test_first_k_last_k_need_depth(placement):
    message = _error(_with(space={"num_prompts": {"int": [1, 8]}, "placement": placement}))
    assert "depth" in message and "placement" in message


def test_layers_placement_needs_layers():
    message = _error(_with(space={"num_prompts": {"int": [1, 8]}, "placement": "layers"}))
    assert "layers" in message


@pytest.mark.parametrize("init", ["kaiming", {"choice": ["uniform", "spt_median"]}])
def test_unknown_prompt_init(init):
    message = _error(_with(space={"num_prompts": {"int": [1, 8]}, "prompt_init": init}))
    assert "prompt_init" in message and "spt_random" in message  # names the valid schemes


@pytest.mark.parametrize("name", ["token_prune_ratio", "segment_prune_ratio", "condensation_ratio"])
@pytest.mark.parametrize("value", [1.0, -0.1, {"float": [0.0, 1.0]}, {"choice": [0.5, 1.5]}])
def test_removal_ratios_must_leave_a_prompt(name, value):
    message = _error(_with(method="e2vpt", space={"num_prompts": {"int": [1, 8]}, name: value}))
    assert f"{name} must lie in [0, 1)" in message


@pytest.mark.parametrize("name", ["token_prune_ratio", "segment_prune_ratio"])
def test_pruning_needs_method_e2vpt(name):
    assert f"space.{name} needs `method: e2vpt`" in _error(_with(space={"num_prompts": 4, name: {"float": [0, 0.5]}}))
    assert validate(_with(method="e2vpt", space={"num_prompts": 4, name: {"float": [0, 0.5]}}))


def test_objectives_must_be_the_supported_ones():
    assert "objectives" in _error(_with(objectives=["val_acc", "latency"]))


@pytest.mark.parametrize("override", ["foo", "=3", "train..epochs=3", ".x=1"])
def test_malformed_set_override(tmp_path, override):
    path = _write(tmp_path, BASE)
    with pytest.raises(SpecError, match=re.escape(f"--set {override!r}")):
        load_spec(path, [override])


def test_set_override_into_a_non_mapping(tmp_path):
    path = _write(tmp_path, BASE)
    with pytest.raises(SpecError, match="'name'"):
        load_spec(path, ["name.x=1"])


def test_set_override_of_an_unknown_key_is_rejected(tmp_path):
    with pytest.raises(SpecError, match="train.epochz"):
        load_spec(_write(tmp_path, BASE), ["train.epochz=3"])


def test_unset_env_var_names_file_variable_and_key(tmp_path, monkeypatch):
    monkeypatch.delenv("VPT_TEST_UNSET_VAR", raising=False)
    path = _write(tmp_path, _with(data={"root": "${VPT_TEST_UNSET_VAR}/vtab"}))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message and "VPT_TEST_UNSET_VAR" in message
    assert "data.root" in message  # the key holding the reference (SpecError: "names the file, the key")


def test_invalid_yaml(tmp_path):
    path = _write(tmp_path, "name: t\nspace: {num_prompts: [1, 2\n")
    with pytest.raises(SpecError, match=re.escape(str(path)) + ".*not valid YAML"):
        load_spec(path)


@pytest.mark.parametrize("content", ["- a\n- b\n", "just a string\n", ""])
def test_non_mapping_yaml(tmp_path, content):
    path = _write(tmp_path, content)
    with pytest.raises(SpecError, match=re.escape(str(path)) + ".*mapping"):
        load_spec(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=re.escape(str(path)) + ".*not found"):
        load_spec(path)
    # A built-in name only stands in for a bare name or search_spaces/<name>, never for a typo'd path.
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "demo.yaml")
    assert load_spec("search_spaces/demo.yaml").name == "demo"


# ---------------------------------------------------------------- the YAML itself: limits, encoding, syntax, keys


def _load_error(tmp_path, content: str | bytes, overrides: list[str] = ()) -> str:
    """The one-line SpecError of loading ``content`` as ``spec.yaml``; it starts with the file's path."""
    path = tmp_path / "spec.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SpecError) as err:
        load_spec(path, overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path) if not overrides else "--set "), message
    return message


def _bomb(levels: int, width: int) -> str:
    """A "billion laughs" mapping: ``l<i>`` lists ``width`` aliases of ``l<i-1>``: width**levels leaves expanded."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_without_expanding_it(tmp_path):
    tracemalloc.start()
    try:
        started = time.monotonic()
        message = _load_error(tmp_path, "name: t\n" + _bomb(10, 10))  # 10**10 leaves: never built, never walked
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # l4 (line 6) is the first anchor past 100,000 nodes (l<i> has 1 + 11...1 nodes): refused there, so the
    # lines after it are never read and nothing is expanded
    assert re.search(r"spec\.yaml:6:\d+: more than 100,000 YAML nodes once aliases \(\*name\) are expanded", message)
    assert "alias *l3 (an alias bomb?)" in message and "copy less through aliases" in message
    assert elapsed < 10 and peak < 50 * 2**20  # generous: it takes milliseconds and kilobytes


def test_node_limit_counts_each_alias_as_a_copy_of_its_anchor(tmp_path):
    # base_lr's choice list `a` holds 1000 nodes; weight_decay's lists 98 aliases of it, then `scalars`
    # values: 99,014 nodes with the 13 of the maps and keys, before those scalars
    def spec(scalars: int) -> str:
        return (f"name: t\nspace: {{num_prompts: 4, base_lr: {{choice: &a [{', '.join(['1'] * 999)}]}}, "
                f"weight_decay: {{choice: [{', '.join(['*a'] * 98 + ['2'] * scalars)}]}}}}\n")

    fill = MAX_SPEC_NODES - 99_014
    spec_at_limit = load_spec(_write(tmp_path, spec(fill)))
    assert len(spec_at_limit.space.weight_decay.choice) == 98 + fill and fill > 0
    assert "more than 100,000 YAML nodes" in _load_error(tmp_path, spec(fill + 1))


def test_anchors_aliases_and_merge_keys_still_load(tmp_path):
    path = _write(tmp_path, """\
name: anchors
space:
  num_prompts: {int: [1, 8]}
  base_lr: &lr {float: [0.01, 1.0], log: true}
  weight_decay: {<<: *lr, log: false, float: [0.0, 0.1]}   # explicit keys override merged ones
  prompt_dropout:
    <<: [{float: [0.0, 0.5]}, {step: 0.1}]
  layers: &blocks [0, 1]
data: {tasks: [digits]}
final: {seeds: *blocks}
train: {epochs: 2, batch_size: 8}
""")
    spec = load_spec(path)
    assert spec.space.base_lr.float_range == (0.01, 1.0) and spec.space.base_lr.log
    assert spec.space.weight_decay.float_range == (0.0, 0.1) and not spec.space.weight_decay.log
    assert spec.space.prompt_dropout.float_range == (0.0, 0.5) and spec.space.prompt_dropout.step == 0.1
    assert spec.space.layers == [0, 1] and spec.final.seeds == [0, 1] and spec.train.epochs == 2


def test_merged_anchor_overriding_merged_keys_is_no_duplicate(tmp_path):
    # `wide` is merged into `space.base_lr` before `wide` itself is constructed: its own `log` must not
    # collide with the `log` it merges from `base`
    path = _write(tmp_path, """\
name: merges
anchors: {base: &base {float: [0.1, 1.0], log: true}, wide: &wide {<<: *base, log: false}}
space: {num_prompts: 4, base_lr: {<<: *wide, float: [0.0, 2.0]}}
""")
    with pytest.raises(SpecError, match="anchors: Extra inputs"):  # parsed: only the unknown key is refused
        load_spec(path)


def test_alias_inside_its_own_anchor_is_refused(tmp_path):
    message = _load_error(tmp_path, "name: t\nspace: &s {num_prompts: *s}\n")
    assert "spec.yaml:2:25: alias *s is inside its own anchor &s (a loop)" in message


@pytest.mark.parametrize(
    "content, line, column",
    [
        ("[" * 10_000, 1, 51),  # flow style: the 51st `[`
        ("name: t\nspace:\n" + "".join(f"{'  ' * (i + 1)}k{i}:\n" for i in range(60)), 52, 101),  # block style
        ("name: t\nspace:\n" + "- " * 5_000 + "x\n", 3, 99),  # the 50th `-` (after the mapping)
    ],
)
def test_deep_nesting_is_refused_before_it_recurses(tmp_path, content, line, column):
    message = _load_error(tmp_path, content)
    assert f"spec.yaml:{line}:{column}: nested deeper than 50 levels, the limit for a spec" in message
    assert "flatten it" in message


def test_fifty_levels_of_nesting_still_parse(tmp_path):
    message = _load_error(tmp_path, "name: t\nspace: {num_prompts: " + "[" * 48 + "1" + "]" * 48 + "}\n")
    assert "space.num_prompts" in message and "nested" not in message  # parsed, then refused by validation


def test_file_over_1_mb_is_refused_unread(tmp_path):
    spec = yaml.safe_dump(BASE)
    exact = spec + "#" * (MAX_SPEC_BYTES - len(spec) - 1) + "\n"
    assert len(exact) == MAX_SPEC_BYTES == 1_000_000 and load_spec(_write(tmp_path, exact)).name == "t"
    message = _load_error(tmp_path, exact + "\n")
    assert message.endswith("spec.yaml: larger than 1,000,000 bytes, the limit for a spec "
                            "(a spec is a few KB: keep data and generated lists out of it)")


def test_invalid_utf8_names_the_byte_offset(tmp_path):
    message = _load_error(tmp_path, b"name: t\nspace: {num_prompts: caf\xe9}\n")
    assert message.endswith("spec.yaml: not UTF-8 text: byte 0xe9 at byte offset 32 (line 2); save the spec as UTF-8")
    assert load_spec(_write(tmp_path, "\ufeff" + yaml.safe_dump(BASE))).name == "t"  # a UTF-8 BOM is fine


def test_control_character_is_refused_with_its_position(tmp_path):
    message = _load_error(tmp_path, "name: t\nspace: {num_prompts: 4\x07}\n")
    assert "spec.yaml:2:23: not valid YAML: character #x0007 is not allowed in YAML: delete it" in message


@pytest.mark.parametrize(
    "content, where, problem",
    [
        ("name: t\nspace: {num_prompts: [1, 2\n", "3:1",
         "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 2)"),
        ("name: t\nspace:\n\tnum_prompts: 3\n", "3:1", "found character '\\t' that cannot start any token"),
        ("name: t: x\n", "1:8", "mapping values are not allowed here"),
        ("name: t\ntrain:\n  epochs: 3\n batch_size: 8\n", "4:2", "expected <block end>"),
        ("name: t\nspace: *nope\n", "2:8", "found undefined alias 'nope'"),
        ("name: t\n---\nname: u\n", "2:1", "but found another document"),
    ],
)
def test_syntax_error_is_one_line_with_line_and_column(tmp_path, content, where, problem):
    message = _load_error(tmp_path, content)
    assert message.startswith(f"{tmp_path / 'spec.yaml'}:{where}: not valid YAML: {problem}"), message


@pytest.mark.parametrize("value", ["2024-13-01", "!!int ten", "!!bool maybe", "!!timestamp soon"])
def test_malformed_typed_scalar_is_a_yaml_error(tmp_path, value):
    message = _load_error(tmp_path, f"name: t\nspace: {{num_prompts: {value}}}\n")
    assert "spec.yaml:2:22: not valid YAML: cannot read" in message and "quote it to keep the text" in message


@pytest.mark.parametrize(
    "content, where, key, first",
    [
        ("name: t\nspace: {num_prompts: 4}\nname: u\n", "3:1", "name", 1),
        ("name: t\nspace:\n  num_prompts: {int: [1, 8]}\n  base_lr: 0.1\n  num_prompts: 4\n", "5:3", "num_prompts", 3),
        ("name: t\nspace: {num_prompts: {int: [1, 8], 'int': [2, 4]}}\n", "2:36", "int", 2),
        ("name: t\nd: &d {a: 1}\nspace: {<<: *d, <<: *d, x: 1, x: 2}\n", "3:31", "x", 3),  # `<<` may repeat
    ],
)
def test_duplicate_keys_are_refused_at_any_level(tmp_path, content, where, key, first):
    message = _load_error(tmp_path, content)
    assert message.startswith(f"{tmp_path / 'spec.yaml'}:{where}: duplicate key {key!r} (first at line {first}); "
                              "YAML would keep only the last: merge the two or delete one"), message


@pytest.mark.parametrize(
    "override, message",
    [
        ("space.num_prompts={int: [1, 8], int: [2, 4]}", ":1:15: duplicate key 'int' (first at line 1)"),
        ("space.layers=" + "[" * 100, ":1:51: nested deeper than 50 levels"),
        ("space.layers=&a [1, *a]", ":1:8: alias *a is inside its own anchor &a"),
        ("data.tasks={" + _bomb(10, 10).replace("\n", ", ") + "}", "more than 100,000 YAML nodes"),
        ("train.epochs=[1, 2", ":1:6: not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ],
)
def test_set_values_get_the_same_guards(tmp_path, override, message):
    error = _load_error(tmp_path, yaml.safe_dump(BASE), [override])
    assert error.startswith(f"--set {override!r}") and message in error, error


def test_stdin_gets_the_same_guards(monkeypatch):
    def load(data: bytes):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        return load_spec("-")

    assert load(yaml.safe_dump(BASE).encode()).name == "t"
    for data, message in [
        (b"name: t\nname: u\n", "<stdin>:2:1: duplicate key 'name'"),
        (b"name: \xff\n", "<stdin>: not UTF-8 text: byte 0xff at byte offset 6 (line 1)"),
        (b"#" * (MAX_SPEC_BYTES + 1), "<stdin>: larger than 1,000,000 bytes"),
        (b"[" * 1000, "<stdin>:1:51: nested deeper than 50 levels"),
    ]:
        with pytest.raises(SpecError) as err:
            load(data)
        assert str(err.value).startswith(message), err.value


# ---------------------------------------------------------------- the Optuna search space


SPACE = {
    "num_prompts": {"int": [1, 200], "log": True},
    "placement": {"choice": ["shallow", "deep", "first_k", "last_k"]},
    "depth": {"int": [1, 12], "when": {"placement": ["first_k", "last_k"]}},
    "base_lr": {"float": [0.05, 50], "log": True},
    "weight_decay": {"choice": [0.0, 0.0001, 0.001, 0.01]},
    "prompt_dropout": {"float": [0.0, 0.5], "step": 0.1},
}


def _ask_many(space: dict, n: int = 200, seed: int = 0):
    spec = validate(_with(space=space))
    sample = DefineByRun(spec.space)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    results = []
    for _ in range(n):
        trial = study.ask()
        fixed = sample(trial)
        results.append((trial, fixed))
    return results


def test_depth_is_sampled_only_for_first_k_and_last_k():
    results = _ask_many(SPACE)
    placements = [trial.params["placement"] for trial, _ in results]
    assert set(placements) == {"shallow", "deep", "first_k", "last_k"}
    for trial, _ in results:
        assert ("depth" in trial.params) == (trial.params["placement"] in ("first_k", "last_k"))
        if "depth" in trial.params:
            assert 1 <= trial.params["depth"] <= 12


def test_ranges_steps_and_fixed_values():
    space = {**SPACE, "weight_decay": 0.001}
    results = _ask_many(space)
    for trial, fixed in results:
        assert fixed == {"weight_decay": 0.001, "prompt_init": "uniform"}
        assert "weight_decay" not in trial.params
        p = trial.params
        assert 1 <= p["num_prompts"] <= 200 and isinstance(p["num_prompts"], int)
        assert 0.05 <= p["base_lr"] <= 50
        assert 0.0 <= p["prompt_dropout"] <= 0.5
        assert math.isclose(p["prompt_dropout"] * 10, round(p["prompt_dropout"] * 10), abs_tol=1e-9)
    assert len({trial.params["prompt_dropout"] for trial, _ in results}) == 6  # 0.0, 0.1, ..., 0.5


def test_log_scale_is_log_uniform():
    results = _ask_many(SPACE, n=300)
    lrs = [trial.params["base_lr"] for trial, _ in results]
    # log-uniform on [0.05, 50]: half the mass below the geometric mean sqrt(0.05*50) ≈ 1.58
    # (a linear-uniform sampler would put ~3 % there)
    below = sum(lr < math.sqrt(0.05 * 50) for lr in lrs) / len(lrs)
    assert 0.38 < below < 0.62
    assert results[0][0].distributions["base_lr"].log
    assert not results[0][0].distributions["prompt_dropout"].log


def test_fixed_placement_last_k_samples_depth():
    space = {"num_prompts": {"int": [1, 8]}, "placement": "last_k",
             "depth": {"int": [1, 4], "when": {"placement": ["last_k"]}}}
    spec_space = validate(_with(space=space)).space
    unsearched = {name: value for name, value in spec_space if value is not None and not isinstance(value, Param)}
    assert unsearched["placement"] == "last_k" and "base_lr" in unsearched  # defaults are fixed values too
    for trial, fixed in _ask_many(space, n=20):
        # every unsearched entry comes back with its value, none is suggested
        assert fixed == unsearched
        assert set(trial.params) == {"num_prompts", "depth"}
        assert 1 <= trial.params["depth"] <= 4


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize(
    "name, cls",
    [
        ("tpe", optuna.samplers.TPESampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("gp", optuna.samplers.GPSampler),
        ("random", optuna.samplers.RandomSampler),
    ],
)
def test_make_sampler(name, cls):
    assert type(make_sampler(SearchSpec(sampler=name, seed=3))) is cls
    # seeded: two studies with the same seed propose the same first configs
    firsts = []
    for _ in range(2):
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=make_sampler(SearchSpec(sampler=name, seed=3)))
        firsts.append([study.ask().suggest_float("x", 0.0, 1.0) for _ in range(3)])
    assert firsts[0] == firsts[1]


def test_grid_sampler_walks_the_whole_product_once():
    space = {"num_prompts": {"choice": [1, 5]}, "base_lr": {"choice": [0.1, 1.0, 10.0]}, "weight_decay": 0.0}
    spec = validate(_with(space=space, search={"sampler": "grid", "trials_per_task": 6, "seed": 1}))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(spec.search, spec.space))
    seen = set()
    for _ in range(6):
        trial = study.ask()
        DefineByRun(spec.space)(trial)
        seen.add((trial.params["num_prompts"], trial.params["base_lr"]))
        study.tell(trial, [0.5, 1.0])
    assert seen == {(p, lr) for p in (1, 5) for lr in (0.1, 1.0, 10.0)}  # every point exactly once
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)  # the last one too


@pytest.mark.parametrize("entry", [{"float": [0.1, 1.0]}, {"choice": [0.1, 1.0], "when": {"num_prompts": [1]}}])
def test_grid_sampler_needs_plain_choices(entry):
    space = {"num_prompts": {"choice": [1, 5]}, "base_lr": entry}
    message = _error(_with(space=space, search={"sampler": "grid"}))
    assert "grid" in message and "space.base_lr" in message


def test_builtin_vpt_grid_spec(monkeypatch):
    monkeypatch.setenv("VTAB_ROOT", "/data/vtab-1k")
    spec = load_spec("search_spaces/vpt_grid.yaml")
    size = math.prod(len(p.choice) for p in spec.space.searched().values())
    assert spec.search.sampler == "grid" and size == spec.search.trials_per_task == 120
    assert spec.space.base_lr.choice == [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05]


@pytest.mark.parametrize("section, key, moved", [("train", "condense_epochs", "condensation.epochs"),
                                                 ("train", "condense_per_block", "condensation.per_block"),
                                                 ("train", "prune_epochs", "e2vpt.prune_epochs")])
def test_keys_that_moved_into_a_method_section_say_where(section, key, moved):
    with pytest.raises(SpecError, match=rf"^old\.yaml: {section}\.{key} is now {moved}: move it there$"):
        validate({"name": "t", "space": {"num_prompts": {"int": [1, 8]}}, section: {key: 1}}, "old.yaml")


def test_every_method_section_and_space_entry_comes_from_the_registry():
    from vpt_tune.methods import METHODS
    from vpt_tune.spec import Space, Spec

    for method in METHODS.values():
        assert set(method.space) <= set(Space.model_fields), method.name
        assert (method.name in Spec.model_fields) == (method.options is not None), method.name


def test_reference_points_are_listed_by_name_with_their_own_lr_grid():
    base = {"name": "t", "space": {"num_prompts": {"int": [1, 8]}}}
    spec = validate({**base, "search": {"references": ["linear", "full"]}, "full": {"base_lrs": [0.001]}})
    assert spec.search.references == ["linear", "full"] and spec.full.base_lrs == [0.001]
    assert spec.linear.base_lrs  # a default grid
    with pytest.raises(SpecError, match=r"search\.references: .*unknown reference 'lora'; choose among linear, ssf, full"):
        validate({**base, "search": {"references": ["lora"]}})
    with pytest.raises(SpecError, match="a reference is listed twice"):
        validate({**base, "search": {"references": ["ssf", "ssf"]}})
    assert validate({**base, "ssf": {"base_lrs": [0.1]}}).search.references == []  # a grid kept, the point off


@pytest.mark.parametrize("name", ["demo", "demo_asha", "demo_e2vpt", "demo_pc", "demo_vfpt", "demo_cvpt", "e2vpt",
                                  "vtab_pc", "fgvc_pc", "vpt_grid"])
def test_a_spec_survives_the_trip_to_its_trials(name, monkeypatch):
    """Trial drivers validate the spec again from its JSON, every default then written out."""
    monkeypatch.setenv("VTAB_ROOT", "/data/vtab-1k")
    monkeypatch.setenv("FGVC_ROOT", "/data/fgvc")
    spec = load_spec(name)
    assert type(spec).model_validate_json(spec.model_dump_json(by_alias=True)) == spec
